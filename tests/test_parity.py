"""fusedopt.SGD/Adam/AdamW follow torch.optim's trajectory step for step.

Each test steps torch.optim (foreach=False, the oracle) and fusedopt side by side on clones
of the same params with identical grads, then compares params, every state tensor and the
param_groups (see conftest.py for the tolerances and the fp16/bf16 oracle).
"""
import pytest
import torch
from torch import nn

import fusedopt
from conftest import (
    DEFAULT_LR, DTYPES, OptimizerPair, clone_params, default_kwargs, dtype_id,
    make_params, random_grads, set_grads, snapshot,
)

STEPS = 6
# 0-dim, odd sizes and a length that leaves vector tails (1031 is prime).
SHAPES = [(5, 7), (1031,), (3, 4, 2), ()]

CONFIGS = [
    ("SGD", "plain", {}),
    ("SGD", "momentum", {"momentum": 0.9}),
    ("SGD", "momentum_dampening", {"momentum": 0.9, "dampening": 0.1}),
    ("SGD", "nesterov", {"momentum": 0.9, "nesterov": True}),
    ("SGD", "weight_decay", {"weight_decay": 0.1}),
    ("SGD", "momentum_weight_decay", {"momentum": 0.9, "weight_decay": 0.1}),
    ("SGD", "maximize", {"maximize": True}),
    ("SGD", "nesterov_weight_decay_maximize",
     {"momentum": 0.5, "nesterov": True, "weight_decay": 0.05, "maximize": True}),
    ("Adam", "default", {}),
    ("Adam", "amsgrad", {"amsgrad": True}),
    ("Adam", "weight_decay", {"weight_decay": 0.1}),
    ("Adam", "maximize", {"maximize": True}),
    ("Adam", "decoupled_weight_decay", {"weight_decay": 0.1, "decoupled_weight_decay": True}),
    ("Adam", "betas_eps", {"betas": (0.8, 0.99), "eps": 1e-6}),
    ("Adam", "amsgrad_weight_decay_maximize",
     {"amsgrad": True, "weight_decay": 0.1, "maximize": True}),
    ("AdamW", "default", {}),
    ("AdamW", "weight_decay", {"weight_decay": 0.1}),
    ("AdamW", "amsgrad", {"amsgrad": True}),
    ("AdamW", "maximize", {"maximize": True}),
    ("AdamW", "amsgrad_weight_decay_maximize",
     {"amsgrad": True, "weight_decay": 0.3, "maximize": True}),
]


@pytest.mark.parametrize("lr_kind", ["float", "tensor"], ids=["lr_float", "lr_tensor"])
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("algo,options", [(a, o) for a, _, o in CONFIGS],
                         ids=[f"{a}-{name}" for a, name, _ in CONFIGS])
def test_trajectory_matches_torch(algo, options, dtype, lr_kind, device):
    params = make_params(SHAPES, dtype, device)
    pair = OptimizerPair(algo, params, **default_kwargs(algo, lr_kind, dtype, **options))
    start = snapshot(pair.fused_params)
    for step in range(STEPS):
        pair.step(random_grads(params, step))
        pair.check()
    moved = [not torch.equal(a, b) for a, b in zip(start, pair.fused_params)]
    assert all(moved), "some params never moved: the comparison would be vacuous"


@pytest.mark.parametrize("algo", ["SGD", "Adam", "AdamW"])
def test_param_groups_with_different_hyperparameters(algo, device):
    group_options = {
        "SGD": [{"lr": 0.1, "momentum": 0.9}, {"lr": 0.02, "weight_decay": 0.1},
                {"momentum": 0.5, "nesterov": True, "maximize": True}],
        "Adam": [{"lr": 0.05, "amsgrad": True}, {"betas": (0.5, 0.9), "weight_decay": 0.2},
                 {"lr": torch.tensor(3e-3), "maximize": True, "eps": 1e-4}],
        "AdamW": [{"lr": 0.05, "weight_decay": 0.5}, {"amsgrad": True, "betas": (0.7, 0.95)},
                  {"lr": torch.tensor(3e-2), "maximize": True}],
    }[algo]
    params = make_params([(4, 3), (7,), (2, 2), (5,), (3, 3), (6,)], device=device)
    groups = [{"params": [2 * i, 2 * i + 1], **o} for i, o in enumerate(group_options)]
    pair = OptimizerPair(algo, params, groups=groups, lr=DEFAULT_LR[algo])
    for step in range(STEPS):
        pair.step(random_grads(params, step))
    pair.check()


