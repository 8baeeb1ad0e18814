"""fusedopt under torch.distributed, on CPU: 2 ranks on gloo over loopback.

Compatibility: trained under DDP (grads in their own tensors, or views into DDP's buckets),
ZeroRedundancyOptimizer and FSDP2's fully_shard, fusedopt's weights equal torch.optim's
under the same engine. ShardedOptimizer (ZeRO-1 over flat-buffer slices) trains as
torch.optim does under DDP, keeps state for 1/world_size of the elements on a model where
ZeroRedundancyOptimizer's whole-tensor split does not, and checkpoints in torch.optim's
format across world sizes.

All distributed scenarios run in one spawn of two processes (starting them costs seconds
each); every rank reports each scenario's outcome to a file, and each test below checks
one scenario on both ranks.
"""
import copy
from collections import defaultdict
import json
import os
import socket
import time
import traceback
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fusedopt
import fusedopt.distributed
from fusedopt.distributed import BufferSlice, ShardedOptimizer, grad_piece
from fusedopt.flat_buffer import FlatBuffer

WORLD_SIZE = 2
TIMEOUT_S = 80  # the two ranks together; a hang fails the tests instead of blocking CI
RTOL, ATOL = 1e-5, 1e-6  # float32 over a few steps; see conftest.py
LR = 0.05

SCENARIOS = {}


def scenario(fn):
    SCENARIOS[fn.__name__] = fn
    return fn


# ----------------------------------------------------------------------------- model

class UnevenNet(nn.Module):
    """An embedding holding most of the elements (as GPT-2's wte), a transposed weight
    (grads with other strides than row-major; FSDP2 takes only contiguous parameters),
    a (1, 3) parameter whose FSDP shard is empty on rank 1, and small layers."""

    def __init__(self, transposed=True):
        super().__init__()
        self.embed = nn.Embedding(256, 8)
        self.hidden = nn.Linear(8, 16)
        mix = torch.randn(6, 16)
        self.mix = nn.Parameter(mix.t() if transposed else mix.t().contiguous())
        self.norm = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)
        self.offset = nn.Parameter(torch.zeros(1, 3))

    def forward(self, tokens):
        hidden = torch.tanh(self.hidden(self.embed(tokens)))
        return self.head(self.norm(hidden @ self.mix)) + self.offset


def make_model(transposed=True):
    torch.manual_seed(0)
    return UnevenNet(transposed)


def tokens(rank, step):
    return torch.randint(0, 256, (4, 6), generator=torch.Generator().manual_seed(100 * rank + step))


def train(model, optimizer, rank, steps, *, set_to_none=True, zero_grad_in_step=False, scheduler=None,
          first_step=0):
    for step in range(first_step, first_step + steps):
        model(tokens(rank, step)).square().mean().backward()
        if zero_grad_in_step:
            optimizer.step(zero_grad=True)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=set_to_none)
        if scheduler is not None:
            scheduler.step()


