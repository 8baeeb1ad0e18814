"""SGD with momentum, dampening, nesterov and weight decay: torch.optim.SGD's constructor
and semantics, one fused kernel per flat buffer."""
from __future__ import annotations

import torch

from . import ops
from .flat_buffer import is_dtensor
from .optimizer import FusedOptimizer
from .options import MASTER_KEY, hyperparameter, reject_differentiable
from .placement import same_place


class SGD(FusedOptimizer):
    """Drop-in for ``torch.optim.SGD``. ``foreach`` and ``fused`` are accepted and
    recorded in param_groups; the step is always fusedopt's fused kernel.

    Besides torch's ``momentum_buffer`` state, each flat buffer records per parameter
    whether its momentum buffer has been started (the ``step`` counter, not exposed), so
    a parameter's first step with momentum starts its buffer as a copy of the grad, as
    torch.optim does, even when GradScaler skipped earlier steps or momentum was 0 before.

    ``state_dtype``, ``master_weights`` and ``stochastic_rounding`` store fewer bytes per
    parameter, as for fusedopt.Adam (off by default).
    """

    _state_keys = ("momentum_buffer",)
    # torch.optim.SGD takes sparse grads; fusedopt's flat kernels do not.
    _sparse_grad_message = "fusedopt.SGD does not support sparse gradients; use torch.optim.SGD"

    def __init__(self, params, lr=1e-3, momentum=0, dampening=0, weight_decay=0, nesterov=False, *,
                 maximize=False, foreach=None, differentiable=False, fused=None, state_dtype=None,
                 master_weights=False, stochastic_rounding=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        reject_differentiable(differentiable)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused, state_dtype=state_dtype,
                        master_weights=master_weights, stochastic_rounding=stochastic_rounding)
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def _algorithm_state_keys(self, group):
        return self._state_keys if hyperparameter(group["momentum"]) != 0 else ()

    def _scheduled_values(self, group):
        return (group["lr"], group["momentum"])

    def _update_buffer(self, group, buf, params, segments, grads, transform):
        has_momentum = bool(self._group_state_keys(group))
        (lr, momentum), scheduled = self._scheduled_arguments(group, buf.device)
        self._set_state_dtypes(group, buf)
        ops.run(
            ops.sgd_step_, params, buf.state_buffer("momentum_buffer") if has_momentum else None, buf.step, grads,
            segments, lr, scheduled, momentum, hyperparameter(group["dampening"]),
            hyperparameter(group["weight_decay"]), group["nesterov"], group["maximize"],
            transform.grad_scale, transform.found_inf, transform.grad_multiplier, transform.zero_grads,
            buf.state_buffer(MASTER_KEY) if group.get("master_weights") else None, self._rounding_seed(group, buf))

    def _adopted(self, buf, row, values):
        # A momentum buffer given through optimizer.state is a started one; None or none
        # makes torch.optim start it from the next grad.
        buf.step[row] = 1.0 if values.get("momentum_buffer") is not None else 0.0

    def state_dict(self):
        """torch.optim's format. A momentum buffer whose parameter has not yet taken a
        step (every step so far skipped by GradScaler) is left out, as torch.optim
        would not have created it."""
        state_dict = super().state_dict()
        steps_taken = {}  # one host read per flat buffer
        params = (p for group in self.param_groups for p in group["params"])
        for index, p in enumerate(params):
            entry = state_dict["state"].get(index)
            buffer = entry.get("momentum_buffer") if entry else None
            if buffer is None or p not in self._slots or is_dtensor(p):
                continue
            buf, i = self._slots[p]
            if not same_place(buffer, buf.state_view("momentum_buffer", i)):
                continue  # not fusedopt's slot yet (loaded or set by the user): torch's value
            if buf not in steps_taken:
                steps_taken[buf] = buf.step.tolist()
            if steps_taken[buf][i] == 0:
                # A copy: the entry itself is optimizer.state[p], which keeps its view.
                entry = {key: value for key, value in entry.items() if key != "momentum_buffer"}
                if entry:
                    state_dict["state"][index] = entry
                else:
                    del state_dict["state"][index]
        return state_dict
