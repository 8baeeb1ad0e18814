"""torch.optim's public objects are the truth; fusedopt's flat buffers only cache them.

Each test runs one user program twice, on torch.optim (foreach=False) and on fusedopt,
and compares params and state after it. The programs touch the optimizer the ways users
do: through ``opt.state``, ``opt.param_groups``, ``p.data``, ``p.grad``, checkpoints,
shared memory, autograd. Where torch.optim itself half-applies an error, fusedopt
raises the same exception before anything changes.
"""
import copy
import multiprocessing

import pytest
import torch
from torch import nn

import fusedopt
from conftest import ALGOS, assert_optimizers_match, assert_same_tree, default_kwargs, make_params, random_grads

OPTIONS = {"SGD": dict(momentum=0.9, dampening=0.1, weight_decay=0.01),
           "Adam": dict(weight_decay=0.01, amsgrad=True), "AdamW": dict(weight_decay=0.01)}
SHAPES = [(4, 3), (5,), (3, 3)]


def build(algo, lib, params_or_groups, **overrides):
    cls = getattr(torch.optim if lib == "torch" else fusedopt, algo)
    kwargs = default_kwargs(algo, **{**OPTIONS[algo], **overrides})
    kwargs["foreach"] = False  # torch's single-tensor reference; fusedopt records it
    return cls(params_or_groups, **kwargs)


def step_with(opt, params, seed, only=None):
    for i, (p, g) in enumerate(zip(params, random_grads(params, seed))):
        p.grad = g if only is None or i in only else None
    opt.step()


def run_both(algo, program, shapes=SHAPES, **overrides):
    """Runs ``program(opt, params)`` on fresh equal params for torch.optim and fusedopt
    and asserts they end equal; returns the pairs for further checks."""
    out = []
    for lib in ("torch", "fusedopt"):
        params = make_params(shapes)
        opt = build(algo, lib, params, **overrides)
        program(opt, params)
        out.append((opt, params))
    (ref, ref_params), (fused, fused_params) = out
    assert_optimizers_match(ref, fused, ref_params, fused_params)
    return out


def remove_param(params, p):
    """``params.remove(p)`` by identity (list.remove compares tensors with ==)."""
    del params[next(i for i, q in enumerate(params) if q is p)]


def trained(opt, params, steps=3, first=0):
    for s in range(first, first + steps):
        step_with(opt, params, s)


# ------------------------------------------------------------------------ checkpoints

@pytest.mark.parametrize("algo", ALGOS)
def test_self_load_of_state_dict_is_a_no_op(algo):
    def program(opt, params):
        trained(opt, params)
        opt.load_state_dict(opt.state_dict())
        trained(opt, params, first=3)
    run_both(algo, program)


@pytest.mark.parametrize("algo", ALGOS)
def test_dcp_get_save_load_set_state_dict_resumes_the_trajectory(algo, tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def fresh():
        model = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 2))
        with torch.no_grad():
            for p, v in zip(model.parameters(), make_params([p.shape for p in model.parameters()])):
                p.copy_(v)
        return model, build(algo, "fusedopt", model.parameters())

    def train(model, opt, seeds):
        for s in seeds:
            gen = torch.Generator().manual_seed(s)
            opt.zero_grad()
            model(torch.randn(8, 4, generator=gen)).square().mean().backward()
            opt.step()

    uninterrupted = fresh()
    train(*uninterrupted, range(6))
    model, opt = fresh()
    train(model, opt, range(3))
    model_sd, opt_sd = get_state_dict(model, opt)
    dcp.save({"model": model_sd, "optim": opt_sd}, checkpoint_id=str(tmp_path))
    model, opt = fresh()  # a new process would start here
    model_sd, opt_sd = get_state_dict(model, opt)
    loaded = {"model": model_sd, "optim": opt_sd}
    dcp.load(loaded, checkpoint_id=str(tmp_path))
    set_state_dict(model, opt, model_state_dict=loaded["model"], optim_state_dict=loaded["optim"])
    train(model, opt, range(3, 6))
    for p, expected in zip(model.parameters(), uninterrupted[0].parameters()):
        torch.testing.assert_close(p, expected, rtol=0, atol=0)


