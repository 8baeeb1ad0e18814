"""GradScaler, fused gradient clipping and zero_grad-in-step, each against torch's own
composition (torch.optim + GradScaler + torch.nn.utils.clip_grad_norm_)."""
import copy

import pytest
import torch

import fusedopt

ALGOS = {
    "sgd": (torch.optim.SGD, fusedopt.SGD, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
    "adam": (torch.optim.Adam, fusedopt.Adam, dict(lr=0.01, weight_decay=0.01, amsgrad=True)),
    "adamw": (torch.optim.AdamW, fusedopt.AdamW, dict(lr=0.01)),
}
OVERFLOW_STEPS = {0, 3}  # the very first step overflows too (torch's fused SGD bug)


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)) for _ in range(n)]


def backward(model, x, y, scaler, poison):
    loss = torch.nn.functional.mse_loss(model(x), y)
    scaler.scale(loss).backward()
    if poison:  # an overflow as mixed precision produces it
        next(model.parameters()).grad[0, 0] = float("inf")


def assert_same_training(torch_model, fused_model, torch_opt, fused_opt):
    for a, b in zip(torch_model.parameters(), fused_model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch_model.parameters(), fused_model.parameters()):
        assert torch_opt.state[a].keys() == fused_opt.state[b].keys()
        for key, value in torch_opt.state[a].items():
            torch.testing.assert_close(fused_opt.state[b][key].to(value.device), value, rtol=1e-5, atol=1e-6)


def train_pair(algo, steps, fused_phase, torch_phase):
    torch_cls, fused_cls, kwargs = ALGOS[algo]
    torch_model = make_model()
    fused_model = copy.deepcopy(torch_model)
    torch_opt = torch_cls(torch_model.parameters(), foreach=False, **kwargs)
    fused_opt = fused_cls(fused_model.parameters(), **kwargs)
    torch_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    fused_scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=2)
    results = []
    for step, (x, y) in enumerate(batches(steps)):
        poison = step in OVERFLOW_STEPS
        for model, opt, scaler, phase in ((torch_model, torch_opt, torch_scaler, torch_phase),
                                          (fused_model, fused_opt, fused_scaler, fused_phase)):
            opt.zero_grad()
            backward(model, x, y, scaler, poison)
            results.append(phase(model, opt, scaler))
            scaler.update()
        assert fused_scaler.get_scale() == torch_scaler.get_scale()
        assert_same_training(torch_model, fused_model, torch_opt, fused_opt)
    return torch_model, fused_model, torch_opt, fused_opt, results


@pytest.mark.parametrize("algo", ALGOS)
def test_grad_scaler_step_alone_matches_torch_and_skips_overflow_steps(algo):
    def phase(model, opt, scaler):
        scaler.step(opt)
    train_pair(algo, 6, phase, phase)


@pytest.mark.parametrize("algo", ALGOS)
def test_grad_scaler_after_explicit_unscale_and_torch_clip_matches_torch(algo):
    def phase(model, opt, scaler):
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        scaler.step(opt)
    train_pair(algo, 6, phase, phase)


@pytest.mark.parametrize("algo", ALGOS)
def test_fused_clip_with_grad_scaler_matches_unscale_clip_step(algo):
    def torch_phase(model, opt, scaler):
        scaler.unscale_(opt)
        return torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)

    def fused_phase(model, opt, scaler):
        return opt.clip_grad_norm_(0.5, grad_scaler=scaler)

    def step_after(phase):
        def run(model, opt, scaler):
            norm = phase(model, opt, scaler)
            scaler.step(opt)
            return norm
        return run

    *_, norms = train_pair(algo, 6, step_after(fused_phase), step_after(torch_phase))
    for torch_norm, fused_norm in zip(norms[0::2], norms[1::2]):
        if torch.isfinite(torch_norm):
            torch.testing.assert_close(fused_norm, torch_norm, rtol=1e-5, atol=1e-6)
        else:
            assert not torch.isfinite(fused_norm)


@pytest.mark.parametrize("algo", ALGOS)
def test_overflow_changes_nothing_even_on_the_first_step(algo):
    _, fused_cls, kwargs = ALGOS[algo]
    model = make_model()
    opt = fused_cls(model.parameters(), **kwargs)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    backward(model, x, y, scaler, poison=True)
    scaler.step(opt)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    for buf in {id(buf): buf for buf, _ in opt._slots.values()}.values():
        assert torch.all(buf.step == 0)
        for flat in buf.state.values():
            assert torch.all(flat == 0)  # finite, and never written
    if algo == "sgd":  # torch.optim would not have created a momentum buffer yet
        assert opt.state_dict()["state"] == {}


