"""Randomized differential test: long random programs run on torch.optim (foreach=False, the
oracle) and on fusedopt side by side, compared after every operation.

torch.optim's public objects (param_groups, state, p.data, p.grad) are the truth; fusedopt's
flat buffers are a private cache that every step checks and re-synchronises. So any edit a
user may make through those objects, in any order, must leave fusedopt exactly where it
leaves torch.optim. Hypothesis' stateful testing generates the programs; on a failure it
prints the shrunk program as plain Python-like steps.

Operations (each applied identically to both optimizers and to both sets of params):
* zero_grad(set_to_none=True/False); writing fresh grads for a random subset of params (in
  place, ``p.grad.copy_(g)``, where a grad exists, else assigned); ``p.grad.data = new``;
  ``p.grad = None`` for one param;
  step(); fusedopt's step(zero_grad=True) against torch's step() then
  zero_grad(set_to_none=False); a combined train step doing all of that; a GradScaler
  step with scaled grads, sometimes overflowing.
* add_param_group with a new param (and possibly an orphan: a param that left every group),
  or with two params that are views of one tensor (halves, or interleaved columns).
* state-dict round trips: self-load, load of a deepcopy, load through torch.save/torch.load;
  a deepcopy of the params and optimizer together, training going on with the copies.
* edits through opt.state: clear(), a new state object (empty or with the same entries),
  del state[p], state[p][key] replaced by a scaled clone, scaled in place or its .data
  re-pointed to scaled new memory, Adam's state[p]["step"] replaced by a new tensor, SGD's
  state[p]["momentum_buffer"] = None.
* edits through param_groups: lr / weight_decay / betas / momentum (incl. 0 <-> nonzero),
  nesterov / dampening / maximize / amsgrad / eps / decoupled_weight_decay,
  a param appended to a group's list (new or orphan), a param removed from a list, a group
  deleted, a group's list replaced by a reversed one, every group dict replaced by a copy.
* re-pointing p.data (a clone, the same values in the other memory layout, new values);
  share_memory_() of every param.

The same programs also run with every param in shared memory from the start (the
``_shared`` classes).

Where torch.optim raises (its state_dict() raises KeyError while a param that has state is
in no group), fusedopt must raise the same exception type; the program then goes on.
"""
import copy
import io
import os
from collections import defaultdict

import pytest
import torch
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from torch import nn

import fusedopt
from conftest import assert_optimizers_match, clone_params, clone_strided

F32, F64 = torch.float32, torch.float64

# (shape, dtype, transposed): transposed params are non-contiguous views of a (n, m) tensor.
PARAM_SPECS = [
    ((3, 4), F32, False),
    ((5,), F64, False),
    ((4, 3), F32, True),
    ((2, 3, 2), F64, False),
    ((), F32, False),
    ((3, 2), F64, True),
    ((7,), F32, False),
]
INITIAL_PARAMS = PARAM_SPECS[:5]

LRS = {"SGD": [0.0, 0.01, 0.05, 0.1], "Adam": [0.0, 1e-3, 1e-2, 5e-2]}
LRS["AdamW"] = LRS["Adam"]
WEIGHT_DECAYS = [0.0, 1e-3, 1e-2, 0.1]
BETAS = [(0.9, 0.999), (0.8, 0.99), (0.5, 0.9), (0.0, 0.99)]
MOMENTA = [0.0, 0.5, 0.9]
HYPERPARAMETERS = {"SGD": ["lr", "weight_decay", "momentum"],
                   "Adam": ["lr", "weight_decay", "betas"],
                   "AdamW": ["lr", "weight_decay", "betas"]}
FLAGS = {"SGD": {"nesterov": [False, True], "dampening": [0.0, 0.1, 0.5], "maximize": [False, True]},
         "Adam": {"maximize": [False, True], "eps": [1e-8, 1e-6, 1e-3],
                  "decoupled_weight_decay": [False, True]}}
FLAGS["AdamW"] = FLAGS["Adam"]


def sgd_options():
    @st.composite
    def options(draw):
        momentum = draw(st.sampled_from(MOMENTA))
        nesterov = momentum > 0 and draw(st.booleans())
        dampening = 0.0 if nesterov else draw(st.sampled_from([0.0, 0.1]))
        return dict(momentum=momentum, dampening=dampening, nesterov=nesterov,
                    weight_decay=draw(st.sampled_from(WEIGHT_DECAYS)), maximize=draw(st.booleans()))
    return options()


