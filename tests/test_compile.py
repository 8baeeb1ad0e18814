"""fusedopt under torch.compile: a compiled step equals the eager one, recompiles no more
often than torch.optim's own under the same scheduler, has no graph break inside
fusedopt's code, and follows edits of the public objects as the eager step does.

Graphs and recompiles are counted with dynamo's own counters. fusedopt runs on inductor;
torch.optim's counts are taken with the "eager" backend (the count is dynamo's, the same
for every backend, and torch's compiled optimizer is slow to compile on two cores).
"""
import pytest
import torch
from torch._dynamo.utils import counters

import fusedopt

STEPS = 12


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def make_optimizer(impl, algo, params, lr):
    if impl == "fusedopt":
        cls = {"sgd": fusedopt.SGD, "adam": fusedopt.Adam, "adamw": fusedopt.AdamW}[algo]
        kwargs = {}
    else:
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[algo]
        kwargs = {"foreach": False}
    if algo == "sgd":
        kwargs["momentum"] = 0.9
    return cls(params, lr=lr, **kwargs)


def make_scheduler(kind, opt):
    if kind == "onecycle":  # cycles lr and beta1 (Adam) / momentum (SGD), as floats
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS + 1)
    return torch.optim.lr_scheduler.LinearLR(opt, start_factor=1.0, end_factor=0.1, total_iters=STEPS)


def train(impl, algo, scheduler, *, lr=0.01, compile_what=None, backend="inductor", set_to_none=True,
          edit=None):
    """STEPS steps of a small regression; returns (params, graphs compiled)."""
    model = make_model()
    opt = make_optimizer(impl, algo, model.parameters(), lr)
    sched = make_scheduler(scheduler, opt) if scheduler else None
    x, y = torch.randn(32, 8), torch.randn(32, 4)

    step = opt.step
    if compile_what == "step":
        step = torch.compile(opt.step, backend=backend)

    def iteration():
        opt.zero_grad(set_to_none=set_to_none)
        torch.nn.functional.mse_loss(model(x), y).backward()
        step()

    if compile_what == "train":
        iteration = torch.compile(iteration, backend=backend)
    counters.clear()
    for i in range(STEPS):
        if edit is not None and i == STEPS // 2:
            edit(model, opt)
        iteration()
        if sched is not None:
            sched.step()
    graphs = counters["stats"]["unique_graphs"]
    return [p.detach().clone() for p in model.parameters()], graphs


def graphs_of_torch(algo, scheduler, compile_what, lr=0.01):
    torch._dynamo.reset()
    _, graphs = train("torch", algo, scheduler, lr=lr, compile_what=compile_what, backend="eager")
    torch._dynamo.reset()
    return graphs


SCHEDULES = [
    ("adamw", "linear", "float"),
    ("adam", "onecycle", "float"),
    ("sgd", "onecycle", "float"),
    ("adamw", "linear", "tensor"),
    ("adam", "onecycle", "tensor"),
]


@pytest.mark.parametrize("algo,scheduler,lr_kind", SCHEDULES, ids=["-".join(s) for s in SCHEDULES])
def test_compiled_step_equals_eager_and_recompiles_no_more_than_torch_optim(algo, scheduler, lr_kind):
    # The scheduler changes lr (and OneCycleLR beta1 / momentum) every step. A float
    # argument of a custom op is a constant to dynamo, one recompile per value; fusedopt
    # hands them to its ops as a tensor, so dynamo compiles twice (the first trace, then
    # once with the floats dynamic), as torch.optim does at best.
    lr = (lambda: torch.tensor(0.01)) if lr_kind == "tensor" else (lambda: 0.01)
    eager, _ = train("fusedopt", algo, scheduler, lr=lr())
    torch._dynamo.reset()
    compiled, graphs = train("fusedopt", algo, scheduler, lr=lr(), compile_what="step")
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)
    torch_graphs = graphs_of_torch(algo, scheduler, "step", lr=lr())
    assert graphs <= 2, f"fusedopt compiled {graphs} graphs in {STEPS} scheduled steps"
    assert graphs <= torch_graphs


def test_compiled_training_step_recompiles_no_more_than_torch_optim():
    # zero_grad, forward, backward and step in one compiled function (backward breaks
    # the graph, as for every optimizer; zero_grad is eager, as torch.optim's).
    eager, _ = train("fusedopt", "adamw", "onecycle")
    torch._dynamo.reset()
    compiled, graphs = train("fusedopt", "adamw", "onecycle", compile_what="train")
    for a, b in zip(compiled, eager):  # inductor's forward and backward round differently
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert graphs <= graphs_of_torch("adamw", "onecycle", "train")


