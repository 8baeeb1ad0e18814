"""Packing params into flat buffers is invisible to the user: same Parameter objects, shapes,
strides and values; zero_grad as torch; training through autograd as torch; a param that
leaves its buffer (model.to(), p.data = ...) is re-packed or refused, never silently stale.
"""
import copy
import sys

import pytest
import torch
from torch import nn

import fusedopt
from conftest import (
    ALGOS, OptimizerPair, assert_optimizers_match, clone_params, clone_strided,
    default_kwargs, make_params, random_grads, snapshot,
)

STEPS = 4
OPTIONS = {"SGD": {"momentum": 0.9, "weight_decay": 0.01}, "Adam": {"amsgrad": True},
           "AdamW": {"weight_decay": 0.1}}


def _varied_params(device):
    gen = torch.Generator().manual_seed(0)
    return [
        nn.Parameter(torch.randn(5, 7, generator=gen).t().to(device)),               # transposed
        nn.Parameter(torch.randn(4, 3, 3, 2, generator=gen).to(device)
                     .to(memory_format=torch.channels_last)),                       # channels_last
        nn.Parameter(torch.randn((), generator=gen).to(device)),                     # 0-dim
        nn.Parameter(torch.randn(0, 3, generator=gen).to(device)),                   # no elements
        nn.Parameter(torch.randn(11, generator=gen).to(device, torch.float64)),      # other dtype
        nn.Parameter(torch.randn(3, 5, generator=gen).to(device)),
        nn.Parameter(torch.randn(6, generator=gen).to(device), requires_grad=False),  # frozen
    ]


@pytest.mark.parametrize("algo", ALGOS)
def test_construction_keeps_parameter_objects_shapes_strides_and_values(algo, device):
    params = _varied_params(device)
    expected = [(p.shape, p.stride(), p.dtype, p.device, p.requires_grad,
                 clone_strided(p.detach())) for p in params]
    opt = getattr(fusedopt, algo)(params, lr=0.01)
    assert opt.param_groups[0]["params"] == params
    assert all(a is b for a, b in zip(opt.param_groups[0]["params"], params))
    for i, (p, (shape, stride, dtype, dev, requires_grad, values)) in enumerate(zip(params, expected)):
        assert type(p) is nn.Parameter and p.is_leaf, f"param {i}"
        assert (p.shape, p.stride(), p.dtype, p.device, p.requires_grad) == \
            (shape, stride, dtype, dev, requires_grad), f"param {i}"
        assert torch.equal(p, values), f"param {i} changed value"


@pytest.mark.parametrize("algo", ALGOS)
def test_varied_params_train_like_torch_and_keep_strides(algo, device):
    params = _varied_params(device)
    pair = OptimizerPair(algo, params, **default_kwargs(algo, **OPTIONS[algo]))
    for step in range(STEPS):
        grads = random_grads(params, step)
        grads[-1] = None  # the frozen param never gets one
        pair.step(grads)
        pair.check()


@pytest.mark.parametrize("algo", ALGOS)
def test_non_dense_param_is_stored_densely_and_trains_like_torch(algo):
    """A param that is a strided slice of a bigger tensor (gaps in memory) cannot keep its
    gaps inside a flat buffer: fusedopt stores it row-major (documented) and must still
    train it exactly like torch.optim. Dense layouts (transposed, channels_last) keep
    their strides: see the tests above."""
    wide = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    params = [nn.Parameter(wide[:, ::2]), nn.Parameter(torch.randn(4))]
    assert params[0].stride() == (10, 2)
    pair = OptimizerPair(algo, params, **default_kwargs(algo, **OPTIONS[algo]))
    for step in range(STEPS):
        pair.step(random_grads(params, step))
        assert pair.fused_params[0].is_contiguous()  # moved: nothing else saw its memory
        assert_optimizers_match(pair.ref, pair.fused, pair.ref_params, pair.fused_params)


@pytest.mark.parametrize("algo", ALGOS)
def test_params_of_one_group_and_dtype_share_one_buffer(algo):
    """The point of fusedopt: per group and (device, dtype) the params, and after a step
    every state tensor of one key, are views into one contiguous buffer."""
    params = make_params([(4, 3), (5,), (2, 2, 2)]) + make_params([(3,), (7,)], torch.float64)
    opt = getattr(fusedopt, algo)(params, **default_kwargs(algo, **OPTIONS[algo]))
    storage = lambda t: t.untyped_storage().data_ptr()
    for p, g in zip(params, random_grads(params, 0)):
        p.grad = g
    opt.step()  # buffers are made at the first step
    assert len({storage(p) for p in params[:3]}) == 1
    assert len({storage(p) for p in params[3:]}) == 1
    assert storage(params[0]) != storage(params[3])
    for key in opt.state[params[0]]:
        if key != "step":
            assert len({storage(opt.state[p][key]) for p in params[:3]}) == 1, key


