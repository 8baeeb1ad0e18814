"""ZeRO-1 over fusedopt's flat buffers: ``ShardedOptimizer``.

Every rank keeps the whole flat param buffer (DDP trains a replicated model) but owns an
equal contiguous slice of it: it keeps optimizer state for that slice only, runs the fused
step on it, and the updated slices are all-gathered into every rank's buffer. Slicing the
flat buffer instead of handing out whole tensors (as torch's ZeroRedundancyOptimizer does)
splits the state evenly however uneven the model is; a parameter may span ranks, each of
which updates its piece of it.
"""
from __future__ import annotations

import functools
import weakref
from collections import defaultdict
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from . import _C
from .flat_buffer import SEGMENT_COLUMNS, FlatBuffer, is_dtensor
from .optimizer import FusedOptimizer
from .placement import NOT_ADOPTED, same_place
from .public_state import _synced

__all__ = ["ShardedOptimizer"]

# Backends whose all-gather into one tensor is the way to share the updated slices. gloo's
# all-gather moves data several times slower than its broadcast (124M floats, 2 CPU ranks:
# 720 ms against 200 ms), so with the others each rank broadcasts its own slice.
ALL_GATHER_BACKENDS = ("nccl", "xccl")
# torch 2.14 renamed all_gather_into_tensor (deprecated there) to all_gather_single.
_all_gather_into_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class Piece(NamedTuple):
    """The part of one parameter that lies in a rank's slice."""
    slice_offset: int  # first element in the slice
    param_start: int   # first element of the parameter it holds, in the parameter's memory order
    numel: int


def grad_piece(grad: torch.Tensor, start: int, numel: int) -> torch.Tensor:
    """Elements [start, start + numel) of ``grad`` (its dims already in its parameter's
    memory order) in row-major order: the grad itself or a view of it where possible;
    else (bmm/einsum grads) a contiguous copy of just the outer rows that hold them."""
    if start == 0 and numel == grad.numel():
        return grad  # the kernels read a whole strided grad in place
    if grad.is_contiguous():
        return grad.view(-1)[start:start + numel]
    row = grad.numel() // grad.size(0)
    first, last = start // row, -(-(start + numel) // row)
    begin = start - first * row
    return grad[first:last].reshape(-1)[begin:begin + numel]


