"""Checkpoints: fusedopt's state_dict() is torch.optim's format; checkpoints move between
torch.optim and fusedopt both ways and training continues as if never interrupted; they
survive torch.save/torch.load (weights_only) and stay as small as torch's; a checkpoint that
does not fit raises ValueError and leaves the optimizer exactly as it was."""
import copy
import io

import pytest
import torch

import fusedopt
from conftest import (
    OptimizerPair, _same_value, assert_optimizers_match, assert_state_matches,
    assert_same_tree, clone_params, default_kwargs, make_params, random_grads, set_grads,
)

CONFIGS = [
    ("SGD", "plain", {}),
    ("SGD", "momentum", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01}),
    ("SGD", "nesterov", {"momentum": 0.9, "nesterov": True}),
    ("Adam", "default", {}),
    ("Adam", "amsgrad", {"amsgrad": True, "weight_decay": 0.1}),
    ("AdamW", "default", {}),
    ("AdamW", "amsgrad_maximize", {"amsgrad": True, "maximize": True}),
]
CONFIG_IDS = [f"{a}-{name}" for a, name, _ in CONFIGS]
CONFIG_PARAMS = [(a, o) for a, _, o in CONFIGS]

SHAPES = [(4, 3), (5,), (2, 3, 2), (6,), (3,)]
GROUPS = [{"params": [0, 1, 2]}, {"params": [3, 4], "lr": 0.02}]


def _grads(params, step):
    """Param 4 never gets a grad (so has no state); param 3 only on even steps."""
    grads = random_grads(params, step)
    grads[4] = None
    if step % 2:
        grads[3] = None
    return grads


def _save_load(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer)  # weights_only=True: the format must be plain tensors & builtins


def _saved_size(obj):
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return len(buffer.getvalue())


def assert_state_dicts_match(fused_sd, ref_sd, fused_opt):
    """Same structure as torch.optim's state_dict: same top-level keys, same param indices
    with state and same keys per index, same param_groups (hyperparameters and 'params'
    index lists); tensors equal within tolerance (conftest.assert_state_matches)."""
    assert set(fused_sd) == set(ref_sd)
    assert set(fused_sd["state"]) == set(ref_sd["state"]), (
        f"param indices with state {sorted(fused_sd['state'])} != torch's {sorted(ref_sd['state'])}")
    params = [p for g in fused_opt.param_groups for p in g["params"]]
    for index, ref_state in ref_sd["state"].items():
        assert_state_matches(ref_state, fused_sd["state"][index], params[index],
                             f"state_dict['state'][{index}]")
    assert len(fused_sd["param_groups"]) == len(ref_sd["param_groups"])
    for fg, rg in zip(fused_sd["param_groups"], ref_sd["param_groups"]):
        assert list(fg) == list(rg)
        for key in rg:
            assert _same_value(fg[key], rg[key]), f"param_groups[{key!r}]: {fg[key]!r} != {rg[key]!r}"


def _run_pair(algo, options, steps=3):
    params = make_params(SHAPES)
    pair = OptimizerPair(algo, params, groups=GROUPS, **default_kwargs(algo, **options))
    for step in range(steps):
        pair.step(_grads(params, step))
    return params, pair


@pytest.mark.parametrize("algo,options", CONFIG_PARAMS, ids=CONFIG_IDS)
def test_state_dict_has_torchs_structure_and_values(algo, options):
    _, pair = _run_pair(algo, options)
    assert_state_dicts_match(pair.fused.state_dict(), pair.ref.state_dict(), pair.fused)


@pytest.mark.parametrize("algo", ["SGD", "Adam", "AdamW"])
def test_state_dict_before_any_step_is_torchs(algo):
    params = make_params(SHAPES)
    pair = OptimizerPair(algo, params, groups=GROUPS, **default_kwargs(algo))
    assert_state_dicts_match(pair.fused.state_dict(), pair.ref.state_dict(), pair.fused)