# --------------------------------------------------------------------------- zero_grad

@pytest.mark.parametrize("algo", ALGOS)
def test_zero_grad_defaults_to_set_to_none(algo, device):
    params = make_params([(3, 4), (5,)], device=device)
    pair = OptimizerPair(algo, params, **default_kwargs(algo))
    pair.step(random_grads(params, 0))
    pair.ref.zero_grad()
    pair.fused.zero_grad()
    assert all(p.grad is None for p in pair.ref_params)
    assert all(p.grad is None for p in pair.fused_params)


@pytest.mark.parametrize("algo", ALGOS)
def test_zero_grad_set_to_none_false_zeroes_grads_in_place(algo, device):
    """As torch: existing grads are zeroed in place (a reference the user holds reads
    zeros), grads that were None stay None."""
    params = make_params([(3, 4), (5,), (2,)], device=device)
    pair = OptimizerPair(algo, params, **default_kwargs(algo))
    grads = random_grads(params, 0)
    grads[2] = None
    pair.step(grads)
    held = [p.grad for p in pair.fused_params]
    pair.ref.zero_grad(set_to_none=False)
    pair.fused.zero_grad(set_to_none=False)
    for i, (rp, fp) in enumerate(zip(pair.ref_params, pair.fused_params)):
        if rp.grad is None:
            assert fp.grad is None, f"param {i}: a None grad became a tensor"
            continue
        assert fp.grad is not None, f"param {i}: grad set to None"
        assert (fp.grad.shape, fp.grad.dtype, fp.grad.device) == \
            (fp.shape, fp.dtype, fp.device), f"param {i}"
        assert not fp.grad.requires_grad
        assert torch.count_nonzero(fp.grad) == 0, f"param {i}: grad not zero"
        assert torch.count_nonzero(held[i]) == 0, (
            f"param {i}: the grad tensor the user held was not zeroed in place "
            f"(torch.optim zeroes p.grad in place and keeps the object)")
    pair.check()


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x))))


def _mlp_pair(algo, device="cpu"):
    """The same MLP twice, one trained by torch.optim (the reference), one by fusedopt."""
    torch.manual_seed(0)
    ref_model = _MLP().to(device)
    fused_model = copy.deepcopy(ref_model)
    kwargs = default_kwargs(algo, **OPTIONS[algo])
    ref = getattr(torch.optim, algo)(ref_model.parameters(), foreach=False, **kwargs)
    fused = getattr(fusedopt, algo)(fused_model.parameters(), foreach=False, **kwargs)
    return ref_model, fused_model, ref, fused


def _train_step(model, opt, step, set_to_none, device):
    gen = torch.Generator().manual_seed(100 + step)
    x = torch.randn(8, 6, generator=gen).to(device)
    y = torch.randn(8, 3, generator=gen).to(device)
    opt.zero_grad(set_to_none=set_to_none)
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    return loss.detach()


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of this process's mapping that holds ``address`` (/proc/self/smaps)."""
    mapping = None
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                mapping = start <= address < end
            elif mapping and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("algo", ALGOS)
def test_buffers_of_several_huge_pages_train_like_torch_and_ask_for_huge_pages(algo):
    """fusedopt's CPU buffers of two huge pages or more (moved params, state, the flat grad
    buffer) start at a 2 MiB boundary of memory advised for transparent huge pages
    ([note: huge pages] in fusedopt/flat_buffer.py), in storage of their own size (not
    torch's allocator's), which must train, zero grads and save like any other buffer."""
    params = make_params([(1100, 1024), (577,), (3, 5)])  # 4.5 MB of float32
    pair = OptimizerPair(algo, params, **default_kwargs(algo, **OPTIONS[algo]))
    for step in range(3):
        for group in (pair.ref_params, pair.fused_params):  # into the flat grad buffer once there
            for p, g in zip(group, random_grads(params, step)):
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.copy_(g)
        pair.ref.step()
        pair.fused.step()
        pair.check()
        pair.ref.zero_grad(set_to_none=False)
        pair.fused.zero_grad(set_to_none=False)
    buf = pair.fused._slots[pair.fused_params[0]][0]
    flats = [buf.data, buf.grad_buffer, *buf.state.values()]
    assert len(flats) == 2 + len(pair.ref.state[pair.ref_params[0]]) - (algo != "SGD")  # no "step" buffer
    for flat in flats:
        assert flat.data_ptr() % (2 << 20) == 0
        # Nothing around it: a checkpoint saves a state view's whole storage.
        assert flat.untyped_storage().nbytes() == flat.numel() * flat.element_size()
        if sys.platform == "linux":
            assert "hg" in _vm_flags(flat.data_ptr()), "not advised for huge pages (madvise MADV_HUGEPAGE)"
    loaded = getattr(fusedopt, algo)(pair.fused_params, **default_kwargs(algo, **OPTIONS[algo]))
    loaded.load_state_dict(copy.deepcopy(pair.fused.state_dict()))
    pair.fused = loaded
    pair.check()


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set_to_none", "zeroed_grads"])
@pytest.mark.parametrize("algo", ALGOS)
def test_autograd_training_matches_torch(algo, set_to_none, device):
    ref_model, fused_model, ref, fused = _mlp_pair(algo, device)
    for step in range(6):
        ref_loss = _train_step(ref_model, ref, step, set_to_none, device)
        fused_loss = _train_step(fused_model, fused, step, set_to_none, device)
        torch.testing.assert_close(fused_loss, ref_loss, rtol=1e-5, atol=1e-6)
        assert_optimizers_match(ref, fused, list(ref_model.parameters()),
                                list(fused_model.parameters()))