def assert_same_weights(module, reference):
    for (name, actual), expected in zip(module.named_parameters(), reference.parameters()):
        torch.testing.assert_close(actual.detach(), expected.detach(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")


def ddp(model, **options):
    return nn.parallel.DistributedDataParallel(model, **options)


def assert_states_match(state, reference_state, what):
    assert list(state) == list(reference_state), f"{what}: keys {list(state)} != torch's {list(reference_state)}"
    for key, value in reference_state.items():
        assert type(state[key]) is type(value), f"{what}[{key}]: {type(state[key])} != {type(value)}"
        torch.testing.assert_close(state[key], value, rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}[{key}]: {m}")


# ----------------------------------------------------------------------------- compatibility

def fusedopt_under_ddp_matches_torch(rank, bucket_view):
    """With gradient_as_bucket_view the grads are views into DDP's buckets: read in place,
    and zero_grad(set_to_none=False) leaves them there."""
    set_to_none = not bucket_view
    runs = []
    for optimizer_class in (torch.optim.AdamW, fusedopt.AdamW):
        model = ddp(make_model(), gradient_as_bucket_view=bucket_view)
        optimizer = optimizer_class(model.parameters(), lr=LR, weight_decay=0.1, foreach=False)
        train(model, optimizer, rank, 2, set_to_none=set_to_none)
        grad_addresses = [p.grad.data_ptr() for p in model.parameters()] if bucket_view else None
        train(model, optimizer, rank, 2, set_to_none=set_to_none, first_step=2)
        if bucket_view:
            assert [p.grad.data_ptr() for p in model.parameters()] == grad_addresses, "grads left DDP's buckets"
        runs.append(model)
    assert_same_weights(runs[1].module, runs[0].module)


@scenario
def ddp_with_grads_in_own_tensors(rank):
    fusedopt_under_ddp_matches_torch(rank, bucket_view=False)


@scenario
def ddp_with_grads_as_bucket_views(rank):
    fusedopt_under_ddp_matches_torch(rank, bucket_view=True)


@scenario
def zero_redundancy_optimizer_of_fusedopt(rank):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    runs = []
    for optimizer_class in (torch.optim.AdamW, fusedopt.AdamW):
        model = ddp(make_model())
        optimizer = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=optimizer_class, lr=LR,
                                            weight_decay=0.1, foreach=False)
        train(model, optimizer, rank, 4)
        runs.append(model)
    assert_same_weights(runs[1].module, runs[0].module)


@scenario
def fsdp2_fully_shard(rank):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    runs = []
    for optimizer_class in (torch.optim.AdamW, fusedopt.AdamW):
        model = make_model(transposed=False)
        fully_shard(model.hidden)
        fully_shard(model)
        optimizer = optimizer_class(model.parameters(), lr=LR, weight_decay=0.1, foreach=False)
        train(model, optimizer, rank, 2)
        train(model, optimizer, rank, 2, set_to_none=False, first_step=2)
        runs.append((model, optimizer))
    (reference, reference_optimizer), (model, optimizer) = runs
    for (name, p), expected in zip(model.named_parameters(), reference.parameters()):
        assert isinstance(p, DTensor), f"{name} is no longer FSDP's DTensor"
        torch.testing.assert_close(p.full_tensor(), expected.full_tensor(), rtol=RTOL, atol=ATOL,
                                   msg=lambda m, name=name: f"{name}: {m}")
    state, reference_state = optimizer.state_dict()["state"], reference_optimizer.state_dict()["state"]
    assert list(state) == list(reference_state)
    for index, entry in state.items():
        for key, expected in reference_state[index].items():
            if isinstance(expected, DTensor):
                assert isinstance(entry[key], DTensor) and entry[key].placements == expected.placements, \
                    f"state[{index}][{key}] is not a DTensor placed like torch's"

        def local(state):
            return {key: value.to_local() if isinstance(value, DTensor) else value for key, value in state.items()}
        assert_states_match(local(entry), local(reference_state[index]), f"state[{index}]")

    # torch's FSDP2 checkpoint loads into fusedopt, and both train on alike.
    optimizer.load_state_dict(reference_optimizer.state_dict())
    for m, o in runs:
        train(m, o, rank, 1, first_step=4)
    for p, expected in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.full_tensor(), expected.full_tensor(), rtol=RTOL, atol=ATOL)


# ----------------------------------------------------------------------------- ShardedOptimizer

def sharded_matches_torch(rank, optimizer_class, *, bucket_view=False, set_to_none=True, zero_grad_in_step=False,
                          **options):
    """Two param groups and an lr schedule (hyperparameters are read every step)."""
    def groups(model):
        return [{"params": [model.embed.weight, model.mix]},
                {"params": [p for n, p in model.named_parameters() if n not in ("embed.weight", "mix")],
                 "lr": LR / 2, "weight_decay": 0.0}]

    reference = ddp(make_model(), gradient_as_bucket_view=bucket_view)
    reference_optimizer = getattr(torch.optim, optimizer_class.__name__)(
        groups(reference.module), lr=LR, foreach=False, **options)
    model = ddp(make_model(), gradient_as_bucket_view=bucket_view)
    optimizer = ShardedOptimizer(groups(model.module), optimizer_class=optimizer_class, lr=LR, foreach=False,
                                 **options)
    for m, o, in_step in ((reference, reference_optimizer, False), (model, optimizer, zero_grad_in_step)):
        schedule = torch.optim.lr_scheduler.LambdaLR(o, lambda step: 1.0 / (1 + step))
        train(m, o, rank, 4, set_to_none=set_to_none, zero_grad_in_step=in_step, scheduler=schedule)
    assert_same_weights(model.module, reference.module)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in reference_optimizer.param_groups]


