"""Flat buffers: the parameters of one param group on one (device, dtype), packed into a
single contiguous tensor that one kernel call updates.

Each parameter becomes a view into the buffer with its old shape *and strides* (the
same ``Parameter`` object; its old storage is released). Optimizer state lives in
flat buffers of the same layout, and ``optimizer.state[p]`` holds views into them, so
``state_dict()`` is torch.optim's format.
"""
from __future__ import annotations

import sys

import torch

from . import _C
# Rows of the segment table: (flat_offset, numel, param_index); csrc/segment_table.h.
SEGMENT_COLUMNS = 3
# Every parameter starts on a 64-byte boundary, so CUDA kernels can use 128-bit loads
# and CPU SIMD loads stay within cache lines.
ALIGN_BYTES = 64


def memory_order(t: torch.Tensor) -> list[int] | None:
    """The permutation of dims that lists ``t``'s memory from outermost to innermost,
    or None when ``t`` is already row-major. Raises ValueError for a tensor that is not
    dense and non-overlapping (it cannot keep its strides in a flat buffer)."""
    if t.is_contiguous():
        return None
    perm = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d)))
    if not t.permute(perm).is_contiguous():
        raise ValueError("not dense")
    return perm


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


class StaleBufferError(RuntimeError):
    """A parameter no longer points into its flat buffer (e.g. ``model.to()`` or
    ``p.data = ...`` after the optimizer was made)."""


