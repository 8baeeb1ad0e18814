// How the CUDA kernels find their work: which rows of the segment table (and which
// elements of them) a warp owns, where each row's grad lives, and how to read it. The
// table and its readers, shared with the host, are in row_table.h ([note: index space]).
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <type_traits>

#include "optimizer_math.h"
#include "row_table.h"
#include "segment_table.h"

namespace fusedopt {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kThreadsPerBlock = 256;
constexpr int kWarpsPerBlock = kThreadsPerBlock / kWarpSize;
// Granularity of a warp's range; a multiple of kRowPad and of every vector width.
constexpr int64_t kWarpRangeGranule = 256;
static_assert(kWarpRangeGranule % kRowPad == 0, "a warp's range must start at a packed row's alignment");

// A 0-dim/1-element tensor argument (grad_scale, found_inf, a scheduled value), read by the
// kernel on the device, or passed by value when the caller gave a CPU tensor.
struct ScalarArg {
  enum Kind : int32_t { kAbsent, kHostValue, kDeviceFloat, kDeviceDouble };
  Kind kind = kAbsent;
  const void* ptr = nullptr;
  double host_value = 0.0;

  C10_DEVICE bool present() const { return kind != kAbsent; }
  C10_DEVICE double value() const {
    switch (kind) {
      case kDeviceFloat: return static_cast<double>(*static_cast<const float*>(ptr));
      case kDeviceDouble: return *static_cast<const double*>(ptr);
      default: return host_value;
    }
  }
  C10_DEVICE double value_or(double fallback) const { return present() ? value() : fallback; }
  C10_DEVICE bool is_set() const { return present() && value() != 0.0; }
};

// This warp's part [begin, end) of the index space; empty past its end.
struct WarpRange {
  int64_t begin, end;
};

C10_DEVICE inline WarpRange warp_range(const RowWalk& walk) {
  const int64_t warp = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
  const int64_t begin = ::min(walk.space, warp * walk.per_warp);
  return {begin, ::min(walk.space, begin + walk.per_warp)};
}

// Calls body(row, flat_offset, j0, j1, grad) for every row this warp owns part of, with
// [j0, j1) that part in row-local elements. All lanes of the warp make the same calls.
template <typename scalar_t, typename Body>
C10_DEVICE inline void for_each_owned_row(const RowWalk& walk, const Body& body) {
  const auto [begin, end] = warp_range(walk);
  if (begin == end) return;
  for (int64_t r = first_row_ending_after(walk, begin); r < walk.num_segments; ++r) {
    const RowSpan<scalar_t> row = row_span<scalar_t>(walk, r);
    if (row.start >= end) break;
    const int64_t j0 = ::max(begin - row.start, int64_t(0));
    const int64_t j1 = ::min(end - row.start, row.numel);
    if (j0 < j1) body(r, row.flat_offset, j0, j1, row.grad);
  }
}

// Zeroes every element of every grad this warp owns part of (the whole flat grad
// buffer, or each grad tensor whole), as the CPU kernels do on a step found_inf skips.
template <typename scalar_t>
C10_DEVICE inline void zero_owned_grads(const RowWalk& walk) {
  const auto [begin, end] = warp_range(walk);
  const int lane = threadIdx.x % kWarpSize;
  if (walk.table == nullptr) {
    scalar_t* flat = static_cast<scalar_t*>(walk.flat_grad);
    for (int64_t i = begin + lane; i < end; i += kWarpSize) flat[i] = scalar_t(0);
    return;
  }
  if (begin == end) return;
  for (int64_t r = first_row_ending_after(walk, begin); r < walk.num_segments && walk.table[r] < end; ++r) {
    const int64_t* row = table_row(walk, r);
    const GradRef<scalar_t> grad = table_grad<scalar_t>(walk, row, 0);
    const int64_t j1 = ::min(end - walk.table[r], row[1]);
    for (int64_t j = ::max(begin - walk.table[r], int64_t(0)) + lane; j < j1; j += kWarpSize)
      grad.data[grad.offset(j)] = scalar_t(0);
  }
}

// 16 bytes of elements, the unit of the vectorized loads and stores.
template <typename scalar_t>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(scalar_t);
  scalar_t v[kSize];
};

template <typename scalar_t>
C10_DEVICE inline bool is_pack_aligned(const scalar_t* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(Pack<scalar_t>) == 0;
}

