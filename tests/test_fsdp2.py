"""fusedopt over FSDP2's DTensor shards, in this process on a one-rank gloo group.

* Every row of a param group, DTensor shards among them, is updated in one kernel call
  (flat_buffer.py: a row's place is data, not a code path); so are shared-memory params
  beside ordinary ones.
* A randomized differential test: random programs (training steps, zero_grad both ways,
  hyperparameter edits, state edits, self-loads and loads of torch's checkpoints) run on
  torch.optim (foreach=False) and fusedopt over two identical fully_shard models, compared
  after every operation. tests/test_distributed.py runs FSDP2 on two ranks.
"""
import copy
import io
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule
from torch import nn

import fusedopt
from fusedopt import ops

RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module", autouse=True)
def one_rank_group():
    """A one-rank gloo process group for this module, gone again after it (other modules
    test torch.distributed.checkpoint without one)."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def sharded_model(seed=0):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    for layer in model[::2]:
        fully_shard(layer)
    fully_shard(model)
    return model


class CountingOps:
    """Counts the calls of fusedopt's step ops, as the step makes them (ops.run: the real
    kernels run)."""

    def __init__(self, monkeypatch):
        self.calls = 0
        real = ops.run

        def counted(op, *args):
            self.calls += op in (ops.adam_step_, ops.sgd_step_)
            return real(op, *args)
        monkeypatch.setattr(ops, "run", counted)


@pytest.mark.parametrize("algo", ["SGD", "AdamW"])
def test_dtensor_shards_of_a_group_are_updated_in_one_kernel_call(algo, monkeypatch):
    from torch.distributed.tensor import DTensor

    model, reference = sharded_model(), sharded_model()
    options = dict(lr=0.05, momentum=0.9) if algo == "SGD" else dict(lr=0.05)
    opt = getattr(fusedopt, algo)(model.parameters(), **options)
    ref = getattr(torch.optim, algo)(reference.parameters(), foreach=False, **options)
    counter = CountingOps(monkeypatch)
    x = torch.randn(4, 6)
    for step in range(3):
        for m, o in ((model, opt), (reference, ref)):
            o.zero_grad()
            m(x + step).square().sum().backward()
            o.step()
    assert counter.calls == 3  # six DTensor params, one call per step
    for p, expected in zip(model.parameters(), reference.parameters()):
        assert isinstance(p, DTensor)
        torch.testing.assert_close(p.full_tensor(), expected.full_tensor(), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("algo", ["SGD", "Adam"])
def test_pinned_rows_are_updated_in_the_kernel_call_of_their_group(algo, monkeypatch):
    """Shared memory, a view of a user's tensor, every other column of one (copied in and
    out) and an ordinary param: one group, one call per step, torch.optim's values."""
    def params():
        torch.manual_seed(0)
        user = torch.randn(4, 6)
        shared = nn.Parameter(torch.randn(5, 3))
        shared.share_memory_()
        return user, [shared, nn.Parameter(user[0:2]), nn.Parameter(user[2:, ::2]), nn.Parameter(torch.randn(7))]

    (user, mine), (ref_user, theirs) = params(), params()
    options = dict(lr=0.1, momentum=0.9) if algo == "SGD" else dict(lr=0.1)
    opt = getattr(fusedopt, algo)(mine, **options)
    ref = getattr(torch.optim, algo)(theirs, foreach=False, **options)
    counter = CountingOps(monkeypatch)
    for step in range(3):
        for ps, o in ((mine, opt), (theirs, ref)):
            for i, p in enumerate(ps):
                p.grad = torch.full_like(p, 0.1 * (i + 1) + step)
            o.step()
    assert counter.calls == 3
    places = sorted(opt._slots[p][0].places[opt._slots[p][1]] for p in mine)
    assert places == ["copied", "moved", "pinned", "pinned"]
    assert len({id(opt._slots[p][0]) for p in mine}) == 1
    torch.testing.assert_close(user, ref_user, rtol=RTOL, atol=ATOL)
    for p, expected in zip(mine, theirs):
        torch.testing.assert_close(p, expected, rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- differential

LRS = {"SGD": [0.01, 0.05, 0.1], "Adam": [1e-3, 1e-2, 5e-2], "AdamW": [1e-3, 1e-2, 5e-2]}


class Fsdp2Differential(RuleBasedStateMachine):
    ALGO = None

    @initialize(amsgrad=st.booleans(), momentum=st.sampled_from([0.0, 0.9]), lr=st.sampled_from([0.01, 0.05]))
    def build(self, amsgrad, momentum, lr):
        self.models = {side: sharded_model() for side in ("ref", "fused")}
        options = dict(momentum=momentum) if self.ALGO == "SGD" else dict(amsgrad=amsgrad)
        self.opts = {side: getattr(torch.optim if side == "ref" else fusedopt, self.ALGO)(
            model.parameters(), lr=lr, foreach=False, **options) for side, model in self.models.items()}
        self.inputs = 0

    def apply(self, op):
        """op(opt, model) on both sides; where torch raises, fusedopt must raise alike."""
        try:
            op(self.opts["ref"], self.models["ref"])
        except Exception as expected:
            with pytest.raises(type(expected)):
                op(self.opts["fused"], self.models["fused"])
            return
        op(self.opts["fused"], self.models["fused"])

    @rule(set_to_none=st.booleans(), zero_in_step=st.booleans())
    def train_step(self, set_to_none, zero_in_step):
        self.inputs += 1
        x = torch.randn(3, 6, generator=torch.Generator().manual_seed(self.inputs))

        def op(opt, model):
            opt.zero_grad(set_to_none=set_to_none)
            model(x).square().mean().backward()
            opt.step()
        self.apply(op)

    @rule(set_to_none=st.booleans())
    def zero_grad(self, set_to_none):
        self.apply(lambda opt, model: opt.zero_grad(set_to_none=set_to_none))

    @rule(key=st.sampled_from(["lr", "weight_decay"]), value=st.sampled_from([0.0, 1e-3, 0.02, 0.1]))
    def set_hyperparameter(self, key, value):
        def op(opt, model):
            for group in opt.param_groups:
                group[key] = value
        self.apply(op)

    @rule()
    def clear_state(self):
        self.apply(lambda opt, model: opt.state.clear())

    @rule(index=st.integers(0, 5))
    def delete_state_entry(self, index):
        def op(opt, model):
            opt.state.pop(list(model.parameters())[index], None)
        self.apply(op)

    @rule(factor=st.sampled_from([0.5, 2.0]))
    def scale_state_in_place(self, factor):
        def op(opt, model):
            for entry in opt.state.values():
                for key, value in entry.items():
                    if key != "step" and torch.is_tensor(value):
                        value.mul_(factor)
        self.apply(op)

    @rule(deep=st.booleans())
    def self_load(self, deep):
        def op(opt, model):
            saved = opt.state_dict()
            opt.load_state_dict(copy.deepcopy(saved) if deep else saved)
        self.apply(op)

    @rule()
    def save_and_load(self):
        def op(opt, model):
            buffer = io.BytesIO()
            torch.save(opt.state_dict(), buffer)
            buffer.seek(0)
            opt.load_state_dict(torch.load(buffer, weights_only=False))
        self.apply(op)

    @rule()
    def load_torchs_checkpoint(self):
        """Both sides load torch.optim's state dict: a run switching to fusedopt."""
        saved = copy.deepcopy(self.opts["ref"].state_dict())
        self.apply(lambda opt, model: opt.load_state_dict(copy.deepcopy(saved)))

    @invariant()
    def matches_torch(self):
        from torch.distributed.tensor import DTensor

        ref, fused = self.opts["ref"], self.opts["fused"]
        for p, expected in zip(self.models["fused"].parameters(), self.models["ref"].parameters()):
            torch.testing.assert_close(p.full_tensor(), expected.full_tensor(), rtol=RTOL, atol=ATOL)
            assert (p in fused.state) == (expected in ref.state)
            for key, value in ref.state.get(expected, {}).items():
                mine = fused.state[p][key]
                if isinstance(value, DTensor):
                    assert isinstance(mine, DTensor) and mine.placements == value.placements
                    torch.testing.assert_close(mine.full_tensor(), value.full_tensor(), rtol=RTOL, atol=ATOL)
                elif torch.is_tensor(value):
                    torch.testing.assert_close(mine, value, rtol=RTOL, atol=ATOL)
                else:
                    assert mine == value
        for mine, theirs in zip(fused.param_groups, ref.param_groups):
            assert {k: v for k, v in mine.items() if k in theirs and k != "params"} == \
                   {k: v for k, v in theirs.items() if k != "params"}


SETTINGS = settings(max_examples=25, stateful_step_count=30, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow], print_blob=False)


def fsdp2_differential(algo):
    test = type(f"{algo}Fsdp2Differential", (Fsdp2Differential,), {"ALGO": algo}).TestCase
    test.settings = SETTINGS
    return test


TestSGDFsdp2Differential = fsdp2_differential("SGD")
TestAdamFsdp2Differential = fsdp2_differential("Adam")
TestAdamWFsdp2Differential = fsdp2_differential("AdamW")
