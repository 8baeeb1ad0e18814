"""Flat buffers: fusedopt's private cache of the parameters and state of a param group.

A buffer holds rows, one per parameter, on one (device, dtype). Its ``data`` is what the
kernels update; optimizer state lives in flat buffers of the same layout (``state``),
and per-row float32 step counters in ``step``. ``views[i]`` is where row i's parameter
is expected to be: the per-step check (``_C.sync_check``) compares every parameter with
it, and anything that no longer matches is re-synchronised from the public objects.

Two kinds of buffer, one layout contract:
* ``FlatBuffer``: parameters *moved* into one contiguous tensor. Each parameter becomes a
  view of it with its old shape and strides (the same ``Parameter`` object). Only a
  parameter whose memory nothing else sees is moved (``may_move``).
* ``PinnedBuffer``: one parameter that must stay where it is (shared memory, a view of
  a user's tensor, storage tied to another parameter or optimizer). Its ``data`` is
  the parameter's own memory, so the kernels update it in place; a parameter whose
  memory is not dense (every other column of a matrix) is copied into a private row
  before the kernel and back after it. ``InPlaceBuffer`` is the DTensor (FSDP2) case.
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
    dense and non-overlapping."""
    if t.is_contiguous():
        return None
    perm = sorted(range(t.dim()), key=lambda d: (-t.stride(d), -t.size(d)))
    if not t.permute(perm).is_contiguous():
        raise ValueError("not dense")
    return perm


def is_dense(t: torch.Tensor) -> bool:
    try:
        memory_order(t)
        return True
    except ValueError:
        return False


def is_dtensor(p: torch.Tensor) -> bool:
    # A DTensor exists only once its module is loaded; importing it here would add
    # half a second to `import fusedopt`.
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    return dtensor_module is not None and isinstance(p, dtensor_module.DTensor)


def may_move(t: torch.Tensor, own_memory: list[tuple[int, int]] = ()) -> bool:
    """Whether moving ``t`` into fusedopt's memory changes nothing a program can see:
    it lies in one of fusedopt's own buffers (``own_memory``: their address ranges), or
    nothing else sees its memory (no other tensor shares it; not shared memory, as after
    ``share_memory()`` in the Hogwild recipe, nor numpy's or a file mapping's)."""
    if t.device.type == "meta":
        return True
    address = t.data_ptr()
    return any(start <= address < end for start, end in own_memory) or _C.sole_owner(t)


def _span(flat: torch.Tensor) -> tuple[int, int]:
    return flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _row_major_strides(shape) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


