"""What a step does to each grad before the update, fused into the step kernel:
GradScaler's unscale and overflow skip, and the clip coefficient of clip_grad_norm_."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.amp.grad_scaler import OptState

from . import ops


@dataclass
class GradTransform:
    """What the kernel does to a grad before the update, and after reading it."""
    grad_scale: torch.Tensor | None = None       # GradScaler's scale: divide by it
    found_inf: torch.Tensor | None = None        # non-zero: skip the whole step
    grad_multiplier: torch.Tensor | None = None  # clip coefficient from clip_grad_norm_
    zero_grads: bool = False                     # write zeros over the grads once read

    def on(self, device: torch.device) -> "GradTransform":
        def move(t):
            return t if t is None or t.device == device else t.to(device, non_blocking=True)
        return GradTransform(move(self.grad_scale), move(self.found_inf), move(self.grad_multiplier),
                             self.zero_grads)


class Clipping:
    """The FusedOptimizer half that fuses GradScaler and gradient clipping into the step."""

    def _grad_transform(self, zero_grad: bool = False) -> GradTransform:
        """What this step does to each grad: GradScaler's scale and overflow flag (which
        scaler.step sets on the optimizer), the pending clip coefficient, zeroing."""
        found_inf = getattr(self, "found_inf", None)
        if found_inf is not None and not torch.is_tensor(found_inf):
            # GradScaler found no grad to check (its sum over no devices is the int 0):
            # torch.optim, stepped through scaler.unscale_, stops with this assertion.
            raise AssertionError("No inf checks were recorded for this optimizer.")
        return GradTransform(getattr(self, "grad_scale", None), found_inf, self._pending_grad_multiplier,
                             zero_grad)

    # --- gradient clipping ----------------------------------------------------------
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False,
                        *, grad_scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over this optimizer's parameters, fused.

        The norm is one reduction pass over the grads (inf/nan make it non-finite); the
        clip coefficient is not applied to the grads here but inside the next ``step()``
        kernel, so the grads themselves keep their unclipped values until then.

        With ``grad_scaler`` (a GradScaler whose ``scale(loss).backward()`` produced the
        grads) this also stands in for ``grader_scaler.unscale_(self)``: the norm of the
        scaled grads is unscaled, inf/nan found in the same pass are reported to the
        scaler, and the kernel unscales the grads during the step. That saves GradScaler's
        own pass over the grads. Returns the total norm (of the unscaled grads).
        """
        inner = self.__dict__.get("_optimizer")
        if isinstance(inner, Clipping) and inner is not self:
            # Called through a wrapper that subclasses the optimizer's class and forwards
            # attribute reads to it (Lightning's LightningOptimizer): the clip coefficient
            # must be written to the optimizer that steps, not to the wrapper.
            return inner.clip_grad_norm_(max_norm, norm_type, error_if_nonfinite, grad_scaler=grad_scaler)
        norm_type = float(norm_type)
        work = self._collect_work()
        if any(c.part.buf.has_shards for c in work):
            # Each rank holds only its shards' grads; the norm needs a reduction over the mesh.
            raise RuntimeError("fusedopt: clip_grad_norm_ does not support DTensor (FSDP2) parameters; "
                               "use torch.nn.utils.clip_grad_norm_, which reduces across ranks")
        if not work:
            return torch.tensor(0.0)
        norms = []
        for c in work:
            rows = c.buffer_rows()
            norms.append(ops.grad_norm(c.part.buf.kernel_grads(rows, c.grads, c.flat), c.part.buf.segments(rows),
                                       norm_type))
        device = norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
        if grad_scaler is not None and grad_scaler.is_enabled():
            total = self._unscale_norm_for(grad_scaler, total)
        dtypes = {c.part.buf.dtype for c in work}
        if len(dtypes) == 1:  # torch.nn.utils.clip_grad_norm_ returns the grads' dtype
            total = total.to(dtypes.pop())
        if self._pending_grad_multiplier is not None:  # grads already clipped once
            total = total * self._pending_grad_multiplier.to(total.device)
        if error_if_nonfinite and (total.isnan() or total.isinf()):
            raise RuntimeError(
                f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, "
                "so it cannot be clipped. To disable this error and scale the gradients by the "
                "non-finite norm anyway, set `error_if_nonfinite=False`")
        coefficient = torch.clamp(max_norm / (total.float() + 1e-6), max=1.0)
        if self._pending_grad_multiplier is not None:
            coefficient = coefficient * self._pending_grad_multiplier.to(coefficient.device)
        self._pending_grad_multiplier = coefficient
        return total

    def _unscale_norm_for(self, grad_scaler: torch.amp.GradScaler, scaled_norm: torch.Tensor) -> torch.Tensor:
        """Takes the place of ``grad_scaler.unscale_(self)``: records found_inf and the
        UNSCALED stage in the scaler, and leaves ``self.grad_scale`` for the step kernel
        to divide by (GradScaler.step keeps an optimizer's grad_scale in that stage)."""
        grad_scaler._check_scale_growth_tracker("unscale_")  # torch's error if scale() never ran
        state = grad_scaler._per_optimizer_states[id(self)]
        if state["stage"] is OptState.UNSCALED:
            raise RuntimeError("unscale_() has already been called on this optimizer since the last update().")
        if state["stage"] is OptState.STEPPED:
            raise RuntimeError("unscale_() is being called after step().")
        scale = grad_scaler._scale
        found_inf = (~torch.isfinite(scaled_norm)).to(torch.float32)
        state["found_inf_per_device"] = {found_inf.device: found_inf.to(scale.device)}
        state["stage"] = OptState.UNSCALED
        self.grad_scale = scale
        return scaled_norm * scale.double().reciprocal().float().to(scaled_norm.device)