@pytest.mark.parametrize("transport", ["torch_save_load", "in_memory"])
@pytest.mark.parametrize("algo,options", CONFIG_PARAMS, ids=CONFIG_IDS)
def test_checkpoints_move_between_torch_and_fusedopt_both_ways(algo, options, transport):
    """torch.optim checkpoint -> fusedopt and fusedopt checkpoint -> torch.optim, each
    continuing = torch.optim's uninterrupted trajectory. The loading optimizers are made
    with other hyperparameters: the checkpoint's must win, as in torch."""
    params, source = _run_pair(algo, options)
    # torch.optim's load_state_dict may keep the very tensors it was given (in memory), so
    # the source optimizers stop here and an identical run continues as the reference.
    _, reference = _run_pair(algo, options)
    move = _save_load if transport == "torch_save_load" else (lambda sd: sd)
    from_torch = move(source.ref.state_dict())
    from_fused = move(source.fused.state_dict())

    other = {"lr": 0.5, "weight_decay": 0.3}
    fused_params = clone_params(source.ref_params)
    fused = getattr(fusedopt, algo)(
        [{**g, "params": [fused_params[i] for i in g["params"]]} for g in GROUPS], **other)
    fused.load_state_dict(from_torch)
    torch_params = clone_params(source.fused_params)
    torch_opt = getattr(torch.optim, algo)(
        [{**g, "params": [torch_params[i] for i in g["params"]]} for g in GROUPS], **other)
    torch_opt.load_state_dict(from_fused)

    ref, ref_params = reference.ref, reference.ref_params
    assert_optimizers_match(ref, fused, ref_params, fused_params)
    assert_optimizers_match(ref, torch_opt, ref_params, torch_params)
    for step in range(3, 7):
        grads = _grads(params, step)
        for ps, opt in ((ref_params, ref), (fused_params, fused), (torch_params, torch_opt)):
            set_grads(ps, grads)
            opt.step()
        assert_optimizers_match(ref, fused, ref_params, fused_params)
        assert_optimizers_match(ref, torch_opt, ref_params, torch_params)


@pytest.mark.parametrize("algo,options", CONFIG_PARAMS, ids=CONFIG_IDS)
def test_fusedopt_checkpoint_round_trips_through_torch_save(algo, options):
    params, pair = _run_pair(algo, options)
    saved = _save_load(pair.fused.state_dict())
    assert_state_dicts_match(saved, pair.ref.state_dict(), pair.fused)
    pair.fused.load_state_dict(saved)
    for step in range(3, 6):
        pair.step(_grads(params, step))
        pair.check()


@pytest.mark.parametrize("algo", ["SGD", "Adam", "AdamW"])
def test_loading_a_checkpoint_without_state_resets_state(algo):
    """Loading a checkpoint taken before any step clears the state (torch replaces it):
    Adam's step restarts at 1, SGD's momentum restarts from the grad."""
    options = {"momentum": 0.9} if algo == "SGD" else {}
    params, pair = _run_pair(algo, options)
    fresh = OptimizerPair(algo, params, groups=GROUPS, **default_kwargs(algo, **options))
    pair.ref.load_state_dict(fresh.ref.state_dict())
    pair.fused.load_state_dict(fresh.fused.state_dict())
    pair.check()
    for step in range(3, 5):
        pair.step(_grads(params, step))
        pair.check()


@pytest.mark.parametrize("algo", ["SGD", "Adam", "AdamW"])
def test_deepcopy_of_model_and_optimizer_trains_like_the_original(algo):
    """copy.deepcopy((params, optimizer)) works for torch.optim (the copy owns copies of the
    params); the fusedopt copy must train them like torch's copy."""
    options = {"momentum": 0.9} if algo == "SGD" else {"amsgrad": True}
    params, pair = _run_pair(algo, options)
    ref_params, ref = copy.deepcopy((pair.ref_params, pair.ref))
    fused_params, fused = copy.deepcopy((pair.fused_params, pair.fused))
    for step in range(3, 6):
        grads = _grads(params, step)
        for ps, opt in ((ref_params, ref), (fused_params, fused)):
            set_grads(ps, grads)
            opt.step()
        assert_optimizers_match(ref, fused, ref_params, fused_params)


# --------------------------------------------------------------------------- size on disk