class FlatBuffer:
    def __init__(self, params: list[torch.Tensor], slices: int = 1):
        """``slices``: the buffer's length is padded so it splits into that many equal,
        aligned slices (fusedopt.distributed gives each rank one)."""
        self.params = params
        self.device = params[0].device
        self.dtype = params[0].dtype
        align = max(1, ALIGN_BYTES // params[0].element_size())
        self.offsets: list[int] = []
        # Per parameter: the permutation that turns a grad with the parameter's
        # strides into a contiguous tensor (None: the parameter is row-major).
        self.grad_perms: list[list[int] | None] = []
        strides = []
        total = 0
        for p in params:
            total = _round_up(total, align)
            self.offsets.append(total)
            total += p.numel()
            try:
                perm = memory_order(p)
                strides.append(p.stride())
            except ValueError:  # a gappy or overlapping view: store it row-major
                perm = None
                strides.append(torch.empty(p.shape, device="meta").stride())
            self.grad_perms.append(perm)
        self.numel = _round_up(total, align * slices)
        self.data = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        with torch.no_grad():
            for p, offset, stride in zip(params, self.offsets, strides):
                view = self.data.as_strided(p.shape, stride, offset)
                view.copy_(p)
                p.data = view
        self.param_ptrs = self._slot_addresses()
        self.state: dict[str, torch.Tensor] = {}  # flat state buffers by torch.optim's key
        # The state keys every parameter is known to have in optimizer.state (a fast
        # path for the per-step check); None after anything replaced optimizer.state.
        self.state_complete_for: tuple[str, ...] | None = None
        # float32 per-parameter step counters (torch.optim's state["step"]).
        self.step = torch.zeros(len(params), dtype=torch.float32, device=self.device)
        self.grad_buffer: torch.Tensor | None = None
        self.grad_views: list[torch.Tensor | None] = [None] * len(params)
        self._all_indices = list(range(len(params)))
        self._any_permuted = any(perm is not None for perm in self.grad_perms)
        self._all_rows = self._make_segments(self._all_indices)
        self._segments_cache: dict[tuple[int, ...], torch.Tensor] = {}

    # --- layout -----------------------------------------------------------------
    def view_of(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """The slot of parameter ``index`` in ``flat``, shaped and strided like it."""
        p = self.params[index]
        return flat.as_strided(p.shape, p.stride(), self.offsets[index])

    def _make_segments(self, rows) -> torch.Tensor:
        table = [[self.offsets[i], self.params[i].numel(), i] for i in rows]
        return torch.tensor(table, dtype=torch.int64).reshape(-1, SEGMENT_COLUMNS).to(self.device)

    def segments(self, rows: list[int]) -> torch.Tensor:
        """The segment table for these parameter indices, cached per set of rows so a
        device table is uploaded only when the set changes."""
        if len(rows) == len(self.params):
            return self._all_rows
        key = tuple(rows)
        table = self._segments_cache.get(key)
        if table is None:
            if len(self._segments_cache) > 64:
                self._segments_cache.clear()
            table = self._segments_cache[key] = self._make_segments(rows)
        return table

    def _slot_addresses(self) -> list[int]:
        # Asked of the views themselves: an empty tensor reports address 0.
        return [self.view_of(self.data, i).data_ptr() for i in range(len(self.params))]

    def __setstate__(self, state):
        # A copy (deepcopy, unpickling) has its buffer at new addresses, and its params
        # may not point into it (Parameter.__deepcopy__ clones); the next step sees
        # that and re-packs, carrying the state over.
        self.__dict__.update(state)
        self.param_ptrs = self._slot_addresses()

    # --- state ------------------------------------------------------------------
    def state_buffer(self, key: str) -> torch.Tensor:
        """The flat buffer behind state key ``key``, zero-initialised on first use."""
        flat = self.state.get(key)
        if flat is None:
            flat = self.state[key] = torch.zeros_like(self.data)
        return flat

    # --- grads ------------------------------------------------------------------
    def collect_grads(self, sparse_message: str):
        """Reads every parameter's grad in place. Returns (rows, grads) where rows are
        the indices of parameters that have a grad and grads is what the kernels take:
        ``[flat grad buffer]`` when every grad is still a view of it, else one tensor per
        row with its dims in the parameter's memory order. Raises StaleBufferError, or
        RuntimeError(sparse_message) for a sparse grad.

        This runs every step over every parameter, so the loop is in C (_C.collect_grads);
        torch itself checks a grad's shape, dtype and device when it is assigned."""
        collected = _C.collect_grads(self.params, self.param_ptrs, self.grad_views)
        if collected is None:
            raise StaleBufferError
        rows, grads, flat, sparse = collected
        if sparse:
            raise RuntimeError(sparse_message)
        if rows is None:
            rows = self._all_indices
        if not grads or (flat and self.grad_buffer is not None):
            return rows, [self.grad_buffer] if grads else []
        if self._any_permuted:
            perms = self.grad_perms
            grads = [g if perms[i] is None else g.permute(perms[i]) for i, g in zip(rows, grads)]
        return rows, grads

    def zero_grads_flat(self) -> None:
        """zero_grad(set_to_none=False): zeroes existing grads in place, as torch does.
        A standalone grad is moved into one flat grad buffer first (the same tensor
        object, re-pointed with ``set_``), so this zeroing and later steps each cover
        one range. A grad that is a view of someone else's buffer (DDP's bucket views)
        is zeroed where it is and left there."""
        if self.grad_buffer is None:
            self.grad_buffer = torch.zeros_like(self.data)
        else:
            self.grad_buffer.zero_()
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None or g is self.grad_views[i]:
                continue
            if g.grad_fn is not None:
                g.detach_()
            else:
                g.requires_grad_(False)
            if g._base is not None or g.is_sparse or g.dtype != self.dtype or g.device != self.device:
                g.zero_()
                continue
            g.set_(self.grad_buffer.untyped_storage(), self.offsets[i], p.shape, p.stride())
            self.grad_views[i] = g

    def release_grad_buffer(self) -> None:
        self.grad_buffer = None
        self.grad_views = [None] * len(self.params)


class InPlaceBuffer(FlatBuffer):
    """The buffer of one parameter that must stay where it is: a DTensor (FSDP2's
    ``fully_shard``), whose local shard its engine owns and gathers from. The kernels
    update that shard in place (its 1-D view is ``data``); the parameter is never
    re-pointed. State is flat over the shard and exposed as DTensors with the
    parameter's mesh and placements, as torch.optim's state is under FSDP2."""

    @staticmethod
    def needed_for(p: torch.Tensor) -> bool:
        # A DTensor exists only once its module is loaded; importing it here would add
        # half a second to `import fusedopt`.
        dtensor_module = sys.modules.get("torch.distributed.tensor")
        return dtensor_module is not None and isinstance(p, dtensor_module.DTensor)

    def __init__(self, param: torch.Tensor):
        with torch.no_grad():  # to_local() outside autograd: the shard itself, not a view of it
            local = param.to_local()
        if not local.is_contiguous():
            raise ValueError("fusedopt: a DTensor parameter's local shard must be contiguous")
        self.params = [param]
        self.device = local.device
        self.dtype = local.dtype
        self.local_shape = local.shape
        self.offsets = [0]
        self.grad_perms = [None]
        self.numel = local.numel()
        self.data = local.view(-1)
        self.param_ptrs = self._slot_addresses()
        self.state = {}
        self.state_complete_for = None
        self.step = torch.zeros(1, dtype=torch.float32, device=self.device)
        self.grad_buffer = None
        self.grad_views = [None]
        self._all_rows = torch.tensor([[0, self.numel, 0]], dtype=torch.int64).to(self.device)

    def view_of(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        p = self.params[index]
        return DTensor.from_local(flat.view(self.local_shape), p.device_mesh, p.placements,
                                  shape=p.shape, stride=p.stride(), run_check=False)

    def _slot_addresses(self) -> list[int]:
        return [self.data.data_ptr()]

    def collect_grads(self, sparse_message: str):
        (p,) = self.params
        if p.to_local().data_ptr() != self.param_ptrs[0]:
            raise StaleBufferError  # the engine replaced the shard (e.g. load_state_dict(assign=True))
        if p.grad is None:
            return [], []
        if p.grad.is_sparse:
            raise RuntimeError(sparse_message)
        if p.grad.placements != p.placements:
            raise ValueError(f"fusedopt: a DTensor grad placed {p.grad.placements} does not match its "
                             f"parameter's placements {p.placements}")
        return [0], [p.grad.to_local()]

    def zero_grads_flat(self) -> None:
        """zero_grad(set_to_none=False): the engine accumulates into the grad it made, so
        its local shard is zeroed where it is."""
        (p,) = self.params
        if p.grad is not None:
            p.grad.to_local().zero_()

