"""How fusedopt adopts what users put into ``optimizer.state`` (edits, loads) into its
flat buffers, and creates state as torch.optim does: lazily, at a parameter's first step
with a grad, as views into the flat state buffers. Every value is validated as torch.optim
would use it before any is written."""
from __future__ import annotations

from typing import Any

import torch

from .flat_buffer import FlatBuffer, is_dtensor
from .options import MASTER_KEY
from .placement import CheckedPart, Part, address_of, same_place


class PublicState:
    """The FusedOptimizer half that moves state between ``optimizer.state`` and the flat
    buffers."""

    # State keys whose value may not be None in a non-empty entry, and what torch.optim's
    # step raises on one (half-applied there: the params before it are already updated;
    # here nothing is written). A key not named here starts afresh from None.
    _none_state_errors: dict[str, type] = {}

    def _row_state(self, p: torch.Tensor, entry: dict | None, keys: tuple[str, ...], has_grad: bool,
                   piece: tuple[int, ...] | None = None):
        """The state values ``entry`` (optimizer.state[p]) gives for ``keys``, validated
        as torch.optim would use them: {} for fresh state (no entry, an empty one, or
        None values where torch.optim starts afresh from None), None to leave the row
        alone this step. Raises what torch.optim's step would (KeyError for a missing
        key, ``_none_state_errors`` for a None), but before anything is written.
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
                error = self._none_state_errors.get(key)
                if error is None:  # None starts the slot afresh (SGD's momentum_buffer)
                    continue
                if not has_grad:
                    return None
                raise error(f"fusedopt: optimizer.state[p][{key!r}] is None, where {type(self).__name__}'s step "
                            f"needs a tensor (an empty state entry starts the parameter afresh)")
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