@pytest.mark.parametrize("algo", ALGOS)
def test_grad_scaler_step_without_any_grad_raises_torchs_assertion_and_changes_nothing(algo):
    """scaler.step(opt) when no parameter has a grad (a frozen model): torch.optim stops
    in scaler.unscale_ with an AssertionError; fusedopt raises the same, not an error
    about GradScaler's internals, and leaves the optimizer and model as they were."""
    errors = []
    for cls in ALGOS[algo][:2]:
        model = make_model()
        opt = cls(model.parameters(), **ALGOS[algo][2])
        state_before = copy.deepcopy(opt.state_dict())
        before = [p.detach().clone() for p in model.parameters()]
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        scaler.scale(torch.ones(()))
        with pytest.raises(AssertionError) as raised:
            scaler.step(opt)
        errors.append(str(raised.value))
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        assert opt.state_dict() == state_before
    assert errors[1] == errors[0]


@pytest.mark.parametrize("norm_type", [2.0, float("inf"), 1.0])
@pytest.mark.parametrize("algo", ALGOS)
def test_clip_grad_norm_returns_torch_norm_and_clips_inside_the_step(algo, norm_type):
    torch_cls, fused_cls, kwargs = ALGOS[algo]
    torch_model = make_model()
    fused_model = copy.deepcopy(torch_model)
    torch_opt = torch_cls(torch_model.parameters(), foreach=False, **kwargs)
    fused_opt = fused_cls(fused_model.parameters(), **kwargs)
    for x, y in batches(4):
        for model, opt in ((torch_model, torch_opt), (fused_model, fused_opt)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
        torch_norm = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), 0.1, norm_type)
        fused_norm = fused_opt.clip_grad_norm_(0.1, norm_type)
        torch.testing.assert_close(fused_norm, torch_norm, rtol=1e-5, atol=1e-7)
        torch_opt.step()
        fused_opt.step()
        assert_same_training(torch_model, fused_model, torch_opt, fused_opt)


def test_clip_grad_norm_twice_clips_the_clipped_grads_as_torch():
    torch_model = make_model()
    fused_model = copy.deepcopy(torch_model)
    torch_opt = torch.optim.SGD(torch_model.parameters(), lr=0.1)
    fused_opt = fusedopt.SGD(fused_model.parameters(), lr=0.1)
    x, y = batches(1)[0]
    for model in (torch_model, fused_model):
        torch.nn.functional.mse_loss(model(x), y).backward()
    for max_norm in (0.5, 0.1):
        torch_norm = torch.nn.utils.clip_grad_norm_(torch_model.parameters(), max_norm)
        fused_norm = fused_opt.clip_grad_norm_(max_norm)
        torch.testing.assert_close(fused_norm, torch_norm)
    torch_opt.step()
    fused_opt.step()
    assert_same_training(torch_model, fused_model, torch_opt, fused_opt)


def test_clip_grad_norm_error_if_nonfinite_uses_torchs_error():
    model = make_model()
    opt = fusedopt.Adam(model.parameters())
    x, y = batches(1)[0]
    torch.nn.functional.mse_loss(model(x), y).backward()
    next(model.parameters()).grad[0, 0] = float("nan")
    with pytest.raises(RuntimeError) as torch_error:
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, error_if_nonfinite=True)
    with pytest.raises(RuntimeError) as fused_error:
        opt.clip_grad_norm_(1.0, error_if_nonfinite=True)
    assert str(fused_error.value) == str(torch_error.value)


@pytest.mark.parametrize("flat_grads", [False, True], ids=["autograd-grads", "flat-grads"])
@pytest.mark.parametrize("algo", ALGOS)
def test_step_with_zero_grad_matches_step_then_zero_grad(algo, flat_grads):
    torch_cls, fused_cls, kwargs = ALGOS[algo]
    torch_model = make_model()
    fused_model = copy.deepcopy(torch_model)
    torch_opt = torch_cls(torch_model.parameters(), foreach=False, **kwargs)
    fused_opt = fused_cls(fused_model.parameters(), **kwargs)
    if flat_grads:
        for model in (torch_model, fused_model):
            torch.nn.functional.mse_loss(model(batches(1)[0][0]), batches(1)[0][1]).backward()
        torch_opt.zero_grad(set_to_none=False)
        fused_opt.zero_grad(set_to_none=False)
    for x, y in batches(4):
        for model in (torch_model, fused_model):
            torch.nn.functional.mse_loss(model(x), y).backward()
        torch_opt.step()
        torch_opt.zero_grad(set_to_none=False)
        fused_opt.step(zero_grad=True)
        for p in fused_model.parameters():
            assert p.grad is not None and torch.all(p.grad == 0)
        assert_same_training(torch_model, fused_model, torch_opt, fused_opt)


def test_step_with_zero_grad_zeroes_grads_of_a_skipped_step():
    model = make_model()
    opt = fusedopt.AdamW(model.parameters())
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x, y = batches(1)[0]
    backward(model, x, y, scaler, poison=True)
    scaler.step(opt, zero_grad=True)
    for p in model.parameters():
        assert torch.all(p.grad == 0)