@pytest.mark.parametrize("algo", ["SGD", "Adam", "AdamW"])
def test_mixed_dtypes_in_one_group(algo, device):
    """Params of several dtypes in one group (packed into one buffer per dtype)."""
    params = []
    for i, dtype in enumerate([torch.float32, torch.float64, torch.bfloat16, torch.float32,
                               torch.float16, torch.float64]):
        params += make_params([(3 + i, 2)], dtype, device, seed=i)
    options = {"SGD": {"momentum": 0.9}, "Adam": {"amsgrad": True}, "AdamW": {}}[algo]
    pair = OptimizerPair(algo, params, **default_kwargs(algo, **options))
    for step in range(STEPS):
        pair.step(random_grads(params, step))
    pair.check()


@pytest.mark.parametrize("algo", ["SGD", "Adam", "AdamW"])
def test_add_param_group_after_steps(algo, device):
    """A group added after some steps trains from scratch; old groups continue unaffected."""
    params = make_params([(4, 3), (5,), (2, 6), (3,)], device=device)
    options = {"SGD": {"momentum": 0.9}, "Adam": {}, "AdamW": {"amsgrad": True}}[algo]
    pair = OptimizerPair(algo, params, groups=[{"params": [0, 1]}],
                         **default_kwargs(algo, **options))
    grads = lambda step: [g if i < 2 else None for i, g in enumerate(random_grads(params, step))]
    for step in range(3):
        pair.step(grads(step))
    new_group = {"params": [2, 3], "lr": 0.03}
    pair.ref.add_param_group({**new_group, "params": pair.ref_params[2:]})
    pair.fused.add_param_group({**new_group, "params": pair.fused_params[2:]})
    pair.check()
    for step in range(3, 3 + STEPS):
        pair.step(random_grads(params, step))
        pair.check()


@pytest.mark.parametrize("algo,options", [
    ("SGD", {"momentum": 0.9}), ("Adam", {}), ("Adam", {"amsgrad": True}), ("AdamW", {})],
    ids=["SGD-momentum", "Adam", "Adam-amsgrad", "AdamW"])
