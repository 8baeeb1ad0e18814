// CUDA kernels of the fusedopt ops: the math of optimizer_math.h over every row of a
// call in one launch, reading each row's param and grad where they live (see
// row_walk.cuh and segment_table.h).
//
// A step is two launches on the current stream:
//   1. a prepare kernel, one thread per row, that advances the row's step counter and
//      writes the row's coefficients (bias corrections, the scheduled lr and betas, SGD's
//      first-step flag) to a scratch table;
//   2. the update kernel, whose warps read the coefficients of the rows they own.
// [note: why a prepare kernel] Every block needs the step of its rows before or after
// the increment, never a mix; stream order gives that for free, where a single kernel
// would need a grid-wide barrier. It also computes the double-precision powers once
// per row instead of once per warp. When found_inf is set both kernels write nothing
// but, with zero_grads, the zeroed grads (as the CPU kernels), and the host never
// reads found_inf.
#include "optimizer_math.h"
#include "row_walk.cuh"
#include "segment_table.h"
#include "state_buffers.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

namespace fusedopt {
namespace cuda {
namespace {

// ---------------------------------------------------------------------------------
// Launch geometry

// Resident blocks of `kernel` on one SM; asked once per kernel, as all visible devices
// of a process are normally of one kind.
template <auto kernel>
int resident_blocks_per_sm() {
  static const int blocks = [] {
    int resident = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, kThreadsPerBlock, 0));
    return std::max(resident, 1);
  }();
  return blocks;
}

// Returns the grid size: what the device holds at once (one wave; each warp then owns
// one contiguous range, see row_walk.cuh), or less when there is little work. Sets the
// walk's range per warp to match.
int shape_launch(RowWalk& walk, int blocks_per_sm) {
  const int64_t granules = (walk.space + kWarpRangeGranule - 1) / kWarpRangeGranule;
  const int64_t max_blocks =
      static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * blocks_per_sm;
  const int64_t wanted_blocks = (granules + kWarpsPerBlock - 1) / kWarpsPerBlock;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min(max_blocks, wanted_blocks)));
  const int64_t warps = static_cast<int64_t>(blocks) * kWarpsPerBlock;
  walk.per_warp = std::max<int64_t>(1, (granules + warps - 1) / warps) * kWarpRangeGranule;
  return blocks;
}

int prepare_blocks(int64_t num_segments) {
  return static_cast<int>((num_segments + kThreadsPerBlock - 1) / kThreadsPerBlock);
}

// ---------------------------------------------------------------------------------
// Kernels

struct GradTransform {
  ScalarArg grad_scale;
  ScalarArg grad_multiplier;
  bool maximize;
};

template <typename opmath_t>
C10_DEVICE EffectiveGrad<opmath_t> effective_grad_of(const GradTransform& t) {
  EffectiveGrad<opmath_t> e;
  e.scale = static_cast<opmath_t>(t.grad_scale.value_or(1.0));
  e.multiplier = static_cast<opmath_t>(t.grad_multiplier.value_or(1.0));
  e.has_scale = t.grad_scale.present();
  e.has_multiplier = t.grad_multiplier.present();
  e.maximize = t.maximize;
  return e;
}

struct AdamHyper {
  double lr, beta1, beta2, weight_decay, eps;
  bool decoupled_weight_decay;
};

// The `scheduled` tensor's values (ops.cpp), read on the device: Adam lr, beta1,
// beta2; SGD lr, momentum. Absent: the floats.
struct Scheduled {
  ScalarArg value[3];
};

template <typename opmath_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
adam_prepare_kernel(const int64_t* __restrict__ segments, int64_t num_segments, float* __restrict__ step,
                    AdamHyper hyper, Scheduled scheduled, ScalarArg found_inf,
                    AdamCoefficients<opmath_t>* __restrict__ coefficients) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= num_segments || found_inf.is_set()) return;
  float& counter = step[segments[r * kSegmentColumns + kParamIndex]];
  counter += 1.0f;  // in float32, as torch.optim's step tensor
  coefficients[r] = adam_coefficients<opmath_t>(scheduled.value[0].value_or(hyper.lr),
                                                scheduled.value[1].value_or(hyper.beta1),
                                                scheduled.value[2].value_or(hyper.beta2), hyper.weight_decay, hyper.eps,
                                                hyper.decoupled_weight_decay, static_cast<double>(counter));
}

