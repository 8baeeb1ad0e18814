"""The machinery shared by fusedopt's optimizers: packing param groups into flat
buffers, reading grads in place, lazily created state, checkpoints in torch.optim's
format. Subclasses (sgd.py, adam.py) validate hyperparameters and call one kernel per
flat buffer.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer

from . import ops
from .flat_buffer import FlatBuffer, InPlaceBuffer, StaleBufferError

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


def reject_differentiable(differentiable: bool) -> None:
    if differentiable:
        raise ValueError("fusedopt does not support differentiable=True: its kernels update "
                         "parameters in place outside autograd; use torch.optim for that")


def hyperparameter(value: Any) -> float:
    """A 1-element tensor hyperparameter (betas, momentum set by a scheduler) as a float."""
    return value.item() if isinstance(value, torch.Tensor) else value


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


class FusedOptimizer(Optimizer):
    # GradScaler hands us grad_scale / found_inf instead of unscaling and syncing itself.
    _step_supports_amp_scaling = True
    # State keys torch.optim keeps per parameter, in its order; set by subclasses.
    _state_keys: tuple[str, ...] = ()
    _sparse_grad_message = "fusedopt does not support sparse gradients"
    # Flat buffers split into this many equal slices (fusedopt.distributed: one per rank).
    _buffer_slices = 1

    def __init__(self, params, defaults: dict[str, Any]):
        self._group_buffers: list[list[FlatBuffer]] = []
        self._slots: dict[torch.Tensor, tuple[FlatBuffer, int]] = {}
        # Clip coefficient from clip_grad_norm_, applied inside the next step's kernel.
        self._pending_grad_multiplier: torch.Tensor | None = None
        super().__init__(params, defaults)

    def __getstate__(self) -> dict[str, Any]:
        # copy.deepcopy((model, optimizer)) and pickling must carry the flat buffers:
        # parameters and state are views into them.
        state = super().__getstate__()
        state.update(_group_buffers=self._group_buffers, _slots=self._slots,
                     _pending_grad_multiplier=self._pending_grad_multiplier)
        return state

    # --- packing ------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        params = self.param_groups[-1]["params"]
        try:
            self._check_packable(params)
        except Exception:
            self.param_groups.pop()  # leave the optimizer as it was
            raise
        self._group_buffers.append(self._pack(params))

    def _check_packable(self, params: list[torch.Tensor]) -> None:
        name = type(self).__name__
        if len(set(params)) != len(params):
            # torch.optim warns and then updates such a parameter twice per step; one slot
            # in a flat buffer cannot do that, and updating it once would differ silently.
            raise ValueError(f"{name}: a parameter group lists the same parameter more than once")
        check_no_shared_memory(params, name)
        for p in params:
            if p.is_complex():
                raise ValueError(f"{name}: complex parameters are not supported by "
                                 "fusedopt; use torch.optim or pass torch.view_as_real(p)")
            if p.dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"{name}: parameters of dtype {p.dtype} are not "
                                 f"supported (supported: {', '.join(map(str, SUPPORTED_DTYPES))})")
            if p.device.type not in SUPPORTED_DEVICE_TYPES:
                raise ValueError(f"{name}: parameters on {p.device} are not supported")
            if p.device.type == "cuda" and not ops.HAS_CUDA_KERNELS:
                raise RuntimeError("fusedopt was built without CUDA kernels; reinstall it on a "
                                   "machine with a CUDA build of torch and the CUDA toolkit")

    def _pack(self, params: list[torch.Tensor]) -> list[FlatBuffer]:
        """One flat buffer per (device, dtype), in order of first appearance; a DTensor
        (FSDP2) gets one of its own over its local shard, which its engine owns."""
        by_key: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            key = (id(p),) if InPlaceBuffer.needed_for(p) else (p.device, p.dtype)
            by_key.setdefault(key, []).append(p)
        buffers = [InPlaceBuffer(ps[0]) if InPlaceBuffer.needed_for(ps[0]) else FlatBuffer(ps, self._buffer_slices)
                   for ps in by_key.values()]
        for buf in buffers:
            for i, p in enumerate(buf.params):
                self._slots[p] = (buf, i)
        return buffers

    def _repack_group(self, group_index: int) -> None:
        """A parameter left its buffer (``model.to()``, ``p.data = ...``): pack the group
        again from the parameters as they are now and carry their state over."""
        params = self.param_groups[group_index]["params"]
        carried = {p: {k: v.detach().clone() if torch.is_tensor(v) else v for k, v in self.state[p].items()}
                   for p in params if self.state.get(p)}
        # Views into the old buffers' counters (kept alive here): copied over without a host read.
        hidden_steps = {p: self._slots[p][0].step[self._slots[p][1]] for p in params}
        self._check_packable(params)
        self._group_buffers[group_index] = self._pack(params)
        for p, state in carried.items():
            self._adopt_state(p, state)
        for p, step in hidden_steps.items():
            buf, i = self._slots[p]
            buf.step[i] = step

    # --- state --------------------------------------------------------------------
    def _adopt_state(self, p: torch.Tensor, state: dict[str, Any]) -> None:
        """Makes ``state`` (tensors from a checkpoint or a previous buffer) live in p's
        flat buffers: values are copied into the slots and state[p] holds views."""
        buf, i = self._slots[p]
        adopted = {}
        for key, value in state.items():
            if key == "step":
                buf.step[i] = value  # a tensor is copied on its device, with no host read
                adopted[key] = buf.step[i]
            elif torch.is_tensor(value) and key in self._state_keys:
                view = buf.view_of(buf.state_buffer(key), i)
                view.copy_(value)
                adopted[key] = view
            else:
                adopted[key] = value
        self.state[p] = adopted

    def _ensure_state(self, buf: FlatBuffer, rows: list[int], keys: tuple[str, ...]) -> None:
        """torch.optim creates state on a parameter's first step with a grad; so do we,
        as views into zero-initialised flat buffers."""
        if buf.state_complete_for == keys or not keys:
            return
        flats = [(key, buf.state_buffer(key)) for key in keys if key != "step"]  # steps: buf.step
        state = self.state
        for i in rows:
            p = buf.params[i]
            entry = state.get(p)
            if entry is not None and all(key in entry for key in keys):
                continue
            entry = state[p]
            if "step" in self._state_keys and "step" not in entry:
                entry["step"] = buf.step[i]
            for key, flat in flats:
                if key not in entry:
                    entry[key] = buf.view_of(flat, i)
        if len(rows) == len(buf.params):
            buf.state_complete_for = keys

    # --- grads --------------------------------------------------------------------
    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim. With ``set_to_none=False`` the grads become views of one flat
        grad buffer per flat param buffer, zeroed in a single pass, and later steps read
        that buffer as one range (fusedopt's fastest path)."""
        self._pending_grad_multiplier = None
        if set_to_none:
            for group in self.param_groups:
                for p in group["params"]:
                    p.grad = None
            for buffers in self._group_buffers:
                for buf in buffers:
                    buf.release_grad_buffer()
            return
        for buffers in self._group_buffers:
            for buf in buffers:
                buf.zero_grads_flat()

    def _collect_work(self):
        """Grads of every buffer, validated before anything is updated so that bad
        input leaves the optimizer and the model as they were."""
        work = []
        for gi, group in enumerate(self.param_groups):
            buffers = self._group_buffers[gi]
            try:
                collected = [buf.collect_grads(self._sparse_grad_message) for buf in buffers]
            except StaleBufferError:
                self._repack_group(gi)
                buffers = self._group_buffers[gi]
                collected = [buf.collect_grads(self._sparse_grad_message) for buf in buffers]
            work.extend((group, buf, rows, grads) for buf, (rows, grads) in zip(buffers, collected) if rows)
        return work

    @staticmethod
    def _lr_arguments(lr, device: torch.device):
        """(lr as float, lr as tensor or None): a tensor lr is read by the kernel on the
        device, so a CUDA step never waits for the host."""
        if isinstance(lr, torch.Tensor):
            return 0.0, lr.to(device=device, dtype=torch.float64, non_blocking=True).reshape(())
        return float(lr), None

    # --- step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, zero_grad: bool = False):
        """As torch.optim. ``zero_grad=True`` zeroes the grads inside the update pass
        (what ``zero_grad(set_to_none=False)`` would do after the step, without a second
        pass over them), also on a step GradScaler skips."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        transform = GradTransform(getattr(self, "grad_scale", None), getattr(self, "found_inf", None),
                                  self._pending_grad_multiplier, zero_grad)
        self._pending_grad_multiplier = None
        # A step GradScaler skips creates no state, as with torch.optim. Only a CPU
        # found_inf is read here; a CUDA one is left to the kernel (no host sync), and
        # the state it leaves is all zeros and counts no step.
        found_inf = transform.found_inf
        skipped = found_inf is not None and found_inf.device.type == "cpu" and bool(found_inf.item())
        for group, buf, rows, grads in self._collect_work():
            self._update_buffer(group, buf, buf.segments(rows), grads, transform.on(buf.device))
            if not skipped:
                self._ensure_state(buf, rows, self._group_state_keys(group))
        return loss

    def _group_state_keys(self, group) -> tuple[str, ...]:
        raise NotImplementedError

    def _update_buffer(self, group, buf: FlatBuffer, segments, grads, transform: GradTransform) -> None:
        raise NotImplementedError

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
        norm_type = float(norm_type)
        work = self._collect_work()
        if any(isinstance(buf, InPlaceBuffer) for _, buf, _, _ in work):
            # Each rank holds only its shards' grads; the norm needs a reduction over the mesh.
            raise RuntimeError("fusedopt: clip_grad_norm_ does not support DTensor (FSDP2) parameters; "
                               "use torch.nn.utils.clip_grad_norm_, which reduces across ranks")
        if not work:
            return torch.tensor(0.0)
        norms = [ops.grad_norm(grads, buf.segments(rows), norm_type) for _, buf, rows, grads in work]
        device = norms[0].device
        total = torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]), norm_type)
        if grad_scaler is not None and grad_scaler.is_enabled():
            total = self._unscale_norm_for(grad_scaler, total)
        dtypes = {buf.dtype for _, buf, _, _ in work}
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

    # --- checkpoints ----------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's format, from torch.optim or fusedopt. A checkpoint that does not
        fit raises ValueError before anything changes."""
        self._validate_checkpoint(state_dict)
        super().load_state_dict(state_dict)
        loaded = self.state
        self.state = defaultdict(dict)
        for buffers in self._group_buffers:
            for buf in buffers:
                for flat in buf.state.values():
                    flat.zero_()
                buf.step.zero_()
                buf.state_complete_for = None
        for p, state in loaded.items():
            if p in self._slots:
                self._adopt_state(p, state)
            else:  # state of no current parameter: torch keeps it as is
                self.state[p] = state

    def _validate_checkpoint(self, state_dict: dict[str, Any]) -> None:
        groups = state_dict.get("param_groups")
        if not isinstance(groups, list) or not isinstance(state_dict.get("state"), dict):
            raise ValueError("loaded state dict must have 'state' and 'param_groups' as torch.optim's")
        if len(groups) != len(self.param_groups):
            raise ValueError("loaded state dict has a different number of parameter groups")
        if any(len(g["params"]) != len(s["params"]) for g, s in zip(self.param_groups, groups)):
            raise ValueError("loaded state dict contains a parameter group "
                             "that doesn't match the size of optimizer's group")
        index_to_param = dict(zip((i for g in groups for i in g["params"]),
                                  (p for g in self.param_groups for p in g["params"])))
        for index, state in state_dict["state"].items():
            p = index_to_param.get(index)
            if p is None or not isinstance(state, dict):
                continue
            for key, value in state.items():
                if key == "step":
                    if torch.is_tensor(value) and value.numel() != 1:
                        raise ValueError(f"loaded state dict has a 'step' of shape {tuple(value.shape)} "
                                         f"for parameter {index}; expected a scalar")
                elif key in self._state_keys and value is not None:
                    if not torch.is_tensor(value) or value.shape != p.shape:
                        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                        raise ValueError(f"loaded state dict has '{key}' of shape {shape} for parameter "
                                         f"{index} of shape {tuple(p.shape)}")


def check_no_shared_memory(params: list[torch.Tensor], name: str) -> None:
    """Parameters whose memory overlaps (two Parameters over one tensor) are updated
    through each other by torch.optim; flat buffers would silently untie them."""
    spans = []
    for index, p in enumerate(params):
        if InPlaceBuffer.needed_for(p):  # a DTensor has no storage; its local shard has
            p = p.to_local()
        if p.numel() == 0:
            continue
        start = p.storage_offset()
        end = start + sum((size - 1) * stride for size, stride in zip(p.shape, p.stride())) + 1
        spans.append((p.untyped_storage().data_ptr(), start * p.element_size(), end * p.element_size(), index))
    spans.sort()
    for (storage_a, _, end_a, a), (storage_b, start_b, _, b) in zip(spans, spans[1:]):
        if storage_a == storage_b and start_b < end_a:
            raise ValueError(f"{name}: parameters {a} and {b} share memory; fusedopt packs each "
                             "parameter into its own slot and cannot keep them tied")