class BufferSlice:
    """This rank's slice [lo, hi) of a FlatBuffer, which the kernels and
    FusedOptimizer's state handling take for a flat buffer of its own: ``data`` is that
    part of the param buffer, state buffers are slice-sized, segment offsets are relative
    to ``lo`` and param indices index the full buffer's ``step`` counters, shared with it
    (exact for every parameter this rank holds a piece of). ``view_of`` gives a
    parameter's piece of a slice-sized buffer: 1-D, in the parameter's memory order."""

    state_buffer = FlatBuffer.state_buffer  # zero-initialised on first use, slice-sized
    set_state_dtypes = FlatBuffer.set_state_dtypes
    segments = FlatBuffer.segments          # cached per set of rows
    kernel_params = FlatBuffer.kernel_params
    _call = FlatBuffer._call

    def __init__(self, full: FlatBuffer, lo: int, hi: int):
        self.full = full
        self.lo, self.hi = lo, hi
        self.data = full.data[lo:hi]
        self.numel = hi - lo
        self.device = full.device
        self.dtype = full.dtype
        self.params = full.params
        self.step = full.step
        self.state: dict[str, torch.Tensor] = {}
        self.state_dtypes: dict[str, torch.dtype] = {}
        self.state_complete_for: tuple[str, ...] | None = None
        # Per row with state: (its keys, what was put into optimizer.state: optimizer's
        # _synced); records_version counts their changes (ShardedOptimizer._edit_check).
        self.records: dict[int, tuple] = {}
        self.records_version = 0
        self.owned: dict[int, Piece] = {}
        for i, (p, offset) in enumerate(zip(full.params, full.offsets)):
            start, stop = max(offset, lo), min(offset + p.numel(), hi)
            # An empty parameter belongs to the slice its offset falls in (the last one
            # if it sits at the very end), so that one rank counts its steps.
            owns_empty = p.numel() == 0 and (lo <= offset < hi or offset >= hi == full.numel)
            if start < stop or owns_empty:
                self.owned[i] = Piece(start - lo, start - offset, max(stop - start, 0))
        self._calls: dict[tuple[int, ...], tuple[torch.Tensor, list[torch.Tensor], object]] = {}
        self._last_call: tuple = (None, 0, None)

    def _make_params(self, rows) -> list[torch.Tensor]:
        return [self.data]

    def _make_segments(self, rows) -> torch.Tensor:
        table = [[self.owned[i].slice_offset, self.owned[i].numel, i] for i in rows]
        return torch.tensor(table, dtype=torch.int64).reshape(-1, SEGMENT_COLUMNS).to(self.device)

    def view_of(self, flat: torch.Tensor, index: int) -> torch.Tensor:
        piece = self.owned[index]
        return flat[piece.slice_offset:piece.slice_offset + piece.numel]

    def piece_of(self, index: int, value: torch.Tensor) -> torch.Tensor:
        """This slice's piece of a whole-parameter tensor (a checkpoint's state)."""
        perm = self.full.grad_perms[index]
        in_memory_order = value if perm is None else value.permute(perm)
        piece = self.owned[index]
        return in_memory_order.reshape(-1)[piece.param_start:piece.param_start + piece.numel]

    def take(self, rows: list[int], grads: list[torch.Tensor]) -> tuple[list[int], list[torch.Tensor]]:
        """The rows this slice owns among ``rows`` and what the kernels read of their
        grads, from ``FlatBuffer.collect_grads``'s (rows, grads)."""
        owned = [i for i in rows if i in self.owned]
        if not owned:
            return owned, []
        if grads[0] is self.full.grad_buffer:
            return owned, [self.full.grad_buffer[self.lo:self.hi]]
        return owned, [grad_piece(g, self.owned[i].param_start, self.owned[i].numel)
                       for i, g in zip(rows, grads) if i in self.owned]

    def clear_state(self) -> None:
        for flat in self.state.values():
            flat.zero_()
        self.state_complete_for = None
        self.set_record(None)

    def set_record(self, index: int | None, record: tuple | None = None) -> None:
        """Row ``index``'s record (None: drop it; index None: drop every row's)."""
        if index is None:
            self.records.clear()
        elif record is None:
            self.records.pop(index, None)
        else:
            self.records[index] = record
        self.records_version += 1

    def state_view(self, key: str, index: int) -> torch.Tensor:
        """What ``optimizer.state[p][key]`` holds for row ``index`` on this rank."""
        return self.step[index] if key == "step" else self.view_of(self.state_buffer(key), index)


def backend_serving(group, device: torch.device) -> str:
    """The name of the backend of ``group`` that serves tensors on ``device``."""
    for entry in str(dist.get_backend(group)).split(","):  # "gloo", or "cpu:gloo,cuda:nccl"
        device_type, _, name = entry.rpartition(":")
        if device_type in ("", device.type):
            return name
    return ""


@functools.cache
def _sharded_class(optimizer_class: type) -> type:
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, FusedOptimizer)):
        raise TypeError(f"ShardedOptimizer: optimizer_class must be one of fusedopt's optimizers "
                        f"(fusedopt.SGD, Adam, AdamW), got {optimizer_class!r}")
    return type(f"Sharded{optimizer_class.__name__}", (ShardedOptimizer, optimizer_class),
                {"__module__": __name__})


