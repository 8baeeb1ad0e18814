// The one definition of every update rule fusedopt runs.
//
// Each function updates one element (or one SIMD vector of elements on the CPU) in
// opmath: float for float32/float16/bfloat16 parameters, double for float64. CPU and
// CUDA kernels include this header and differ only in how they load, iterate and
// store. [note: why one header] ATen's CPU and CUDA fused Adam are written twice and
// have drifted apart (pytorch#110758, #106951); here there is one copy of the math.
//
// `T` is the opmath scalar (float/double) on CUDA and in scalar CPU tails, or an
// at::vec::Vectorized<opmath> on the CPU's SIMD path. Scalar coefficients are
// broadcast with `T(x)` so the same code serves both.
#pragma once

#include <c10/macros/Macros.h>
#include <cmath>
#include <cstdint>

namespace fusedopt {

// Elementwise primitives that differ between scalars and SIMD vectors. The CPU
// kernel specialises them for at::vec::Vectorized.
template <typename T>
C10_HOST_DEVICE inline T opmath_sqrt(T x) {
  return ::sqrt(x);
}

// torch.maximum semantics: NaN in either input propagates.
template <typename T>
C10_HOST_DEVICE inline T opmath_maximum(T a, T b) {
  return (a != a) ? a : ((b != b) ? b : (a > b ? a : b));
}

// Per-segment scalars for one Adam/AdamW element update, precomputed once per
// parameter from the hyperparameters and that parameter's step.
template <typename opmath_t>
struct AdamCoefficients {
  opmath_t lr;                    // learning rate
  opmath_t beta1;                 // only for lerp's weight
  opmath_t beta2;
  opmath_t one_minus_beta1;       // lerp weight
  opmath_t one_minus_beta2;
  opmath_t weight_decay;          // Adam's L2 term (g += wd * p)
  opmath_t decay_factor;          // AdamW's p *= 1 - lr * wd
  opmath_t eps;
  opmath_t step_size;             // lr / bias_correction1
  opmath_t bias_correction2_sqrt; // sqrt(1 - beta2 ** step)
};

// [note: bias corrections in double] torch.optim evaluates `1 - beta ** step` in
// Python floats (double) and only then rounds to the parameter's opmath; doing the
// power in float loses ~1e-4 relative at large steps.
template <typename opmath_t>
C10_HOST_DEVICE inline AdamCoefficients<opmath_t> adam_coefficients(
    double lr, double beta1, double beta2, double weight_decay, double eps,
    bool decoupled_weight_decay, double step) {
  const double bias_correction1 = 1.0 - ::pow(beta1, step);
  const double bias_correction2 = 1.0 - ::pow(beta2, step);
  AdamCoefficients<opmath_t> c;
  c.lr = static_cast<opmath_t>(lr);
  c.beta1 = static_cast<opmath_t>(beta1);
  c.beta2 = static_cast<opmath_t>(beta2);
  c.one_minus_beta1 = static_cast<opmath_t>(1.0 - beta1);
  c.one_minus_beta2 = static_cast<opmath_t>(1.0 - beta2);
  c.weight_decay = static_cast<opmath_t>(decoupled_weight_decay ? 0.0 : weight_decay);
  c.decay_factor = static_cast<opmath_t>(decoupled_weight_decay ? 1.0 - lr * weight_decay : 1.0);
  c.eps = static_cast<opmath_t>(eps);
  c.step_size = static_cast<opmath_t>(lr / bias_correction1);
  c.bias_correction2_sqrt = static_cast<opmath_t>(::sqrt(bias_correction2));
  return c;
}

// torch.lerp's formula: exact at both ends, the branch picks the stabler side.
template <typename T, typename opmath_t>
C10_HOST_DEVICE inline T lerp(T start, T end, opmath_t weight) {
  return weight < opmath_t(0.5) ? start + T(weight) * (end - start)
                                : end - (end - start) * T(opmath_t(1) - weight);
}

// Turns the raw gradient into the one the update sees: GradScaler unscaling (a
// division, as torch's fused kernels do), the clip coefficient of a preceding
// clip_grad_norm_ (a multiplication, as torch's clip does), and maximize.
template <typename T, typename opmath_t>
C10_HOST_DEVICE inline T effective_grad(T grad, const opmath_t* grad_scale,
                                        const opmath_t* grad_multiplier, bool maximize) {
  if (grad_scale != nullptr) grad = grad / T(*grad_scale);
  if (grad_multiplier != nullptr) grad = grad * T(*grad_multiplier);
  return maximize ? T(opmath_t(0)) - grad : grad;
}

// One Adam / AdamW element. Order as torch.optim: weight decay (AdamW: on the param,
// before the moments), first moment by lerp, second moment, amsgrad max, update.
template <bool amsgrad, typename T, typename opmath_t>
C10_HOST_DEVICE inline void adam_update(T& param, T grad, T& exp_avg, T& exp_avg_sq,
                                        T& max_exp_avg_sq,
                                        const AdamCoefficients<opmath_t>& c) {
  // Skipped at zero as torch.optim does, so an inf/nan param stays out of the grad.
  if (c.decay_factor != opmath_t(1)) param = param * T(c.decay_factor);
  if (c.weight_decay != opmath_t(0)) grad = grad + param * T(c.weight_decay);
  exp_avg = lerp(exp_avg, grad, c.one_minus_beta1);
  exp_avg_sq = exp_avg_sq * T(c.beta2) + T(c.one_minus_beta2) * grad * grad;
  T second_moment = exp_avg_sq;
  if constexpr (amsgrad) {
    max_exp_avg_sq = opmath_maximum(max_exp_avg_sq, exp_avg_sq);
    second_moment = max_exp_avg_sq;
  }
  const T denom = opmath_sqrt(second_moment) / T(c.bias_correction2_sqrt) + T(c.eps);
  param = param - T(c.step_size) * exp_avg / denom;
}

template <typename opmath_t>
struct SgdCoefficients {
  opmath_t lr;
  opmath_t momentum;
  opmath_t one_minus_dampening;
  opmath_t weight_decay;
};

template <typename opmath_t>
C10_HOST_DEVICE inline SgdCoefficients<opmath_t> sgd_coefficients(
    double lr, double momentum, double dampening, double weight_decay) {
  return {static_cast<opmath_t>(lr), static_cast<opmath_t>(momentum),
          static_cast<opmath_t>(1.0 - dampening), static_cast<opmath_t>(weight_decay)};
}

// One SGD element. `first_step` is per parameter: torch.optim starts a momentum
// buffer as a copy of the gradient, with no dampening, on that parameter's first step.
template <bool has_momentum, bool nesterov, typename T, typename opmath_t>
C10_HOST_DEVICE inline void sgd_update(T& param, T grad, T& momentum_buffer,
                                       bool first_step,
                                       const SgdCoefficients<opmath_t>& c) {
  if (c.weight_decay != opmath_t(0)) grad = grad + param * T(c.weight_decay);
  if constexpr (has_momentum) {
    momentum_buffer = first_step ? grad
                                 : momentum_buffer * T(c.momentum) + T(c.one_minus_dampening) * grad;
    grad = nesterov ? grad + T(c.momentum) * momentum_buffer : momentum_buffer;
  }
  param = param - T(c.lr) * grad;
}

}  // namespace fusedopt
