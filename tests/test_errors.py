"""Constructor and param-group validation: fusedopt raises what torch.optim raises, with the
same exception type and the same message (users grep for torch's wording); the message is
captured from torch.optim itself, never copied into this file."""
import inspect
import warnings

import pytest
import torch
from torch import nn

import fusedopt
from fusedopt.options import LOW_PRECISION_DEFAULTS
from conftest import ALGOS, default_kwargs, make_params, random_grads, torch_keys


def _params():
    return make_params([(3, 2), (4,)])


def _raised(make):
    """The (type, message) `make()` raises, or None."""
    try:
        make()
    except Exception as e:  # noqa: BLE001 - we compare whatever torch raises
        return type(e), str(e)
    return None


HYPERPARAMETER_CASES = [
    # (algo, id, kwargs)
    *[(a, "negative_lr", {"lr": -1.0}) for a in ALGOS],
    *[(a, "negative_weight_decay", {"weight_decay": -1.0}) for a in ALGOS],
    *[(a, "two_element_lr_tensor", {"lr": torch.tensor([1e-3, 1e-3])}) for a in ALGOS],
    *[(a, "negative_lr_tensor", {"lr": torch.tensor(-1.0)}) for a in ALGOS],
    *[(a, "negative_eps", {"eps": -1.0}) for a in ("Adam", "AdamW")],
    *[(a, "beta1_one", {"betas": (1.0, 0.9)}) for a in ("Adam", "AdamW")],
    *[(a, "beta2_one", {"betas": (0.9, 1.0)}) for a in ("Adam", "AdamW")],
    *[(a, "negative_beta1", {"betas": (-0.1, 0.999)}) for a in ("Adam", "AdamW")],
    *[(a, "betas_float_and_tensor", {"betas": (0.9, torch.tensor(0.999))})
      for a in ("Adam", "AdamW")],
    *[(a, "two_element_beta_tensor", {"betas": (torch.tensor([0.9, 0.9]), torch.tensor(0.999))})
      for a in ("Adam", "AdamW")],
    ("SGD", "negative_momentum", {"momentum": -0.5}),
    ("SGD", "nesterov_with_dampening", {"momentum": 0.9, "dampening": 0.1, "nesterov": True}),
    ("SGD", "nesterov_without_momentum", {"nesterov": True}),
]


@pytest.mark.parametrize("algo,kwargs", [(a, k) for a, _, k in HYPERPARAMETER_CASES],
                         ids=[f"{a}-{name}" for a, name, _ in HYPERPARAMETER_CASES])
def test_invalid_hyperparameters_raise_torchs_error(algo, kwargs):
    expected = _raised(lambda: getattr(torch.optim, algo)(_params(), **kwargs))
    assert expected is not None, "torch.optim accepted it"
    assert _raised(lambda: getattr(fusedopt, algo)(_params(), **kwargs)) == expected


def _p(seed=0):
    return make_params([(3,)], seed=seed)[0]


PARAMS_CASES = {
    "empty_param_list": lambda: [],
    "bare_tensor_not_iterable": lambda: _p(),
    "nested_list": lambda: [[_p()]],
    "tensor_and_dict_mixed": lambda: [_p(), {"params": [_p(1)]}],
    "int_in_params": lambda: [_p(), 3],
    "non_leaf_tensor": lambda: [_p() * 2],
    "group_params_is_a_set": lambda: [{"params": {_p()}}],
    "group_without_params": lambda: [{"lr": 0.1}],
    "param_in_two_groups": lambda: (lambda p: [{"params": [p]}, {"params": [p]}])(_p()),
}


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", list(PARAMS_CASES))
def test_invalid_params_raise_torchs_error(case, algo):
    make_params_arg = PARAMS_CASES[case]
    expected = _raised(lambda: getattr(torch.optim, algo)(make_params_arg(), lr=0.1))
    assert expected is not None, "torch.optim accepted it"
    assert _raised(lambda: getattr(fusedopt, algo)(make_params_arg(), lr=0.1)) == expected


ACCEPTED_PARAMS_CASES = {
    "generator": lambda ps: (p for p in ps),
    "group_params_bare_tensor": lambda ps: [{"params": ps[0]}, {"params": ps[1:]}],
    "named_parameters": lambda ps: [(f"p{i}", p) for i, p in enumerate(ps)],
    "named_parameters_in_groups": lambda ps: [{"params": [("a", ps[0])]},
                                              {"params": [("b", ps[1])], "lr": 0.5}],
    "frozen_param": lambda ps: [nn.Parameter(ps[0].detach().clone(), requires_grad=False), ps[1]],
}


