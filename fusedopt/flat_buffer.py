"""Flat buffers: fusedopt's private cache of the parameters and state of a param group.

A buffer holds rows, one per parameter, on one (device, dtype): the layout of its state
(flat buffers by torch.optim's key, ``state``), per-row float32 step counters
(``step``), and where each row's parameter lives. Where a row lives is data, not a kind
of buffer: the kernels take every row of a call in one op, each addressed where its
memory is (csrc/segment_table.h). A row's place is one of

* ``MOVED``: a parameter nothing else sees (``may_move``) is moved into ``data``, one
  contiguous tensor that keeps such rows adjacent and aligned; it becomes a view of it
  with its old shape *and strides* (the same ``Parameter`` object). A call whose rows
  all lie in ``data`` passes it whole, and the kernels walk it as one range.
* ``PINNED``: a parameter that must stay where it is (shared memory, a view of a user's
  tensor, storage tied to another parameter or optimizer) is updated in its own memory.
* ``SHARD``: a DTensor parameter (FSDP2's ``fully_shard``), whose local shard its
  engine owns and gathers from, is updated in that shard. Its state is exposed as
  DTensors with the parameter's mesh and placements, as torch.optim's is under FSDP2.
* ``COPIED``: a pinned parameter whose memory is not dense (every other column of a
  matrix) has a private row in ``data``, copied in before the kernel and back after it.

``views[i]`` is where row i's parameter is expected to be (a DTensor: its local shard):
the per-step check (``_C.sync_check``) compares every parameter with it, and anything
that no longer matches is re-synchronised from the public objects.
"""
from __future__ import annotations

import sys

import torch

from . import _C

# Rows of the segment table: (flat_offset, numel, param_index); csrc/segment_table.h.
SEGMENT_COLUMNS = 3
# Every row starts on a 64-byte boundary of the state buffers, so CUDA kernels can use
# 128-bit loads and CPU SIMD loads stay within cache lines.
ALIGN_BYTES = 64

MOVED, PINNED, SHARD, COPIED = "moved", "pinned", "shard", "copied"
IN_DATA = (MOVED, COPIED)  # places whose kernel row lies in ``data``


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


def local_of(p: torch.Tensor) -> torch.Tensor:
    """What the kernels update for ``p``: a DTensor's local shard (the shard itself, as
    _C.sync_check reads it, not a view of it), else ``p``."""
    return p._local_tensor if is_dtensor(p) else p


def may_move(t: torch.Tensor, own_memory: list[tuple[int, int]] = ()) -> bool:
    """Whether moving ``t`` into fusedopt's memory changes nothing a program can see:
    it lies in one of fusedopt's own buffers (``own_memory``: their address ranges), or
    nothing else sees its memory (no other tensor shares it; not shared memory, as after
    ``share_memory()`` in the Hogwild recipe, nor numpy's or a file mapping's)."""
    if is_dtensor(t):
        return False
    if t.device.type == "meta":
        return True
    address = t.data_ptr()
    return any(start <= address < end for start, end in own_memory) or _C.sole_owner(t)


# [note: huge pages] A step streams every byte of its buffers once, and with 4 KiB pages
# every 4 KiB of each stream is a TLB miss and a page walk. On Linux with transparent
# huge pages on "madvise" (Ubuntu's default, and this project's machines') memory is
# backed by 2 MiB pages (x86-64's) only where a program asks. fusedopt asks for its own
# flat buffers (moved params, state, flat grads); torch's allocator does not for the
# tensors of torch.optim (unless THP_MEM_ALLOC_ENABLE=1). The same step over the same
# values with the buffers on huge pages against 4 KiB pages, interleaved in one process
# (2-core EPYC Zen 4, two runs, medians of 40-150 steps; grads are the caller's 4 KiB
# pages): 3000 params of 2048, SGD moved 1.13-1.14x as fast, in shared memory (only the
# state ours) 1.06-1.10x; AdamW 1.10-1.12x and 0.99-1.10x; 48 params of 1M 1.00-1.17x.
HUGE_PAGE = 2 << 20