template <typename scalar_t, typename state_t>
struct AdamBuffers {  // the state buffers; params are found through the walk (row_param)
  float* master;  // the float32 master copy, or nullptr
  state_t* exp_avg;
  state_t* exp_avg_sq;
  state_t* max_exp_avg_sq;
  bool aligned;  // every base pointer is 16-byte aligned
};

template <typename scalar_t, typename state_t, bool amsgrad, bool kMaster>
__global__ void __launch_bounds__(kThreadsPerBlock)
adam_kernel(AdamBuffers<scalar_t, state_t> buffers, RowWalk walk,
            const AdamCoefficients<at::opmath_type<scalar_t>>* __restrict__ coefficients,
            GradTransform transform, ScalarArg found_inf, bool zero_grads, RoundingArg rounding) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kStates = amsgrad ? 3 : 2;
  if (found_inf.is_set()) {
    if (zero_grads) zero_owned_grads<scalar_t>(walk);
    return;
  }
  const EffectiveGrad<opmath_t> grad_of = effective_grad_of<opmath_t>(transform);
  for_each_owned_row<scalar_t>(walk, [&](int64_t row, int64_t flat_offset, int64_t j0, int64_t j1,
                                         const GradRef<scalar_t>& grad) {
    const AdamCoefficients<opmath_t> c = coefficients[row];
    RowState<scalar_t, state_t, kStates> state;
    state.param = row_param<scalar_t>(walk, row, flat_offset);
    state.master = kMaster ? buffers.master + flat_offset : nullptr;
    state.state[0] = buffers.exp_avg + flat_offset;
    state.state[1] = buffers.exp_avg_sq + flat_offset;
    if constexpr (amsgrad) state.state[2] = buffers.max_exp_avg_sq + flat_offset;
    update_row_elements<scalar_t, state_t, kMaster>(
        state, flat_offset, grad, j0, j1, buffers.aligned, zero_grads, rounding,
        [&](opmath_t& p, opmath_t (&v)[kStates], opmath_t g) {
          if constexpr (amsgrad) {
            adam_update<true>(p, grad_of(g), v[0], v[1], v[2], c);
          } else {
            opmath_t unused_max_exp_avg_sq = 0;
            adam_update<false>(p, grad_of(g), v[0], v[1], unused_max_exp_avg_sq, c);
          }
        });
  });
}

template <typename opmath_t>
struct SgdRowCoefficients {
  SgdCoefficients<opmath_t> c;
  bool first_step;
};

struct SgdHyper {
  double lr, momentum, dampening, weight_decay;
};

template <typename opmath_t>
__global__ void __launch_bounds__(kThreadsPerBlock)
sgd_prepare_kernel(const int64_t* __restrict__ segments, int64_t num_segments, float* __restrict__ step,
                   SgdHyper hyper, Scheduled scheduled, ScalarArg found_inf,
                   SgdRowCoefficients<opmath_t>* __restrict__ coefficients) {
  const int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (r >= num_segments || found_inf.is_set()) return;
  float& counter = step[segments[r * kSegmentColumns + kParamIndex]];
  const double momentum = scheduled.value[1].value_or(hyper.momentum);
  coefficients[r] = {sgd_coefficients<opmath_t>(scheduled.value[0].value_or(hyper.lr), momentum,
                                                hyper.dampening, hyper.weight_decay),
                     counter == 0.0f};
  // The counter records a started momentum buffer: a step without momentum starts none.
  if (momentum != 0.0) counter += 1.0f;
}

