"""torch.distributed.checkpoint between torch.optim and fusedopt, both ways, as between two
torch.optim optimizers: get_state_dict / set_state_dict and get_optimizer_state_dict /
set_optimizer_state_dict, nested and flattened, from a fresh optimizer and after steps,
in memory and through dcp.save / dcp.load, in one process and on a one-rank gloo process
group; parameters, named parameters and named groups.

DCP loads into the keys of the destination's state dict (and unflattens by the keys of its
live param_groups), so this needs fusedopt's param_groups and state_dict() to be
torch.optim's key for key: fusedopt's own options at their defaults used to make
``dcp.load`` of a torch.optim checkpoint raise "Missing key in checkpoint state_dict:
optim.param_groups.0.state_dtype", and a flattened set_state_dict a KeyError.
"""
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions, get_optimizer_state_dict, get_state_dict, set_optimizer_state_dict, set_state_dict,
)

import fusedopt
from conftest import assert_optimizers_match, assert_same_tree

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

CONFIGS = {"SGD": {"momentum": 0.9}, "Adam": {}, "AdamW": {}}
LIBS = {"torch": torch.optim, "fusedopt": fusedopt}


@pytest.fixture(scope="module", params=["one_process", "gloo_one_rank"])
def process_group(request):
    """None (DCP without torch.distributed), or a one-rank gloo group that DCP's collectives
    run on. Module-scoped: pytest runs each variant's tests together."""
    if request.param == "one_process":
        yield None
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(self.encoder(x))


def param_list(model, layout):
    named = list(model.named_parameters())
    if layout == "parameters":
        return [p for _, p in named]
    if layout == "named_parameters":
        return named
    return [{"params": [(n, p) for n, p in named if n.endswith("weight")], "name": "decay", "weight_decay": 0.1},
            {"params": [(n, p) for n, p in named if n.endswith("bias")], "name": "no_decay", "weight_decay": 0.0}]


def make(lib, algo, layout, lr=0.05):
    model = Net()
    return model, getattr(LIBS[lib], algo)(param_list(model, layout), lr=lr, foreach=False, **CONFIGS[algo])


def train(model, opt, steps, first=0):
    for step in range(first, first + steps):
        gen = torch.Generator().manual_seed(step)
        opt.zero_grad()
        model(torch.randn(6, 4, generator=gen)).square().mean().backward()
        opt.step()


def move(transport, source, destination, options, checkpoint_dir, process_group):
    """Source's (model, optimizer) checkpoint into destination's, as a user does it."""
    (model, opt), (into_model, into_opt) = source, destination
    if transport == "set_optimizer_state_dict":
        state = get_optimizer_state_dict(model, opt, options=options)
        into_model.load_state_dict(model.state_dict())
        set_optimizer_state_dict(into_model, into_opt, state, options=options)
        return
    model_state, opt_state = get_state_dict(model, opt, options=options)
    if transport == "dcp_save_load":
        dcp.save({"model": model_state, "optim": opt_state}, checkpoint_id=checkpoint_dir,
                 process_group=process_group)
        model_state, opt_state = get_state_dict(into_model, into_opt, options=options)  # a new process
        loaded = {"model": model_state, "optim": opt_state}
        dcp.load(loaded, checkpoint_id=checkpoint_dir, process_group=process_group)
        model_state, opt_state = loaded["model"], loaded["optim"]
    set_state_dict(into_model, into_opt, model_state_dict=model_state, optim_state_dict=opt_state, options=options)


FLATTEN = pytest.mark.parametrize("flatten", [False, True], ids=["nested", "flattened"])
STEPS = pytest.mark.parametrize("steps", [0, 3], ids=["fresh", "after_steps"])


@STEPS
@FLATTEN
@pytest.mark.parametrize("layout", ["parameters", "named_parameters", "named_groups"])
@pytest.mark.parametrize("algo", CONFIGS)
def test_dcp_optimizer_state_dict_of_fusedopt_is_torchs(process_group, algo, layout, flatten, steps):
    """get_optimizer_state_dict and get_state_dict (which step a fresh optimizer once with
    zero grads and lr 0 to make its state) give torch.optim's dict, key for key."""
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    state_dicts = []
    for lib in LIBS:
        model, opt = make(lib, algo, layout)
        train(model, opt, steps)
        state_dicts.append((get_optimizer_state_dict(model, opt, options=options),
                            get_state_dict(model, opt, options=options)[1]))
    (ref_alone, ref_with_model), (fused_alone, fused_with_model) = state_dicts
    assert_same_tree(fused_alone, ref_alone, "get_optimizer_state_dict")
    assert_same_tree(fused_with_model, ref_with_model, "get_state_dict")


# One optimizer and layout per case (the key sets they give differ); all combinations of the rest.
ALGO_LAYOUTS = [("Adam", "parameters"), ("SGD", "named_parameters"), ("AdamW", "named_groups")]


@STEPS
@FLATTEN
@pytest.mark.parametrize("transport", ["set_state_dict", "set_optimizer_state_dict", "dcp_save_load"])
@pytest.mark.parametrize("source,destination", [("torch", "fusedopt"), ("fusedopt", "torch")],
                         ids=["torch_to_fusedopt", "fusedopt_to_torch"])
@pytest.mark.parametrize("algo,layout", ALGO_LAYOUTS, ids=[f"{a}-{layout}" for a, layout in ALGO_LAYOUTS])
def test_checkpoint_moves_through_dcp_between_torch_and_fusedopt_as_between_torchs(
        process_group, tmp_path, algo, layout, source, destination, transport, flatten, steps):
    """The destination (made with another lr: the checkpoint's wins) ends as torch.optim
    loading torch.optim's checkpoint the same way does, key for key, and trains on alike."""
    options = StateDictOptions(flatten_optimizer_state_dict=flatten)
    loaded = []
    for from_lib, into_lib in (("torch", "torch"), (source, destination)):
        from_model, from_opt = make(from_lib, algo, layout)
        train(from_model, from_opt, steps)
        into = make(into_lib, algo, layout, lr=0.5)
        move(transport, (from_model, from_opt), into, options, tmp_path / f"{from_lib}-{into_lib}", process_group)
        loaded.append(into)
    (ref_model, ref), (model, opt) = loaded
    assert_same_tree(opt.state_dict(), ref.state_dict())
    train(ref_model, ref, 3, first=steps)
    train(model, opt, 3, first=steps)
    assert_optimizers_match(ref, opt, list(ref_model.parameters()), list(model.parameters()))
    assert_same_tree(opt.state_dict(), ref.state_dict())