def _many_small_params():
    return make_params([(7,)] * 150 + [(3, 5)] * 150)


@pytest.mark.parametrize("algo,options", [("SGD", {"momentum": 0.9}), ("Adam", {"amsgrad": True})],
                         ids=["SGD-momentum", "Adam-amsgrad"])
def test_checkpoint_of_many_small_tensors_is_no_bigger_than_torchs(algo, options):
    """Saving a view writes its whole storage (pytorch#1995); a checkpoint of views into flat
    buffers must not grow with the number of tensors (DeepSpeed#549)."""
    params = _many_small_params()
    pair = OptimizerPair(algo, params, **default_kwargs(algo, **options))
    pair.step(random_grads(params, 0))
    torch_size = _saved_size(pair.ref.state_dict())
    fused_size = _saved_size(pair.fused.state_dict())
    assert fused_size <= 1.2 * torch_size, f"{fused_size} bytes vs torch.optim's {torch_size}"


# --------------------------------------------------------------------------- bad checkpoints

def _mismatching_checkpoints(algo, options):
    """(id, checkpoint) pairs that do not fit an optimizer over SHAPES in GROUPS."""
    params, pair = _run_pair(algo, options)
    good = _save_load(pair.ref.state_dict())
    cases = {}

    one_group = OptimizerPair(algo, params, **default_kwargs(algo, **options))
    one_group.step(_grads(params, 0))
    cases["other_number_of_groups"] = one_group.ref.state_dict()

    other_sizes = OptimizerPair(algo, params, groups=[{"params": [0, 1]}, {"params": [2, 3, 4]}],
                                **default_kwargs(algo, **options))
    other_sizes.step(_grads(params, 0))
    cases["other_group_sizes"] = other_sizes.ref.state_dict()

    key = "momentum_buffer" if algo == "SGD" else "exp_avg"
    if key in good["state"].get(0, {}):
        bad = copy.deepcopy(good)
        bad["state"][0][key] = torch.zeros(5, 2)            # param 0 is (4, 3)
        cases["state_tensor_other_numel"] = bad
        bad = copy.deepcopy(good)
        bad["state"][0][key] = torch.zeros(3, 4)            # same numel, transposed shape
        cases["state_tensor_other_shape_same_numel"] = bad
        bad = copy.deepcopy(good)
        bad["state"][1][key] = torch.zeros(4)               # param 1 is (5,): last param fine
        cases["second_param_state_too_short"] = bad
    return cases


MISMATCH_CASES = [
    ("SGD", {"momentum": 0.9}),
    ("Adam", {"amsgrad": True}),
    ("AdamW", {}),
]


@pytest.mark.parametrize("case", ["other_number_of_groups", "other_group_sizes",
                                  "state_tensor_other_numel", "state_tensor_other_shape_same_numel",
                                  "second_param_state_too_short"])
@pytest.mark.parametrize("algo,options", MISMATCH_CASES, ids=["SGD-momentum", "Adam-amsgrad", "AdamW"])
def test_mismatched_checkpoint_raises_and_changes_nothing(algo, options, case):
    checkpoint = _mismatching_checkpoints(algo, options)[case]
    params, pair = _run_pair(algo, options)
    before = copy.deepcopy(pair.fused.state_dict())
    with pytest.raises(ValueError) as fused_error:
        pair.fused.load_state_dict(copy.deepcopy(checkpoint))
    if case in ("other_number_of_groups", "other_group_sizes"):
        with pytest.raises(ValueError) as torch_error:
            pair.ref.load_state_dict(copy.deepcopy(checkpoint))
        assert str(fused_error.value) == str(torch_error.value)
    after = pair.fused.state_dict()
    assert_state_dicts_match(after, before, pair.fused)
    for i, p in enumerate(pair.fused_params):  # exact, not just close
        for key, value in before["state"].get(i, {}).items():
            assert torch.equal(pair.fused.state[p][key], value), f"state[{i}][{key!r}] changed"
    pair.check()
    for step in range(3, 5):
        pair.step(_grads(params, step))
        pair.check()


# --------------------------------------------------------------------------- key for key