def adam_options():
    return st.fixed_dictionaries(dict(amsgrad=st.booleans(), weight_decay=st.sampled_from(WEIGHT_DECAYS),
                                      maximize=st.booleans(), betas=st.sampled_from(BETAS)))


OPTIONS = {"SGD": sgd_options(), "Adam": adam_options(), "AdamW": adam_options()}


def random_tensor(shape, dtype, seed, device, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    if transposed:
        return torch.randn(tuple(reversed(shape)), generator=gen).to(device, dtype).t()
    return torch.randn(shape, generator=gen).to(device, dtype)


def other_layout(t):
    """Same values, the other memory layout for 2-D tensors; a plain clone otherwise."""
    if t.dim() == 2:
        return t.t().contiguous().t() if t.is_contiguous() else t.contiguous()
    return t.clone()


class Differential(RuleBasedStateMachine):
    """One random program on a (torch.optim, fusedopt) pair; ALGO and DEVICE are set by
    subclasses."""
    ALGO = None
    DEVICE = "cpu"
    SHARED = False  # every param starts in shared memory (fusedopt updates it where it is)

    def __init__(self):
        super().__init__()
        self.sides = {"ref": [], "fused": []}  # params, index-aligned on both sides
        self.user_tensors = {"ref": [], "fused": []}  # tensors some params are views of
        self.opts = {}
        self.seed = 0

    # --- helpers ------------------------------------------------------------------------
    def next_seed(self):
        self.seed += 1
        return self.seed

    def new_param(self, spec):
        """A new param, cloned onto both sides; returns its index."""
        shape, dtype, transposed = spec
        base = [nn.Parameter(random_tensor(shape, dtype, self.next_seed(), self.DEVICE, transposed))]
        for side in self.sides.values():
            side += clone_params(base)
            if self.SHARED:
                side[-1].share_memory_()
        return len(self.sides["ref"]) - 1

    @property
    def ref(self):
        return self.opts["ref"]

    @property
    def ref_params(self):
        return self.sides["ref"]

    def in_groups(self):
        """Indices of the params in some group of torch's optimizer, in group order."""
        index = {id(p): i for i, p in enumerate(self.ref_params)}
        return [index[id(p)] for g in self.ref.param_groups for p in g["params"]]

    def orphans(self):
        listed = set(self.in_groups())
        return [i for i in range(len(self.ref_params)) if i not in listed]

    def with_state(self, key=None):
        """Indices of params with a state entry in torch (having `key`, if given)."""
        return [i for i, p in enumerate(self.ref_params)
                if p in self.ref.state and (key is None or key in self.ref.state[p])]

    def apply(self, op, fused_op=None):
        """op(opt, params) on torch's side, then on fusedopt's (fused_op there, where given:
        fusedopt's spelling of the same thing); where torch raises, fusedopt must raise the
        same exception type."""
        fused_op = fused_op or op
        try:
            op(self.opts["ref"], self.sides["ref"])
        except Exception as expected:
            with pytest.raises(Exception) as raised:
                fused_op(self.opts["fused"], self.sides["fused"])
            assert type(raised.value) is type(expected), (
                f"torch raised {expected!r}, fusedopt raised {raised.value!r}")
            return
        fused_op(self.opts["fused"], self.sides["fused"])

    # --- setup --------------------------------------------------------------------------
    @initialize(data=st.data(), split=st.booleans())
    def build(self, data, split):
        options = data.draw(OPTIONS[self.ALGO], label="options")
        lr = data.draw(st.sampled_from(LRS[self.ALGO][1:]), label="lr")
        for spec in INITIAL_PARAMS:
            self.new_param(spec)
        for side, params in self.sides.items():
            groups = ([{"params": params[:3]}, {"params": params[3:], "lr": lr / 2}] if split
                      else [{"params": list(params)}])
            self.opts[side] = getattr(torch.optim if side == "ref" else fusedopt, self.ALGO)(
                groups, lr=lr, foreach=False, **copy.deepcopy(options))
        # One GradScaler per side, in lockstep (growth every 3 unskipped steps).
        self.scalers = {side: torch.amp.GradScaler(self.DEVICE, init_scale=2.0 ** 8, growth_interval=3)
                        for side in self.sides}
        for scaler in self.scalers.values():
            scaler.scale(torch.ones((), device=self.DEVICE))  # makes its scale tensor

    # --- grads and steps ----------------------------------------------------------------
    def _grad_writer(self, data):
        """Fresh grads for a random subset of params: p.grad.copy_(g) where a grad exists
        (a zero_grad(set_to_none=False) grad, or one left from the last step), else assigned."""
        n = len(self.ref_params)
        subset = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n), label="grads for")
        grads = {i: random_tensor(self.ref_params[i].shape, self.ref_params[i].dtype, self.next_seed(),
                                  self.DEVICE)
                 for i in subset}

        def write(params):
            for i, g in grads.items():
                if params[i].grad is None:
                    params[i].grad = g.clone()
                else:
                    params[i].grad.copy_(g)
        return write

    def _grad_data_setter(self, data):
        """p.grad.data = a new tensor (sometimes in the transposed layout) for a param with a grad."""
        with_grad = [i for i, p in enumerate(self.ref_params) if p.grad is not None]
        if not with_grad:
            return lambda params: None
        i = data.draw(st.sampled_from(with_grad), label="p.grad.data = new for")
        p = self.ref_params[i]
        new = random_tensor(p.shape, p.dtype, self.next_seed(), self.DEVICE,
                            transposed=p.dim() == 2 and data.draw(st.booleans(), label="transposed"))

        def set_data(params):
            params[i].grad.data = clone_strided(new)
        return set_data

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none):
        self.apply(lambda opt, params: opt.zero_grad(set_to_none=set_to_none))

    @rule(data=st.data())
    def write_grads(self, data):
        write = self._grad_writer(data)
        self.apply(lambda opt, params: write(params))

    @rule(data=st.data())
    def set_grad_data(self, data):
        set_data = self._grad_data_setter(data)
        self.apply(lambda opt, params: set_data(params))

    @rule(data=st.data())
    def drop_grad(self, data):
        """p.grad = None for one param, as code that freezes a layer for a while does."""
        with_grad = [i for i, p in enumerate(self.ref_params) if p.grad is not None]
        if not with_grad:
            return
        i = data.draw(st.sampled_from(with_grad), label="p.grad = None for")
        self.apply(lambda opt, params: setattr(params[i], "grad", None))

    @rule()
    def step(self):
        self.apply(lambda opt, params: opt.step())

    @rule(data=st.data(), overflow=st.booleans())
    def amp_train_step(self, data, overflow):
        """A mixed-precision step as a training loop runs it: zero_grad(), fresh grads for a
        subset multiplied by the loss scale (one element inf when overflow), scaler.step(opt),
        scaler.update(), zero_grad(). The grads scaler.step leaves are what differs by
        design (fusedopt keeps them scaled; README), so the step ends by dropping them."""
        write = self._grad_writer(data)
        scale = self.scalers["ref"].get_scale()

        def op(opt, params):
            scaler = self.scalers["ref" if opt is self.opts["ref"] else "fused"]
            opt.zero_grad(set_to_none=True)
            write(params)
            grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
            if not grads:
                return  # scaler.step would assert that it found no grads (test_amp_and_clipping)
            with torch.no_grad():
                for g in grads:
                    g.mul_(scale)
                if overflow:
                    grads[0][(0,) * grads[0].dim()] = float("inf")  # any layout, also 0-dim
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
        self.apply(op)
        assert self.scalers["fused"].get_scale() == self.scalers["ref"].get_scale()

    @rule()
    def step_zeroing_grads(self):
        """fusedopt's step(zero_grad=True), which zeroes the grads in the update pass, against
        torch.optim's step() then zero_grad(set_to_none=False)."""
        def step_then_zero(opt, params):
            opt.step()
            opt.zero_grad(set_to_none=False)
        self.apply(step_then_zero, lambda opt, params: opt.step(zero_grad=True))

    @rule(data=st.data(), zero=st.sampled_from(["set_to_none", "zero_in_place", "keep"]),
          set_grad_data=st.booleans())
    def train_step(self, data, zero, set_grad_data):
        """zero_grad (either mode, or none), fresh grads for a subset, maybe p.grad.data = new, step."""
        write = self._grad_writer(data)

        def op(opt, params):
            if zero != "keep":
                opt.zero_grad(set_to_none=zero == "set_to_none")
            write(params)
        self.apply(op)
        if set_grad_data:
            self.set_grad_data(data)
        self.step()

    # --- param groups -------------------------------------------------------------------
    @rule(data=st.data(), spec=st.sampled_from(PARAM_SPECS), with_orphan=st.booleans())
    def add_param_group(self, data, spec, with_orphan):
        orphans = self.orphans()
        members = [self.new_param(spec)]
        if with_orphan and orphans:
            members.append(data.draw(st.sampled_from(orphans), label="orphan"))
        lr = data.draw(st.sampled_from(LRS[self.ALGO]), label="lr")
        self.apply(lambda opt, params: opt.add_param_group({"params": [params[i] for i in members], "lr": lr}))

    @rule(data=st.data())
    def set_hyperparameter(self, data):
        gi = data.draw(st.integers(0, len(self.ref.param_groups) - 1), label="group")
        key = data.draw(st.sampled_from(HYPERPARAMETERS[self.ALGO]), label="key")
        value = data.draw(st.sampled_from({"lr": LRS[self.ALGO], "weight_decay": WEIGHT_DECAYS,
                                           "betas": BETAS, "momentum": MOMENTA}[key]), label="value")

        def op(opt, params):
            opt.param_groups[gi][key] = value
        self.apply(op)

    @rule(data=st.data())
    def set_flag(self, data):
        """A group's other options, switched mid-run as a user may: SGD's nesterov,
        dampening and maximize; Adam's maximize, eps and decoupled_weight_decay."""
        gi = data.draw(st.integers(0, len(self.ref.param_groups) - 1), label="group")
        key = data.draw(st.sampled_from(sorted(FLAGS[self.ALGO])), label="key")
        value = data.draw(st.sampled_from(FLAGS[self.ALGO][key]), label="value")

        def op(opt, params):
            opt.param_groups[gi][key] = value
        self.apply(op)

    @precondition(lambda self: self.ALGO != "SGD")
    @rule(on=st.booleans())
    def set_amsgrad(self, on):
        """amsgrad switched for every group and the defaults. On only while no state entry
        lacks a max_exp_avg_sq: torch.optim's step would raise a KeyError after creating
        state for the params before it, a half-applied step fusedopt does not copy (it
        raises before any write; test_one_source_of_truth pins that)."""
        if on and any(entry and "max_exp_avg_sq" not in entry for entry in self.ref.state.values()):
            return

        def op(opt, params):
            opt.defaults["amsgrad"] = on
            for group in opt.param_groups:
                group["amsgrad"] = on
        self.apply(op)

    @precondition(lambda self: self.ALGO == "SGD")
    @rule(data=st.data())
    def toggle_momentum(self, data):
        """SGD momentum 0 <-> nonzero (torch keeps or starts momentum buffers accordingly);
        more often than set_hyperparameter alone would draw it."""
        gi = data.draw(st.integers(0, len(self.ref.param_groups) - 1), label="group")
        value = 0.9 if self.ref.param_groups[gi]["momentum"] == 0 else 0.0

        def op(opt, params):
            opt.param_groups[gi]["momentum"] = value
        self.apply(op)

    @rule(data=st.data(), interleaved=st.booleans())
    def add_tied_params(self, data, interleaved):
        """Two params that are views of one tensor of the user's (its halves, or its even and
        odd columns), each side with its own such tensor, added as a new group."""
        base = random_tensor((4, 6), F32, self.next_seed(), self.DEVICE)
        first = len(self.ref_params)
        for side in self.sides:
            tensor = base.clone()
            self.user_tensors[side].append(tensor)  # updates must write through to it
            halves = (tensor[:, 0::2], tensor[:, 1::2]) if interleaved else (tensor[:2], tensor[2:])
            self.sides[side] += [nn.Parameter(half) for half in halves]
        lr = data.draw(st.sampled_from(LRS[self.ALGO]), label="lr")
        self.apply(lambda opt, params: opt.add_param_group({"params": params[first:first + 2], "lr": lr}))

    @rule(data=st.data(), spec=st.sampled_from(PARAM_SPECS), use_orphan=st.booleans())
    def append_param(self, data, spec, use_orphan):
        """group["params"].append(p) with a new param or an orphan (never one already in a
        group: torch.optim would then update it twice per step; fusedopt refuses that)."""
        gi = data.draw(st.integers(0, len(self.ref.param_groups) - 1), label="group")
        orphans = self.orphans()
        if use_orphan and orphans:
            i = data.draw(st.sampled_from(orphans), label="orphan")
        else:
            i = self.new_param(spec)
        self.apply(lambda opt, params: opt.param_groups[gi]["params"].append(params[i]))

    @rule(data=st.data())
    def remove_param(self, data):
        gi = data.draw(st.integers(0, len(self.ref.param_groups) - 1), label="group")
        n = len(self.ref.param_groups[gi]["params"])
        if n == 0:
            return
        j = data.draw(st.integers(0, n - 1), label="position")

        def op(opt, params):
            del opt.param_groups[gi]["params"][j]
        self.apply(op)

    @rule(data=st.data())
    def reorder_group(self, data):
        """group["params"] = a new list, reversed (state follows each param, not its place)."""
        gi = data.draw(st.integers(0, len(self.ref.param_groups) - 1), label="group")

        def op(opt, params):
            opt.param_groups[gi]["params"] = opt.param_groups[gi]["params"][::-1]
        self.apply(op)

    @rule()
    def copy_param_groups(self):
        """opt.param_groups = [dict(group) for group in opt.param_groups]: new group dicts."""
        def op(opt, params):
            opt.param_groups = [dict(group) for group in opt.param_groups]
        self.apply(op)

    @precondition(lambda self: len(self.ref.param_groups) > 1)
    @rule(data=st.data())
    def delete_group(self, data):
        gi = data.draw(st.integers(0, len(self.ref.param_groups) - 1), label="group")

        def op(opt, params):
            del opt.param_groups[gi]
        self.apply(op)

    # --- checkpoints --------------------------------------------------------------------
    @rule(kind=st.sampled_from(["self", "deepcopy", "torch.save"]))
    def state_dict_round_trip(self, kind):
        def op(opt, params):
            sd = opt.state_dict()
            if kind == "deepcopy":
                sd = copy.deepcopy(sd)
            elif kind == "torch.save":
                buffer = io.BytesIO()
                torch.save(sd, buffer)
                buffer.seek(0)
                sd = torch.load(buffer)
            opt.load_state_dict(sd)
        self.apply(op)

    @rule()
    def deepcopy_training_setup(self):
        """copy.deepcopy of the params and the optimizer together; training goes on with
        the copies (the copy rebuilds fusedopt's cache from the public objects)."""
        for side in self.sides:
            self.sides[side], self.opts[side], self.user_tensors[side] = copy.deepcopy(
                (self.sides[side], self.opts[side], self.user_tensors[side]))

    # --- optimizer.state ----------------------------------------------------------------
    @rule()
    def clear_state(self):
        self.apply(lambda opt, params: opt.state.clear())

    @rule(keep=st.booleans())
    def replace_state_object(self, keep):
        """opt.state = a new defaultdict: empty, or holding the same entries."""
        def op(opt, params):
            opt.state = defaultdict(dict, opt.state if keep else {})
        self.apply(op)

    @rule(data=st.data())
    def delete_state(self, data):
        candidates = self.with_state()
        if not candidates:
            return
        i = data.draw(st.sampled_from(candidates), label="param")

        def op(opt, params):
            del opt.state[params[i]]
        self.apply(op)

    @rule(data=st.data(), factor=st.sampled_from([0.5, 2.0, 0.0]),
          how=st.sampled_from(["replace", "in_place", "data"]))
    def scale_state_tensor(self, data, factor, how):
        """state[p][key] = state[p][key].clone() * factor, .mul_(factor) in place, or the
        tensor's .data re-pointed to scaled new memory (the same tensor object)."""
        candidates = [(i, key) for i in self.with_state() for key, v in self.ref.state[self.ref_params[i]].items()
                      if key != "step" and torch.is_tensor(v)]
        if not candidates:
            return
        i, key = data.draw(st.sampled_from(candidates), label="(param, key)")

        def op(opt, params):
            entry = opt.state[params[i]]
            if how == "in_place":
                entry[key].mul_(factor)
            elif how == "data":
                entry[key].data = entry[key].data.clone() * factor
            else:
                entry[key] = entry[key].clone() * factor
        self.apply(op)

    @precondition(lambda self: self.ALGO != "SGD")
    @rule(data=st.data(), delta=st.integers(0, 5))
    def replace_step(self, data, delta):
        """state[p]["step"] = a new tensor (never below 1: a step 0 would divide by zero)."""
        candidates = self.with_state("step")
        if not candidates:
            return
        i = data.draw(st.sampled_from(candidates), label="param")

        def op(opt, params):
            old = opt.state[params[i]]["step"]
            opt.state[params[i]]["step"] = torch.tensor(float(old) + delta, dtype=old.dtype)
        self.apply(op)

    @precondition(lambda self: self.ALGO == "SGD")
    @rule(data=st.data())
    def momentum_buffer_to_none(self, data):
        candidates = self.with_state("momentum_buffer")
        if not candidates:
            return
        i = data.draw(st.sampled_from(candidates), label="param")

        def op(opt, params):
            opt.state[params[i]]["momentum_buffer"] = None
        self.apply(op)

    # --- p.data -------------------------------------------------------------------------
    @rule(data=st.data(), kind=st.sampled_from(["clone", "other_layout", "new_values"]))
    def repoint_data(self, data, kind):
        i = data.draw(st.integers(0, len(self.ref_params) - 1), label="param")
        p = self.ref_params[i]
        new = random_tensor(p.shape, p.dtype, self.next_seed(), self.DEVICE) if kind == "new_values" else None

        def op(opt, params):
            q = params[i]
            if kind == "clone":
                q.data = q.data.clone()
            elif kind == "other_layout":
                q.data = other_layout(q.data)
            else:
                q.data = new.clone()
        self.apply(op)

    @rule()
    def share_memory(self):
        """model.share_memory(), as the Hogwild recipe calls it: every param's storage moves
        to shared memory in place (for fusedopt, that of the flat buffers its params are views of)."""
        def op(opt, params):
            for p in params:
                p.share_memory_()
        self.apply(op)

    # --- the comparison -----------------------------------------------------------------
    @invariant()
    def matches_torch(self):
        """Params, every state tensor, param_groups (hyperparameters and membership), and the
        grads (which nothing computes here, so they must be equal exactly)."""
        if not self.opts:
            return
        assert_optimizers_match(self.opts["ref"], self.opts["fused"], self.sides["ref"], self.sides["fused"])
        for i, (rp, fp) in enumerate(zip(self.sides["ref"], self.sides["fused"])):
            assert (fp.grad is None) == (rp.grad is None), f"param {i}: grad {fp.grad} vs torch's {rp.grad}"
            if rp.grad is not None:
                assert torch.equal(fp.grad, rp.grad), f"param {i}: grad differs from torch's"
        for i, (rt, ft) in enumerate(zip(self.user_tensors["ref"], self.user_tensors["fused"])):
            torch.testing.assert_close(ft, rt, rtol=1e-5, atol=1e-6, msg=lambda m: f"user tensor {i}: {m}")