@pytest.mark.parametrize("algo", ["Adam", "AdamW"])
def test_sgd_checkpoint_into_adam_raises_keyerror_and_changes_nothing(algo):
    params = make_params(SHAPES)
    sgd = build("SGD", "torch", make_params(SHAPES))
    trained(sgd, sgd.param_groups[0]["params"])
    opt = build(algo, "fusedopt", params)
    trained(opt, params)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(KeyError, match="step"):
        opt.load_state_dict(sgd.state_dict())
    torch.testing.assert_close(opt.state_dict(), before)  # torch.optim would have replaced its state


@pytest.mark.parametrize("stepped", [False, True], ids=["fresh_sgd", "stepped_sgd"])
def test_adam_checkpoint_loads_into_sgd_as_into_torch_and_its_step_raises_keyerror(stepped):
    """torch.optim.SGD takes an Adam checkpoint: its groups (no momentum) and its state
    (step, exp_avg, exp_avg_sq) replace SGD's, and its step raises KeyError('momentum')
    before any update. fusedopt raised that KeyError from load_state_dict, after it had
    replaced its state. Given SGD's hyperparameters back, both train on alike, the Adam
    keys kept in the state beside the new momentum buffers."""
    adam = build("Adam", "torch", make_params(SHAPES))
    trained(adam, adam.param_groups[0]["params"])
    checkpoint = adam.state_dict()

    def program(opt, params):
        if stepped:
            trained(opt, params)
        opt.load_state_dict(copy.deepcopy(checkpoint))  # no error, as torch
        before = [p.detach().clone() for p in params]
        with pytest.raises(KeyError, match="momentum"):
            step_with(opt, params, 5)
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        opt.param_groups[0].update(momentum=0.9, dampening=0.0)
        trained(opt, params, first=6)
    (ref, _), (fused, _) = run_both("SGD", program)
    assert_same_tree(fused.state_dict(), ref.state_dict())
    assert list(fused.state_dict()["state"][0]) == [*checkpoint["state"][0], "momentum_buffer"]


@pytest.mark.parametrize("step", [None, [3.0], 3, 3.0], ids=["None", "list", "int", "float"])
@pytest.mark.parametrize("algo", ["Adam", "AdamW"])
def test_checkpoint_step_that_is_not_a_tensor_is_read_as_torch_adam_reads_it(algo, step):
    """torch.optim.Adam's load makes a tensor of float(step): a step of None (or a list)
    raises its TypeError after it replaced its state and param_groups (half-applied);
    fusedopt raises the same before anything changes, where it used to take None as a
    fresh state. A number loads as torch loads it."""
    checkpoint = build(algo, "torch", make_params(SHAPES))
    trained(checkpoint, checkpoint.param_groups[0]["params"])
    state_dict = checkpoint.state_dict()
    state_dict["state"][1]["step"] = step
    state_dict["param_groups"][0]["lr"] = 0.125
    errors = []

    def program(opt, params):
        trained(opt, params)
        before = copy.deepcopy(opt.state_dict())
        try:
            opt.load_state_dict(copy.deepcopy(state_dict))
            errors.append(None)
        except TypeError as error:
            errors.append(error)
            if isinstance(opt, fusedopt.Adam):
                assert_same_tree(opt.state_dict(), before)
            else:  # torch.optim has taken the new lr and state: back to where fusedopt stayed
                opt.load_state_dict(before)
        trained(opt, params, first=3)
    (ref, _), (fused, _) = run_both(algo, program)
    assert (errors[0] is None) == (step not in (None, [3.0]))
    assert [(type(e), str(e)) for e in errors[1:]] == [(type(e), str(e)) for e in errors[:1]]
    assert_same_tree(fused.state_dict(), ref.state_dict())


@pytest.mark.parametrize("algo", ALGOS)
def test_load_state_dict_pre_hook_runs_before_validation(algo):
    """A pre-hook may re-map a checkpoint (torch's documented use): validation sees its result."""
    def program(opt, params):
        trained(opt, params)
        state = opt.state_dict()
        broken = {"state": state["state"], "param_groups": state["param_groups"] + [{"params": [99]}]}
        opt.register_load_state_dict_pre_hook(lambda o, sd: {"state": sd["state"], "param_groups": sd["param_groups"][:1]})
        opt.load_state_dict(broken)
        trained(opt, params, first=3)
    run_both(algo, program)