def _named_model():
    torch.manual_seed(0)
    return torch.nn.ModuleDict({"encoder": torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh()),
                                "head": torch.nn.Linear(5, 2)})


def _train_model(model, opt, steps, first=0):
    for step in range(first, first + steps):
        gen = torch.Generator().manual_seed(step)
        opt.zero_grad()
        model["head"](model["encoder"](torch.randn(6, 4, generator=gen))).square().mean().backward()
        opt.step()


def _param_list(model, layout):
    """What users hand an optimizer: parameters, named parameters (torch.optim then saves
    ``param_names``), groups named by a key of their own (as HF's decay / no_decay), or one
    group now and one through add_param_group later (_make_with_layout)."""
    named = list(model.named_parameters())
    if layout == "parameters":
        return [p for _, p in named]
    if layout == "named_parameters":
        return named
    decay = [(n, p) for n, p in named if n.endswith("weight")]
    no_decay = [(n, p) for n, p in named if n.endswith("bias")]
    if layout == "add_param_group":
        return decay
    return [{"params": decay, "name": "decay", "weight_decay": 0.1},
            {"params": no_decay, "name": "no_decay", "weight_decay": 0.0}]


LAYOUTS = ["parameters", "named_parameters", "named_groups", "add_param_group"]


def _make_with_layout(lib, algo, model, layout, **options):
    opt = getattr(lib, algo)(_param_list(model, layout), lr=0.05, foreach=False, **options)
    if layout == "add_param_group":
        opt.add_param_group({"params": [(n, p) for n, p in model.named_parameters() if n.endswith("bias")],
                             "name": "no_decay", "lr": 0.01})
    return opt


@pytest.mark.parametrize("steps", [0, 3], ids=["fresh", "after_steps"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("algo,options", CONFIG_PARAMS, ids=CONFIG_IDS)
def test_state_dict_and_param_groups_at_default_options_are_torchs_key_for_key(algo, options, layout, steps):
    """fusedopt's own options (state_dtype, master_weights, stochastic_rounding) are not in
    param_groups or state_dict() at their defaults: torch.distributed.checkpoint loads into
    the destination's keys, and a torch.optim checkpoint lacks them."""
    runs = []
    for lib in (torch.optim, fusedopt):
        model = _named_model()
        opt = _make_with_layout(lib, algo, model, layout, **options)
        _train_model(model, opt, steps)
        runs.append(opt)
    ref, fused = runs
    assert [list(g) for g in fused.param_groups] == [list(g) for g in ref.param_groups]
    assert_same_tree(fused.state_dict(), ref.state_dict())


def test_low_precision_options_appear_only_where_they_differ_from_their_defaults():
    model = _named_model()
    weights, biases = model["encoder"][0].parameters(), model["head"].parameters()
    opt = fusedopt.AdamW([{"params": weights}, {"params": biases, "state_dtype": None}], lr=0.01,
                         state_dtype=torch.bfloat16, master_weights=False)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "stochastic_rounding": False})
    groups = opt.state_dict()["param_groups"]
    assert [g.get("state_dtype", "absent") for g in groups] == [torch.bfloat16, "absent", torch.bfloat16]
    assert not any("master_weights" in g or "stochastic_rounding" in g for g in groups)
    _train_model(model, opt, 1)
    assert opt.state[model["encoder"][0].weight]["exp_avg"].dtype == torch.bfloat16
    assert opt.state[model["head"].bias]["exp_avg"].dtype == torch.float32  # the group's None, not defaults'
    opt.param_groups[0]["state_dtype"] = None  # set back to the default: no longer saved
    assert "state_dtype" not in opt.state_dict()["param_groups"][0]