template <typename scalar_t, typename state_t>
struct SgdBuffers {  // the state buffers; params are found through the walk (row_param)
  float* master;  // the float32 master copy, or nullptr
  state_t* momentum_buffer;
  bool aligned;
};

template <typename scalar_t, typename state_t, bool has_momentum, bool nesterov, bool kMaster>
__global__ void __launch_bounds__(kThreadsPerBlock)
sgd_kernel(SgdBuffers<scalar_t, state_t> buffers, RowWalk walk,
           const SgdRowCoefficients<at::opmath_type<scalar_t>>* __restrict__ coefficients,
           GradTransform transform, ScalarArg found_inf, bool zero_grads, RoundingArg rounding) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kStates = has_momentum ? 1 : 0;
  if (found_inf.is_set()) {
    if (zero_grads) zero_owned_grads<scalar_t>(walk);
    return;
  }
  const EffectiveGrad<opmath_t> grad_of = effective_grad_of<opmath_t>(transform);
  for_each_owned_row<scalar_t>(walk, [&](int64_t row, int64_t flat_offset, int64_t j0, int64_t j1,
                                         const GradRef<scalar_t>& grad) {
    const SgdRowCoefficients<opmath_t> rc = coefficients[row];
    RowState<scalar_t, state_t, kStates> state;
    state.param = row_param<scalar_t>(walk, row, flat_offset);
    state.master = kMaster ? buffers.master + flat_offset : nullptr;
    if constexpr (has_momentum) state.state[0] = buffers.momentum_buffer + flat_offset;
    update_row_elements<scalar_t, state_t, kMaster>(
        state, flat_offset, grad, j0, j1, buffers.aligned, zero_grads, rounding,
        [&](opmath_t& p, opmath_t (&v)[kStates > 0 ? kStates : 1], opmath_t g) {
          if constexpr (has_momentum) {
            sgd_update<true, nesterov>(p, grad_of(g), v[0], rc.first_step, rc.c);
          } else {
            opmath_t unused_momentum_buffer = 0;
            sgd_update<false, false>(p, grad_of(g), unused_momentum_buffer, rc.first_step, rc.c);
          }
        });
  });
}

enum class NormKind { kOne, kTwo, kInf, kPower };

// Partials are accumulated in double for every dtype, as the CPU kernel does: float
// sums of squares of a billion elements lose digits, and on the GPUs this targets
// double adds are far from the bottleneck of a memory-bound pass.
template <NormKind kind>
C10_DEVICE inline double norm_combine(double acc, double term) {
  return kind == NormKind::kInf ? opmath_maximum(acc, term) : acc + term;
}

template <NormKind kind>
C10_DEVICE inline double norm_term(double g, double p) {
  const double a = ::fabs(g);
  switch (kind) {
    case NormKind::kOne: return a;
    case NormKind::kTwo: return g * g;
    case NormKind::kInf: return a;
    default: return ::pow(a, p);
  }
}

template <NormKind kind>
C10_DEVICE inline double block_combine(double value) {
  __shared__ double warp_values[kWarpsPerBlock];
  for (int delta = kWarpSize / 2; delta > 0; delta /= 2)
    value = norm_combine<kind>(value, __shfl_down_sync(0xffffffffu, value, delta));
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  if (lane == 0) warp_values[warp] = value;
  __syncthreads();
  if (warp == 0) {
    value = lane < kWarpsPerBlock ? warp_values[lane] : 0.0;
    for (int delta = kWarpSize / 2; delta > 0; delta /= 2)
      value = norm_combine<kind>(value, __shfl_down_sync(0xffffffffu, value, delta));
  }
  return value;  // valid in thread 0
}

