"""The machinery shared by fusedopt's optimizers: keeping flat buffers in line with
torch.optim's public objects, reading grads in place, lazily created state, checkpoints
in torch.optim's format. Subclasses (sgd.py, adam.py) validate hyperparameters and call
one kernel per flat buffer.
"""
from __future__ import annotations

from collections import defaultdict
import operator
from dataclasses import dataclass
from typing import Any

import torch
from torch.amp.grad_scaler import OptState
from torch.optim import Optimizer

from . import ops
from torch.nn.parameter import is_lazy

from . import _C
from .flat_buffer import FlatBuffer, is_dtensor, local_of, may_move

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "meta")  # meta: shapes only, as torch.optim
# state_dtype= choices: the moments/momentum buffers stored in that dtype (math in float32).
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# optimizer.state key of the float32 master copy of a bf16/fp16 param (master_weights=True).
MASTER_KEY = "master_param"
# The low-precision hyperparameters, with their defaults (torch.optim's trajectory). A param
# group holds one only where it differs from its default, so that at default options
# param_groups and state_dict() are torch.optim's key for key: torch.distributed.checkpoint
# loads into the keys of the optimizer it loads into, and a torch.optim checkpoint lacks
# these. Read them with group.get(key, default); ``defaults`` records them all.
LOW_PRECISION_DEFAULTS = {"state_dtype": None, "master_weights": False, "stochastic_rounding": False}
# A row's record (Part.synced) while optimizer.state holds state for it that fusedopt has
# not adopted yet: an entry of its own, so no entry, not even none, matches it.
NOT_ADOPTED = (object(),)


def drop_default_options(group: dict[str, Any]) -> None:
    """Removes from a param group the low-precision options that hold their default."""
    for key, default in LOW_PRECISION_DEFAULTS.items():
        if key in group and group[key] is default:
            del group[key]


def check_state_dtype(state_dtype: Any) -> None:
    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {state_dtype} (supported: None, i.e. as the params, "
                         f"{', '.join(map(str, STATE_DTYPES))})")


def check_low_precision_group(group: dict[str, Any], params: list[torch.Tensor]) -> None:
    """Raises ValueError where a param group's low-precision options do not fit its params."""
    state_dtype, master, stochastic = (group.get(k, d) for k, d in LOW_PRECISION_DEFAULTS.items())
    check_state_dtype(state_dtype)
    dtypes = {p.dtype for p in params}
    if state_dtype is not None and torch.float64 in dtypes:
        raise ValueError(f"state_dtype={state_dtype} needs float32, bfloat16 or float16 params; "
                         "a float64 param keeps float64 state")
    if master and not dtypes <= {torch.bfloat16, torch.float16}:
        raise ValueError("master_weights=True keeps a float32 copy of bfloat16 or float16 params; got "
                         f"params of dtype {', '.join(sorted(map(str, dtypes - {torch.bfloat16, torch.float16})))}")
    if stochastic and master:
        raise ValueError("stochastic_rounding=True and master_weights=True exclude each other: with "
                         "master weights the param is the float32 master rounded to nearest")
    if stochastic and not dtypes <= {torch.bfloat16}:
        raise ValueError("stochastic_rounding=True rounds bfloat16 params; got params of dtype "
                         f"{', '.join(sorted(map(str, dtypes - {torch.bfloat16})))}")
    if stochastic and state_dtype == torch.float16:
        raise ValueError("stochastic_rounding=True rounds bfloat16 values; use state_dtype=torch.bfloat16 "
                         "or torch.float32")


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
        return (len(params) == len(self.params) and all(map(operator.is_, params, self.params))
                and not any(map(_is_materialised, self.lazy)))


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