# CI runs the same 60 programs per algorithm every time. FUSEDOPT_DIFFERENTIAL_EXAMPLES=N
# runs N fresh random ones, longer, instead: how the programs pinned in
# test_one_source_of_truth were found.
EXPLORE = int(os.environ.get("FUSEDOPT_DIFFERENTIAL_EXAMPLES", "0"))
SETTINGS = settings(max_examples=EXPLORE or 60, stateful_step_count=150 if EXPLORE else 80, deadline=None,
                    derandomize=not EXPLORE, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                    print_blob=False)


def differential_test(algo, device, shared=False):
    """The pytest class running random programs for one algorithm on one device (with
    ``shared``: every param in shared memory, a fifth of the programs)."""
    machine = type(f"{algo}Differential_{device}{'_shared' if shared else ''}", (Differential,),
                   {"ALGO": algo, "DEVICE": device, "SHARED": shared})
    test = machine.TestCase
    test.settings = settings(SETTINGS, max_examples=SETTINGS.max_examples // 5) if shared else SETTINGS
    return pytest.mark.skipif(device == "cuda" and not torch.cuda.is_available(),
                              reason="no CUDA device on this machine")(test)


TestSGDDifferential = differential_test("SGD", "cpu")
TestAdamDifferential = differential_test("Adam", "cpu")
TestAdamWDifferential = differential_test("AdamW", "cpu")
# Params in shared memory (PyTorch's Hogwild recipe): rows fusedopt cannot move, updated
# where they live in the same kernel call as the rest of their group.
TestSGDDifferential_shared = differential_test("SGD", "cpu", shared=True)
TestAdamDifferential_shared = differential_test("Adam", "cpu", shared=True)
TestAdamWDifferential_shared = differential_test("AdamW", "cpu", shared=True)
# The same programs with params, grads and fusedopt's buffers on the GPU (torch.optim's
# oracle runs there too). Written before any GPU ran them: benchmarks/cuda_check.sh's
# `tests` stage picks them up by name.
TestSGDDifferential_cuda = differential_test("SGD", "cuda")
TestAdamDifferential_cuda = differential_test("Adam", "cuda")
TestAdamWDifferential_cuda = differential_test("AdamW", "cuda")