template <typename scalar_t, NormKind kind>
__global__ void __launch_bounds__(kThreadsPerBlock)
grad_norm_partial_kernel(RowWalk walk, double p, double* __restrict__ partials) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = Pack<scalar_t>::kSize;
  const int lane = threadIdx.x % kWarpSize;
  double acc = 0.0;
  for_each_owned_row<scalar_t>(walk, [&](int64_t, int64_t, int64_t j0, int64_t j1,
                                         const GradRef<scalar_t>& grad) {
    int64_t scalar_begin = j0;
    if (grad.shape == nullptr && is_pack_aligned(grad.data + j0)) {
      scalar_begin = j0 + (j1 - j0) / kVec * kVec;
      for (int64_t j = j0 + int64_t(lane) * kVec; j < scalar_begin; j += int64_t(kWarpSize) * kVec) {
        const Pack<scalar_t> pack = *reinterpret_cast<const Pack<scalar_t>*>(grad.data + j);
#pragma unroll
        for (int k = 0; k < kVec; ++k)
          acc = norm_combine<kind>(acc, norm_term<kind>(static_cast<opmath_t>(pack.v[k]), p));
      }
    }
    for (int64_t j = scalar_begin + lane; j < j1; j += kWarpSize)
      acc = norm_combine<kind>(acc, norm_term<kind>(static_cast<opmath_t>(grad.data[grad.offset(j)]), p));
  });
  const double block_value = block_combine<kind>(acc);
  if (threadIdx.x == 0) partials[blockIdx.x] = block_value;
}

// Folds the per-block partials in a fixed order (the result does not depend on
// scheduling) and takes the root.
template <typename out_t, NormKind kind>
__global__ void __launch_bounds__(kThreadsPerBlock)
grad_norm_finish_kernel(const double* __restrict__ partials, int num_partials, double p,
                        out_t* __restrict__ out) {
  double acc = 0.0;
  for (int i = threadIdx.x; i < num_partials; i += blockDim.x) acc = norm_combine<kind>(acc, partials[i]);
  acc = block_combine<kind>(acc);
  if (threadIdx.x != 0) return;
  double norm;
  switch (kind) {
    case NormKind::kOne: norm = acc; break;
    case NormKind::kTwo: norm = ::sqrt(acc); break;
    case NormKind::kInf: norm = acc; break;
    default: norm = ::pow(acc, 1.0 / p); break;
  }
  *out = static_cast<out_t>(norm);
}

// ---------------------------------------------------------------------------------
// Host side

// Turns an optional scalar tensor into a kernel argument. Device tensors are read by
// the kernels (no sync); a CPU tensor is read here, which costs no sync either.
// Dtypes other than float32/float64 are converted on the device first; the converted
// tensor joins `keep_alive` until the kernels are enqueued.
ScalarArg scalar_arg(const std::optional<at::Tensor>& tensor, const at::Device& device, const char* name,
                     std::vector<at::Tensor>& keep_alive) {
  ScalarArg arg;
  if (!tensor.has_value()) return arg;
  TORCH_CHECK(tensor->numel() == 1, "fusedopt: ", name, " must have one element, got ", tensor->numel());
  if (tensor->is_cpu()) {
    arg.kind = ScalarArg::kHostValue;
    arg.host_value = tensor->item<double>();
    return arg;
  }
  TORCH_CHECK(tensor->device() == device, "fusedopt: ", name, " is on ", tensor->device(),
              " but the buffers are on ", device);
  at::Tensor value = *tensor;
  if (value.scalar_type() != at::kFloat && value.scalar_type() != at::kDouble) {
    value = value.to(at::kDouble);
    keep_alive.push_back(value);
  }
  arg.kind = value.scalar_type() == at::kFloat ? ScalarArg::kDeviceFloat : ScalarArg::kDeviceDouble;
  arg.ptr = value.const_data_ptr();
  return arg;
}

bool is_16_byte_aligned(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

void check_float_dtype(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "fusedopt: ", name, " must be float32, float64, float16 or bfloat16, got ", dtype);
}