class FusedOptimizer(Optimizer):
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
            self._check_params(self.param_groups[-1]["params"])
            check_low_precision_group(self.param_groups[-1], self.param_groups[-1]["params"])
        except Exception:
            self.param_groups.pop()  # leave the optimizer as it was
            raise

    def _check_params(self, params: list[torch.Tensor]) -> None:
        name = type(self).__name__
        params = [p for p in params if not is_lazy(p)]  # checked once materialised
        if len(set(params)) != len(params):
            # torch.optim warns and then updates such a parameter twice per step; one slot
            # cannot do that, and updating it once would differ silently.
            raise ValueError(f"{name}: a parameter group lists the same parameter more than once")
        for p in params:
            if not isinstance(p, torch.Tensor):
                raise TypeError("optimizer can only optimize Tensors, but one of the params is "
                                + torch.typename(p))
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
        self._check_params([p for p in params if not is_lazy(p)])
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

    def _rounding_seed(self, group: dict[str, Any], buf) -> torch.Tensor | None:
        """With stochastic rounding, one draw from torch's generator of the buffer's device
        per buffer and step: the key of the kernel's random bits (optimizer_math.h)."""
        if not group.get("stochastic_rounding"):
            return None
        return torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device=buf.device)

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
                    rows = range(len(part.rows)) if rows is None else rows
                    results.append((part, dirty, list(rows), grads, flat, bad))
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

    # --- state ------------------------------------------------------------------------
    def _row_state(self, p: torch.Tensor, entry: dict | None, keys: tuple[str, ...], has_grad: bool,
                   piece: tuple[int, ...] | None = None):
        """The state values ``entry`` (optimizer.state[p]) gives for ``keys``, validated
        as torch.optim would use them: {} for fresh state (no entry, an empty one, or
        None values), None to leave the row alone this step. Raises what torch.optim's
        step would (KeyError for a missing key), but before anything is written.
        ``piece``: a shape a state tensor may also have (a rank's piece of it, sharded)."""
        if not entry:
            return {}
        # A missing master copy starts from the param (one made by torch.optim has none).
        for key in self._keys_required_in_state(tuple(k for k in keys if k != MASTER_KEY)):
            if key not in entry:
                if has_grad:
                    raise KeyError(key)
                return None
        values = {}
        for key in keys:
            value = entry.get(key)
            if value is None:
                continue
            shape = _misfit_shape(p, key, value, piece)
            if shape is not None and key == "step":
                raise RuntimeError(f"fusedopt: state['step'] must hold one number, got shape {shape}")
            if shape is not None:
                raise RuntimeError(f"fusedopt: state['{key}'] of shape {shape} does not match its "
                                   f"parameter of shape {tuple(p.shape)}")
            values[key] = value
        return values

    def _keys_required_in_state(self, keys: tuple[str, ...]) -> tuple[str, ...]:
        """Keys a non-empty state entry must have for torch.optim's step."""
        return ()

    def _sync_state(self, checked: list[CheckedPart], stepping: bool = True) -> None:
        """Brings the slots of every row whose public state changed up to date: all
        rows are validated first, then written. ``stepping``: for the step about to run
        (a row with a grad whose entry lacks a key raises torch.optim's KeyError); a load
        leaves such a row to the next step, as torch.optim's load does."""
        own = None
        plan = []
        for c in checked:
            if not c.dirty:
                continue
            with_grad = set(c.rows) if stepping else set()
            own = self._own_memory() if own is None else own
            for j in c.dirty:
                p, row = c.part.params[j], c.part.rows[j]
                entry = self.state.get(p)
                values = self._row_state(p, entry, c.part.keys, j in with_grad)
                if values is None:
                    continue
                for key, value in values.items():
                    view = c.part.buf.state_view(key, row)
                    if torch.is_tensor(value) and in_memory(value, own) and not _is_exactly(value, view):
                        values[key] = value.clone()  # it is another slot: read it before any write
                plan.append((c.part, j, entry, values))
        for part, j, entry, values in plan:
            self._adopt_row(part, j, entry, values)

    def _adopt_row(self, part: Part, j: int, entry: dict | None, values: dict[str, Any]) -> None:
        views = self._write_row_state(part.buf, part.rows[j], part.keys, values, part.params[j])
        part.complete = False
        if not values:
            part.synced[j] = None  # fresh: torch.optim makes the state at the next step with a grad
            return
        for key, view in zip(part.keys, views):
            entry[key] = view
        part.synced[j] = _synced(entry, part.keys, views)

    def _write_row_state(self, buf, row: int, keys: tuple[str, ...], values: dict[str, Any], param: torch.Tensor,
                         fit=lambda value, view: value) -> list[torch.Tensor]:
        """Writes the values _row_state gave into row ``row``'s state views in ``buf`` and
        returns the views: no value starts afresh (zeros; the master copy from ``param``),
        a tensor is copied unless it is the view itself, a step of any one-element shape
        as torch.optim reads it. ``fit(value, view)``: a parameter-shaped tensor as the
        view holds it (sharded: this rank's piece of it)."""
        views = []
        for key in keys:
            view = buf.state_view(key, row)
            value = values.get(key)
            if value is None and key == MASTER_KEY:
                view.copy_(fit(param.detach(), view))
            elif value is None:
                view.zero_()
            elif not torch.is_tensor(value):
                view.fill_(value)
            elif key == "step":
                view.copy_(value.reshape(view.shape))
            elif not _is_exactly(value, view):
                view.copy_(fit(value.to_local() if is_dtensor(value) and not is_dtensor(view) else value, view))
            views.append(view)
        self._adopted(buf, row, values)
        return views

    def _adopted(self, buf: FlatBuffer, row: int, values: dict[str, Any]) -> None:
        """Subclass hook: a row's state was taken from the public objects."""

    def _ensure_state(self, part: Part, positions: list[int]) -> None:
        """torch.optim creates state on a parameter's first step with a grad; so do we,
        as views into the flat state buffers."""
        if part.complete or not part.keys:
            return
        state, buf = self.state, part.buf
        for j in positions:
            if part.synced[j] is not None:
                continue
            p, row = part.params[j], part.rows[j]
            entry = state[p]
            views = [buf.state_view(key, row) for key in part.keys]
            for key, view in zip(part.keys, views):
                entry[key] = view
            part.synced[j] = _synced(entry, part.keys, views)
        part.complete = all(s is not None for s in part.synced)

    def _check_state_fits(self, state: dict, param_groups: list[dict[str, Any]]) -> None:
        """A state about to replace this optimizer's (load_state_dict) must fit its
        parameters; raises before anything is replaced."""
        params = (p for group in param_groups for p in group["params"])
        for index, p in enumerate(params):
            entry = state.get(p)
            if not entry:
                continue
            if not isinstance(entry, dict):
                raise ValueError(f"loaded state dict has a state of type {type(entry).__name__} for "
                                 f"parameter {index}; expected a dict")
            for key in self._keys_required_on_load:
                if key not in entry:
                    raise KeyError(key)
                if not torch.is_tensor(entry[key]):
                    # torch.optim's __setstate__ makes a tensor of float(value): its
                    # TypeError (a step of None) or ValueError, but before any change.
                    float(entry[key])
            for key, value in entry.items():
                if key not in self._all_state_keys or value is None:
                    continue
                shape = _misfit_shape(p, key, value)
                if shape is not None and key == "step":
                    raise ValueError(f"loaded state dict has a 'step' of shape {shape} "
                                     f"for parameter {index}; expected a scalar")
                if shape is not None:
                    raise ValueError(f"loaded state dict has '{key}' of shape {shape} for parameter "
                                     f"{index} of shape {tuple(p.shape)}")

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
        self._update_buffer(c.group, buf, buf.kernel_params(rows), buf.segments(rows),
                            buf.kernel_grads(rows, c.grads, c.flat), transform.on(buf.device))
        if skipped:
            return
        buf.after_kernel()
        self._ensure_state(c.part, c.rows)

    # --- step under torch.compile ------------------------------------------------------
    def _traced_step(self, transform: GradTransform) -> None:
        """step() as dynamo traces it: one fusedopt op per part, nothing else. The
        bookkeeping is _init_group's, which dynamo runs eagerly while tracing (as for
        torch.optim's own optimizers) and then guards on: every parameter and state tensor
        it returns, the grads, the param groups. When any of them changes the step
        recompiles, and the new trace re-synchronises the cache: the compiled step follows
        the public objects as the eager one does."""
        self._pending_grad_multiplier = None
        guarded: list[torch.Tensor] = []
        layout = self._init_group(guarded)  # first: see _init_group
        for t in guarded:  # realised, so that dynamo installs its guards
            t.shape
        for index, k, positions in layout:
            group = self.param_groups[index]
            part = self._plans[index].parts[k]
            buf = part.buf
            rows = [part.rows[j] for j in positions]
            grads = [part.params[j].grad for j in positions]
            grads = [local_of(g) for g in grads]
            buf.before_kernel()
            self._update_buffer(group, buf, buf.kernel_params(rows), buf.segments(rows),
                                buf.kernel_grads(rows, grads, False), transform.on(buf.device))
            buf.after_kernel()

    def _init_group(self, guarded: list[torch.Tensor]) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
        """The eager half of a traced step (see _traced_step): the whole per-step check and
        re-synchronisation, before any graph runs, and the state torch.optim creates at a
        first step. Called before the traced code touches ``param_groups``: once dynamo
        has wrapped a parameter it holds a reference to its storage, and the parameter
        would no longer look movable into a flat buffer (``may_move``). Appends to
        ``guarded`` the parameters with grads and their state tensors (dynamo guards on
        the identity of what this returns in a list: replacing one recompiles). Returns,
        per part with grads, (its group's index, its index in the group's plan, the
        positions of its rows with grads)."""
        work = self._collect_work()
        index_of = {id(group): i for i, group in enumerate(self.param_groups)}
        layout = []
        for c in work:
            self._ensure_state(c.part, c.rows)
            c.part.buf.segments(c.buffer_rows())  # cached now (with its params), not made inside the graph
            for p in c.updated_params():
                guarded.append(p)
                guarded.extend(v for v in self.state.get(p, {}).values() if torch.is_tensor(v))
            index = index_of[id(c.group)]
            layout.append((index, self._plans[index].parts.index(c.part), tuple(c.rows)))
        return tuple(layout)

    def _algorithm_state_keys(self, group) -> tuple[str, ...]:
        raise NotImplementedError

    def _update_buffer(self, group, buf: FlatBuffer, params, segments, grads, transform: GradTransform) -> None:
        """One kernel call over the rows ``segments`` names (csrc/segment_table.h)."""
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
        inner = self.__dict__.get("_optimizer")
        if isinstance(inner, FusedOptimizer) and inner is not self:
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