class FlatBuffer:
    """Parameters moved into one contiguous tensor (see the module doc)."""

    def __init__(self, params: list[torch.Tensor], slices: int = 1):
        """``slices``: the buffer's length is padded so it splits into that many equal,
        aligned slices (fusedopt.distributed gives each rank one)."""
        self.params = list(params)
        self.device = params[0].device
        self.dtype = params[0].dtype
        align = max(1, ALIGN_BYTES // params[0].element_size())
        self.offsets: list[int] = []
        self.strides: list[tuple[int, ...]] = []
        # Per row: the permutation that turns a grad with the parameter's strides into
        # a contiguous tensor (None: the slot is row-major).
        self.grad_perms: list[list[int] | None] = []
        total = 0
        for p in params:
            total = _round_up(total, align)
            self.offsets.append(total)
            total += p.numel()
            if is_dense(p):  # keeps its strides (channels_last, transposed)
                self.strides.append(p.stride())
                self.grad_perms.append(memory_order(p))
            else:  # gappy or overlapping: stored row-major
                self.strides.append(_row_major_strides(p.shape))
                self.grad_perms.append(None)
        self.numel = _round_up(total, align * slices)
        self.data = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        self.views = [self.view_of(self.data, i) for i in range(len(params))]
        with torch.no_grad():
            for p, view in zip(params, self.views):
                view.copy_(p)
                p.data = view
        self._init_rows()

    def _init_rows(self) -> None:
        self.state: dict[str, torch.Tensor] = {}  # flat state buffers by torch.optim's key
        # The dtype of each key's state buffer where it is not the param's (bf16 moments,
        # a float32 master copy); set by the optimizer from its param group.
        self.state_dtypes: dict[str, torch.dtype] = {}
        # float32 per-row step counters (torch.optim's state["step"]; for SGD: whether
        # the row's momentum buffer has been started).
        self.step = torch.zeros(len(self.params), dtype=torch.float32, device=self.device)
        self.grad_buffer: torch.Tensor | None = None
        self._segments_cache: dict[tuple[int, ...], torch.Tensor] = {}

    # --- layout -----------------------------------------------------------------
    def view_of(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """Row ``index`` of ``flat`` (a buffer laid out like ``data``), shaped and
        strided like the slot of its parameter."""
        p = self.params[index]
        return flat.as_strided(p.shape, self.strides[index], flat.storage_offset() + self.offsets[index])

    def segments(self, rows: list[int]) -> torch.Tensor:
        """The segment table for these rows, cached per set of rows so a device table
        is uploaded only when the set changes."""
        key = tuple(rows)
        table = self._segments_cache.get(key)
        if table is None:
            if len(self._segments_cache) > 64:
                self._segments_cache.clear()
            table = self._segments_cache[key] = self._make_segments(rows)
        return table

    def _make_segments(self, rows) -> torch.Tensor:
        table = [[self.offsets[i], self.params[i].numel(), i] for i in rows]
        return torch.tensor(table, dtype=torch.int64).reshape(-1, SEGMENT_COLUMNS).to(self.device)

    def memory(self) -> list[tuple[int, int]]:
        """Address ranges of the buffers this object owns (param data, state, grads)."""
        return [_span(t) for t in (self.data, self.grad_buffer, *self.state.values()) if t is not None]

    # --- state ------------------------------------------------------------------
    def state_buffer(self, key: str) -> torch.Tensor:
        """The flat buffer behind state key ``key``, of that key's dtype (``state_dtypes``,
        else the param's), zero-initialised on first use."""
        flat = self.state.get(key)
        dtype = self.state_dtypes.get(key, self.dtype)
        if flat is None:
            flat = self.state[key] = torch.zeros_like(self.data, dtype=dtype)
        elif flat.dtype != dtype:
            flat = self.state[key] = flat.to(dtype)
        return flat

    def set_state_dtypes(self, dtypes: dict[str, torch.dtype]) -> bool:
        """Sets the dtype of each key's state buffer; a buffer of another dtype is
        converted (to nearest). Returns whether any key's dtype changed."""
        changed = False
        for key, dtype in dtypes.items():
            if self.state_dtypes.get(key, self.dtype) != dtype:
                changed = True
            self.state_dtypes[key] = dtype
            if key in self.state and self.state[key].dtype != dtype:
                self.state[key] = self.state[key].to(dtype)
        return changed

    def state_view(self, key: str, index: int) -> torch.Tensor:
        """What ``optimizer.state[p][key]`` holds for row ``index``."""
        if key == "step":
            return self.step[index]
        return self.view_of(self.state_buffer(key), index)

    # --- grads ------------------------------------------------------------------
    def grad_slots(self, rows: list[int]) -> list[int] | None:
        """Per row, the address of its slot in the flat grad buffer (None: no buffer)."""
        if self.grad_buffer is None:
            return None
        return [self.view_of(self.grad_buffer, i).data_ptr() for i in rows]

    def kernel_grads(self, rows: list[int], grads: list[torch.Tensor], flat: bool) -> list[torch.Tensor]:
        """What the kernels read for these rows' grads (segment_table.h): the flat grad
        buffer, or each grad with its dims in its slot's memory order."""
        if flat:
            return [self.grad_buffer]
        perms = self.grad_perms
        if not any(perms):  # every slot row-major: the grads as they are
            return grads
        return [g if perms[i] is None else g.permute(perms[i]) for i, g in zip(rows, grads)]

    def zero_grads(self, rows: list[int]) -> list[torch.Tensor]:
        """zero_grad(set_to_none=False) for these rows: zeroes existing grads, as torch
        does. A grad nothing else sees is moved into the flat grad buffer first (the same
        tensor object, re-pointed with ``set_``), so that later steps read these rows as
        one range; any other grad (a DDP bucket view, a tensor shared with another
        parameter or held by the user) is zeroed where it is. Returns the grads zeroed."""
        if self.grad_buffer is None:
            self.grad_buffer = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        zeroed = []
        for i in rows:
            p = self.params[i]
            g = p.grad
            if g is None:
                continue
            if g.grad_fn is not None:
                g.detach_()
            else:
                g.requires_grad_(False)
            slot = self.view_of(self.grad_buffer, i)
            if g.data_ptr() == slot.data_ptr() and g.stride() == slot.stride():
                slot.zero_()
            elif (g.layout == torch.strided and g.dtype == self.dtype and g.device == self.device
                  and g.shape == p.shape and may_move(g) and not any(g is z for z in zeroed)):
                slot.zero_()
                g.set_(self.grad_buffer.untyped_storage(), slot.storage_offset(), slot.shape, slot.stride())
            else:
                g.zero_()
            zeroed.append(g)
        return zeroed

    def release_grad_buffer(self) -> None:
        self.grad_buffer = None

    # --- around the kernel --------------------------------------------------------
    def before_kernel(self) -> None:
        """Brings ``data`` up to date with the parameters (only a copied row needs it)."""

    def after_kernel(self) -> None:
        """Writes ``data`` back to the parameters (only a copied row needs it)."""


class PinnedBuffer(FlatBuffer):
    """One parameter updated where it lives (see the module doc)."""

    def __init__(self, param: torch.Tensor):
        self.params = [param]
        self.device = param.device
        self.dtype = param.dtype
        self.offsets = [0]
        self.numel = param.numel()
        self.copied = not is_dense(param)
        if self.copied:  # a private row-major row, synchronised around each kernel
            self.strides = [_row_major_strides(param.shape)]
            self.grad_perms = [None]
            self.data = torch.empty(self.numel, dtype=self.dtype, device=self.device)
        else:  # the parameter's own memory, as a flat 1-D view
            self.strides = [param.stride()]
            self.grad_perms = [memory_order(param)]
            self.data = param.detach().as_strided((self.numel,), (1,), param.storage_offset())
        self.views = [param.detach()]  # where the parameter is: its own memory
        self._init_rows()

    def memory(self) -> list[tuple[int, int]]:  # the parameter's own memory is not fusedopt's
        owned = (self.grad_buffer, *self.state.values(), self.data if self.copied else None)
        return [_span(t) for t in owned if t is not None]

    def before_kernel(self) -> None:
        if self.copied:
            self.view_of(self.data, 0).copy_(self.params[0])

    def after_kernel(self) -> None:
        if self.copied:
            self.params[0].copy_(self.view_of(self.data, 0))


class InPlaceBuffer(PinnedBuffer):
    """A DTensor parameter (FSDP2's ``fully_shard``), whose local shard its engine owns
    and gathers from: the kernels update that shard in place. State is flat over the
    shard and exposed as DTensors with the parameter's mesh and placements, as
    torch.optim's state is under FSDP2."""

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
        self.strides = [local.stride()]
        self.grad_perms = [None]
        self.numel = local.numel()
        self.copied = False
        self.data = local.view(-1)
        self.views = [local]
        self._init_rows()

    def view_of(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        p = self.params[index]
        local = flat.as_strided(self.local_shape, self.strides[0], flat.storage_offset())
        return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                  run_check=False)

    def _make_segments(self, rows) -> torch.Tensor:  # the local shard, not the global shape
        return torch.tensor([[0, self.numel, 0]] if rows else [], dtype=torch.int64).reshape(
            -1, SEGMENT_COLUMNS).to(self.device)

    def grad_slots(self, rows):
        return None  # the engine owns the grads

    def local_grad(self) -> torch.Tensor | None:
        """The grad's local shard; raises for a grad whose placements differ."""
        (p,) = self.params
        if p.grad is None:
            return None
        if p.grad.placements != p.placements:
            raise ValueError(f"fusedopt: a DTensor grad placed {p.grad.placements} does not match its "
                             f"parameter's placements {p.placements}")
        return p.grad.to_local()

    def kernel_grads(self, rows, grads, flat):
        return [self.local_grad()]

    def zero_grads(self, rows):
        """The engine accumulates into the grad it made: its local shard is zeroed where it is."""
        grad = self.local_grad()
        if grad is None:
            return []
        grad.zero_()
        return [self.params[0].grad]
