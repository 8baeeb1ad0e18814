"""The machinery shared by fusedopt's optimizers: packing param groups into flat
buffers, reading grads in place, lazily created state, checkpoints in torch.optim's
format. Subclasses (sgd.py, adam.py) validate hyperparameters and call one kernel per
flat buffer.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.optim import Optimizer

from .flat_buffer import FlatBuffer, StaleBufferError

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda")


def reject_differentiable(differentiable: bool) -> None:
    if differentiable:
        raise ValueError("fusedopt does not support differentiable=True: its kernels update "
                         "parameters in place outside autograd; use torch.optim for that")


def hyperparameter(value: Any) -> float:
    """A 1-element tensor hyperparameter (betas, momentum set by a scheduler) as a float."""
    return value.item() if isinstance(value, torch.Tensor) else value


class FusedOptimizer(Optimizer):
    # GradScaler hands us grad_scale / found_inf instead of unscaling and syncing itself.
    _step_supports_amp_scaling = True
    # State keys torch.optim keeps per parameter, in its order; set by subclasses.
    _state_keys: tuple[str, ...] = ()
    _sparse_grad_message = "fusedopt does not support sparse gradients"

    def __init__(self, params, defaults: dict[str, Any]):
        self._group_buffers: list[list[FlatBuffer]] = []
        self._slots: dict[torch.Tensor, tuple[FlatBuffer, int]] = {}
        super().__init__(params, defaults)

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
        for p in params:
            if p.is_complex():
                raise ValueError(f"{type(self).__name__}: complex parameters are not supported by "
                                 "fusedopt; use torch.optim or pass torch.view_as_real(p)")
            if p.dtype not in SUPPORTED_DTYPES:
                raise ValueError(f"{type(self).__name__}: parameters of dtype {p.dtype} are not "
                                 f"supported (supported: {', '.join(map(str, SUPPORTED_DTYPES))})")
            if p.device.type not in SUPPORTED_DEVICE_TYPES:
                raise ValueError(f"{type(self).__name__}: parameters on {p.device} are not supported")
            if p.device.type == "cuda" and not _cuda_kernels_built():
                raise RuntimeError("fusedopt was built without CUDA kernels; reinstall it on a "
                                   "machine with a CUDA build of torch and the CUDA toolkit")

    def _pack(self, params: list[torch.Tensor]) -> list[FlatBuffer]:
        """One flat buffer per (device, dtype), in order of first appearance. A
        parameter listed twice (torch.optim warns) is packed once."""
        by_key: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in dict.fromkeys(params):
            by_key.setdefault((p.device, p.dtype), []).append(p)
        buffers = [FlatBuffer(ps) for ps in by_key.values()]
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
        hidden_steps = {p: self._slots[p][0].step[self._slots[p][1]].item() for p in params}
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
                buf.step[i] = value.item() if torch.is_tensor(value) else float(value)
                adopted[key] = buf.step[i]
            elif torch.is_tensor(value) and key in self._state_keys:
                view = buf.view_of(buf.state_buffer(key), i)
                view.copy_(value.reshape(p.shape))
                adopted[key] = view
            else:
                adopted[key] = value
        self.state[p] = adopted

    def _ensure_state(self, buf: FlatBuffer, rows: list[int], keys: tuple[str, ...]) -> None:
        """torch.optim creates state on a parameter's first step with a grad; so do we,
        as views into zero-initialised flat buffers."""
        flats = [(key, buf.state_buffer(key)) for key in keys]
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

    # --- grads --------------------------------------------------------------------
    @torch.no_grad()
    def zero_grad(self, set_to_none: bool = True) -> None:
        """As torch.optim. With ``set_to_none=False`` the grads become views of one flat
        grad buffer per flat param buffer, zeroed in a single pass, and later steps read
        that buffer as one range (fusedopt's fastest path)."""
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
                collected = [buf.collect_grads() for buf in buffers]
            except StaleBufferError:
                self._repack_group(gi)
                buffers = self._group_buffers[gi]
                collected = [buf.collect_grads() for buf in buffers]
            for buf, (rows, grads) in zip(buffers, collected):
                if rows:
                    if any(g.is_sparse for g in grads):
                        raise RuntimeError(self._sparse_grad_message)
                    work.append((group, buf, rows, grads))
        return work

    def _amp_tensors(self, device: torch.device):
        """GradScaler's grad_scale and found_inf for a buffer on ``device``, if a scaler
        drives this step."""
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is not None and grad_scale.device != device:
            grad_scale = grad_scale.to(device, non_blocking=True)
        if found_inf is not None and found_inf.device != device:
            found_inf = found_inf.to(device, non_blocking=True)
        return grad_scale, found_inf

    @staticmethod
    def _lr_arguments(lr, device: torch.device):
        """(lr as float, lr as tensor or None): a tensor lr is read by the kernel on the
        device, so a CUDA step never waits for the host."""
        if isinstance(lr, torch.Tensor):
            return 0.0, lr.to(device=device, dtype=torch.float64, non_blocking=True).reshape(())
        return float(lr), None

    # --- step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, buf, rows, grads in self._collect_work():
            grad_scale, found_inf = self._amp_tensors(buf.device)
            self._update_buffer(group, buf, rows, buf.segments(rows), grads, grad_scale, found_inf)
        return loss

    def _update_buffer(self, group, buf, rows, segments, grads, grad_scale, found_inf) -> None:
        raise NotImplementedError

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
                    if not torch.is_tensor(value) or value.numel() != p.numel():
                        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                        raise ValueError(f"loaded state dict has '{key}' of shape {shape} for parameter "
                                         f"{index} of shape {tuple(p.shape)}")


def _cuda_kernels_built() -> bool:
    from .ops import HAS_CUDA_KERNELS
    return HAS_CUDA_KERNELS