def in_memory(t: torch.Tensor, spans: list[tuple[int, int]]) -> bool:
    address = address_of(t)
    return any(start <= address < end for start, end in spans)


def _is_exactly(value: torch.Tensor, view: torch.Tensor) -> bool:
    """Whether ``value`` is the slot ``view`` itself (a self-load hands fusedopt its own views)."""
    if value is view:
        return True
    if is_dtensor(value) or is_dtensor(view):
        return False
    return same_place(value, view)


def _misfit_shape(p: torch.Tensor, key: str, value: Any, piece: tuple | None = None) -> tuple | str | None:
    """None when ``value`` fits state key ``key`` of parameter ``p`` (a step: one number;
    else a tensor of p's shape, or of ``piece``); otherwise its shape (or type name)."""
    if key == "step":
        return tuple(value.shape) if torch.is_tensor(value) and value.numel() != 1 else None
    if torch.is_tensor(value):
        return None if value.shape == p.shape or tuple(value.shape) == piece else tuple(value.shape)
    return type(value).__name__


def _synced(entry: dict, keys: tuple[str, ...], views: list[torch.Tensor]) -> tuple:
    """What _C.sync_check compares state[p] with: the entry, then each key's view and address."""
    synced = [entry]
    for view in views:
        synced += [view, address_of(view)]
    return tuple(synced)
