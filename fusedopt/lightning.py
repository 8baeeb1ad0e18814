"""Lightning's mixed precision with gradient clipping, for fusedopt's optimizers.

``Trainer(precision="bf16-mixed" | "16-mixed", gradient_clip_val=...)`` refuses every
optimizer that sets ``_step_supports_amp_scaling`` (torch's ``fused=True`` ones and
fusedopt's), even under bf16, where no GradScaler exists (lightning#21435). The flag
only tells ``GradScaler.step`` that the optimizer takes ``grad_scale`` and ``found_inf``
and unscales inside its own kernel; torch reads it nowhere else. When grads were
unscaled before the step (``scaler.unscale_``, or fusedopt's
``clip_grad_norm_(grad_scaler=...)``, which records the same in the scaler),
``GradScaler.step`` hands the optimizer the scale that is still owed (none after
``unscale_``) and ``found_inf``, so clipping before such a step is correct. Lightning's
refusal is its own guard, so the fix is on Lightning's side: this plugin, passed instead
of the ``precision`` string::

    from fusedopt.lightning import MixedPrecision
    trainer = L.Trainer(plugins=[MixedPrecision("bf16-mixed", "cpu")], gradient_clip_val=1.0)

For fusedopt's optimizers, clipping by norm is ``optimizer.clip_grad_norm_``: one read of
the grads for the norm (and, under a GradScaler, the inf/nan check that ``unscale_``
would make); the step kernel then unscales and clips in its own pass. As with torch's
fused optimizers under Lightning, grads are still scaled (16-mixed) and unclipped when
``on_before_optimizer_step`` sees them. Every other optimizer gets Lightning's own
behaviour.
"""
from __future__ import annotations

from typing import Union

from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.plugins.precision import MixedPrecision as LightningMixedPrecision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer

from .optimizer import FusedOptimizer

__all__ = ["MixedPrecision"]


class MixedPrecision(LightningMixedPrecision):
    """Lightning's ``MixedPrecision`` (same arguments) that clips fusedopt's optimizers."""

    def clip_gradients(self, optimizer: Optimizer, clip_val: Union[int, float] = 0.0,
                       gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM) -> None:
        # Manual optimization's self.optimizers() is a wrapper that passes isinstance
        # checks but does not hold the optimizer's state: clip the optimizer itself.
        if isinstance(optimizer, LightningOptimizer):
            optimizer = optimizer.optimizer
        if not isinstance(optimizer, FusedOptimizer):
            return super().clip_gradients(optimizer, clip_val, gradient_clip_algorithm)
        if clip_val <= 0:
            return
        scaler = self.scaler
        still_scaled = (scaler is not None and scaler.is_enabled()
                        and scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY)
        if gradient_clip_algorithm == GradClipAlgorithmType.NORM:
            optimizer.clip_grad_norm_(clip_val, grad_scaler=scaler if still_scaled else None)
            return
        # By value: no fused form; the grads must be unscaled first, as Lightning does for
        # optimizers without the flag. GradScaler.step then owes the kernel no scale.
        if still_scaled:
            scaler.unscale_(optimizer)
        self.clip_grad_by_value(optimizer, clip_val)