@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("case", list(ACCEPTED_PARAMS_CASES))
def test_params_forms_torch_accepts_are_accepted(case, algo):
    arrange = ACCEPTED_PARAMS_CASES[case]
    ref = getattr(torch.optim, algo)(arrange(_params()), lr=0.1)
    fused = getattr(fusedopt, algo)(arrange(_params()), lr=0.1)
    assert [{k: v for k, v in g.items() if k != "params"} for g in fused.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in ref.param_groups]
    assert [[tuple(p.shape) for p in g["params"]] for g in fused.param_groups] == \
        [[tuple(p.shape) for p in g["params"]] for g in ref.param_groups]


@pytest.mark.parametrize("algo", ALGOS)
def test_add_param_group_with_a_param_already_present_raises_and_changes_nothing(algo):
    ps = _params()
    for module in (torch.optim, fusedopt):
        opt = getattr(module, algo)([ps[0]], lr=0.1)
        with pytest.raises(ValueError) as error:
            opt.add_param_group({"params": [ps[1], ps[0]]})
        if module is torch.optim:
            expected = str(error.value)
        else:
            assert str(error.value) == expected
            assert len(opt.param_groups) == 1
            ps[0].grad, ps[1].grad = torch.ones(3, 2), torch.ones(4)
            opt.step()  # still usable


@pytest.mark.parametrize("algo", ALGOS)
def test_duplicate_params_in_a_group_warn_like_torch(algo):
    """torch.optim warns (and, having the param twice, updates it twice per step); fusedopt
    must mirror that, or refuse the duplicate outright with a ValueError (torch's announced
    future behaviour)."""
    params = make_params([(3, 2), (4,)])
    kwargs = default_kwargs(algo)
    ref_params = [nn.Parameter(p.detach().clone()) for p in params]
    fused_params = [nn.Parameter(p.detach().clone()) for p in params]
    with warnings.catch_warnings(record=True) as ref_warnings:
        warnings.simplefilter("always")
        ref = getattr(torch.optim, algo)([ref_params[0], ref_params[1], ref_params[0]],
                                         foreach=False, **kwargs)
    with warnings.catch_warnings(record=True) as fused_warnings:
        warnings.simplefilter("always")
        try:
            fused = getattr(fusedopt, algo)([fused_params[0], fused_params[1], fused_params[0]],
                                            foreach=False, **kwargs)
        except ValueError:
            return
    assert [str(w.message) for w in fused_warnings] == [str(w.message) for w in ref_warnings]
    for step in range(3):
        grads = random_grads(params, step)
        for ps, opt in ((ref_params, ref), (fused_params, fused)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
    for i, (rp, fp) in enumerate(zip(ref_params, fused_params)):
        torch.testing.assert_close(fp, rp, rtol=1e-5, atol=1e-6,
                                   msg=lambda m: f"param {i} (listed twice: {i == 0}): {m}")


@pytest.mark.parametrize("algo", ALGOS)
def test_differentiable_true_is_refused(algo):
    with pytest.raises(ValueError, match="differentiable"):
        getattr(fusedopt, algo)(_params(), lr=0.1, differentiable=True)


@pytest.mark.parametrize("algo", ALGOS)
def test_constructor_signature_is_torchs(algo):
    """Same parameter names, order, kinds (positional / keyword-only) and defaults; then
    fusedopt's own keyword-only options, off by default."""
    def describe(cls):
        return [(p.name, p.kind, p.default) for p in
                inspect.signature(cls.__init__).parameters.values()]
    own = [(name, inspect.Parameter.KEYWORD_ONLY, default) for name, default in LOW_PRECISION_DEFAULTS.items()]
    assert describe(getattr(fusedopt, algo)) == describe(getattr(torch.optim, algo)) + own


@pytest.mark.parametrize("flags", [{}, {"foreach": True}, {"foreach": False}, {"fused": True},
                                   {"fused": False}, {"capturable": True}],
                         ids=["no_flags", "foreach", "no_foreach", "fused", "no_fused",
                              "capturable"])
@pytest.mark.parametrize("algo", ALGOS)
def test_defaults_and_implementation_flags_recorded_like_torch(algo, flags):
    """foreach/fused/capturable are accepted and ignored, but recorded in defaults and
    param_groups exactly as torch.optim records them (they travel in checkpoints)."""
    if algo == "SGD" and "capturable" in flags:
        pytest.skip("torch.optim.SGD has no capturable argument")
    ref = getattr(torch.optim, algo)(_params(), **flags)
    fused = getattr(fusedopt, algo)(_params(), **flags)
    assert {k: fused.defaults[k] for k in torch_keys(fused.defaults)} == ref.defaults
    assert [{k: v for k, v in g.items() if k != "params"} for g in fused.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in ref.param_groups]
    assert {k: type(fused.defaults[k]) for k in torch_keys(fused.defaults)} == \
        {k: type(v) for k, v in ref.defaults.items()}