// A kernel argument of the low-precision stores: whether bfloat16 stores round
// stochastically, and the seed of their random bits (one int64, on the device or
// passed by value; see optimizer_math.h, [note: random bits]).
struct RoundingArg {
  bool stochastic = false;
  const int64_t* seed_ptr = nullptr;
  int64_t seed = 0;

  C10_DEVICE uint32_t key() const { return rounding_key(seed_ptr != nullptr ? *seed_ptr : seed); }
};

// The flat buffers of one row, offset to the row's start: the param, its float32 master
// copy (with master weights), and the state buffers.
template <typename scalar_t, typename state_t, int kStates>
struct RowState {
  scalar_t* param;
  float* master;
  state_t* state[kStates > 0 ? kStates : 1];
};

// Elements per vector access: 16 bytes of the widest buffer a row touches.
template <typename scalar_t, typename state_t, bool kMaster>
constexpr int row_vector_width() {
  constexpr size_t widest = sizeof(scalar_t) > sizeof(state_t) ? sizeof(scalar_t) : sizeof(state_t);
  return static_cast<int>(16 / (kMaster && widest < sizeof(float) ? sizeof(float) : widest));
}

template <typename T, int N>
struct alignas(sizeof(T) * N) PackOf {
  T v[N];
};

template <typename T, int N>
C10_DEVICE inline bool is_aligned_for(const T* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % sizeof(PackOf<T, N>) == 0;
}

// An opmath value as storage type T: to nearest even, or stochastically for bfloat16
// when asked, with the element's hash (rounding_element_hash; `slot`: which buffer).
template <typename T, typename opmath_t>
C10_DEVICE inline T stored_as(opmath_t value, bool stochastic, uint32_t element_hash, int slot) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<opmath_t, float>) {
    if (stochastic)
      value = round_stochastic_to_bfloat16(value, rounding_half(rounding_pair_hash(element_hash, slot >> 1), slot));
  }
  return static_cast<T>(value);
}

// The param as the update sees it: its value, or the master ([note: master weights
// follow the param] in optimizer_math.h).
template <typename scalar_t, bool kMaster, typename opmath_t>
C10_DEVICE inline opmath_t param_value(scalar_t param, float master) {
  if constexpr (kMaster) {
    return master_or_param(master, static_cast<float>(static_cast<scalar_t>(master)),
                           static_cast<float>(param));
  } else {
    return static_cast<opmath_t>(param);
  }
}