# --------------------------------------------------------------------------- stale buffers

def _step_or_refuse(pair, grads, ref_step):
    """Steps fusedopt; returns True if it refused with a RuntimeError that left every param
    and state tensor as it was, False if it stepped (then torch.optim steps via ref_step
    and the two must match)."""
    params_before = snapshot(pair.fused_params)
    state_before = copy.deepcopy({i: dict(pair.fused.state.get(p, {}))
                                  for i, p in enumerate(pair.fused_params)})
    for p, g in zip(pair.fused_params, grads):
        p.grad = None if g is None else g.clone()
    try:
        pair.fused.step()
    except RuntimeError as e:
        assert str(e), "empty error message"
        for i, p in enumerate(pair.fused_params):
            assert torch.equal(p, params_before[i]), f"param {i} changed by a refused step"
            for key, value in state_before[i].items():
                assert torch.equal(pair.fused.state[p][key], value), f"state[{i}][{key!r}]"
        return True
    for p, g in zip(pair.ref_params, grads):
        p.grad = None if g is None else g.clone()
    ref_step()
    return False


@pytest.mark.parametrize("when", ["before_first_step", "after_steps"])
@pytest.mark.parametrize("algo", ALGOS)
def test_replacing_p_data_repacks_or_refuses(algo, when):
    """`p.data = new_tensor` after the optimizer was made: torch.optim updates the new
    tensor. fusedopt must do the same (re-pack) or raise RuntimeError, never update its
    stale buffer and leave p untouched."""
    params = make_params([(4, 3), (5,), (2, 6)])
    pair = OptimizerPair(algo, params, **default_kwargs(algo, **OPTIONS[algo]))
    if when == "after_steps":
        for step in range(2):
            pair.step(random_grads(params, step))
    new = torch.randn(5, generator=torch.Generator().manual_seed(7))
    pair.ref_params[1].data = new.clone()
    pair.fused_params[1].data = new.clone()
    if _step_or_refuse(pair, random_grads(params, 10), pair.ref.step):
        return
    assert not torch.equal(pair.fused_params[1], new), "the replaced param was not updated"
    pair.check()
    for step in range(11, 13):
        pair.step(random_grads(params, step))
        pair.check()


def _torch_continuing_after_conversion(ref, ref_params, grads):
    """torch.optim after model.to(float64): SGD just continues (its float32 momentum
    buffer mixes in); Adam raises on the dtype mismatch, so its correct continuation is
    torch's own checkpoint reload, which casts the state to the params' new dtype."""
    def step():
        snapshot_params = snapshot(ref_params)
        state = copy.deepcopy(ref.state_dict())
        try:
            ref.step()
        except RuntimeError:
            with torch.no_grad():
                for p, v in zip(ref_params, snapshot_params):
                    p.copy_(v)
            ref.load_state_dict(state)
            ref.step()
    return step


