// Host-side checks of a step's state buffers (momentum buffer, moments, the float32
// master copy) and dispatch on their dtype, shared by the CPU and CUDA kernels: float32,
// bfloat16 or float16 state for params computed in float, and the params' own dtype for
// float64 params.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <optional>
#include <type_traits>

namespace fusedopt {

// The dtype of the state buffers, checked against the params': the params' own, or
// float32/bfloat16/float16 for params computed in float (float32, bfloat16, float16).
inline at::ScalarType check_state_dtype(const at::Tensor& state, at::ScalarType param_dtype) {
  const auto dtype = state.scalar_type();
  const bool float_opmath = param_dtype != at::kDouble;
  TORCH_CHECK(dtype == param_dtype ||
                  (float_opmath && (dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf)),
              "fusedopt: state of dtype ", dtype, " is not supported for ", param_dtype,
              " params (float32, bfloat16 or float16 state needs float32, bfloat16 or float16 params)");
  return dtype;
}

// A state buffer (segment_table.h): contiguous, of `dtype`, on the params' device, and
// holding every row, which ends at or before `extent`.
inline void check_flat(const at::Tensor& flat, const at::Device& device, at::ScalarType dtype, int64_t extent,
                       const char* name) {
  TORCH_CHECK(flat.device() == device && flat.scalar_type() == dtype && flat.numel() >= extent &&
                  flat.is_contiguous(),
              "fusedopt: ", name, " must be a contiguous buffer of ", dtype, " on ", device,
              " holding every row (", extent, " elements)");
}

// The float32 master copy of bfloat16 or float16 params, if given.
inline float* check_master(const std::optional<at::Tensor>& master_param, at::ScalarType param_dtype,
                           const at::Device& device, int64_t extent) {
  if (!master_param.has_value()) return nullptr;
  TORCH_CHECK(param_dtype == at::kBFloat16 || param_dtype == at::kHalf,
              "fusedopt: master_param is for bfloat16 or float16 params, got ", param_dtype);
  check_flat(*master_param, device, at::kFloat, extent, "master_param");
  return master_param->data_ptr<float>();
}

// Calls f with a null state_t* for the state dtype.
template <typename scalar_t, typename F>
void dispatch_state_dtype(c10::ScalarType dtype, const F& f) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    f(static_cast<double*>(nullptr));
  } else {
    switch (dtype) {
      case c10::kFloat: f(static_cast<float*>(nullptr)); break;
      case c10::kBFloat16: f(static_cast<c10::BFloat16*>(nullptr)); break;
      case c10::kHalf: f(static_cast<c10::Half*>(nullptr)); break;
      default: TORCH_CHECK(false, "fusedopt: unsupported state dtype ", dtype);
    }
  }
}

}  // namespace fusedopt
