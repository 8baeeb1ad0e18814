"""FusedOptimizer: the torch.optim-facing base of fusedopt's optimizers. Subclasses
(sgd.py, adam.py) validate hyperparameters and make one kernel call per part; the
machinery is split by concern:

* placement.py: where each parameter's row lives, and the per-step check of the rows
  against torch.optim's public objects (flat_buffer.py: the rows themselves);
* public_state.py: state edits and loads adopted into the flat buffers, state created
  lazily as torch.optim creates it;
* clipping.py: GradScaler and clip_grad_norm_ fused into the step;
* compiled.py: the step under torch.compile;
* options.py: what parameters and low-precision options are accepted.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.optim import Optimizer

from .clipping import Clipping, GradTransform
from .compiled import CompiledStep
from .flat_buffer import FlatBuffer, is_dtensor
from .options import (LOW_PRECISION_DEFAULTS, MASTER_KEY, check_low_precision_group, check_params,
                      check_state_dtype, drop_default_options)
from .placement import CheckedPart, GroupPlan, Placement
from .public_state import PublicState
from . import _C


class FusedOptimizer(Placement, PublicState, Clipping, CompiledStep, Optimizer):
    """torch.optim's public objects (``param_groups``, ``state``, each parameter's data
    and grad) are the truth; flat buffers are fusedopt's private cache of them. Every
    step checks the cache against the truth (``_C.sync_check``, one C pass per buffer)
    and re-synchronises what differs before anything is written. Buffers are made
    lazily, at the first step, so a constructor that raises has moved nothing."""

    # GradScaler hands us grad_scale / found_inf instead of unscaling and syncing itself.
    _step_supports_amp_scaling = True
    # State keys torch.optim keeps per parameter, in its order; set by subclasses.
    _state_keys: tuple[str, ...] = ()
    # The same and fusedopt's own (checked on load, loaded by ShardedOptimizer).
    _all_state_keys: tuple[str, ...] = (MASTER_KEY,)
    # Keys torch.optim requires in a non-empty state entry when it loads a checkpoint, and
    # reads as numbers.
    _keys_required_on_load: tuple[str, ...] = ()
    _sparse_grad_message = "fusedopt does not support sparse gradients"
    # Whether optimizer.state is checked every step and re-synchronised into the buffers.
    _tracks_public_state = True
    # Flat buffers split into this many equal slices (fusedopt.distributed: one per rank).
    _buffer_slices = 1

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._all_state_keys = (*cls._state_keys, MASTER_KEY)

    def __init__(self, params, defaults: dict[str, Any]):
        check_state_dtype(defaults.get("state_dtype"))
        self._plans: list[GroupPlan] = []
        self._slots: dict[torch.Tensor, tuple[FlatBuffer, int]] = {}
        # Clip coefficient from clip_grad_norm_, applied inside the next step's kernel.
        self._pending_grad_multiplier: torch.Tensor | None = None
        self._have_grad_buffers = False  # a flat grad buffer exists (zero_grad(set_to_none=False))
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        # torch.optim's public objects only: a copy (deepcopy, pickle) rebuilds its
        # cache from them at its first step.
        state = super().__getstate__()
        state["_pending_grad_multiplier"] = self._pending_grad_multiplier
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict ends here, after its pre-hooks and torch's own validation:
        # the new state is checked against the parameters before anything is replaced.
        if "state" in state and "param_groups" in state:
            self._check_state_fits(state["state"], state["param_groups"])
        current = self.__dict__.get("param_groups")  # None when unpickled or deep-copied
        if current is not None and "param_groups" in state and len(current) == len(state["param_groups"]):
            # A loaded group without fusedopt's options (one torch.optim saved, or one at
            # their defaults) keeps this optimizer's.
            for group, old in zip(state["param_groups"], current):
                for key in LOW_PRECISION_DEFAULTS:
                    if key not in group and key in old:
                        group[key] = old[key]
        super().__setstate__(state)
        self.__dict__.setdefault("_plans", [])
        self.__dict__.setdefault("_slots", {})
        self.__dict__.setdefault("_pending_grad_multiplier", None)
        self.__dict__.setdefault("_have_grad_buffers", False)
        for group in self.param_groups:  # checkpoints of fusedopt 0.1.0 hold them all
            drop_default_options(group)

    # --- param groups -----------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        drop_default_options(self.param_groups[-1])  # set from ``defaults`` by torch
        try:
            check_params(type(self).__name__, self.param_groups[-1]["params"])
            check_low_precision_group(self.param_groups[-1], self.param_groups[-1]["params"])
        except Exception:
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def _rounding_seed(self, group: dict[str, Any], buf) -> torch.Tensor | None:
        """With stochastic rounding, one draw from torch's generator of the buffer's device
        per buffer and step: the key of the kernel's random bits (optimizer_math.h)."""
        if not group.get("stochastic_rounding"):
            return None
        return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=buf.device)

    # --- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's, key for key: fusedopt's low-precision options appear in a group
        only where they differ from their defaults (one set back to its default in
        ``param_groups`` is removed there first). Under FSDP2 each DTensor state value is a
        copy: the state of a group's DTensor params shares one storage (its flat buffers),
        and torch can neither save nor deep-copy several DTensors over one storage
        ("invalid python storage")."""
        for group in self.param_groups:
            drop_default_options(group)
        state_dict = super().state_dict()
        if any(buf.has_shards for buf, _ in self._slots.values()):
            state_dict["state"] = {index: {key: value.clone() if is_dtensor(value) else value
                                           for key, value in entry.items()}
                                   for index, entry in state_dict["state"].items()}
        return state_dict

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's, in its order: pre-hooks, validation, loading (all or nothing:
        the new state is checked against the parameters before it replaces anything),
        post-hooks. The loaded values are then copied into fusedopt's buffers at once,
        so a later change to the checkpoint's tensors does not reach this optimizer.

        Unlike torch.optim, state tensors keep their dtype (bf16 moments, the float32
        master copy; torch.optim casts every state tensor to its param's dtype), and a
        checkpoint group without fusedopt's low-precision options (one torch.optim
        saved, or fusedopt's at their defaults) keeps this optimizer's."""
        loaded: dict[str, Any] = {}
        # The checkpoint as the user's pre-hooks leave it (this one runs last).
        handle = self.register_load_state_dict_pre_hook(lambda _, checkpoint: loaded.update(checkpoint))
        try:
            super().load_state_dict(state_dict)
        finally:
            handle.remove()
        # The saved ids name the current params in order, as torch.optim maps them.
        param_of = dict(zip((i for g in loaded["param_groups"] for i in g["params"]),
                            (p for g in self.param_groups for p in g["params"])))
        for i, saved in loaded["state"].items():
            entry = self.state.get(param_of.get(i))
            if not isinstance(saved, dict) or not entry:
                continue
            for key, value in saved.items():
                cast = entry.get(key)
                if (key != "step" and torch.is_tensor(value) and value.is_floating_point()
                        and torch.is_tensor(cast) and cast.dtype != value.dtype):
                    entry[key] = value.detach().to(device=cast.device, copy=True)
        # A group that lacks hyperparameters of this optimizer (an Adam checkpoint loaded
        # into SGD) loads as into torch.optim, whose step then raises their KeyError: its
        # state is read at the step.
        if self._tracks_public_state and all(map(self._has_hyperparameters, self.param_groups)):
            self._sync_state(self._checked_parts(check_grads=False), stepping=False)

    def _has_hyperparameters(self, group: dict[str, Any]) -> bool:
        return all(key in group for key in self.defaults if key not in LOW_PRECISION_DEFAULTS)

    # --- grads ------------------------------------------------------------------------
    @torch._disable_dynamo  # as torch.optim's: always eager, also inside a compiled function
    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim. With ``set_to_none=False`` grads nothing else sees become views
        of one flat grad buffer per flat param buffer, zeroed in a single pass, and later
        steps read that buffer as one range (fusedopt's fastest path)."""
        self._pending_grad_multiplier = None
        if set_to_none:
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            if self._have_grad_buffers:
                for buf, _ in self._slots.values():
                    buf.release_grad_buffer()
                self._have_grad_buffers = False
            return
        self._have_grad_buffers = True
        zeroed = []
        for c in self._checked_parts(with_state=False):
            zeroed.extend(c.part.buf.zero_grads(c.part.rows))
        for plan in self._plans:
            zeroed.extend(p.grad.zero_() for p in plan.lazy if p.grad is not None)
        torch.autograd.graph.increment_version(zeroed)

    def _collect_work(self) -> list[CheckedPart]:
        """Every part with grads, after the cache was brought in line with the public
        objects; validated before anything is updated, so that bad input leaves the
        optimizer and the model as they were."""
        checked = self._checked_parts(with_state=self._tracks_public_state)
        self._sync_state(checked)
        return [c for c in checked if c.rows]

    def _scheduled_arguments(self, group: dict[str, Any], device: torch.device):
        """The hyperparameters schedulers change (``_scheduled_values``) as the ops take
        them (ops.cpp): (floats, None), or (zeros, one float64 tensor on the device) when
        any is a tensor (the kernel reads it there: a CUDA step never waits for the host)
        or under torch.compile, where a float argument of an op is a constant that dynamo
        guards on (one recompile per lr) but a float in tensor arithmetic is a graph input."""
        values = self._scheduled_values(group)
        tensors = [isinstance(v, torch.Tensor) for v in values]
        if not torch.compiler.is_compiling() and not any(tensors):
            return tuple(map(float, values)), None
        zero = torch.zeros((), dtype=torch.float64, device=device)
        scheduled = torch.stack([v.to(device=device, dtype=torch.float64, non_blocking=True).reshape(())
                                 if is_tensor else zero + v for v, is_tensor in zip(values, tensors)])
        return (0.0,) * len(values), scheduled

    def _scheduled_values(self, group: dict[str, Any]) -> tuple:
        """The values of ops.cpp's ``scheduled`` for this group, in the op's order."""
        raise NotImplementedError

    # --- step -------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, zero_grad: bool = False):
        """As torch.optim. ``zero_grad=True`` zeroes the grads inside the update pass
        (what ``zero_grad(set_to_none=False)`` would do after the step, without a second
        pass over them), also on a step GradScaler skips."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        transform = self._grad_transform(zero_grad)
        if torch.compiler.is_compiling():
            self._traced_step(transform)
            return loss
        work = self._collect_work()
        self._pending_grad_multiplier = None
        # A step GradScaler skips creates no state, as with torch.optim. Only a CPU
        # found_inf is read here; a CUDA one is left to the kernel (no host sync), and
        # the state it leaves is all zeros and counts no step.
        found_inf = transform.found_inf
        skipped = found_inf is not None and found_inf.device.type == "cpu" and bool(found_inf.item())
        for c in work:
            self._run(c, transform, skipped)
        return loss

    def _run(self, c: CheckedPart, transform: GradTransform, skipped: bool) -> None:
        buf = c.part.buf
        rows = c.buffer_rows()
        # The update is an in-place write to each parameter (and with zero_grads to each
        # grad): autograd must see it. Bumped before the kernel, while the check has just
        # brought these tensors into cache (after it they cost a cache miss each).
        if not skipped:
            _C.bump_versions(c.updated_params())
        if transform.zero_grads:
            _C.bump_versions(c.grads)
        buf.before_kernel()
        grads = buf.kernel_grads(rows, c.grads, c.flat)
        # Held in C++ for the call, as the buffer holds its per-row params ([note: C++
        # references for op calls]): a grad that only its Python object holds (a DTensor
        # grad's local shard, as the check hands it) would otherwise take the GIL back as
        # the op drops it (FSDP2, 600 shards: ~0.06 ms a step).
        held_grads = _C.hold(grads) if len(grads) > 1 else None
        self._update_buffer(c.group, buf, buf.kernel_params(rows), buf.segments(rows), grads,
                            transform.on(buf.device))
        del held_grads
        if skipped:
            return
        buf.after_kernel()
        self._ensure_state(c.part, c.rows)

    # --- what subclasses define -----------------------------------------------------------
    def _algorithm_state_keys(self, group) -> tuple[str, ...]:
        raise NotImplementedError

    def _update_buffer(self, group, buf: FlatBuffer, params, segments, grads, transform: GradTransform) -> None:
        """One kernel call over the rows ``segments`` names (csrc/segment_table.h)."""
        raise NotImplementedError