@pytest.mark.parametrize("when", ["before_first_step", "after_steps"])
@pytest.mark.parametrize("algo", ALGOS)
def test_model_to_float64_repacks_or_refuses(algo, when):
    ref_model, fused_model, ref, fused = _mlp_pair(algo)
    if when == "after_steps":
        for step in range(2):
            _train_step(ref_model, ref, step, True, "cpu")
            _train_step(fused_model, fused, step, True, "cpu")
    ref_model.to(torch.float64)
    fused_model.to(torch.float64)
    ref_params, fused_params = list(ref_model.parameters()), list(fused_model.parameters())
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    grads = torch.autograd.grad(ref_model(x).square().sum(), ref_params)

    class Pair:  # what _step_or_refuse needs
        pass
    pair = Pair()
    pair.fused, pair.fused_params, pair.ref_params = fused, fused_params, ref_params
    if _step_or_refuse(pair, grads, _torch_continuing_after_conversion(ref, ref_params, grads)):
        return
    for i, (rp, fp) in enumerate(zip(ref_params, fused_params)):
        assert fp.dtype == torch.float64
        # float32 state (torch's SGD keeps its momentum buffer in float32) -> fp32 tolerance
        torch.testing.assert_close(fp, rp, rtol=1e-5, atol=1e-6, msg=lambda m: f"param {i}: {m}")
    for step in range(2, 4):
        x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        for model, opt in ((ref_model, ref), (fused_model, fused)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
    for i, (rp, fp) in enumerate(zip(ref_params, fused_params)):
        torch.testing.assert_close(fp, rp, rtol=1e-5, atol=1e-6, msg=lambda m: f"param {i}: {m}")


@pytest.mark.parametrize("algo", ALGOS)
def test_in_place_writes_to_params_are_trained_from(algo):
    """model.load_state_dict / nn.init after the optimizer was made write into the params in
    place; the next step must start from those values, as torch's does."""
    ref_model, fused_model, ref, fused = _mlp_pair(algo)
    weights = _MLP().state_dict()
    for model in (ref_model, fused_model):
        model.load_state_dict(weights)
        with torch.no_grad():
            nn.init.constant_(model.fc2.bias, 0.25)
    for step in range(3):
        _train_step(ref_model, ref, step, True, "cpu")
        _train_step(fused_model, fused, step, True, "cpu")
    assert_optimizers_match(ref, fused, list(ref_model.parameters()),
                            list(fused_model.parameters()))


@pytest.mark.parametrize("algo", ALGOS)
def test_params_sharing_storage_train_like_torch_or_are_refused(algo):
    """Two Parameters made from one tensor alias the same memory; torch.optim then applies
    both updates to that memory. fusedopt must do the same or refuse them with an error,
    not silently untie them into two buffer slots."""
    base = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    ref_params = [nn.Parameter(base.clone()), nn.Parameter(torch.randn(5))]
    ref_params.append(nn.Parameter(ref_params[0].data))            # aliases param 0
    fused_base = base.clone()
    fused_params = [nn.Parameter(fused_base), nn.Parameter(ref_params[1].detach().clone())]
    fused_params.append(nn.Parameter(fused_params[0].data))
    kwargs = default_kwargs(algo, **OPTIONS[algo])
    ref = getattr(torch.optim, algo)(ref_params, foreach=False, **kwargs)
    try:
        fused = getattr(fusedopt, algo)(fused_params, foreach=False, **kwargs)
    except (RuntimeError, ValueError):
        return
    for step in range(3):
        grads = random_grads(ref_params, step)
        for ps, opt in ((ref_params, ref), (fused_params, fused)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            try:
                opt.step()
            except RuntimeError:
                assert opt is fused and step == 0, "torch.optim failed, or fusedopt failed late"
                return
    for i, (rp, fp) in enumerate(zip(ref_params, fused_params)):
        torch.testing.assert_close(fp, rp, rtol=1e-5, atol=1e-6, msg=lambda m: f"param {i}: {m}")


@pytest.mark.parametrize("algo", ALGOS)
def test_one_param_in_two_optimizers(algo):
    """A param given to two optimizers (stepped alternately) trains as with torch.optim."""
    params = make_params([(4, 3), (5,), (6,)])
    kwargs = default_kwargs(algo, **OPTIONS[algo])
    ref_params, fused_params = clone_params(params), clone_params(params)
    ref_a = getattr(torch.optim, algo)(ref_params[:2], foreach=False, **kwargs)
    ref_b = getattr(torch.optim, algo)(ref_params[1:], foreach=False, **kwargs)
    fused_a = getattr(fusedopt, algo)(fused_params[:2], foreach=False, **kwargs)
    fused_b = getattr(fusedopt, algo)(fused_params[1:], foreach=False, **kwargs)
    for step in range(4):
        grads = random_grads(params, step)
        for ps, opt in ((ref_params, ref_a if step % 2 else ref_b),
                        (fused_params, fused_a if step % 2 else fused_b)):
            for p, g in zip(ps, grads):
                p.grad = g.clone()
            opt.step()
        assert_optimizers_match(ref_a, fused_a, ref_params[:2], fused_params[:2])
        assert_optimizers_match(ref_b, fused_b, ref_params[1:], fused_params[1:])


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_state_memory_is_its_moments_only(amsgrad):
    """Adam's state costs two (amsgrad: three) param-sized buffers, as torch.optim's;
    the per-parameter steps live in one small float32 tensor, not a param-sized buffer."""
    params = make_params([(64, 3), (100,)])
    opt = fusedopt.Adam(params, amsgrad=amsgrad)
    for p, g in zip(params, random_grads(params, 0)):
        p.grad = g
    opt.step()
    (part,) = opt._plans[0].parts
    buf = part.buf
    assert sum(flat.numel() for flat in buf.state.values()) == (3 if amsgrad else 2) * buf.numel
    assert buf.step.numel() == len(params)