@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_whole_step_compiles_as_one_graph(algo):
    # fullgraph=True raises at any graph break: nothing in fusedopt's step (nor
    # torch.optim's step wrapper around it) breaks the graph. torch.optim's own step
    # does not compile with fullgraph=True.
    model = make_model()
    opt = make_optimizer("fusedopt", algo, model.parameters(), 0.01)
    step = torch.compile(opt.step, fullgraph=True)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    for i in range(6):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        step()
        opt.param_groups[0]["lr"] = 0.01 / (i + 2)
    assert counters["stats"]["unique_graphs"] <= 2
    assert not counters["graph_break"]


def replace_exp_avg(model, opt):
    p = model[0].weight
    opt.state[p]["exp_avg"] = torch.full_like(p, 0.01)


def replace_step(model, opt):
    opt.state[model[0].weight]["step"] = torch.tensor(100.0)


def clear_state(model, opt):
    opt.state.clear()


def self_load(model, opt):
    opt.load_state_dict(opt.state_dict())


def add_param_group(model, opt):
    # The second layer moves to a group of its own with another lr.
    second = list(model[2].parameters())
    opt.param_groups[0]["params"] = list(model[0].parameters())
    opt.add_param_group({"params": second, "lr": 0.003})


EDITS = [replace_exp_avg, replace_step, clear_state, self_load, add_param_group]


@pytest.mark.parametrize("edit", EDITS, ids=[e.__name__ for e in EDITS])
def test_compiled_step_follows_edits_of_the_public_objects(edit):
    # dynamo guards on what fusedopt's _init_group returns (parameters, state tensors)
    # and on the param groups: an edit recompiles, and the new trace re-synchronises
    # the buffers, so the compiled run equals torch.optim's eager one.
    expected, _ = train("torch", "adam", None, edit=edit)
    compiled, _ = train("fusedopt", "adam", None, compile_what="step", edit=edit)
    for a, b in zip(compiled, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_compiled_step_with_grads_kept_in_the_flat_grad_buffer():
    # zero_grad(set_to_none=False) makes the grads views of one flat grad buffer.
    eager, _ = train("fusedopt", "adamw", "linear", set_to_none=False)
    torch._dynamo.reset()
    compiled, _ = train("fusedopt", "adamw", "linear", compile_what="step", set_to_none=False)
    for a, b in zip(compiled, eager):
        assert torch.equal(a, b)


def test_compiled_first_step_packs_the_model_into_one_flat_buffer_and_one_op():
    # The first step is the traced one here: its bookkeeping runs before dynamo wraps
    # the parameters (a wrapped parameter's storage is referenced by dynamo too, and
    # would look shared: one kernel call per parameter instead of one per buffer).
    model = make_model()
    opt = make_optimizer("fusedopt", "adamw", model.parameters(), 0.01)
    torch.nn.functional.mse_loss(model(torch.randn(32, 8)), torch.randn(32, 4)).backward()
    explanation = torch._dynamo.explain(opt.step)()
    ops = [str(op) for graph in explanation.ops_per_graph for op in graph]
    assert explanation.graph_break_count == 0
    assert ops.count("fusedopt.adam_step_") == 1, ops
    assert len(opt._plans[0].parts) == 1


def test_parameters_seen_by_a_compiled_forward_still_move_into_one_flat_buffer():
    # Compiling the forward first asks for every parameter's storage from Python; the
    # storage object torch keeps alive for that is no other user of the memory.
    model = make_model()
    opt = make_optimizer("fusedopt", "adamw", model.parameters(), 0.01)
    forward = torch.compile(model)
    x, y = torch.randn(32, 8), torch.randn(32, 4)
    expected = make_model()
    ref = make_optimizer("torch", "adamw", expected.parameters(), 0.01)
    for _ in range(3):
        opt.zero_grad()
        torch.nn.functional.mse_loss(forward(x), y).backward()
        opt.step()
        ref.zero_grad()
        torch.nn.functional.mse_loss(expected(x), y).backward()
        ref.step()
    (part,) = opt._plans[0].parts
    assert set(part.buf.places) == {"moved"}
    for a, b in zip(model.parameters(), expected.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