// The seed of stochastic rounding: read by the kernels on the device (no sync), or
// passed by value from a CPU tensor.
RoundingArg rounding_arg(const std::optional<at::Tensor>& rounding_seed, const at::Device& device,
                         bool has_master) {
  RoundingArg arg;
  if (!rounding_seed.has_value()) return arg;
  TORCH_CHECK(rounding_seed->numel() == 1 && rounding_seed->scalar_type() == at::kLong,
              "fusedopt: rounding_seed must be one int64");
  TORCH_CHECK(!has_master, "fusedopt: stochastic rounding and master_param exclude each other "
                           "(the param is the master's rounding to nearest)");
  arg.stochastic = true;
  if (rounding_seed->is_cpu()) {
    arg.seed = rounding_seed->item<int64_t>();
  } else {
    TORCH_CHECK(rounding_seed->device() == device, "fusedopt: rounding_seed is on ", rounding_seed->device(),
                " but the buffers are on ", device);
    arg.seed_ptr = rounding_seed->const_data_ptr<int64_t>();
  }
  return arg;
}

// Calls f with std::true_type when there is a master copy (bfloat16/float16 params only).
template <typename scalar_t, typename F>
void dispatch_master(bool has_master, const F& f) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>) {
    if (has_master) return f(std::true_type{});
  }
  f(std::false_type{});
}

// The params' dtype and device, checked with step, segments and the grads' dtypes. The
// rows' extent is on the device: state buffers are checked against the first one's
// size (the optimizers size them all alike).
void check_param_step_segments(at::TensorList params, const at::Tensor& step, at::TensorList grads,
                               const at::Tensor& segments) {
  TORCH_CHECK(!params.empty(), "fusedopt: expected at least one param");
  const at::Tensor& param = params[0];
  TORCH_CHECK(param.is_cuda(), "fusedopt: params must be CUDA tensors");
  check_float_dtype(param, "param");
  for (size_t i = 0; i < params.size(); ++i)
    TORCH_CHECK(params[i].scalar_type() == param.scalar_type() && params[i].device() == param.device() &&
                    params[i].is_contiguous(),
                "fusedopt: param ", i, " must be a contiguous ", param.scalar_type(), " tensor on ",
                param.device());
  TORCH_CHECK(step.device() == param.device() && step.scalar_type() == at::kFloat && step.dim() == 1 &&
                  step.is_contiguous(),
              "fusedopt: step must be a 1-D float32 tensor of per-parameter counters on the param's device");
  TORCH_CHECK(segments.device() == param.device() && segments.scalar_type() == at::kLong &&
                  segments.dim() == 2 && segments.size(1) == kSegmentColumns && segments.is_contiguous(),
              "fusedopt: segments must be a contiguous int64 [n, ", int64_t(kSegmentColumns),
              "] tensor on the param's device");
  for (size_t i = 0; i < grads.size(); ++i)
    TORCH_CHECK(grads[i].scalar_type() == param.scalar_type(), "fusedopt: grad ", i, " is ",
                grads[i].scalar_type(), " but its param is ", param.scalar_type());
}

// What both step ops take besides their buffers: the optional scalars as kernel
// arguments (with any converted copies kept alive until the kernels are enqueued) and
// the plan for reading the grads.
struct StepInputs {
  std::vector<at::Tensor> keep_alive;
  ScalarArg found_inf, grad_scale, grad_multiplier;
  Scheduled scheduled;
  GradsPlan plan;
};

StepInputs step_inputs(at::TensorList params, at::TensorList grads, const at::Tensor& segments,
                       const std::optional<at::Tensor>& scheduled, int64_t num_scheduled,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf,
                       const std::optional<at::Tensor>& grad_multiplier, bool zero_grads) {
  StepInputs inputs;
  const at::Tensor& param = params[0];
  inputs.found_inf = scalar_arg(found_inf, param.device(), "found_inf", inputs.keep_alive);
  if (scheduled.has_value()) {
    TORCH_CHECK(scheduled->numel() == num_scheduled, "fusedopt: scheduled must hold ", num_scheduled,
                " values, got ", scheduled->numel());
    for (int64_t i = 0; i < num_scheduled; ++i)
      inputs.scheduled.value[i] = scalar_arg(scheduled->reshape({-1})[i], param.device(), "scheduled",
                                             inputs.keep_alive);
  }
  inputs.grad_scale = scalar_arg(grad_scale, param.device(), "grad_scale", inputs.keep_alive);
  inputs.grad_multiplier = scalar_arg(grad_multiplier, param.device(), "grad_multiplier", inputs.keep_alive);
  inputs.plan = plan_rows(params, grads, segments, zero_grads);
  return inputs;
}