@pytest.mark.parametrize("algo", ALGOS)
def test_malformed_checkpoint_entry_changes_nothing(algo):
    params = make_params(SHAPES)
    opt = build(algo, "fusedopt", params)
    trained(opt, params)
    state = copy.deepcopy(opt.state_dict())
    before = copy.deepcopy(state)
    key = "momentum_buffer" if algo == "SGD" else "exp_avg"
    state["state"][2][key] = torch.zeros(7)
    state["param_groups"][0]["lr"] = 123.0
    with pytest.raises(ValueError, match=key):
        opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] != 123.0
    torch.testing.assert_close(opt.state_dict(), before)


@pytest.mark.parametrize("algo", ALGOS)
def test_constructor_that_raises_moves_no_parameter(algo):
    good = make_params(SHAPES)
    addresses = [p.data_ptr() for p in good]
    with pytest.raises(ValueError):
        build(algo, "fusedopt", [{"params": good}, {"params": [nn.Parameter(torch.randn(2, dtype=torch.complex64))]}])
    assert [p.data_ptr() for p in good] == addresses


# ------------------------------------------------------------------------ opt.state edits

STATE_EDITS = {
    "clear": lambda opt, params: opt.state.clear(),
    "new_dict": lambda opt, params: setattr(opt, "state", __import__("collections").defaultdict(dict)),
    "del_entry": lambda opt, params: opt.state.pop(params[1]),
    "replace_tensor": lambda opt, params: opt.state[params[0]].update(
        {k: v.clone() * 0.5 for k, v in opt.state[params[0]].items() if k != "step" and torch.is_tensor(v)}),
    "replace_step": lambda opt, params: opt.state[params[0]].update(
        {"step": torch.tensor(10.0)} if "step" in opt.state[params[0]] else {}),
    "momentum_buffer_none": lambda opt, params: opt.state[params[0]].update(
        {"momentum_buffer": None} if "momentum_buffer" in opt.state[params[0]] else {}),
    "in_place": lambda opt, params: [v.mul_(0.25) for v in opt.state[params[2]].values() if torch.is_tensor(v)],
}


@pytest.mark.parametrize("edit", STATE_EDITS)
@pytest.mark.parametrize("algo", ALGOS)
def test_edits_through_opt_state_are_followed(algo, edit):
    def program(opt, params):
        trained(opt, params)
        STATE_EDITS[edit](opt, params)
        trained(opt, params, first=3)
    run_both(algo, program)


