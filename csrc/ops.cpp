// Schemas of every fusedopt op, declared once. Device kernels register their
// implementations beside their code: csrc/cpu/optimizer_kernels.cpp (CPU) and
// csrc/cuda/optimizer_kernels.cu (CUDA, only in CUDA builds). Linked into the
// fusedopt._C module (csrc/python_module.cpp).
#include <torch/library.h>

TORCH_LIBRARY(fusedopt, m) {
  // `scheduled`: the hyperparameters schedulers change, as one float tensor that
  // replaces the floats when given: Adam [lr, beta1, beta2], SGD [lr, momentum]. Read
  // on the device, it never syncs a CUDA step, and under torch.compile it is a graph
  // value (a float argument is a constant that dynamo guards on: one recompile per
  // value).
  //
  // Adam and AdamW over the rows of segment_table.h (params, grads and state wherever
  // segments say they are), in one call. amsgrad iff max_exp_avg_sq is given;
  // `step` holds one float32 counter per parameter (torch.optim's state["step"]).
  // On found_inf != 0 no param, state or step is written (with zero_grads the grads
  // are still zeroed). grad_scale divides and grad_multiplier (a clip coefficient)
  // multiplies the grad before the update; zero_grads writes zeros over the grads
  // that were read.
  //
  // Low-precision storage (both step ops; optimizer_math.h, [note: rounding on store]):
  // the state buffers are of the param's dtype or, for float32/bfloat16/float16 params,
  // of any of those three; the math is in opmath either way. master_param (float32,
  // for bfloat16/float16 params) is what the update acts on, and the param is stored
  // as its rounding to nearest. rounding_seed (one int64, without master_param) makes
  // every bfloat16 store round stochastically with bits derived from it.
  m.def(
      "adam_step_(Tensor(a!)[] params, Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, "
      "Tensor(d!)? max_exp_avg_sq, Tensor(e!) step, Tensor(f!)[] grads, Tensor segments, "
      "float lr, Tensor? scheduled, float beta1, float beta2, float weight_decay, float eps, "
      "bool decoupled_weight_decay, bool maximize, Tensor? grad_scale, Tensor? found_inf, "
      "Tensor? grad_multiplier, bool zero_grads, Tensor(g!)? master_param=None, "
      "Tensor? rounding_seed=None) -> ()");
  // SGD over the rows of segment_table.h, in one call. Momentum iff momentum_buffer is given; `step` counts
  // each parameter's steps with momentum, so a first one (step == 0) starts the buffer.
  m.def(
      "sgd_step_(Tensor(a!)[] params, Tensor(b!)? momentum_buffer, Tensor(c!) step, "
      "Tensor(d!)[] grads, Tensor segments, float lr, Tensor? scheduled, float momentum, "
      "float dampening, float weight_decay, bool nesterov, bool maximize, "
      "Tensor? grad_scale, Tensor? found_inf, Tensor? grad_multiplier, bool zero_grads, "
      "Tensor(e!)? master_param=None, Tensor? rounding_seed=None) -> ()");
  // The norm_type-norm of all grads named by `segments` (same grads contract as the
  // steps), as a 0-dim tensor in opmath (float32; float64 for float64 grads). inf or
  // nan in any grad makes the result non-finite.
  m.def("grad_norm(Tensor[] grads, Tensor segments, float norm_type) -> Tensor");
}