void adam_step_cuda(at::TensorList params, at::Tensor& exp_avg, at::Tensor& exp_avg_sq,
                    const std::optional<at::Tensor>& max_exp_avg_sq, at::Tensor& step, at::TensorList grads,
                    const at::Tensor& segments, double lr, const std::optional<at::Tensor>& scheduled,
                    double beta1, double beta2, double weight_decay, double eps, bool decoupled_weight_decay,
                    bool maximize, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_multiplier,
                    bool zero_grads, const std::optional<at::Tensor>& master_param,
                    const std::optional<at::Tensor>& rounding_seed) {
  check_param_step_segments(params, step, grads, segments);
  const at::Tensor& param = params[0];
  const at::ScalarType state_dtype = check_state_dtype(exp_avg, param.scalar_type());
  const int64_t extent = exp_avg.numel();
  check_flat(exp_avg, param.device(), state_dtype, extent, "exp_avg");
  check_flat(exp_avg_sq, param.device(), state_dtype, extent, "exp_avg_sq");
  const bool amsgrad = max_exp_avg_sq.has_value();
  if (amsgrad) check_flat(*max_exp_avg_sq, param.device(), state_dtype, extent, "max_exp_avg_sq");
  float* master = check_master(master_param, param.scalar_type(), param.device(), extent);
  const RoundingArg rounding = rounding_arg(rounding_seed, param.device(), master != nullptr);
  const c10::cuda::CUDAGuard guard(param.device());
  const int64_t num_segments = segments.size(0);
  if (num_segments == 0) return;

  StepInputs inputs = step_inputs(params, grads, segments, scheduled, 3, grad_scale, found_inf,
                                  grad_multiplier, zero_grads);
  GradsPlan& plan = inputs.plan;  // shape_launch sizes the walk to the grid
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "fusedopt::adam_step_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    at::Tensor coefficients =
        at::empty({num_segments * static_cast<int64_t>(sizeof(AdamCoefficients<opmath_t>))},
                  param.options().dtype(at::kByte));
    auto* coefficients_ptr = reinterpret_cast<AdamCoefficients<opmath_t>*>(coefficients.data_ptr());
    adam_prepare_kernel<opmath_t><<<prepare_blocks(num_segments), kThreadsPerBlock, 0, stream>>>(
        plan.walk.segments, num_segments, step.data_ptr<float>(),
        AdamHyper{lr, beta1, beta2, weight_decay, eps, decoupled_weight_decay}, inputs.scheduled, inputs.found_inf,
        coefficients_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (plan.walk.space == 0) return;
    const GradTransform transform{inputs.grad_scale, inputs.grad_multiplier, maximize};
    dispatch_state_dtype<scalar_t>(state_dtype, [&](auto* state_tag) {
      using state_t = std::remove_pointer_t<decltype(state_tag)>;
      state_t* max_ptr = amsgrad ? max_exp_avg_sq->data_ptr<state_t>() : nullptr;
      const bool aligned = is_16_byte_aligned(exp_avg.data_ptr()) && is_16_byte_aligned(exp_avg_sq.data_ptr()) &&
                           (!amsgrad || is_16_byte_aligned(max_ptr)) && (master == nullptr || is_16_byte_aligned(master));
      const AdamBuffers<scalar_t, state_t> buffers{master, exp_avg.data_ptr<state_t>(), exp_avg_sq.data_ptr<state_t>(),
                                                   max_ptr, aligned};
      auto launch = [&](auto amsgrad_tag, auto master_tag) {
        constexpr auto kernel =
            adam_kernel<scalar_t, state_t, decltype(amsgrad_tag)::value, decltype(master_tag)::value>;
        const int blocks = shape_launch(plan.walk, resident_blocks_per_sm<kernel>());
        kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(buffers, plan.walk, coefficients_ptr, transform,
                                                        inputs.found_inf, zero_grads, rounding);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      dispatch_master<scalar_t>(master != nullptr, [&](auto master_tag) {
        amsgrad ? launch(std::true_type{}, master_tag) : launch(std::false_type{}, master_tag);
      });
    });
  });
}

