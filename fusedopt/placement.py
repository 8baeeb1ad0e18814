"""Where each parameter of an optimizer lives: its flat buffer and row (flat_buffer.py),
grouped per param group into parts (one kernel call each), and the per-step check of
those rows against torch.optim's public objects (``_C.sync_check``): a parameter that
left its row gets a new one, state whose keys or dtypes changed is reset, and bad grads
are refused before anything is written."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parameter import is_lazy

from . import _C
from .flat_buffer import FlatBuffer, is_dtensor, local_of, may_move
from .options import MASTER_KEY, check_low_precision_group, check_params

# A row's record (Part.synced) while optimizer.state holds state for it that fusedopt has
# not adopted yet: an entry of its own, so no entry, not even none, matches it.
NOT_ADOPTED = (object(),)


@dataclass(eq=False)
class Part:
    """The rows of one buffer that one param group updates, and what fusedopt last put
    into ``optimizer.state`` for each (``synced``, the per-step check's reference)."""
    buf: FlatBuffer
    rows: list[int]
    params: list[torch.Tensor]
    views: list[torch.Tensor]
    synced: list
    keys: tuple[str, ...] = ()
    dtypes: tuple = ()  # per key, the dtype of its state buffer
    complete: bool = False  # every row's state is in optimizer.state
    _grad_slots: tuple = (None, None)  # (grad buffer, its slot addresses) cache
    _positions: list = field(default_factory=list)

    def positions(self) -> list[int]:
        """[0, 1, ..., len(rows) - 1], kept while the rows stay (each step's check of a
        part whose rows all have grads names them all)."""
        if len(self._positions) != len(self.rows):
            self._positions = list(range(len(self.rows)))
        return self._positions

    def grad_slots(self) -> list[int] | None:
        if self._grad_slots[0] is not self.buf.grad_buffer:
            self._grad_slots = (self.buf.grad_buffer, self.buf.grad_slots(self.rows))
        return self._grad_slots[1]


@dataclass(eq=False)
class GroupPlan:
    """Where the parameters of one param group live: ``parts`` cover ``params`` (a
    snapshot of ``group["params"]``) but for ``lazy`` ones not yet materialised."""
    params: list[torch.Tensor]
    parts: list[Part]
    lazy: list[torch.Tensor]

    def describes(self, params: list[torch.Tensor]) -> bool:
        return _C.same_items(params, self.params) and not any(map(_is_materialised, self.lazy))


def _is_materialised(p: torch.Tensor) -> bool:
    return not is_lazy(p)


def address_of(t: torch.Tensor) -> int:
    return t.to_local().data_ptr() if is_dtensor(t) else t.data_ptr()


def same_place(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype and a.device == b.device)


@dataclass
class CheckedPart:
    """One part after the per-step check: which rows changed state, which have grads."""
    group: dict[str, Any]
    part: Part
    dirty: list[int]
    rows: list[int]            # positions in part.rows that have a grad
    grads: list[torch.Tensor]
    flat: bool                 # every grad lies in the flat grad buffer

    def buffer_rows(self) -> list[int]:
        """The buffer rows that have a grad."""
        part = self.part
        return part.rows if len(self.rows) == len(part.rows) else [part.rows[j] for j in self.rows]

    def updated_params(self) -> list[torch.Tensor]:
        """The parameters that have a grad."""
        part = self.part
        return part.params if len(self.rows) == len(part.rows) else [part.params[j] for j in self.rows]


class Placement:
    """The FusedOptimizer half that places rows: ``_slots`` (param -> (buffer, row)) and
    ``_plans`` (per param group, its parts), kept in line with ``param_groups``."""

    # --- the cache: where each parameter lives ---------------------------------------
    def _own_memory(self) -> list[tuple[int, int]]:
        buffers = {id(buf): buf for buf, _ in self._slots.values()}
        return [span for buf in buffers.values() for span in buf.memory()]

    def _in_its_slot(self, p: torch.Tensor) -> bool:
        slot = self._slots.get(p)
        if slot is None:
            return False
        buf, row = slot
        return same_place(local_of(p), buf.views[row])

    def _new_buffers(self, params: list[torch.Tensor]) -> list[FlatBuffer]:
        """Slots for parameters that have none: one buffer per (device, dtype), whose
        rows are moved into its memory where nothing else sees theirs, else updated
        where they are (flat_buffer.py), all in one kernel call."""
        own = self._own_memory()
        movable = {id(p): may_move(p, own) for p in params}
        layer = overlap_layers([p for p in params if not movable[id(p)] and not is_dtensor(p)])
        by_key: dict[tuple, list[torch.Tensor]] = {}
        for p in params:
            by_key.setdefault((p.device, p.dtype, layer.get(id(p), 0)), []).append(p)
        return [FlatBuffer(ps, self._buffer_slices, [movable[id(p)] for p in ps]) for ps in by_key.values()]

    def _make_plan(self, group: dict[str, Any], old: list[GroupPlan]) -> GroupPlan:
        params = list(group["params"])
        lazy = [p for p in params if is_lazy(p)]
        check_params(type(self).__name__, [p for p in params if not is_lazy(p)])
        present = [p for p in params if not is_lazy(p)]
        check_low_precision_group(group, present)
        placed = {id(p): self._slots[p][0] for p in present if self._in_its_slot(p)}  # param -> its buffer
        buffers = {id(buf): buf for buf in placed.values()}
        clashing = {key for key, buf in buffers.items() if self._state_dtypes_clash(group, buf)}
        moving = [p for p in present if id(p) not in placed or id(placed[id(p)]) in clashing]
        for buf in self._new_buffers(moving):
            for row, p in enumerate(buf.params):
                self._slots[p] = (buf, row)
        # A row's record of optimizer.state carries over where it stays in its buffer and
        # was made for the state this group keeps now (one made while momentum was off
        # vouches for no momentum buffer).
        keys = self._group_state_keys(group)
        same_state = [part for plan in old for part in plan.parts
                      if part.keys == keys and part.dtypes == self._state_dtypes(group, keys, part.buf.dtype)]
        synced = {p: s for part in same_state for p, s in zip(part.params, part.synced)
                  if self._slots.get(p, (None,))[0] is part.buf}
        parts: dict[int, Part] = {}
        for p in present:
            buf, row = self._slots[p]
            part = parts.get(id(buf))
            if part is None:
                part = parts[id(buf)] = Part(buf, [], [], [], [])
            part.rows.append(row)
            part.params.append(p)
            part.views.append(buf.views[row])
            part.synced.append(synced[p] if p in synced else self._unsynced_record(buf, row))
        for part in parts.values():
            part.keys, part.dtypes = keys, self._state_dtypes(group, keys, part.buf.dtype)
            if part.buf.set_state_dtypes(dict(zip(keys, part.dtypes))):
                part.synced = [self._unsynced_record(part.buf, row) for row in part.rows]
        return GroupPlan(params, list(parts.values()), lazy)

    def _state_dtypes(self, group: dict[str, Any], keys: tuple[str, ...], param_dtype: torch.dtype) -> tuple:
        """Per state key, the dtype of its flat buffer: the master copy float32, the
        others ``state_dtype``, by default as the values they update (the master's
        float32 with master weights, else the param's)."""
        moments = group.get("state_dtype") or (torch.float32 if group.get("master_weights") else param_dtype)
        return tuple(torch.float32 if key in ("step", MASTER_KEY) else moments for key in keys)

    def _buffer_state_dtypes(self, group: dict[str, Any], buf) -> dict[str, torch.dtype]:
        """Per state key of the group, the dtype its flat buffer in ``buf`` must have."""
        keys = self._group_state_keys(group)
        return dict(zip(keys, self._state_dtypes(group, keys, buf.dtype)))

    def _set_state_dtypes(self, group: dict[str, Any], buf) -> None:
        buf.set_state_dtypes(self._buffer_state_dtypes(group, buf))

    def _state_dtypes_clash(self, group: dict[str, Any], buf) -> bool:
        """Whether ``group`` needs other dtypes for its state than ``buf`` holds while
        another param group with rows in ``buf`` (a parameter moved between groups) needs
        the ones it holds. A buffer holds one flat tensor per key, so the group's rows
        then move to a buffer of their own: converting the shared one would round the
        other group's state."""
        mine = self._buffer_state_dtypes(group, buf)
        if all(buf.state_dtypes.get(key, buf.dtype) == dtype for key, dtype in mine.items()):
            return False
        for other in self.param_groups:
            if other is group or not any(self._slots.get(q, (None,))[0] is buf for q in other["params"]):
                continue
            theirs = self._buffer_state_dtypes(other, buf)
            if any(mine[key] != theirs[key] for key in mine.keys() & theirs.keys()):
                return True
        return False

    def _group_state_keys(self, group) -> tuple[str, ...]:
        """The state keys of a group's params, in torch.optim's order, then the master copy."""
        keys = self._algorithm_state_keys(group)
        return (*keys, MASTER_KEY) if group.get("master_weights") else keys

    def _unsynced_record(self, buf: FlatBuffer, row: int) -> tuple | None:
        """The record for a row whose record of optimizer.state was dropped (its group
        deleted and the parameter re-added, the group's state keys or dtypes changed).
        With no state in optimizer.state, torch.optim starts the parameter afresh: its
        slots are reset and the record is None (nothing adopted, slots fresh). Otherwise
        NOT_ADOPTED, which every check that looks at state sees as changed until it
        adopts the entry, whatever happens to the entry meanwhile (a zero_grad's check
        does not look; the entry may be deleted before the next step's)."""
        if self.state.get(buf.params[row]):
            return NOT_ADOPTED
        buf.step[row] = 0
        for flat in buf.state.values():
            buf.view_of(flat, row).zero_()
        return None

    def _current_plans(self) -> list[GroupPlan]:
        """A plan per param group, following edits of ``param_groups`` (parameters
        added, removed, groups deleted) and lazy parameters that materialised."""
        old = self._plans
        plans = []
        for index, group in enumerate(self.param_groups):
            params = group["params"]
            if index < len(old) and old[index].describes(params):
                plans.append(old[index])
                continue
            match = next((plan for plan in old if plan.describes(params)), None)
            plans.append(match if match is not None else self._make_plan(group, old))
        self._plans = plans
        return plans

    def _check_part(self, part: Part, keys: tuple[str, ...]) -> tuple:
        """_C.sync_check of the part; ``keys``: the state keys to check (none: skip state)."""
        return _C.sync_check(part.params, part.views, part.grad_slots(), self.state, keys, part.synced)

    def _checked_parts(self, with_state: bool = True, check_grads: bool = True) -> list[CheckedPart]:
        """Every part, checked against the public objects; a parameter that left its
        slot (``p.data = ...``, ``model.to()``) gets a new one, its state following it."""
        checked = []
        plans = self._current_plans()
        for index, (group, plan) in enumerate(zip(self.param_groups, plans)):
            keys = self._group_state_keys(group) if with_state else ()
            for _ in range(2):
                results = []
                for part in plan.parts:
                    dtypes = self._state_dtypes(group, keys, part.buf.dtype) if with_state else ()
                    # e.g. amsgrad, momentum or master weights switched on, state_dtype changed
                    if with_state and (part.keys != keys or part.dtypes != dtypes):
                        if self._state_dtypes_clash(group, part.buf):
                            break  # re-planned: this group's rows move out of the shared buffer
                        part.keys, part.dtypes = keys, dtypes
                        part.buf.set_state_dtypes(dict(zip(keys, dtypes)))
                        part.synced = [self._unsynced_record(part.buf, row) for row in part.rows]
                        part.complete = False
                    stale, dirty, rows, grads, flat, bad = self._check_part(part, keys)
                    if stale >= 0:
                        break
                    results.append((part, dirty, part.positions() if rows is None else rows, grads, flat, bad))
                else:
                    break
                plan = self._plans[index] = self._make_plan(group, self._plans)
            else:
                raise RuntimeError("fusedopt: internal error: a parameter keeps leaving its slot")
            for part, dirty, rows, grads, flat, bad in results:
                if bad >= 0 and check_grads:
                    self._raise_bad_grad(part.params[bad])
                checked.append(CheckedPart(group, part, dirty, rows, grads, flat))
        return checked

    def _raise_bad_grad(self, p: torch.Tensor) -> None:
        g = p.grad
        if g.layout != torch.strided:
            raise RuntimeError(self._sparse_grad_message)
        if is_dtensor(p) and g.placements != p.placements:
            raise ValueError(f"fusedopt: a DTensor grad placed {g.placements} does not match its "
                             f"parameter's placements {p.placements}")
        raise RuntimeError(f"fusedopt: a parameter of dtype {p.dtype} on {p.device} with shape "
                           f"{tuple(p.shape)} has a grad of dtype {g.dtype} on {g.device} with shape "
                           f"{tuple(g.shape)}; they must match")


def overlap_layers(params: list[torch.Tensor]) -> dict[int, int]:
    """Per parameter (by id), a layer such that no two in one layer share memory. One
    kernel call reads every row before it writes it, while torch.optim updates
    parameters one after another: parameters whose memory overlaps (views of one
    tensor that share elements) must be updated by separate calls, in order. Greedy
    interval colouring by address span: disjoint parameters all get layer 0."""
    spans = []
    for p in params:
        extent = sum((size - 1) * stride for size, stride in zip(p.shape, p.stride())) + 1 if p.numel() else 0
        spans.append((p.data_ptr(), p.data_ptr() + extent * p.element_size(), id(p)))
    layer_ends: list[int] = []  # per layer, where its last span ends
    layers = {}
    for start, end, key in sorted(spans):
        layer = next((k for k, last in enumerate(layer_ends) if last <= start), len(layer_ends))
        if layer == len(layer_ends):
            layer_ends.append(end)
        layer_ends[layer] = end
        layers[key] = layer
    return layers