@pytest.mark.parametrize("algo", ["Adam", "AdamW"])
def test_step_of_any_one_element_shape_put_into_opt_state_is_read_as_torch_reads_it(algo):
    """torch.optim takes state["step"] = torch.tensor([10.0]) (shape (1,)) as step 10.
    fusedopt trains the same; its entry then holds fusedopt's own 0-dim step, as for any
    tensor put into opt.state (README). Adopting it used to raise a shape error halfway
    through writing the row."""
    out = []
    for lib in ("torch", "fusedopt"):
        params = make_params(SHAPES)
        opt = build(algo, lib, params)
        trained(opt, params)
        opt.state[params[0]]["step"] = torch.tensor([10.0])
        trained(opt, params, first=3)
        out.append((opt, params))
    (ref, ref_params), (fused, fused_params) = out
    for a, b in zip(ref_params, fused_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert float(fused.state[fused_params[0]]["step"]) == float(ref.state[ref_params[0]]["step"]) == 13.0
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(fused.state[fused_params[0]][key], ref.state[ref_params[0]][key],
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algo", ["Adam", "AdamW"])
def test_state_entry_missing_a_key_raises_torchs_keyerror_before_any_write(algo):
    params = make_params(SHAPES)
    opt = build(algo, "fusedopt", [{"params": params[:2]}, {"params": params[2:]}])
    trained(opt, params)
    del opt.state[params[2]]["exp_avg"]
    before = [p.detach().clone() for p in params]
    steps = [opt.state[p]["step"].item() for p in params[:2]]
    with pytest.raises(KeyError, match="exp_avg"):
        step_with(opt, params, 5)
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert [opt.state[p]["step"].item() for p in params[:2]] == steps


@pytest.mark.parametrize("key", ["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
def test_adam_state_value_set_to_none_raises_torchs_error_type_before_any_write(key):
    """torch.optim.Adam's step fails on a None in a non-empty state entry (each key its
    own exception), after updating the params before it. fusedopt raised nothing and
    started the row afresh from zeros, silently. Now: torch's exception type, nothing
    written; while the param has no grad, neither raises and the row is left alone."""
    raised = []
    for lib in ("torch", "fusedopt"):
        params = make_params(SHAPES)
        opt = build("Adam", lib, params)  # amsgrad, weight decay
        trained(opt, params)
        opt.state[params[1]][key] = None
        step_with(opt, params, 4, only={0, 2})  # params[1] has no grad: no error
        before = [p.detach().clone() for p in params]
        steps = [opt.state[p]["step"].item() for p in (params[0], params[2])]
        with pytest.raises(Exception) as error:
            step_with(opt, params, 5)
        raised.append(error.type)
        if lib == "fusedopt":
            assert all(torch.equal(p, b) for p, b in zip(params, before))
            assert [opt.state[p]["step"].item() for p in (params[0], params[2])] == steps
            assert opt.state[params[1]][key] is None
            assert key in str(error.value)
    assert raised[0] is raised[1]


def test_checkpoint_entry_missing_a_key_loads_as_torch_and_the_step_raises():
    """torch.optim's load_state_dict takes an entry without a key the group needs (amsgrad
    switched on in the checkpoint's groups, no max_exp_avg_sq); only its step raises the
    KeyError. fusedopt loads it too and raises at the step, before any write."""
    states = []
    for lib in ("torch", "fusedopt"):
        params = make_params(SHAPES)
        opt = build("Adam", lib, params, amsgrad=False)
        trained(opt, params)
        state_dict = opt.state_dict()
        state_dict["param_groups"][0]["amsgrad"] = True
        opt.load_state_dict(state_dict)  # no error, as torch
        before = [p.detach().clone() for p in params]
        with pytest.raises(KeyError, match="max_exp_avg_sq"):
            step_with(opt, params, 5)
        states.append((opt, params, before))
    _, (fused, fused_params, before) = states
    assert all(torch.equal(p, b) for p, b in zip(fused_params, before))
    assert all(fused.state[p]["step"].item() == 3 for p in fused_params)


# 40 rows in one flat buffer: the per-step check reads rows ahead of the one it checks
# ([note: prefetching the check] in csrc/python_module.cpp); edits far into the buffer
# and on its last rows must be seen exactly as on the first.
LONG_SHAPES = [(3, 3) if i % 5 == 0 else (i % 4 + 2,) for i in range(40)]


@pytest.mark.parametrize("algo", ALGOS)
def test_edits_deep_in_a_long_buffer_are_followed(algo):
    def program(opt, params):
        trained(opt, params)
        opt.state[params[33]].update({k: v.clone() * 0.5 for k, v in opt.state[params[33]].items()
                                      if k != "step" and torch.is_tensor(v)})
        del opt.state[params[25]]
        params[35].data = params[35].data.t()  # same address, other strides
        step_with(opt, params, 3, only=set(range(40)) - {17, 18, 39})
        opt.zero_grad(set_to_none=False)
        for i, (p, g) in enumerate(zip(params, random_grads(params, 4))):
            if i == 30:
                p.grad.data = g  # another tensor behind the same grad object
            elif p.grad is None:  # rows 17, 18 and 39 had none
                p.grad = g
            else:
                p.grad.copy_(g)
        opt.step()
        opt.state[params[39]].clear()
        trained(opt, params, first=5)
    run_both(algo, program, shapes=LONG_SHAPES)


# ------------------------------------------------------------------------ param_groups edits

@pytest.mark.parametrize("algo", ALGOS)
def test_parameter_appended_to_a_group_is_trained(algo):
    def program(opt, params):
        extra = params.pop()
        remove_param(opt.param_groups[0]["params"], extra)
        trained(opt, params)
        opt.param_groups[0]["params"].append(extra)
        params.append(extra)
        trained(opt, params, first=3)
    run_both(algo, program)


@pytest.mark.parametrize("algo", ALGOS)
def test_parameter_removed_from_a_group_is_no_longer_updated(algo):
    def program(opt, params):
        trained(opt, params)
        remove_param(opt.param_groups[0]["params"], params[1])
        trained(opt, params, first=3)
    run_both(algo, program)


@pytest.mark.parametrize("algo", ALGOS)
def test_group_params_replaced_by_a_tuple_then_reordered_are_stepped_as_given(algo):
    def program(opt, params):
        trained(opt, params)
        opt.param_groups[0]["params"] = tuple(opt.param_groups[0]["params"])  # same tensors
        trained(opt, params, first=3)
        opt.param_groups[0]["params"] = tuple(reversed(opt.param_groups[0]["params"]))
        trained(opt, params, first=6)
    run_both(algo, program)


@pytest.mark.parametrize("algo", ALGOS)
def test_deleting_a_param_group_keeps_the_others_hyperparameters(algo):
    out = []
    for lib in ("torch", "fusedopt"):
        params = make_params(SHAPES)
        opt = build(algo, lib, [{"params": params[:1], "lr": 0.5}, {"params": params[1:2], "lr": 0.01},
                                {"params": params[2:]}])
        trained(opt, params)
        del opt.param_groups[0]
        trained(opt, params, first=3)
        out.append((opt, params))
    (ref, ref_params), (fused, fused_params) = out
    for a, b in zip(ref_params, fused_params):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dampening", [0.0, 0.5])
def test_sgd_momentum_switched_on_mid_run_starts_the_buffer_from_the_grad(dampening):
    def program(opt, params):
        trained(opt, params)
        opt.param_groups[0]["momentum"] = 0.9
        trained(opt, params, first=3)
    run_both("SGD", program, momentum=0.0, dampening=dampening)


def test_state_deleted_while_momentum_is_off_starts_afresh_after_a_regroup():
    """Momentum switched off, a state entry deleted, momentum back on and the group's
    parameter list edited before the next step: the regrouped rows' record of
    optimizer.state, made while the group kept no state, no longer vouches for it, so the
    parameter starts a new momentum buffer from its grad, as torch.optim does (found by
    the differential test: the old buffer was silently reused)."""
    def program(opt, params):
        trained(opt, params, steps=1)
        opt.param_groups[0]["momentum"] = 0.0
        trained(opt, params, steps=1, first=1)
        del opt.state[params[2]]
        trained(opt, params, steps=1, first=2)
        opt.param_groups[0]["momentum"] = 0.9
        remove_param(opt.param_groups[0]["params"], params[0])
        trained(opt, params, first=3)
    run_both("SGD", program, momentum=0.5)


@pytest.mark.parametrize("algo", ALGOS)
def test_state_cleared_before_a_regrouped_parameter_was_adopted_starts_afresh(algo):
    """A parameter that left its group and came back in a new one keeps its state in
    optimizer.state until a step adopts it; zero_grads in between (whose checks do not
    look at state) and then opt.state.clear() must leave it starting afresh at the next
    step, as torch.optim does (found by the differential test: its old step counter and
    moments were reused)."""
    def program(opt, params):
        step_with(opt, params, 0, only={0})
        remove_param(opt.param_groups[0]["params"], params[0])
        opt.zero_grad(set_to_none=False)
        opt.add_param_group({"params": [params[0]]})
        opt.zero_grad(set_to_none=False)
        opt.state.clear()
        step_with(opt, params, 1, only={0})
    run_both(algo, program)


# ------------------------------------------------------------------------ where params live

def test_hogwild_share_memory_workers_update_the_shared_model():
    """PyTorch's Hogwild example: model.share_memory(), forked workers each step their own
    optimizer; every update must reach the one shared model."""
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork")
    # The example runs in a fresh process: torch refuses autograd in a child forked from a
    # process whose autograd engine has started its threads (an earlier test's may have).
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.SimpleQueue()
    example = ctx.Process(target=_hogwild_example, args=(queue,))
    example.start()
    results = queue.get()
    example.join()
    assert example.exitcode == 0 and not isinstance(results, str), results
    results = [[torch.tensor(values) for values in params] for params in results]
    for fused, ref in zip(results[1], results[0]):
        torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    assert not torch.equal(results[1][0], torch.ones(2, 3))


def _hogwild_example(queue) -> None:
    """Puts the shared model's parameters (as lists) after Hogwild training with torch's SGD
    and with fusedopt's, or the error, on ``queue``."""
    results = []
    for lib in ("torch", "fusedopt"):
        model = nn.Linear(3, 2)
        with torch.no_grad():
            model.weight.fill_(1.0)
            model.bias.fill_(0.5)
        model.share_memory()
        ctx = multiprocessing.get_context("fork")
        workers = [ctx.Process(target=_hogwild_worker, args=(model, lib, seed)) for seed in range(2)]
        for w in workers:  # one after the other: a deterministic result to compare
            w.start()
            w.join()
            if w.exitcode != 0:
                queue.put(f"{lib} worker exited with {w.exitcode}")
                return
        results.append([p.detach().tolist() for p in model.parameters()])
    queue.put(results)


def _hogwild_worker(model, lib, seed):
    opt = (torch.optim.SGD if lib == "torch" else fusedopt.SGD)(model.parameters(), lr=0.1, momentum=0.5)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 3, generator=gen)).square().sum().backward()
        opt.step()


@pytest.mark.parametrize("algo", ALGOS)
def test_parameter_that_is_a_view_of_a_user_tensor_writes_through(algo):
    out = []
    for lib in ("torch", "fusedopt"):
        big = torch.arange(12.0).reshape(6, 2).clone()
        params = [nn.Parameter(big[2:5]), nn.Parameter(big[:, 1])]  # a slice; every other element
        opt = build(algo, lib, [{"params": params[:1]}, {"params": params[1:]}])
        trained(opt, params)
        out.append(big)
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algo", ALGOS)
def test_storage_object_held_by_the_user_keeps_seeing_the_parameter(algo):
    # A Python storage object the user holds sees the parameter's memory (so it is not
    # moved); one that nobody holds any more (torch.compile asks for every storage) does not
    # keep a parameter out of the flat buffer.
    out = []
    for lib in ("torch", "fusedopt"):
        params = [nn.Parameter(torch.randn(3, 4, generator=torch.Generator().manual_seed(5)))
                  for _ in range(2)]
        held = params[0].untyped_storage()
        params[1].untyped_storage()  # asked for and dropped
        opt = build(algo, lib, [{"params": params}])
        trained(opt, params)
        out.append(torch.empty(0).set_(held).view(3, 4).clone())
        if lib == "fusedopt":
            slots = [opt._slots[p] for p in params]
            assert [buf.places[row] for buf, row in slots] == ["pinned", "moved"]
            assert slots[0][0] is slots[1][0]  # one buffer: one kernel call for both rows
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algo", ALGOS)
def test_storage_tied_across_groups_stays_tied(algo):
    out = []
    for lib in ("torch", "fusedopt"):
        shared = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))
        a, b = nn.Parameter(shared), nn.Parameter(shared)  # two Parameters, one storage
        opt = build(algo, lib, [{"params": [a]}, {"params": [b], "lr": 0.003}])
        trained(opt, [a, b])
        assert a.data_ptr() == b.data_ptr()
        out.append(shared.clone())
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algo", ALGOS)
def test_same_parameters_in_two_fusedopt_optimizers_are_not_repacked(algo):
    params = make_params(SHAPES)
    first, second = build(algo, "fusedopt", params), build(algo, "fusedopt", params, lr=0.001)
    trained(first, params, 1)
    trained(second, params, 1)
    plans = [first._plans[0].parts[0].buf, second._plans[0].parts[0].buf]
    trained(first, params, 2, first=1)
    trained(second, params, 2, first=1)
    assert [first._plans[0].parts[0].buf, second._plans[0].parts[0].buf] == plans