@scenario
def sharded_adamw(rank):
    sharded_matches_torch(rank, fusedopt.AdamW, weight_decay=0.1)


@scenario
def sharded_adam_amsgrad_bucket_views_kept(rank):
    sharded_matches_torch(rank, fusedopt.Adam, bucket_view=True, set_to_none=False, amsgrad=True)


@scenario
def sharded_sgd_flat_grad_buffer(rank):
    sharded_matches_torch(rank, fusedopt.SGD, set_to_none=False, momentum=0.9, nesterov=True, weight_decay=0.01)


@scenario
def sharded_step_zeroes_all_grads(rank):
    sharded_matches_torch(rank, fusedopt.AdamW, set_to_none=False, zero_grad_in_step=True)


@scenario
def sharded_all_gather_into_one_tensor(rank):
    """NCCL's way of sharing the slices (gloo broadcasts them), run on gloo."""
    backends = fusedopt.distributed.ALL_GATHER_BACKENDS
    fusedopt.distributed.ALL_GATHER_BACKENDS = ("gloo",)
    try:
        sharded_matches_torch(rank, fusedopt.AdamW)
    finally:
        fusedopt.distributed.ALL_GATHER_BACKENDS = backends


def sharded_follows_edits_of_its_state(rank, optimizer_class, key, **options):
    """Edits through optimizer.state between training phases, on torch.optim under DDP and
    on ShardedOptimizer, whose entries hold this rank's pieces: each is written so that it
    means the same on both (every rank makes it), and both train on from the edited state:
    cleared, one entry dropped, a new state object with the same entries, `key` set to
    None, to zeros like it, to a tensor of the parameter's shape (the piece is taken)."""
    def set_key(make):
        def edit(opt, model):
            for p, entry in list(opt.state.items()):
                entry[key] = make(p, entry[key])
        return edit

    edits = [lambda opt, model: opt.state.clear(),
             lambda opt, model: opt.state.pop(model.module.embed.weight, None),
             lambda opt, model: setattr(opt, "state", defaultdict(dict, opt.state)),
             set_key(lambda p, value: torch.zeros_like(value)),
             set_key(lambda p, value: torch.full_like(p, 0.01))]
    if optimizer_class is fusedopt.SGD:
        edits.append(set_key(lambda p, value: None))
    reference = ddp(make_model())
    reference_optimizer = getattr(torch.optim, optimizer_class.__name__)(
        reference.parameters(), lr=LR, foreach=False, **options)
    model = ddp(make_model())
    optimizer = ShardedOptimizer(model.parameters(), optimizer_class=optimizer_class, lr=LR, **options)
    for phase, edit in enumerate([None, *edits]):
        for m, o in ((reference, reference_optimizer), (model, optimizer)):
            if edit is not None:
                edit(o, m)
            train(m, o, rank, 2, first_step=2 * phase)
        assert_same_weights(model.module, reference.module)
    if optimizer_class is fusedopt.Adam:  # an entry without a key: torch's KeyError, before any write
        before = [p.detach().clone() for p in model.parameters()]
        for entry in optimizer.state.values():
            del entry["exp_avg"]
        model(tokens(rank, 0)).square().mean().backward()
        with pytest.raises(KeyError, match="exp_avg"):
            optimizer.step()
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@scenario
def sharded_sgd_resumes_and_self_loads_like_torch(rank):
    """SGD's momentum buffers through a consolidated checkpoint: loaded into a fresh
    ShardedOptimizer they go on as torch.optim's do, and a self-load followed by
    opt.state.clear() starts them afresh (the loaded rows had no record of what was put
    into optimizer.state, so the cleared entries went unnoticed and the buffers went on)."""
    options = dict(lr=LR, momentum=0.9, dampening=0.1)
    reference = ddp(make_model())
    reference_optimizer = torch.optim.SGD(reference.parameters(), foreach=False, **options)
    model = ddp(make_model())
    optimizer = ShardedOptimizer(model.parameters(), optimizer_class=fusedopt.SGD, **options)
    for m, o in ((reference, reference_optimizer), (model, optimizer)):
        train(m, o, rank, 3)
    optimizer.consolidate_state_dict(to=0)
    transported = [optimizer.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(transported, src=0)
    resumed = ShardedOptimizer(model.parameters(), optimizer_class=fusedopt.SGD, **options)
    resumed.load_state_dict(transported[0])
    for m, o in ((reference, reference_optimizer), (model, resumed)):
        train(m, o, rank, 2, first_step=3)
    assert_same_weights(model.module, reference.module)
    resumed.consolidate_state_dict(to=0)
    transported = [resumed.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(transported, src=0)
    reference_optimizer.load_state_dict(reference_optimizer.state_dict())
    resumed.load_state_dict(transported[0])
    for m, o in ((reference, reference_optimizer), (model, resumed)):
        o.state.clear()
        train(m, o, rank, 2, first_step=5)
    assert_same_weights(model.module, reference.module)


@scenario
def sharded_adam_checkpoint_loads_into_sgd_as_into_torch(rank):
    """torch.optim.SGD loads an Adam checkpoint (its groups lack momentum) and its step
    raises KeyError('momentum'). ShardedOptimizer raised that KeyError from
    load_state_dict, after the groups had been replaced: half-applied. Now it loads, its
    step raises before any write, and once the groups hold SGD's hyperparameters again
    both train alike (the loaded entries read as edits)."""
    reference, model = ddp(make_model()), ddp(make_model())
    reference_adam = torch.optim.Adam(reference.parameters(), lr=LR, foreach=False)
    adam = ShardedOptimizer(model.parameters(), optimizer_class=fusedopt.Adam, lr=LR)
    for m, o in ((reference, reference_adam), (model, adam)):
        train(m, o, rank, 2)
    adam.consolidate_state_dict(to=0)
    transported = [adam.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(transported, src=0)
    options = dict(lr=LR, momentum=0.9, dampening=0.1)
    reference_sgd = torch.optim.SGD(reference.parameters(), foreach=False, **options)
    sgd = ShardedOptimizer(model.parameters(), optimizer_class=fusedopt.SGD, **options)
    for m, o in ((reference, reference_sgd), (model, sgd)):
        train(m, o, rank, 1, first_step=2)
        o.load_state_dict(transported[0])  # no error, as torch
        m(tokens(rank, 3)).square().mean().backward()
        before = [p.detach().clone() for p in m.parameters()]
        with pytest.raises(KeyError, match="momentum"):
            o.step()
        assert all(torch.equal(p, b) for p, b in zip(m.parameters(), before))
        for group in o.param_groups:
            group.update(options, **{key: value for key, value in o.defaults.items() if key not in group})
        o.zero_grad()
        train(m, o, rank, 2, first_step=4)
    assert_same_weights(model.module, reference.module)
    # This rank keeps state only for the parameters it holds rows of, as after any load.
    fresh_model = ddp(make_model())
    fresh = ShardedOptimizer(fresh_model.parameters(), optimizer_class=fusedopt.SGD, **options)
    train(fresh_model, fresh, rank, 1)
    holding = [i for i, p in enumerate(fresh_model.parameters()) if fresh.state.get(p)]
    assert [i for i, p in enumerate(model.parameters()) if sgd.state.get(p)] == holding
    assert len(holding) < len(list(model.parameters()))


@scenario
def sharded_adam_follows_edits_of_its_state(rank):
    sharded_follows_edits_of_its_state(rank, fusedopt.Adam, "exp_avg", weight_decay=0.1)


@scenario
def sharded_sgd_follows_edits_of_its_state(rank):
    sharded_follows_edits_of_its_state(rank, fusedopt.SGD, "momentum_buffer", momentum=0.9, dampening=0.1)


def state_elements(optimizer_state, key="exp_avg"):
    """Elements allocated for `key` on this rank: the storages behind the state tensors."""
    storages = {}
    for entry in optimizer_state.values():
        value = entry.get(key)
        if value is not None:
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes() // value.element_size()
    return sum(storages.values())


@scenario
def sharded_state_is_an_even_slice(rank):
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = ddp(make_model())
    sharded = ShardedOptimizer(model.parameters(), optimizer_class=fusedopt.AdamW, lr=LR)
    train(model, sharded, rank, 1)
    zero_model = ddp(make_model())
    zero = ZeroRedundancyOptimizer(zero_model.parameters(), optimizer_class=torch.optim.AdamW, lr=LR)
    train(zero_model, zero, rank, 1)
    counts = [None] * WORLD_SIZE
    dist.all_gather_object(counts, (state_elements(sharded.state), state_elements(zero.optim.state)))
    sharded_counts, zero_counts = zip(*counts)

    params = list(model.parameters())
    total, largest = sum(p.numel() for p in params), max(p.numel() for p in params)
    # Padding: each parameter starts on a 64-byte line, and the buffer splits into equal lines.
    padding = 16 * (len(params) + WORLD_SIZE)
    assert len(set(sharded_counts)) == 1, f"slices differ in size: {sharded_counts}"
    assert sharded_counts[0] <= total / WORLD_SIZE + padding, (sharded_counts, total)
    assert max(zero_counts) >= largest, (zero_counts, largest)
    assert max(sharded_counts) < max(zero_counts)


@scenario
def sharded_checkpoint_is_torchs_across_world_sizes(rank):
    reference = ddp(make_model())
    reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=LR, foreach=False)
    model = ddp(make_model())
    optimizer = ShardedOptimizer(model.parameters(), optimizer_class=fusedopt.AdamW, lr=LR, foreach=False)
    for m, o in ((reference, reference_optimizer), (model, optimizer)):
        train(m, o, rank, 3)
    optimizer.consolidate_state_dict(to=0)
    if rank == 0:
        loaded = torch.optim.AdamW(copy.deepcopy(reference.module).parameters(), lr=LR, foreach=False)
        loaded.load_state_dict(optimizer.state_dict())
        expected = reference_optimizer.state_dict()
        for index, state in expected["state"].items():
            assert_states_match(loaded.state_dict()["state"][index], state, f"state[{index}]")
        # Key for key (fusedopt's own options at their defaults are not saved).
        assert optimizer.state_dict()["param_groups"] == expected["param_groups"]
        assert loaded.state_dict()["param_groups"] == expected["param_groups"]
    else:
        with pytest.raises(RuntimeError, match="consolidate_state_dict"):
            optimizer.state_dict()

    # A checkpoint from one rank alone (world size 1) resumes on two ranks as torch's does.
    alone = dist.new_group([0])
    transported = [None, None]
    if rank == 0:
        solo_model = make_model()
        solo = ShardedOptimizer(solo_model.parameters(), optimizer_class=fusedopt.AdamW, process_group=alone,
                                lr=LR)
        train(solo_model, solo, rank, 3)
        solo.consolidate_state_dict(to=0)
        transported = [solo_model.state_dict(), solo.state_dict()]
    dist.broadcast_object_list(transported, src=0)
    weights, checkpoint = transported
    resumed = []
    for optimizer_class in (torch.optim.AdamW, fusedopt.AdamW):
        module = make_model()
        module.load_state_dict(weights)
        model = ddp(module)
        if optimizer_class is torch.optim.AdamW:
            optimizer = optimizer_class(model.parameters(), lr=LR)
        else:
            optimizer = ShardedOptimizer(model.parameters(), optimizer_class=optimizer_class, lr=LR)
        optimizer.load_state_dict(copy.deepcopy(checkpoint))
        train(model, optimizer, rank, 2, first_step=3)
        resumed.append(model)
    assert_same_weights(resumed[1].module, resumed[0].module)


@scenario
def sharded_low_precision_trains_like_the_unsharded_optimizer(rank):
    """bf16 moments and float32 master weights live in each rank's slice: training equals
    the same fusedopt optimizer unsharded, bit for bit (also after opt.state.clear(): a
    master copy starts again from its param), and the consolidated checkpoint keeps their
    dtypes."""
    for dtype, options in ((torch.float32, {"state_dtype": torch.bfloat16}),
                           (torch.bfloat16, {"master_weights": True})):
        reference = ddp(make_model().to(dtype))
        reference_optimizer = fusedopt.AdamW(reference.parameters(), lr=LR, weight_decay=0.1, **options)
        model = ddp(make_model().to(dtype))
        optimizer = ShardedOptimizer(model.parameters(), optimizer_class=fusedopt.AdamW, lr=LR,
                                     weight_decay=0.1, **options)
        for m, o in ((reference, reference_optimizer), (model, optimizer)):
            train(m, o, rank, 3)
            o.state.clear()
            train(m, o, rank, 2, first_step=3)
        for (name, p), q in zip(model.module.named_parameters(), reference.module.parameters()):
            assert torch.equal(p, q), f"{options}: {name} differs"
        optimizer.consolidate_state_dict(to=0)
        if rank == 0:
            consolidated = optimizer.state_dict()["state"]
            for index, state in reference_optimizer.state_dict()["state"].items():
                for key, value in state.items():
                    got = consolidated[index][key]
                    assert got.dtype == value.dtype and torch.equal(got, value), f"{options}: state[{index}][{key}]"


@scenario
def sharded_with_grad_scaler_and_clipping(rank):
    """GradScaler hands grad_scale/found_inf to the step; a step with an inf grad is
    skipped; fused clip_grad_norm_ clips by the norm of all grads."""
    runs = []
    for sharded in (False, True):
        model = ddp(make_model())
        if sharded:
            optimizer = ShardedOptimizer(model.parameters(), optimizer_class=fusedopt.AdamW, lr=LR)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=LR, foreach=False)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        for step in range(4):
            scaler.scale(model(tokens(rank, step)).square().mean()).backward()
            if step == 1:
                model.module.hidden.bias.grad[0] = float("inf")
            if sharded:
                optimizer.clip_grad_norm_(0.5, grad_scaler=scaler)
            else:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
        runs.append((model, scaler.get_scale()))
    (reference, reference_scale), (model, scale) = runs
    assert scale == reference_scale == 2.0 ** 7
    assert_same_weights(model.module, reference.module)


# ----------------------------------------------------------------------------- running the ranks

def _run_scenarios(rank, port, result_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on two cores
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=TIMEOUT_S))
    outcomes = {}
    for name, run in SCENARIOS.items():
        try:
            run(rank)
            outcomes[name] = None
        except Exception:
            outcomes[name] = traceback.format_exc()
        Path(result_dir, f"rank{rank}.json").write_text(json.dumps(outcomes))
        if outcomes[name] is not None:
            # The other rank may wait in a collective this one never reaches: leaving
            # closes the connections, which fails that collective at once, where going on
            # would pair up mismatched collectives.
            break
    else:
        dist.barrier()  # no rank leaves while another still talks to it
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Each scenario's outcome on each rank (None, or the traceback it raised), and how
    a rank died, if one did."""
    result_dir = tmp_path_factory.mktemp("ranks")
    context = mp.start_processes(_run_scenarios, args=(_free_port(), str(result_dir)), nprocs=WORLD_SIZE,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    death = None
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"the ranks did not finish within {TIMEOUT_S} s; so far: {_read_outcomes(result_dir)}")
    except (mp.ProcessExitedException, mp.ProcessRaisedException) as error:
        # Judged per scenario: a rank that dies after reporting them all (seen rarely in
        # gloo's teardown at exit) fails none of them.
        death = str(error)
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
            process.join()
    return _read_outcomes(result_dir), death


def _read_outcomes(result_dir):
    files = [Path(result_dir, f"rank{rank}.json") for rank in range(WORLD_SIZE)]
    return [json.loads(file.read_text()) if file.exists() else {} for file in files]


def check(outcomes, name):
    per_rank, death = outcomes
    for rank, outcome in enumerate(per_rank):
        failed_before = [f"{other}:\n{error}" for other, error in outcome.items() if error is not None]
        assert name in outcome, f"rank {rank} stopped before {name}; {death or ''}" + "".join(failed_before)
        assert outcome[name] is None, f"rank {rank}:\n{outcome[name]}"


def test_ddp_trains_fusedopt_like_torch_with_grads_in_own_tensors(outcomes):
    check(outcomes, "ddp_with_grads_in_own_tensors")


def test_ddp_trains_fusedopt_like_torch_with_grads_as_bucket_views_left_in_place(outcomes):
    check(outcomes, "ddp_with_grads_as_bucket_views")


def test_zero_redundancy_optimizer_of_fusedopt_trains_like_torchs(outcomes):
    check(outcomes, "zero_redundancy_optimizer_of_fusedopt")


def test_fsdp2_fully_shard_trains_fusedopt_like_torch_with_torchs_state_format(outcomes):
    check(outcomes, "fsdp2_fully_shard")


def test_sharded_adamw_with_param_groups_and_lr_schedule_trains_like_torch(outcomes):
    check(outcomes, "sharded_adamw")


def test_sharded_adam_amsgrad_reads_ddp_bucket_views_in_place(outcomes):
    check(outcomes, "sharded_adam_amsgrad_bucket_views_kept")


def test_sharded_sgd_reads_the_flat_grad_buffer_slice(outcomes):
    check(outcomes, "sharded_sgd_flat_grad_buffer")


def test_sharded_step_with_zero_grad_zeroes_every_grad_not_just_the_slice(outcomes):
    check(outcomes, "sharded_step_zeroes_all_grads")


def test_sharded_all_gather_into_one_tensor_trains_like_torch(outcomes):
    check(outcomes, "sharded_all_gather_into_one_tensor")


def test_sharded_sgd_resumes_from_its_checkpoint_and_self_loads_like_torch(outcomes):
    check(outcomes, "sharded_sgd_resumes_and_self_loads_like_torch")


def test_sharded_adam_checkpoint_loads_into_sgd_as_into_torch_and_its_step_raises(outcomes):
    check(outcomes, "sharded_adam_checkpoint_loads_into_sgd_as_into_torch")


@pytest.mark.parametrize("algo", ["adam", "sgd"])
def test_sharded_optimizer_follows_edits_of_its_state_like_torch(outcomes, algo):
    check(outcomes, f"sharded_{algo}_follows_edits_of_its_state")


def test_sharded_state_is_an_even_slice_where_zero_holds_the_largest_tensor(outcomes):
    check(outcomes, "sharded_state_is_an_even_slice")


def test_sharded_checkpoint_loads_into_torch_and_across_world_sizes(outcomes):
    check(outcomes, "sharded_checkpoint_is_torchs_across_world_sizes")


def test_sharded_with_grad_scaler_skip_and_fused_clipping_trains_like_torch(outcomes):
    check(outcomes, "sharded_with_grad_scaler_and_clipping")


# ----------------------------------------------------------------------------- in one process

def test_sharded_low_precision_state_and_master_weights_train_like_unsharded(outcomes):
    check(outcomes, "sharded_low_precision_trains_like_the_unsharded_optimizer")


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_slices_of_all_ranks_cover_every_element_once(world_size):
    shapes = [(5, 7), (0,), (33,), (3, 1, 4), (0, 2), (1,), (0,)]
    params = [nn.Parameter(torch.randn(s)) for s in shapes]
    params[0] = nn.Parameter(torch.randn(7, 5).t())  # strides (1, 7)
    buf = FlatBuffer(params, slices=world_size)
    size = buf.numel // world_size
    assert size * world_size == buf.numel and size % 16 == 0  # equal, 64-byte aligned slices
    covered = [torch.zeros(p.numel(), dtype=torch.int64) for p in params]
    empty_owners = {i: 0 for i, p in enumerate(params) if p.numel() == 0}
    for rank in range(world_size):
        rank_slice = BufferSlice(buf, rank * size, (rank + 1) * size)
        for i, piece in rank_slice.owned.items():
            covered[i][piece.param_start:piece.param_start + piece.numel] += 1
            # the piece holds the very elements of the parameter, in its memory order
            in_memory_order = params[i].detach().permute(*buf.grad_perms[i] or range(params[i].dim()))
            assert torch.equal(rank_slice.view_of(rank_slice.data, i), in_memory_order.reshape(-1)[
                piece.param_start:piece.param_start + piece.numel])
            if params[i].numel() == 0:
                empty_owners[i] += 1
    assert all(bool((c == 1).all()) for c in covered)
    assert set(empty_owners.values()) == {1}, "each empty parameter needs exactly one rank counting its steps"


def test_grad_piece_of_a_strided_grad_copies_only_its_rows():
    grad = torch.arange(60.0).reshape(5, 12).t()  # (12, 5), not contiguous
    piece = grad_piece(grad, 13, 9)
    assert torch.equal(piece, grad.reshape(-1)[13:22])
    contiguous = torch.arange(60.0).reshape(12, 5)
    view = grad_piece(contiguous, 13, 9)
    assert view.data_ptr() == contiguous[2, 3].data_ptr(), "a contiguous grad's piece is a view"
    assert grad_piece(grad, 0, 60) is grad, "a whole strided grad is read in place"


def test_sharded_optimizer_takes_only_fusedopt_optimizers():
    with pytest.raises(TypeError, match="optimizer_class"):
        ShardedOptimizer([nn.Parameter(torch.ones(2))], optimizer_class=torch.optim.AdamW)