void sgd_step_cuda(at::TensorList params, const std::optional<at::Tensor>& momentum_buffer, at::Tensor& step,
                   at::TensorList grads, const at::Tensor& segments, double lr,
                   const std::optional<at::Tensor>& scheduled, double momentum, double dampening,
                   double weight_decay, bool nesterov, bool maximize, const std::optional<at::Tensor>& grad_scale,
                   const std::optional<at::Tensor>& found_inf, const std::optional<at::Tensor>& grad_multiplier,
                   bool zero_grads, const std::optional<at::Tensor>& master_param,
                   const std::optional<at::Tensor>& rounding_seed) {
  check_param_step_segments(params, step, grads, segments);
  const at::Tensor& param = params[0];
  const bool has_momentum = momentum_buffer.has_value();
  const at::ScalarType state_dtype =
      has_momentum ? check_state_dtype(*momentum_buffer, param.scalar_type()) : param.scalar_type();
  const int64_t extent = has_momentum ? momentum_buffer->numel() : 0;
  if (has_momentum) check_flat(*momentum_buffer, param.device(), state_dtype, extent, "momentum_buffer");
  float* master = check_master(master_param, param.scalar_type(), param.device(),
                               has_momentum ? extent : (master_param ? master_param->numel() : 0));
  const RoundingArg rounding = rounding_arg(rounding_seed, param.device(), master != nullptr);
  const c10::cuda::CUDAGuard guard(param.device());
  const int64_t num_segments = segments.size(0);
  if (num_segments == 0) return;

  StepInputs inputs = step_inputs(params, grads, segments, scheduled, 2, grad_scale, found_inf,
                                  grad_multiplier, zero_grads);
  GradsPlan& plan = inputs.plan;  // shape_launch sizes the walk to the grid
  const auto stream = at::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, param.scalar_type(), "fusedopt::sgd_step_", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    at::Tensor coefficients =
        at::empty({num_segments * static_cast<int64_t>(sizeof(SgdRowCoefficients<opmath_t>))},
                  param.options().dtype(at::kByte));
    auto* coefficients_ptr = reinterpret_cast<SgdRowCoefficients<opmath_t>*>(coefficients.data_ptr());
    sgd_prepare_kernel<opmath_t><<<prepare_blocks(num_segments), kThreadsPerBlock, 0, stream>>>(
        plan.walk.segments, num_segments, step.data_ptr<float>(),
        SgdHyper{lr, momentum, dampening, weight_decay}, inputs.scheduled, inputs.found_inf, coefficients_ptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (plan.walk.space == 0) return;
    const GradTransform transform{inputs.grad_scale, inputs.grad_multiplier, maximize};
    auto launch = [&](auto* state_tag, auto momentum_tag, auto nesterov_tag, auto master_tag) {
      using state_t = std::remove_pointer_t<decltype(state_tag)>;
      state_t* buffer_ptr = has_momentum ? momentum_buffer->data_ptr<state_t>() : nullptr;
      const SgdBuffers<scalar_t, state_t> buffers{
          master, buffer_ptr,
          (!has_momentum || is_16_byte_aligned(buffer_ptr)) && (master == nullptr || is_16_byte_aligned(master))};
      constexpr auto kernel = sgd_kernel<scalar_t, state_t, decltype(momentum_tag)::value,
                                         decltype(nesterov_tag)::value, decltype(master_tag)::value>;
      const int blocks = shape_launch(plan.walk, resident_blocks_per_sm<kernel>());
      kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(buffers, plan.walk, coefficients_ptr, transform,
                                                      inputs.found_inf, zero_grads, rounding);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    dispatch_master<scalar_t>(master != nullptr, [&](auto master_tag) {
      if (!has_momentum) {
        launch(static_cast<scalar_t*>(nullptr), std::false_type{}, std::false_type{}, master_tag);
        return;
      }
      dispatch_state_dtype<scalar_t>(state_dtype, [&](auto* state_tag) {
        if (nesterov) launch(state_tag, std::true_type{}, std::true_type{}, master_tag);
        else launch(state_tag, std::true_type{}, std::false_type{}, master_tag);
      });
    });
  });
}

