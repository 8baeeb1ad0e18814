"""Adam and AdamW: torch.optim's constructors and semantics, one fused kernel per flat buffer."""
from __future__ import annotations

import torch

from . import ops
from .optimizer import FusedOptimizer
from .options import MASTER_KEY, hyperparameter, reject_differentiable


class Adam(FusedOptimizer):
    """Drop-in for ``torch.optim.Adam``. ``foreach``, ``fused`` and ``capturable`` are
    accepted (and recorded in param_groups, as torch does) so existing code runs; the
    step is always fusedopt's fused kernel.

    Fewer bytes per parameter (all off by default, param-group options like ``lr``):
    ``state_dtype`` (torch.bfloat16 or torch.float16) stores the moments in that dtype,
    each update computed in float32 and rounded to nearest; ``master_weights=True``
    keeps a float32 copy of bf16/fp16 params in ``state[p]["master_param"]``, updates it
    and stores its rounding in the param; ``stochastic_rounding=True`` rounds bf16
    params (and bf16 moments) stochastically, from torch's random generator."""

    _state_keys = ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")
    _keys_required_on_load = ("step",)  # torch.optim.Adam.__setstate__ reads it
    # torch.optim.Adam's step on a None: "API has changed, `state_steps` ..." (step), no
    # attribute lerp_ / mul_ (the moments), maximum() must take a Tensor (amsgrad).
    _none_state_errors = {"step": RuntimeError, "exp_avg": AttributeError, "exp_avg_sq": AttributeError,
                          "max_exp_avg_sq": TypeError}
    _sparse_grad_message = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0, amsgrad=False,
                 *, foreach=None, maximize=False, capturable=False, differentiable=False, fused=None,
                 decoupled_weight_decay=False, state_dtype=None, master_weights=False,
                 stochastic_rounding=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise ValueError(f"Invalid epsilon value: {eps}")
        if not 0.0 <= betas[0] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
                or (isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor))):
            raise ValueError("betas must be either both floats or both Tensors")
        for index, beta in enumerate(betas):
            if isinstance(beta, torch.Tensor) and beta.numel() != 1:
                raise ValueError(f"Tensor betas[{index}] must be 1-element")
        reject_differentiable(differentiable)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                        maximize=maximize, foreach=foreach, capturable=capturable,
                        differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay, state_dtype=state_dtype,
                        master_weights=master_weights, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", False)
            group.setdefault("fused", None)
            for p in group["params"]:
                # As torch.optim.Adam: a step saved as a number becomes a tensor (checked
                # to be one by _check_state_fits before anything changed).
                entry = self.state.get(p)
                if entry and not torch.is_tensor(entry["step"]):
                    entry["step"] = torch.tensor(float(entry["step"]), dtype=torch.float32)

    def _algorithm_state_keys(self, group):
        return self._state_keys if group["amsgrad"] else self._state_keys[:3]

    def _keys_required_in_state(self, keys):
        # In the order torch.optim's step reads them: the first one missing is its KeyError.
        return (*keys[1:], "step")

    def _scheduled_values(self, group):
        return (group["lr"], *group["betas"])

    def _update_buffer(self, group, buf, params, segments, grads, transform):
        (lr, beta1, beta2), scheduled = self._scheduled_arguments(group, buf.device)
        self._set_state_dtypes(group, buf)
        ops.run(
            ops.adam_step_, params, buf.state_buffer("exp_avg"), buf.state_buffer("exp_avg_sq"),
            buf.state_buffer("max_exp_avg_sq") if group["amsgrad"] else None, buf.step, grads, segments,
            lr, scheduled, beta1, beta2,
            hyperparameter(group["weight_decay"]), group["eps"], group["decoupled_weight_decay"],
            group["maximize"], transform.grad_scale, transform.found_inf, transform.grad_multiplier,
            transform.zero_grads, buf.state_buffer(MASTER_KEY) if group.get("master_weights") else None,
            self._rounding_seed(group, buf))


class AdamW(Adam):
    """Drop-in for ``torch.optim.AdamW``: Adam with decoupled weight decay (default 1e-2)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False,
                 *, maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 state_dtype=None, master_weights=False, stochastic_rounding=False):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, foreach=foreach, maximize=maximize,
                         capturable=capturable, differentiable=differentiable, fused=fused,
                         decoupled_weight_decay=True, state_dtype=state_dtype, master_weights=master_weights,
                         stochastic_rounding=stochastic_rounding)

    def __setstate__(self, state):
        super().__setstate__(state)
        # As torch.optim.AdamW: any state loaded into AdamW decays decoupled.
        for group in self.param_groups:
            group["decoupled_weight_decay"] = True