@pytest.mark.parametrize("algo,options", CONFIG_PARAMS, ids=CONFIG_IDS)
def test_checkpoint_of_fusedopt_0_1_with_its_options_in_every_group_still_loads(algo, options):
    """fusedopt 0.1.0 saved state_dtype, master_weights and stochastic_rounding in every
    group. Such a checkpoint loads: its values are the group's options (an explicit default
    too), and the loaded optimizer's state_dict() is torch.optim's again."""
    params, pair = _run_pair(algo, options)
    checkpoint = _save_load(pair.ref.state_dict())
    old_format = copy.deepcopy(checkpoint)
    for group in old_format["param_groups"]:
        group.update(state_dtype=None, master_weights=False, stochastic_rounding=False)
    old_format["param_groups"][1]["state_dtype"] = torch.bfloat16
    fused_params = clone_params(pair.fused_params)
    fused = getattr(fusedopt, algo)([{**g, "params": [fused_params[i] for i in g["params"]]} for g in GROUPS],
                                    lr=0.5, state_dtype=torch.float16)
    fused.load_state_dict(old_format)
    assert [g.get("state_dtype") for g in fused.param_groups] == [None, torch.bfloat16]
    expected = copy.deepcopy(checkpoint["param_groups"])
    expected[1] = {**{k: v for k, v in expected[1].items() if k != "params"},
                   "state_dtype": torch.bfloat16, "params": expected[1]["params"]}
    state_dict = fused.state_dict()
    assert_same_tree(state_dict["param_groups"], expected, "param_groups")
    assert list(state_dict["state"]) == list(checkpoint["state"])
    for index, entry in state_dict["state"].items():
        if index in GROUPS[0]["params"]:
            assert_same_tree(entry, checkpoint["state"][index], f"state[{index}]")
        else:
            assert list(entry) == list(checkpoint["state"][index])
            assert {v.dtype for k, v in entry.items() if k != "step"} == {torch.bfloat16}


def test_state_dict_post_hook_sees_torchs_format():
    seen = []
    for lib in (torch.optim, fusedopt):
        model = _named_model()
        opt = _make_with_layout(lib, "AdamW", model, "named_groups")
        _train_model(model, opt, 2)
        opt.register_state_dict_post_hook(lambda o, sd: seen.append(copy.deepcopy(sd)))
        opt.state_dict()
    assert_same_tree(seen[1], seen[0])


def test_load_post_hook_sees_the_options_a_torch_checkpoint_leaves_to_the_optimizer():
    """A torch.optim checkpoint has no state_dtype: the loading optimizer keeps its own,
    already when load_state_dict's post-hooks run."""
    model = _named_model()
    ref = _make_with_layout(torch.optim, "AdamW", model, "named_groups")
    _train_model(model, ref, 2)
    opt = _make_with_layout(fusedopt, "AdamW", _named_model(), "named_groups", state_dtype=torch.bfloat16)
    seen = []
    opt.register_load_state_dict_post_hook(lambda o: seen.append([g.get("state_dtype") for g in o.param_groups]))
    opt.load_state_dict(ref.state_dict())
    assert seen == [[torch.bfloat16, torch.bfloat16]]


@pytest.mark.parametrize("algo,options", [("SGD", {"momentum": 0.9}), ("AdamW", {})], ids=["SGD", "AdamW"])
def test_load_pre_hook_that_returns_another_checkpoint_loads_that_one_as_torch(algo, options):
    """torch.optim loads what its load_state_dict pre-hooks return. The checkpoint passed in
    (bf16 state saved by fusedopt) must leave no trace: fusedopt read its state's dtypes
    before the hooks ran and wrote its tensors over the hook's."""
    params = make_params(SHAPES)
    bf16 = getattr(fusedopt, algo)([{"params": params[:3]}, {"params": params[3:]}], lr=0.01,
                                   state_dtype=torch.bfloat16, **options)
    for step in range(2):
        set_grads(params, random_grads(params, 50 + step))
        bf16.step()
    passed_in = bf16.state_dict()
    _, pair = _run_pair(algo, options)
    returned = _save_load(pair.ref.state_dict())
    loaded = []
    for lib in (torch.optim, fusedopt):
        loading = clone_params(pair.fused_params)
        opt = getattr(lib, algo)([{**g, "params": [loading[i] for i in g["params"]]} for g in GROUPS], lr=0.5)
        opt.register_load_state_dict_pre_hook(lambda o, sd: copy.deepcopy(returned))
        opt.load_state_dict(passed_in)
        loaded.append(opt)
    assert_same_tree(loaded[1].state_dict(), loaded[0].state_dict())