at::Tensor grad_norm_cuda(at::TensorList grads, const at::Tensor& segments, double norm_type) {
  TORCH_CHECK(!grads.empty(), "fusedopt: grad_norm needs at least one grad");
  TORCH_CHECK(norm_type > 0.0, "fusedopt: norm_type must be positive, got ", norm_type);
  TORCH_CHECK(segments.is_cuda() && segments.scalar_type() == at::kLong && segments.dim() == 2 &&
                  segments.size(1) == kSegmentColumns && segments.is_contiguous(),
              "fusedopt: segments must be a contiguous int64 [n, ", int64_t(kSegmentColumns),
              "] CUDA tensor");
  const auto dtype = grads[0].scalar_type();
  check_float_dtype(grads[0], "grads");
  for (size_t i = 0; i < grads.size(); ++i)
    TORCH_CHECK(grads[i].scalar_type() == dtype, "fusedopt: grad ", i, " is ", grads[i].scalar_type(),
                ", grad 0 ", dtype);
  const c10::cuda::CUDAGuard guard(segments.device());
  const auto out_options = segments.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat);
  if (segments.size(0) == 0) return at::zeros({}, out_options);

  GradsPlan plan = plan_rows({}, grads, segments, /*zero_grads=*/false);
  if (plan.walk.space == 0) return at::zeros({}, out_options);
  const auto stream = at::cuda::getCurrentCUDAStream();
  at::Tensor out = at::empty({}, out_options);
  const NormKind kind = std::isinf(norm_type) ? NormKind::kInf
                        : norm_type == 1.0    ? NormKind::kOne
                        : norm_type == 2.0    ? NormKind::kTwo
                                              : NormKind::kPower;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "fusedopt::grad_norm", [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    auto run = [&](auto kind_tag) {
      constexpr NormKind kKind = decltype(kind_tag)::value;
      constexpr auto partial_kernel = grad_norm_partial_kernel<scalar_t, kKind>;
      const int blocks = shape_launch(plan.walk, resident_blocks_per_sm<partial_kernel>());
      at::Tensor partials = at::empty({blocks}, segments.options().dtype(at::kDouble));
      partial_kernel<<<blocks, kThreadsPerBlock, 0, stream>>>(plan.walk, norm_type,
                                                              partials.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      grad_norm_finish_kernel<out_t, kKind><<<1, kThreadsPerBlock, 0, stream>>>(
          partials.data_ptr<double>(), blocks, norm_type, out.data_ptr<out_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    switch (kind) {
      case NormKind::kOne: run(std::integral_constant<NormKind, NormKind::kOne>{}); break;
      case NormKind::kTwo: run(std::integral_constant<NormKind, NormKind::kTwo>{}); break;
      case NormKind::kInf: run(std::integral_constant<NormKind, NormKind::kInf>{}); break;
      case NormKind::kPower: run(std::integral_constant<NormKind, NormKind::kPower>{}); break;
    }
  });
  return out;
}

}  // namespace
}  // namespace cuda
}  // namespace fusedopt

TORCH_LIBRARY_IMPL(fusedopt, CUDA, m) {
  m.impl("adam_step_", &fusedopt::cuda::adam_step_cuda);
  m.impl("sgd_step_", &fusedopt::cuda::sgd_step_cuda);
  m.impl("grad_norm", &fusedopt::cuda::grad_norm_cuda);
}