// Runs update(param, state_values, grad_value) in opmath over elements [j0, j1) of a
// row, the warp's lanes taking consecutive packs; stores the param (and master) and the
// state as storage dtypes, rounded as `rounding` says. `aligned` says every state
// buffer's base pointer is 16-byte aligned; packs are used where the row's first element
// and its param (wherever it lives) allow, the
// grad is loaded as packs only when it is aligned too, element by element otherwise
// (unaligned views, strided grads). Zeroes each grad element after reading it when asked to.
template <typename scalar_t, typename state_t, bool kMaster, int kStates, typename Update>
C10_DEVICE inline void update_row_elements(const RowState<scalar_t, state_t, kStates>& row, int64_t flat_offset,
                                           const GradRef<scalar_t>& grad, int64_t j0, int64_t j1, bool aligned,
                                           bool zero_grads, const RoundingArg& rounding, const Update& update) {
  using opmath_t = at::opmath_type<scalar_t>;
  constexpr int kVec = row_vector_width<scalar_t, state_t, kMaster>();
  const int lane = threadIdx.x % kWarpSize;
  const bool stochastic = rounding.stochastic;
  const uint32_t key = stochastic ? rounding.key() : 0u;
  int64_t scalar_begin = j0;
  if (aligned && (flat_offset + j0) % kVec == 0 && is_aligned_for<scalar_t, kVec>(row.param + j0)) {
    const bool vector_grad = grad.shape == nullptr && is_aligned_for<scalar_t, kVec>(grad.data + j0);
    scalar_begin = j0 + (j1 - j0) / kVec * kVec;
    for (int64_t j = j0 + int64_t(lane) * kVec; j < scalar_begin; j += int64_t(kWarpSize) * kVec) {
      auto params = *reinterpret_cast<const PackOf<scalar_t, kVec>*>(row.param + j);
      PackOf<float, kVec> masters;
      if constexpr (kMaster) masters = *reinterpret_cast<const PackOf<float, kVec>*>(row.master + j);
      PackOf<state_t, kVec> states[kStates > 0 ? kStates : 1];
#pragma unroll
      for (int s = 0; s < kStates; ++s) states[s] = *reinterpret_cast<const PackOf<state_t, kVec>*>(row.state[s] + j);
      opmath_t g[kVec];
      if (vector_grad) {
        auto* grad_pack = reinterpret_cast<PackOf<scalar_t, kVec>*>(grad.data + j);
        const PackOf<scalar_t, kVec> loaded = *grad_pack;
#pragma unroll
        for (int k = 0; k < kVec; ++k) g[k] = static_cast<opmath_t>(loaded.v[k]);
        if (zero_grads) {
          PackOf<scalar_t, kVec> zeros;
#pragma unroll
          for (int k = 0; k < kVec; ++k) zeros.v[k] = scalar_t(0);
          *grad_pack = zeros;
        }
      } else {
#pragma unroll
        for (int k = 0; k < kVec; ++k) {
          scalar_t* element = grad.data + grad.offset(j + k);
          g[k] = static_cast<opmath_t>(*element);
          if (zero_grads) *element = scalar_t(0);
        }
      }
#pragma unroll
      for (int k = 0; k < kVec; ++k) {
        const uint32_t hash =
            stochastic ? rounding_element_hash(static_cast<uint32_t>(flat_offset + j + k), key) : 0u;
        opmath_t p = param_value<scalar_t, kMaster, opmath_t>(params.v[k], kMaster ? masters.v[k] : 0.0f);
        opmath_t values[kStates > 0 ? kStates : 1];
#pragma unroll
        for (int s = 0; s < kStates; ++s) values[s] = static_cast<opmath_t>(states[s].v[k]);
        update(p, values, g[k]);
        if constexpr (kMaster) {
          masters.v[k] = static_cast<float>(p);
          params.v[k] = static_cast<scalar_t>(p);
        } else {
          params.v[k] = stored_as<scalar_t>(p, stochastic, hash, 0);
        }
#pragma unroll
        for (int s = 0; s < kStates; ++s) states[s].v[k] = stored_as<state_t>(values[s], stochastic, hash, 1 + s);
      }
      *reinterpret_cast<PackOf<scalar_t, kVec>*>(row.param + j) = params;
      if constexpr (kMaster) *reinterpret_cast<PackOf<float, kVec>*>(row.master + j) = masters;
#pragma unroll
      for (int s = 0; s < kStates; ++s) *reinterpret_cast<PackOf<state_t, kVec>*>(row.state[s] + j) = states[s];
    }
  }
  for (int64_t j = scalar_begin + lane; j < j1; j += kWarpSize) {
    scalar_t* element = grad.data + grad.offset(j);
    const opmath_t g = static_cast<opmath_t>(*element);
    if (zero_grads) *element = scalar_t(0);
    const uint32_t hash = stochastic ? rounding_element_hash(static_cast<uint32_t>(flat_offset + j), key) : 0u;
    opmath_t p = param_value<scalar_t, kMaster, opmath_t>(row.param[j], kMaster ? row.master[j] : 0.0f);
    opmath_t values[kStates > 0 ? kStates : 1];
#pragma unroll
    for (int s = 0; s < kStates; ++s) values[s] = static_cast<opmath_t>(row.state[s][j]);
    update(p, values, g);
    if constexpr (kMaster) {
      row.master[j] = static_cast<float>(p);
      row.param[j] = static_cast<scalar_t>(p);
    } else {
      row.param[j] = stored_as<scalar_t>(p, stochastic, hash, 0);
    }
#pragma unroll
    for (int s = 0; s < kStates; ++s) row.state[s][j] = stored_as<state_t>(values[s], stochastic, hash, 1 + s);
  }
}

// Host side (grad_table.cu) ---------------------------------------------------------

// The RowWalk of one op call, and the device table it points into (kept alive by the
// caller until the kernels are enqueued).
struct GradsPlan {
  RowWalk walk;
  at::Tensor table;
};

// build_row_table (row_table.h) with its table on the device, uploaded only when it
// differs from the last one seen for these segments. `params` is empty for an op
// without params (grad_norm). Reads no device memory.
GradsPlan plan_rows(at::TensorList params, at::TensorList grads, const at::Tensor& segments, bool zero_grads);

}  // namespace cuda
}  // namespace fusedopt