def empty(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty(numel)``; on the CPU, a buffer of two huge pages or more starts on a
    2 MiB boundary and its whole 2 MiB pages are huge pages (``_C.huge_page_empty``)."""
    device = torch.device(device)
    if device.type != "cpu" or numel * dtype.itemsize < 2 * HUGE_PAGE:
        return torch.empty(numel, dtype=dtype, device=device)
    return _C.huge_page_empty(numel, dtype)


def zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.zeros(numel)``, laid out as ``empty``."""
    return empty(numel, dtype, device).zero_()


def _span(flat: torch.Tensor) -> tuple[int, int]:
    return flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()


def _round_up(n: int, multiple: int) -> int:
    return (n + multiple - 1) // multiple * multiple


def _row_major_strides(shape) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def _place(p: torch.Tensor, movable: bool) -> str:
    if is_dtensor(p):
        return SHARD
    if movable:
        return MOVED
    return PINNED if is_dense(p) else COPIED


class FlatBuffer:
    """The rows of parameters of one (device, dtype), wherever they live (module doc)."""

    def __init__(self, params: list[torch.Tensor], slices: int = 1, movable: list[bool] | None = None):
        """``movable``: per parameter, whether it may move into ``data`` (default: all).
        ``slices``: the layout's length is padded so it splits into that many equal,
        aligned slices (fusedopt.distributed gives each rank one)."""
        movable = [True] * len(params) if movable is None else movable
        places = [_place(p, m) for p, m in zip(params, movable)]
        # Rows with a slot in ``data`` first: ``data`` ends where the last of them does.
        order = sorted(range(len(params)), key=lambda i: places[i] not in IN_DATA)
        self.params = [params[i] for i in order]
        self.places = [places[i] for i in order]
        local = [local_of(p) for p in self.params]
        self.device = local[0].device
        self.dtype = local[0].dtype
        align = max(1, ALIGN_BYTES // local[0].element_size())
        self.offsets: list[int] = []
        self.strides: list[tuple[int, ...]] = []
        # Per row: the permutation that turns a grad with the parameter's strides into
        # a contiguous tensor (None: the slot is row-major).
        self.grad_perms: list[list[int] | None] = []
        total = data_numel = 0
        for p, shard, place in zip(self.params, local, self.places):
            total = _round_up(total, align)
            self.offsets.append(total)
            total += shard.numel()
            if place == SHARD:
                if not shard.is_contiguous():
                    raise ValueError("fusedopt: a DTensor parameter's local shard must be contiguous")
                self.strides.append(shard.stride())
                self.grad_perms.append(None)
            elif place != COPIED and is_dense(p):  # keeps its strides (channels_last, transposed)
                self.strides.append(p.stride())
                self.grad_perms.append(memory_order(p))
            else:  # gappy or overlapping: its row is row-major
                self.strides.append(_row_major_strides(p.shape))
                self.grad_perms.append(None)
            if place in IN_DATA:
                data_numel = total
        self.numel = _round_up(total, align * slices)
        self.copied = [i for i, place in enumerate(self.places) if place == COPIED]
        self.has_shards = SHARD in self.places
        all_in_data = all(place in IN_DATA for place in self.places)
        self.data = zeros(self.numel if all_in_data else _round_up(data_numel, align), self.dtype, self.device)
        # Per row: where the parameter is expected (views) and the contiguous tensor the
        # kernels update (homes; segment_table.h).
        self.views: list[torch.Tensor] = []
        self.homes: list[torch.Tensor] = []
        with torch.no_grad():
            for i, (p, shard, place) in enumerate(zip(self.params, local, self.places)):
                offset, numel = self.offsets[i], shard.numel()
                if place == MOVED:
                    view = self.view_of(self.data, i)
                    view.copy_(p)
                    p.data = view
                    self.views.append(view)
                else:
                    self.views.append(shard.detach())
                if place in IN_DATA:
                    self.homes.append(self.data[offset:offset + numel])
                elif self.views[-1].is_contiguous():
                    # The view itself: the per-step check has just brought its TensorImpl
                    # into cache, where another tensor object would be a cache miss per
                    # row at the kernel call (3000 rows: about 0.5 ms).
                    self.homes.append(self.views[-1])
                else:  # dense: its memory from its lowest address
                    self.homes.append(self.views[-1].as_strided((numel,), (1,), shard.storage_offset()))
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
        self._calls: dict[tuple[int, ...], tuple[torch.Tensor, list[torch.Tensor], object]] = {}
        self._last_call: tuple = (None, 0, None)  # (rows list, its length, its call)

    # --- layout -----------------------------------------------------------------
    def view_of(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        """Row ``index`` of ``flat`` (a buffer laid out like the state), shaped and
        strided like the slot of its parameter (a DTensor's: a DTensor of that shard)."""
        p = self.params[index]
        if self.places[index] != SHARD:
            return flat.as_strided(p.shape, self.strides[index], flat.storage_offset() + self.offsets[index])
        from torch.distributed.tensor import DTensor

        local = flat.as_strided(p._local_tensor.shape, self.strides[index],
                                flat.storage_offset() + self.offsets[index])
        return DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride(),
                                  run_check=False)

    def segments(self, rows: list[int]) -> torch.Tensor:
        """The segment table for these rows (csrc/segment_table.h)."""
        return self._call(rows)[0]

    def kernel_params(self, rows: list[int]) -> list[torch.Tensor]:
        """The params list the kernels take for these rows (csrc/segment_table.h): ``data``
        when every row lies in it, else each row's own memory."""
        return self._call(rows)[1]

    def _call(self, rows: list[int]) -> tuple[torch.Tensor, list[torch.Tensor], object]:
        """(segments, kernel params, a C++ hold on them) for a set of rows, cached per set
        so a device table is uploaded only when the set changes. The hold spares each
        call a GIL round trip per row param ([note: C++ references for op calls]). The
        same list as the last call's is its set without hashing it again (a step asks
        twice for its part's rows; a rows list is not changed once made: Part.rows grows
        only while its plan is made, and the length is checked)."""
        last_rows, last_length, call = self._last_call
        if rows is last_rows and len(rows) == last_length:
            return call
        key = tuple(rows)
        call = self._calls.get(key)
        if call is None:
            if len(self._calls) > 64:
                self._calls.clear()
            params = self._make_params(rows)
            call = self._calls[key] = (self._make_segments(rows), params, _C.hold(params))
        self._last_call = (rows, len(rows), call)
        return call

    def _make_segments(self, rows) -> torch.Tensor:
        table = [[self.offsets[i], self.homes[i].numel(), i] for i in rows]
        return torch.tensor(table, dtype=torch.int64).reshape(-1, SEGMENT_COLUMNS).to(self.device)

    def _make_params(self, rows) -> list[torch.Tensor]:
        if all(self.places[i] in IN_DATA for i in rows):
            return [self.data]
        return [self.homes[i] for i in rows]

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
            flat = self.state[key] = zeros(self.numel, dtype, self.device)
        elif flat.dtype != dtype:
            flat = self.state[key] = empty(self.numel, dtype, self.device).copy_(flat)
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
        """Per row, the address of its slot in the flat grad buffer (None: no buffer; 0:
        none, as for a DTensor, whose engine owns its grad)."""
        if self.grad_buffer is None:
            return None
        return [0 if self.places[i] == SHARD else self.view_of(self.grad_buffer, i).data_ptr() for i in rows]

    def kernel_grads(self, rows: list[int], grads: list[torch.Tensor], flat: bool) -> list[torch.Tensor]:
        """What the kernels read for these rows' grads (segment_table.h): the flat grad
        buffer, or each grad (a DTensor's: its local shard, as _C.sync_check gives it)
        with its dims in its slot's memory order."""
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
        parameter or held by the user, a DTensor's, which its engine owns) is zeroed where
        it is. Returns the grads zeroed."""
        if self.grad_buffer is None:
            self.grad_buffer = zeros(self.numel, self.dtype, self.device)
        zeroed = []
        for i in rows:
            p = self.params[i]
            g = p.grad
            if g is None:
                continue
            if self.places[i] == SHARD:
                g._local_tensor.zero_()
                zeroed.append(g)
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
        """Brings the private rows of copied parameters up to date with them."""
        for i in self.copied:
            self.view_of(self.data, i).copy_(self.params[i])

    def after_kernel(self) -> None:
        """Writes the private rows of copied parameters back to them."""
        for i in self.copied:
            self.params[i].copy_(self.view_of(self.data, i))