def test_meta_and_lazy_parameters_are_accepted_like_torch():
    meta = nn.Linear(3, 2, device="meta")
    for algo in ALGOS:
        build(algo, "fusedopt", meta.parameters())
    for algo in ALGOS:
        out = []
        for lib in ("torch", "fusedopt"):
            torch.manual_seed(0)
            model = nn.Sequential(nn.LazyLinear(2))
            opt = build(algo, lib, model.parameters())
            for s in range(3):
                opt.zero_grad()
                model(torch.randn(4, 3, generator=torch.Generator().manual_seed(s))).sum().backward()
                opt.step()
            out.append(model[0].weight.detach().clone())
        torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algo", ALGOS)
def test_interleaved_column_views_are_trained_in_place(algo):
    out = []
    for lib in ("torch", "fusedopt"):
        w = torch.randn(4, 2, generator=torch.Generator().manual_seed(1))
        params = [nn.Parameter(w[:, 0]), nn.Parameter(w[:, 1])]
        opt = build(algo, lib, params)
        trained(opt, params)
        out.append(w)
    torch.testing.assert_close(out[1], out[0], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ p.data and p.grad

@pytest.mark.parametrize("algo", ALGOS)
def test_p_data_transposed_in_place_is_followed(algo):
    def program(opt, params):
        trained(opt, params)
        params[2].data = params[2].data.t()  # same address, other strides (square)
        trained(opt, params, first=3)
    run_both(algo, program)


@pytest.mark.parametrize("algo", ALGOS)
def test_p_data_of_another_shape_raises_a_clear_error_before_any_write(algo):
    params = make_params(SHAPES)
    opt = build(algo, "fusedopt", params)
    trained(opt, params)
    params[0].data = params[0].data[:2]
    before = [p.detach().clone() for p in params]
    with pytest.raises(RuntimeError, match="does not match its parameter"):
        step_with(opt, params, 5)
    assert all(torch.equal(p, b) for p, b in zip(params, before))


@pytest.mark.parametrize("algo", ALGOS)
def test_p_grad_data_replaced_after_zero_grad_false_is_read(algo):
    def program(opt, params):
        for s in range(3):
            opt.zero_grad(set_to_none=False)
            for p, g in zip(params, random_grads(params, s)):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.data = g
            opt.step()
    run_both(algo, program)


@pytest.mark.parametrize("algo", ALGOS)
def test_one_grad_tensor_shared_by_two_params(algo):
    def program(opt, params):
        for s in range(3):
            opt.zero_grad(set_to_none=False)
            g = random_grads(params, s)[0]
            if params[0].grad is None:
                params[0].grad = g
                params[1].grad = params[0].grad
            else:
                params[0].grad.copy_(g)
            opt.step()
    run_both(algo, program, shapes=[(3, 2), (3, 2)])


@pytest.mark.parametrize("algo", ALGOS)
def test_view_of_p_grad_held_elsewhere_keeps_aliasing(algo):
    out = []
    for lib in ("torch", "fusedopt"):
        params = make_params(SHAPES)
        opt = build(algo, lib, params)
        for p, g in zip(params, random_grads(params, 0)):
            p.grad = g
        held = params[0].grad.view(-1)
        opt.step()
        opt.zero_grad(set_to_none=False)
        params[0].grad.add_(1.0)
        assert torch.equal(held, params[0].grad.view(-1))
        opt.step()
        out.append(params)
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("algo", ALGOS)
def test_step_bumps_autograd_versions_so_stepping_before_backward_is_caught(algo):
    """The classic GAN bug: optimizer.step() between forward and backward."""
    for lib in ("torch", "fusedopt"):
        model = nn.Sequential(nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 3))  # backward needs weights
        opt = build(algo, lib, model.parameters())
        loss = model(torch.randn(2, 3)).pow(2).sum()
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            loss.backward()


# ------------------------------------------------------------------------ errors change nothing

def test_grad_of_another_dtype_in_a_later_group_raises_before_earlier_groups_move():
    params = make_params(SHAPES)
    opt = fusedopt.Adam([{"params": params[:2]}, {"params": params[2:]}])
    trained(opt, params)
    before = [p.detach().clone() for p in params]
    steps = [opt.state[p]["step"].item() for p in params]
    for p, g in zip(params, random_grads(params, 9)):
        p.grad = g
    params[2].grad.data = params[2].grad.data.double()
    with pytest.raises(RuntimeError, match="float64"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert [opt.state[p]["step"].item() for p in params] == steps


@pytest.mark.parametrize("algo", ALGOS)
def test_many_dim_param_with_strided_grad_trains_like_torch(algo):
    shape = (2,) * 17  # more dims than any fixed-size index

    def program(opt, params):
        for s in range(2):
            for p, g in zip(params, random_grads(params, s)):
                p.grad = g.transpose(0, 16).contiguous().transpose(0, 16)
            opt.step()
    run_both(algo, program, shapes=[shape])
