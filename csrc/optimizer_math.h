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
#include <cstring>

namespace fusedopt {

// Elementwise primitives that differ between scalars and SIMD vectors. The CPU
// kernel specialises them for at::vec::Vectorized.
template <typename T>
C10_HOST_DEVICE inline T opmath_sqrt(T x) {
  return ::sqrt(x);
}

// x where a == b, else y (elementwise; a NaN compares unequal).
template <typename T>
C10_HOST_DEVICE inline T select_where_equal(T a, T b, T x, T y) {
  return a == b ? x : y;
}

// The bits of a float as an unsigned integer, and back. The CPU kernel specialises them
// (and the traits naming their types) for SIMD vectors, whose integer type is
// at::vec::Vectorized<int32_t>.
template <typename F>
struct BitsOf {
  using type = uint32_t;
};
template <typename U>
struct FloatOf {
  using type = float;
};

template <typename F>
C10_HOST_DEVICE inline typename BitsOf<F>::type float_bits(F x) {
#ifdef __CUDA_ARCH__
  return __float_as_uint(x);
#else
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return bits;
#endif
}

template <typename U>
C10_HOST_DEVICE inline typename FloatOf<U>::type bits_as_float(U bits) {
#ifdef __CUDA_ARCH__
  return __uint_as_float(bits);
#else
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
#endif
}

template <typename U>
C10_HOST_DEVICE inline U shift_right_logical(U x, int bits) {
  return x >> bits;
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
//
// Plain values, no pointers: a kernel copies it into a local, where the compiler keeps
// every field in a register for the whole loop. A pointer to the scale or multiplier
// (even one selected at run time between a local and nullptr) keeps them in memory: on
// the GPU every element reloads them from local memory, and on the CPU a store through
// a float pointer may alias them, so every block reloads and re-tests them ([note:
// invariants in locals] in cpu/optimizer_kernels.cpp).
template <typename opmath_t>
struct EffectiveGrad {
  opmath_t scale = opmath_t(1), multiplier = opmath_t(1);
  bool has_scale = false, has_multiplier = false, maximize = false;

  template <typename T>
  C10_HOST_DEVICE T operator()(T grad) const {
    if (has_scale) grad = grad / T(scale);
    if (has_multiplier) grad = grad * T(multiplier);
    return maximize ? T(opmath_t(0)) - grad : grad;
  }
};

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

// ---------------------------------------------------------------------------------
// Low-precision storage: the update is computed in opmath as above; only the store
// differs.
//
// [note: rounding on store] By default a value is stored with the conversion of its
// storage dtype, round-to-nearest-even, as torch's `.to(dtype)`: a bf16 moment is then
// exactly "fp32 math, round the state after each step". A bf16 param updated by steps
// smaller than half its ulp never moves under that rounding; stochastic rounding rounds
// up with probability equal to the distance from the lower neighbour, so the expected
// stored value is the exact one and small updates accumulate on average.

// [note: random bits] Stochastic rounding draws its bits from a counter-based hash of
// (key, element index, slot; see rounding_pair_hash) rather than a sequential generator, so every element can
// be rounded independently by any thread, and the CPU and CUDA kernels round alike for
// the same key and layout. The key is drawn from torch's generator once per step; the
// index is the element's position in the flat buffer (modulo 2**32). The mixer is
// Wellons' lowbias32 (an avalanche-tested 32-bit integer hash). `U` is uint32_t or, on
// the CPU's SIMD path, at::vec::Vectorized<int32_t> (wrapping arithmetic either way).
// (mix_bits_until_last_shift(x) is all but its final x ^ (x >> 16): the CPU kernels keep
// that shift, which is also the finished hash's high half.)
template <typename U>
C10_HOST_DEVICE inline U mix_bits_until_last_shift(U x) {
  x = x ^ shift_right_logical(x, 16);
  x = x * U(0x7feb352du);
  x = x ^ shift_right_logical(x, 15);
  return x * U(0x846ca68bu);
}

template <typename U>
C10_HOST_DEVICE inline U mix_bits(U x) {
  x = mix_bits_until_last_shift(x);
  return x ^ shift_right_logical(x, 16);
}

// The hash's input for element `index`: a Weyl sequence, so that a block of consecutive
// elements is one broadcast plus constant lane offsets, without a multiplication.
template <typename U>
C10_HOST_DEVICE inline U rounding_counter(U index, uint32_t key) {
  return index * U(0x9e3779b1u) + U(key);
}

// Stored value `slot` of an element (0: the param, 1..: the state buffers) rounds with
// rounding_half(rounding_pair_hash(rounding_element_hash(index, key), slot / 2), slot):
// slots 2k and 2k+1 take the two halves of pair k's 32 bits. Pair 1's bits are pair 0's
// times an odd constant: a bijection of uniform bits is uniform, so each value's
// rounding stays unbiased, for one multiplication instead of a second hash.
template <typename U>
C10_HOST_DEVICE inline U rounding_pair_hash(U element_hash, int pair) {
  return pair == 0 ? element_hash : element_hash * U(0x2c1b3c6du);
}

// The element's hash: computed once per element, shared by all its stored values.
template <typename U>
C10_HOST_DEVICE inline U rounding_element_hash(U index, uint32_t key) {
  return mix_bits(rounding_counter(index, key));
}

// Slot's 16 bits (in the low half) of its pair's hash.
template <typename U>
C10_HOST_DEVICE inline U rounding_half(U hash, int slot) {
  return (slot & 1) ? shift_right_logical(hash, 16) : (hash & U(0xffffu));
}

// The key of one step's random bits from the 64-bit seed drawn from torch's generator.
C10_HOST_DEVICE inline uint32_t rounding_key(int64_t seed) {
  const uint64_t bits = static_cast<uint64_t>(seed);
  return static_cast<uint32_t>(bits) ^ mix_bits(static_cast<uint32_t>(bits >> 32));
}

// Rounds float `x` stochastically onto the bfloat16 grid (the result is exactly
// representable in bfloat16, so the store's own conversion keeps it): adding 16 random
// bits below bf16's last mantissa bit and truncating rounds the magnitude up with
// probability equal to the dropped fraction, which is unbiased (torchao's
// bf16_stochastic_round does the same). NaN is kept as is (a carry out of a NaN's
// mantissa could reach the sign bit); inf stays inf.
template <typename F, typename U>
C10_HOST_DEVICE inline F round_stochastic_to_bfloat16(F x, U random16) {
  const F rounded = bits_as_float((float_bits(x) + random16) & U(0xffff0000u));
  return select_where_equal(x, x, rounded, x);
}

// [note: master weights follow the param] With master weights the fp32 master copy is
// fusedopt's cache of a bf16/fp16 param, and the param is the truth: an element whose
// param no longer equals the master's rounding (the user wrote to the param: a model
// load, an init, `p.data.copy_`) restarts from the param's value. A zeroed master slot
// is therefore also a fresh one.
template <typename T>
C10_HOST_DEVICE inline T master_or_param(T master, T master_rounded, T param) {
  return select_where_equal(master_rounded, param, master, param);
}

}  // namespace fusedopt