class ShardedOptimizer(FusedOptimizer):
    """ZeRO-1 for a DDP-wrapped model, shaped like
    ``torch.distributed.optim.ZeroRedundancyOptimizer``::

        optimizer = ShardedOptimizer(ddp_model.parameters(), optimizer_class=fusedopt.AdamW,
                                     lr=1e-3, weight_decay=0.1)

    Each flat buffer is padded to ``world_size`` equal slices; rank r keeps state for
    slice r only (1/world_size of the elements), runs ``optimizer_class``'s fused step on
    it and all-gathers the slices into every rank's parameters. ``optimizer.state[p]``
    holds this rank's piece of p's state (1-D, in p's memory order) for the parameters it
    owns a piece of. ``consolidate_state_dict(to)`` on every rank, then ``state_dict()``
    on rank ``to``, gives torch.optim's checkpoint format; ``load_state_dict`` takes one
    from any world size. Hyperparameters are read from ``param_groups`` every step, so
    lr schedulers and GradScaler work as with ``optimizer_class``.

    The object is an instance of a subclass of both ShardedOptimizer and
    ``optimizer_class`` (one per class): it takes that class's constructor arguments,
    validation, param_groups and update as they are.
    """

    def __new__(cls, params, optimizer_class, *args, **kwargs):
        if cls is ShardedOptimizer:
            cls = _sharded_class(optimizer_class)
        return super().__new__(cls)

    def __init__(self, params, optimizer_class: type[FusedOptimizer], process_group: Any = None,
                 **defaults: Any):
        # optimizer_class already chose this object's class, in __new__.
        self.process_group = process_group if process_group is not None else dist.group.WORLD
        self.world_size = dist.get_world_size(self.process_group)
        self._buffer_slices = self.world_size
        self.rank = dist.get_rank(self.process_group)
        self._slice_of: dict[FlatBuffer, BufferSlice] = {}
        self._edit_checks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # see _edit_check
        # Set on rank `to` by consolidate_state_dict; a step makes it stale.
        self._consolidated_state: dict[torch.Tensor, dict[str, Any]] | None = None
        # A load left every parameter's entry whole (its groups lacked hyperparameters):
        # the next step keeps only this rank's rows' entries, as a load would have.
        self._whole_entries = False
        super().__init__(params, **defaults)  # optimizer_class's constructor (next in the MRO)

    # --- packing ------------------------------------------------------------------
    # The rank's state is its slices of the flat buffers, made and loaded here, and
    # optimizer.state holds its pieces: FusedOptimizer's whole-parameter check of the
    # state is off, and _state_edits follows optimizer.state piece by piece instead.
    _tracks_public_state = False

    def _new_buffers(self, params: list[torch.Tensor]) -> list[FlatBuffer]:
        if any(is_dtensor(p) for p in params):
            raise ValueError("ShardedOptimizer: DTensor parameters are already sharded by their engine "
                             "(FSDP2); use fusedopt's optimizers with it directly")
        if any(p in self._slots for p in params):
            raise RuntimeError("ShardedOptimizer: a parameter no longer points into its flat buffer "
                               "(model.to() or p.data = ... after the optimizer was made); its sharded state "
                               "cannot follow it. Move the model before making the optimizer.")
        by_key: dict[tuple, list[torch.Tensor]] = {}
        for p in params:  # every parameter moves: each rank updates slices of one buffer
            by_key.setdefault((p.device, p.dtype), []).append(p)
        buffers = [FlatBuffer(ps, self._buffer_slices) for ps in by_key.values()]
        for buf in buffers:
            size = buf.numel // self.world_size
            self._slice_of[buf] = BufferSlice(buf, self.rank * size, (self.rank + 1) * size)
        return buffers

    def _ensure_slice_state(self, rank_slice: BufferSlice, rows: list[int], keys: tuple[str, ...]) -> None:
        """torch.optim creates state on a parameter's first step with a grad: this
        rank's pieces of it, as views into its slice's state buffers."""
        if rank_slice.state_complete_for == keys or not keys:
            return
        for i in rows:
            entry = self.state[rank_slice.params[i]]
            for key in keys:
                if entry.get(key) is None:  # absent, or set to None (SGD: a momentum buffer to start)
                    entry[key] = rank_slice.state_view(key, i)
            rank_slice.set_record(i, (keys, _synced(entry, keys, [entry[key] for key in keys])))
        if len(rows) == len(rank_slice.owned):
            rank_slice.state_complete_for = keys

    # --- optimizer.state ------------------------------------------------------------
    # optimizer.state[p] holds this rank's pieces of p's state, views into its slices.
    # Every step compares the entry of each row this rank holds with what it put there
    # (BufferSlice.records) and follows an edit as torch.optim's step reads the entry: a
    # cleared or deleted entry starts the parameter afresh, a replaced value (a tensor of
    # the piece's or of the parameter's shape, or None) is taken over. Every row is
    # validated before any is written.

    def _edit_check(self, part, rank_slice: BufferSlice, keys: tuple[str, ...]) -> tuple:
        """The rows of ``part`` this rank holds, as _C.sync_check takes them: (positions in
        the part, params, views, records). Rebuilt only when the keys or a record changed,
        so that an unedited step is one C pass (3000 rows in Python: 5 ms a step)."""
        version = (keys, rank_slice.records_version)
        cached = self._edit_checks.get(part)
        if cached is not None and cached[0] == version:
            return cached[1]
        positions = [j for j, i in enumerate(part.rows) if i in rank_slice.owned]
        synced = []
        for j in positions:
            record_keys, record = rank_slice.records.get(part.rows[j], (None, None))
            # A record made for other keys vouches for nothing: the row is re-read.
            synced.append(record if record is None or record_keys == keys else NOT_ADOPTED)
        check = (positions, [part.params[j] for j in positions], [part.views[j] for j in positions], synced)
        self._edit_checks[part] = (version, check)
        return check

    def _state_edits(self, work) -> list[tuple]:
        stepping: dict[int, set[int]] = {}  # per flat buffer, the rows with a grad this step (once needed)

        def has_grad(buf, i: int) -> bool:
            if not stepping:
                for c in work:
                    stepping.setdefault(id(c.part.buf), set()).update(c.buffer_rows())
            return i in stepping.get(id(buf), ())

        edits = []
        for group, plan in zip(self.param_groups, self._plans):
            keys = self._group_state_keys(group)
            if not keys:
                continue
            for part in plan.parts:
                rank_slice = self._slice_of[part.buf]
                positions, params, views, synced = self._edit_check(part, rank_slice, keys)
                stale, dirty, *_ = _C.sync_check(params, views, None, self.state, keys, synced)
                if stale >= 0:  # _collect_work re-planned moved parameters (or raised) before this
                    raise RuntimeError("ShardedOptimizer: internal error: a parameter left its slot")
                for k in dirty:
                    p, i = params[k], part.rows[positions[k]]
                    entry = self.state.get(p)
                    if synced[k] is None and not entry:
                        continue  # an empty entry (opt.state[p] read) of a row with no state yet
                    values = self._row_state(p, entry, keys, has_grad(part.buf, i),
                                             piece=(rank_slice.owned[i].numel,))
                    if values is None:
                        continue
                    for key, value in values.items():  # read before anything is written
                        if torch.is_tensor(value) and not same_place(value, rank_slice.state_view(key, i)):
                            values[key] = value.clone()
                    edits.append((rank_slice, i, entry, values, keys))
        return edits

    def _adopt_pieces(self, rank_slice: BufferSlice, i: int, entry: dict | None, values: dict[str, Any],
                      keys: tuple[str, ...]) -> None:
        views = self._write_row_state(
            rank_slice, i, keys, values, rank_slice.params[i],
            fit=lambda value, view: value if value.shape == view.shape else rank_slice.piece_of(i, value))
        if not values:  # afresh: torch.optim makes the entry at the next step with a grad
            rank_slice.set_record(i)
            rank_slice.state_complete_for = None
            return
        for key, view in zip(keys, views):
            entry[key] = view
        rank_slice.set_record(i, (keys, _synced(entry, keys, views)))

    # --- step ---------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, *, zero_grad: bool = False):
        """As torch.optim: every rank updates its slice of each flat buffer, then the
        slices are all-gathered into every rank's parameters (on every rank, in the same
        order, so every rank must call it). ``zero_grad=True`` then zeroes the grads as
        ``zero_grad(set_to_none=False)`` does, also on a step GradScaler skips."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        transform = self._grad_transform()
        work = self._collect_work()
        edits = self._state_edits(work)  # all validated before anything changes
        self._consolidated_state = None
        if getattr(self, "_whole_entries", False):
            self._drop_entries_of_other_ranks()
        self._pending_grad_multiplier = None
        found_inf = transform.found_inf
        skipped = found_inf is not None and found_inf.device.type == "cpu" and bool(found_inf.item())
        for edit in edits:
            self._adopt_pieces(*edit)
        for c in work:
            buf = c.part.buf
            rank_slice = self._slice_of[buf]
            rows = c.buffer_rows()
            owned, owned_grads = rank_slice.take(rows, buf.kernel_grads(rows, c.grads, c.flat))
            if owned:
                self._update_buffer(c.group, rank_slice, rank_slice.kernel_params(owned),
                                    rank_slice.segments(owned), owned_grads, transform.on(buf.device))
                if not skipped:
                    self._ensure_slice_state(rank_slice, owned, self._group_state_keys(c.group))
            if not skipped:
                _C.bump_versions(c.updated_params())
        self._all_gather_slices()
        if zero_grad:
            self.zero_grad(set_to_none=False)
        return loss

    def _drop_entries_of_other_ranks(self) -> None:
        """Drops the state entries of parameters whose rows other ranks hold (they hold
        that state), as load_state_dict does."""
        for p in list(self.state):
            slot = self._slots.get(p)
            if slot is not None and slot[1] not in self._slice_of[slot[0]].owned:
                del self.state[p]
        self._whole_entries = False

    def _all_gather_slices(self) -> None:
        works = []
        for rank_slice in self._slice_of.values():
            full = rank_slice.full.data
            if backend_serving(self.process_group, full.device) in ALL_GATHER_BACKENDS:
                works.append(_all_gather_into_tensor(full, rank_slice.data, group=self.process_group,
                                                     async_op=True))
                continue
            for owner, owned in enumerate(full.view(self.world_size, -1)):
                works.append(dist.broadcast(owned, dist.get_global_rank(self.process_group, owner),
                                            group=self.process_group, async_op=True))
        for work in works:
            work.wait()

    # --- checkpoints ----------------------------------------------------------------
    @torch.no_grad()
    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gathers the whole state on rank ``to`` of the process group, for
        ``state_dict()`` there. Every rank must call it."""
        destination = dist.get_global_rank(self.process_group, to)
        gathering = self.rank == to
        consolidated: dict[torch.Tensor, dict[str, Any]] = {}
        plans = self._current_plans()
        for edit in self._state_edits([]):  # edits since the last step (opt.state.clear()) count
            self._adopt_pieces(*edit)
        for group, plan in zip(self.param_groups, plans):
            keys = self._group_state_keys(group)
            for buf in (part.buf for part in plan.parts):
                # A parameter's step counter is exact on the ranks that hold a piece of
                # it and 0 (or older) elsewhere.
                steps = buf.step.clone()
                dist.reduce(steps, destination, op=dist.ReduceOp.MAX, group=self.process_group)
                flats = {}
                self._set_state_dtypes(group, self._slice_of[buf])
                for key in keys:
                    if key == "step":
                        continue
                    piece = self._slice_of[buf].state_buffer(key)
                    flats[key] = piece.new_empty(buf.numel) if gathering else None
                    dist.gather(piece,
                                list(flats[key].chunk(self.world_size)) if gathering else None,
                                dst=destination, group=self.process_group)
                if not gathering:
                    continue
                buf.step.copy_(steps)
                for i, (p, stepped) in enumerate(zip(buf.params, (steps > 0).tolist())):
                    if stepped:  # torch.optim makes state on a parameter's first step
                        consolidated[p] = {key: buf.step[i] if key == "step" else buf.view_of(flats[key], i)
                                           for key in keys}
        self._consolidated_state = consolidated if gathering else None

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's format, on the rank that ``consolidate_state_dict`` gathered to
        since the last step."""
        if self._consolidated_state is None:
            raise RuntimeError("ShardedOptimizer: the state has not been consolidated on this rank since "
                               f"the last step; call consolidate_state_dict(to={self.rank}) on all ranks first")
        rank_state, self.state = self.state, self._consolidated_state
        try:
            return super().state_dict()
        finally:
            self.state = rank_state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's format, from any world size: every rank passes the whole
        checkpoint and keeps its slice of it."""
        super().load_state_dict(state_dict)  # checked against the parameters before it replaces anything
        self._consolidated_state = None
        if not all(map(self._has_hyperparameters, self.param_groups)):
            # A group lacking this optimizer's hyperparameters (an Adam checkpoint loaded
            # into SGD) loads as into torch.optim, whose step then raises their KeyError:
            # the entries stay whole until a step can read them (ours raises before any
            # write; once the groups are complete, the step takes them as edits).
            self._whole_entries = True
            return
        self._whole_entries = False
        self._current_plans()  # every parameter in a slice
        for rank_slice in self._slice_of.values():
            rank_slice.clear_state()
        for group, plan in zip(self.param_groups, self._plans):
            for part in plan.parts:
                self._set_state_dtypes(group, self._slice_of[part.buf])
        loaded, self.state = self.state, defaultdict(dict)
        for p, entry in loaded.items():
            slot = self._slots.get(p)
            if slot is None:  # state of no current parameter: torch keeps it as is
                self.state[p] = entry
                continue
            buf, i = slot
            rank_slice = self._slice_of[buf]
            if i not in rank_slice.owned:
                continue  # the ranks that hold p's pieces keep its state
            pieces = {}
            for key, value in entry.items():
                if key == "step":
                    buf.step[i] = value
                    pieces[key] = buf.step[i]
                elif torch.is_tensor(value) and key in self._all_state_keys:
                    pieces[key] = rank_slice.view_of(rank_slice.state_buffer(key), i)
                    pieces[key].copy_(rank_slice.piece_of(i, value))
                else:
                    pieces[key] = value
            self.state[p] = pieces
            # Read as an edit at the next step: SGD learns there whether a momentum
            # buffer was given, and an entry dropped before then starts afresh.
            rank_slice.set_record(i, (None, NOT_ADOPTED))