def test_none_grads_skip_param_and_do_not_advance_step(algo, options, device):
    """A param whose grad is None is not updated and its state['step'] does not advance;
    a param that never had a grad has no state (as in torch.optim)."""
    params = make_params([(3, 4), (5,), (2, 2), (6,)], device=device)
    pair = OptimizerPair(algo, params, **default_kwargs(algo, **options))
    has_grad = [
        lambda s: True,          # every step
        lambda s: s % 2 == 0,    # every other step
        lambda s: False,         # never
        lambda s: s >= 3,        # only later
    ]
    for step in range(STEPS):
        before = snapshot(pair.fused_params)
        grads = [g if has_grad[i](step) else None
                 for i, g in enumerate(random_grads(params, step))]
        pair.step(grads)
        pair.check()
        for i, g in enumerate(grads):
            if g is None:
                assert torch.equal(pair.fused_params[i], before[i]), f"param {i} changed"
    assert not pair.fused.state.get(pair.fused_params[2]), "never-stepped param has state"
    if algo != "SGD":
        expected_steps = [STEPS, (STEPS + 1) // 2, None, STEPS - 3]
        for i, n in enumerate(expected_steps):
            if n is not None:
                assert float(pair.fused.state[pair.fused_params[i]]["step"]) == n


@pytest.mark.parametrize("algo", ["SGD", "Adam", "AdamW"])
def test_step_with_no_grads_at_all_changes_nothing(algo, device):
    params = make_params([(3, 4), (5,)], device=device)
    options = {"momentum": 0.9} if algo == "SGD" else {}
    pair = OptimizerPair(algo, params, **default_kwargs(algo, **options))
    pair.step([None, None])
    pair.check()
    assert all(not pair.fused.state.get(p) for p in pair.fused_params)
    pair.step(random_grads(params, 0))
    pair.step([None, None])
    pair.check()


# --------------------------------------------------------------------- grads with other strides

def _transposed(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(reversed(shape)), generator=gen).t()


def _contiguous(shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _channels_last(shape, seed):
    return _contiguous(shape, seed).to(memory_format=torch.channels_last)


def _sliced(shape, seed):
    """Non-dense: every other column of a wider tensor."""
    wide = _contiguous((shape[0], 2 * shape[1]), seed)
    return wide[:, ::2]


LAYOUTS = {
    # id: (shape, param layout, grad layout)
    "transposed_param-contiguous_grad": ((7, 5), _transposed, _contiguous),
    "contiguous_param-transposed_grad": ((7, 5), _contiguous, _transposed),
    "transposed_param-transposed_grad": ((7, 5), _transposed, _transposed),
    "channels_last_param-contiguous_grad": ((4, 3, 3, 2), _channels_last, _contiguous),
    "contiguous_param-channels_last_grad": ((4, 3, 3, 2), _contiguous, _channels_last),
    "contiguous_param-sliced_grad": ((6, 5), _contiguous, _sliced),
    "transposed_param-sliced_grad": ((6, 5), _transposed, _sliced),
}


@pytest.mark.parametrize("algo,options", [
    ("SGD", {"momentum": 0.9, "weight_decay": 0.1}), ("Adam", {"amsgrad": True}),
    ("AdamW", {"weight_decay": 0.1})], ids=["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_grads_with_other_strides_than_their_param(layout, algo, options, device):
    """torch's fused CPU kernel silently mis-updates when grad strides differ from the
    param's (pytorch#106951); fusedopt must read each grad by its own strides and keep each
    param's strides."""
    shape, param_layout, grad_layout = LAYOUTS[layout]
    params = [nn.Parameter(param_layout(shape, 0).to(device)),
              nn.Parameter(_contiguous((9,), 1).to(device))]
    pair = OptimizerPair(algo, params, **default_kwargs(algo, **options))
    for step in range(STEPS):
        grads = [grad_layout(shape, 10 + step).to(device), _contiguous((9,), 20 + step).to(device)]
        pair.step(grads)
        pair.check()


def _mlp_like_autograd_cases(device):
    """Params of unusual layouts whose grads come from bmm/einsum/conv through autograd."""
    gen = torch.Generator().manual_seed(3)
    w_t = nn.Parameter(torch.randn(6, 4, generator=gen).t().to(device))   # (4, 6), stride (1, 4)
    w_bmm = nn.Parameter(torch.randn(2, 6, 3, generator=gen).transpose(1, 2).to(device))
    conv_w = nn.Parameter(torch.randn(5, 3, 3, 3, generator=gen).to(device)
                          .to(memory_format=torch.channels_last))
    conv_w_contig = nn.Parameter(torch.randn(4, 5, 1, 1, generator=gen).to(device))
    return [w_t, w_bmm, conv_w, conv_w_contig]


def _autograd_loss(params, step, device):
    w_t, w_bmm, conv_w, conv_w_contig = params
    gen = torch.Generator().manual_seed(50 + step)
    x = torch.randn(3, 5, 4, generator=gen).to(device)
    h = torch.einsum("bsi,ij->bsj", x, w_t)                       # (3, 5, 6)
    h = torch.bmm(h[:2], w_bmm.transpose(1, 2))                   # (2, 5, 3)
    img = torch.randn(2, 3, 6, 6, generator=gen).to(device).to(memory_format=torch.channels_last)
    y = nn.functional.conv2d(img, conv_w)                          # channels_last grads
    y = nn.functional.conv2d(y, conv_w_contig)
    return h.square().mean() + y.tanh().mean()


@pytest.mark.parametrize("algo", ["SGD", "Adam", "AdamW"])
def test_grads_from_bmm_einsum_and_channels_last_conv(algo, device):
    params = _mlp_like_autograd_cases(device)
    options = {"momentum": 0.9} if algo == "SGD" else {}
    pair = OptimizerPair(algo, params, **default_kwargs(algo, **options))
    for step in range(STEPS):
        for opt, ps in ((pair.ref, pair.ref_params), (pair.fused, pair.fused_params)):
            opt.zero_grad()
            _autograd_loss(ps, step, device).backward()
            opt.step()
        pair.check()


# --------------------------------------------------------------------- closure

@pytest.mark.parametrize("algo", ["SGD", "Adam", "AdamW"])
def test_step_with_closure_returns_its_loss_and_steps(algo, device):
    params = make_params([(3, 4), (4,)], device=device)
    pair = OptimizerPair(algo, params, **default_kwargs(algo))
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0)).to(device)

    def closure_for(opt, ps):
        def closure():
            opt.zero_grad()
            loss = ((x @ ps[0] + ps[1]) ** 2).mean()
            loss.backward()
            return loss
        return closure

    for _ in range(3):
        ref_loss = pair.ref.step(closure_for(pair.ref, pair.ref_params))
        fused_loss = pair.fused.step(closure_for(pair.fused, pair.fused_params))
        assert torch.is_tensor(fused_loss), f"step(closure) returned {fused_loss!r}"
        torch.testing.assert_close(fused_loss, ref_loss, rtol=1e-5, atol=1e-6)
        pair.check()
    assert pair.fused.step() is None  # no closure: torch returns None


# --------------------------------------------------------------------- sparse and complex

@pytest.mark.parametrize("algo,options", [
    ("Adam", {}), ("AdamW", {}), ("SGD", {}), ("SGD", {"momentum": 0.9})],
    ids=["Adam", "AdamW", "SGD", "SGD-momentum"])
def test_sparse_grads(algo, options):
    """Adam/AdamW: RuntimeError with torch's message, params and state untouched.
    SGD (torch supports sparse grads): either torch's result or a RuntimeError that leaves
    params and state untouched."""
    params = make_params([(4, 3), (5,)])
    pair = OptimizerPair(algo, params, **default_kwargs(algo, **options))
    pair.step(random_grads(params, 0))
    before = snapshot(pair.fused_params)
    state_before = {i: {k: v.clone() for k, v in pair.fused.state.get(p, {}).items()}
                    for i, p in enumerate(pair.fused_params)}
    grads = random_grads(params, 1)
    grads[0] = grads[0].to_sparse()
    for p, g in zip(pair.fused_params, grads):
        p.grad = g.clone()
    try:
        pair.fused.step()
    except RuntimeError as fused_error:
        for p, g in zip(pair.ref_params, grads):
            p.grad = g.clone()
        if algo != "SGD":
            with pytest.raises(RuntimeError) as torch_error:
                pair.ref.step()
            assert str(fused_error) == str(torch_error.value)
        for i, p in enumerate(pair.fused_params):
            assert torch.equal(p, before[i]), f"param {i} changed by a step that raised"
            for k, v in pair.fused.state.get(p, {}).items():
                assert torch.equal(v, state_before[i][k]), f"state[{i}][{k!r}] changed"
        return
    assert algo == "SGD", f"{algo} accepted a sparse grad; torch.optim raises RuntimeError"
    for p, g in zip(pair.ref_params, grads):
        p.grad = g.clone()
    pair.ref.step()
    pair.check()


@pytest.mark.parametrize("algo,options", [
    ("SGD", {"momentum": 0.9}), ("Adam", {"amsgrad": True}), ("AdamW", {})],
    ids=["SGD", "Adam", "AdamW"])
def test_complex_params_match_torch_or_raise_cleanly(algo, options):
    """torch.optim treats a complex param as its view_as_real; fusedopt must either do the
    same or refuse with a clear error (at construction or step) and change nothing."""
    gen = torch.Generator().manual_seed(0)
    params = [nn.Parameter(torch.randn(4, 3, dtype=torch.complex64, generator=gen)),
              nn.Parameter(torch.randn(5, generator=gen))]
    kwargs = default_kwargs(algo, **options)
    try:
        pair = OptimizerPair(algo, params, **kwargs)
    except (RuntimeError, ValueError, TypeError) as e:
        assert "complex" in str(e).lower(), f"unclear error for a complex param: {e}"
        return
    before = snapshot(pair.fused_params)
    grads = [torch.randn(4, 3, dtype=torch.complex64, generator=gen), torch.randn(5, generator=gen)]
    try:
        pair.fused_params[0].grad, pair.fused_params[1].grad = grads[0].clone(), grads[1].clone()
        pair.fused.step()
    except (RuntimeError, ValueError, TypeError) as e:
        assert "complex" in str(e).lower(), f"unclear error for a complex param: {e}"
        for p, b in zip(pair.fused_params, before):
            assert torch.equal(p, b), "a step that raised changed a param"
        assert all(not pair.fused.state.get(p) for p in pair.fused_params)
        return
    pair.ref_params[0].grad, pair.ref_params[1].grad = grads[0].clone(), grads[1].clone()
    pair.ref.step()
    pair.check()
    for step in range(3):
        g = [torch.randn(4, 3, dtype=torch.complex64, generator=gen), torch.randn(5, generator=gen)]
        pair.step(g)
        pair.check()


def test_tensor_betas_match_torch():
    """Adam accepts 1-element tensor betas (schedulers may write them); float32 only: torch
    then computes the bias corrections in the betas' float32, not in double."""
    params = make_params(SHAPES)
    betas = (torch.tensor(0.8), torch.tensor(0.99))
    pair = OptimizerPair("Adam", params, **default_kwargs("Adam", amsgrad=True, betas=betas))
    for step in range(STEPS):
        pair.step(random_grads(params, step))
        pair.check()


@pytest.mark.parametrize("algo", ["SGD", "Adam", "AdamW"])
def test_step_hooks_run_like_torchs(algo):
    """register_step_pre_hook / register_step_post_hook fire once per step, in order, with
    the optimizer (LR schedulers and profilers rely on torch's step wrapping)."""
    params = make_params([(3,)])
    calls = {}
    for module in (torch.optim, fusedopt):
        ps = clone_params(params)
        opt = getattr(module, algo)(ps, lr=0.1)
        log = calls[module.__name__] = []
        opt.register_step_pre_hook(lambda o, args, kwargs: log.append(("pre", o is opt)))
        opt.register_step_post_hook(lambda o, args, kwargs: log.append(("post", o is opt)))
        for step in range(2):
            set_grads(ps, random_grads(ps, step))
            opt.step()
    assert calls["fusedopt"] == calls["torch.optim"]
