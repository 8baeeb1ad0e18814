"""Fewer bytes per parameter: bf16/fp16 optimizer state, fp32 master weights, stochastic rounding.

Oracles:
* The fp32 math is fusedopt's default float32 path: test_parity.py pins it to torch.optim,
  and below it is bit-identical to torch.optim's fused CPU Adam/AdamW wherever torch runs
  whole SIMD vectors (torch's scalar tails order float operations differently).
* state_dtype: "fp32 math, round the state after each step": after every reference step
  its params and state are rounded to the stored dtypes; fusedopt must match bit for bit.
* master_weights: torch.optim on float32 params, fed the bf16/fp16 grads; the master copy
  equals those params and the param is their rounding, bit for bit.
* stochastic_rounding: every stored value is one of the two neighbours of the fp32 result,
  the mean of many roundings is the fp32 value, and torch.manual_seed reproduces it.
"""
import copy
import importlib.util
import io
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fusedopt
from fusedopt.options import MASTER_KEY

SHAPES = [(5, 7), (1031,), (3, 4, 2), ()]  # vector tails, 0-dim
WHOLE_VECTOR_SHAPES = [(8, 32), (48,), (4, 4, 2)]  # numel a multiple of 16: no scalar tail in torch
STEPS = 5
LOW = (torch.bfloat16, torch.float16)

CONFIGS = [
    ("SGD", {"lr": 0.05, "momentum": 0.9}),
    ("SGD", {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
    ("SGD", {"lr": 0.05, "momentum": 0.5, "dampening": 0.2, "maximize": True}),
    ("Adam", {"lr": 1e-2}),
    ("Adam", {"lr": 1e-2, "amsgrad": True, "weight_decay": 0.1}),
    ("AdamW", {"lr": 1e-2, "weight_decay": 0.1}),
    ("AdamW", {"lr": 1e-2, "amsgrad": True, "maximize": True}),
]
CONFIG_IDS = [f"{algo}-{'-'.join(f'{k}={v}' for k, v in o.items() if k != 'lr') or 'default'}"
              for algo, o in CONFIGS]


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def make_params(dtype, seed=0, shapes=SHAPES):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator).to(dtype).requires_grad_() for shape in shapes]


def make_grads(params, step, dtype=None):
    generator = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(p.shape, generator=generator).to(dtype or p.dtype) for p in params]


def fp32_engine(algo, params, options):
    """The optimizer whose float32 math the low-precision modes must reproduce."""
    return getattr(fusedopt, algo)(params, **options)


def torch_fp32_engine(algo, params, options):
    """torch.optim's fused CPU Adam/AdamW (bit-identical on whole vectors); torch's fused
    SGD orders its operations differently, so SGD's is fusedopt's (pinned by test_parity)."""
    if algo == "SGD":
        return fusedopt.SGD(params, **options)
    return getattr(torch.optim, algo)(params, fused=True, **options)


@pytest.mark.parametrize("algo,options", CONFIGS[3:], ids=CONFIG_IDS[3:])
def test_fp32_path_is_bitwise_torch_fused_adam_on_whole_vectors(algo, options):
    params = make_params(torch.float32, shapes=WHOLE_VECTOR_SHAPES)
    ref_params = [p.detach().clone().requires_grad_() for p in params]
    opt = getattr(fusedopt, algo)(params, **options)
    reference = torch_fp32_engine(algo, ref_params, options)
    for step in range(STEPS):
        grads = make_grads(params, step)
        set_grads(params, grads)
        set_grads(ref_params, grads)
        opt.step()
        reference.step()
    for i, (p, r) in enumerate(zip(params, ref_params)):
        bits_equal(p.detach(), r.detach(), f"param {i}")
        for key in moment_keys(reference, r):
            bits_equal(opt.state[p][key], reference.state[r][key], f"state[{i}][{key!r}]")


def bits_equal(actual, expected, what):
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    differ = actual.view(-1).ne(expected.view(-1)) & ~(actual.view(-1).isnan() & expected.view(-1).isnan())
    assert not differ.any(), (f"{what}: {int(differ.sum())} of {actual.numel()} elements differ, e.g. "
                              f"{actual.view(-1)[differ][:3].tolist()} != {expected.view(-1)[differ][:3].tolist()}")


def moment_keys(opt, p):
    return [k for k, v in opt.state[p].items() if k not in ("step", MASTER_KEY) and torch.is_tensor(v)]


class RoundedReference:
    """fp32 math, then params and state rounded to their stored dtypes after each step."""

    def __init__(self, algo, params, param_dtype, state_dtype, options):
        self.params = [p.detach().float().clone().requires_grad_() for p in params]
        self.opt = fp32_engine(algo, self.params, options)
        self.param_dtype, self.state_dtype = param_dtype, state_dtype

    @torch.no_grad()
    def step(self, grads):
        for p, g in zip(self.params, grads):
            p.grad = g.float()
        self.opt.step()
        for p in self.params:
            p.copy_(p.to(self.param_dtype).float())
            for key in moment_keys(self.opt, p):
                self.opt.state[p][key].copy_(self.opt.state[p][key].to(self.state_dtype).float())

    @torch.no_grad()
    def switch_state_dtype(self, state_dtype):
        """The switch rounds the state once, before the next step."""
        self.state_dtype = state_dtype
        for p in self.params:
            for key in moment_keys(self.opt, p):
                self.opt.state[p][key].copy_(self.opt.state[p][key].to(state_dtype).float())

    def check(self, fused_params, fused_opt):
        for i, (ref, p) in enumerate(zip(self.params, fused_params)):
            bits_equal(p.detach(), ref.detach().to(self.param_dtype), f"param {i}")
            keys = moment_keys(self.opt, ref)
            assert moment_keys(fused_opt, p) == keys
            for key in keys:
                bits_equal(fused_opt.state[p][key], self.opt.state[ref][key].to(self.state_dtype),
                           f"state[{i}][{key!r}]")


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


# ----------------------------------------------------------------------------- state_dtype

@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=dtype_id)
@pytest.mark.parametrize("algo,options", CONFIGS, ids=CONFIG_IDS)
def test_state_dtype_is_fp32_math_with_state_rounded_to_nearest_each_step(algo, options, param_dtype,
                                                                         state_dtype):
    params = make_params(param_dtype)
    reference = RoundedReference(algo, params, param_dtype, state_dtype, options)
    opt = getattr(fusedopt, algo)(params, state_dtype=state_dtype, **options)
    for step in range(STEPS):
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        reference.step(grads)
        reference.check(params, opt)


def test_state_dtype_default_keeps_torch_optims_dtypes_and_float32_state_is_the_default_path():
    params = make_params(torch.float32)
    same = [p.detach().clone().requires_grad_() for p in params]
    explicit = fusedopt.AdamW(params, lr=1e-2, state_dtype=torch.float32)
    default = fusedopt.AdamW(same, lr=1e-2)
    for step in range(3):
        grads = make_grads(params, step)
        set_grads(params, grads)
        set_grads(same, grads)
        explicit.step()
        default.step()
    for a, b in zip(params, same):
        bits_equal(a.detach(), b.detach(), "param")
        assert default.state[b]["exp_avg"].dtype == torch.float32


@pytest.mark.parametrize("algo,options", [CONFIGS[0], CONFIGS[5]], ids=[CONFIG_IDS[0], CONFIG_IDS[5]])
def test_state_dtype_stores_fewer_bytes(algo, options):
    params = make_params(torch.float32)
    opt = getattr(fusedopt, algo)(params, state_dtype=torch.bfloat16, **options)
    set_grads(params, make_grads(params, 0))
    opt.step()
    for p in params:
        for key in moment_keys(opt, p):
            assert opt.state[p][key].dtype == torch.bfloat16 and opt.state[p][key].element_size() == 2


# ----------------------------------------------------------------------------- master weights

@pytest.mark.parametrize("shapes", [SHAPES, WHOLE_VECTOR_SHAPES], ids=["tails", "whole_vectors_vs_torch"])
@pytest.mark.parametrize("param_dtype", LOW, ids=dtype_id)
@pytest.mark.parametrize("algo,options", CONFIGS, ids=CONFIG_IDS)
def test_master_weights_follow_torch_optim_on_float32_params(algo, options, param_dtype, shapes):
    params = make_params(param_dtype, shapes=shapes)
    ref_params = [p.detach().float().clone().requires_grad_() for p in params]
    engine = torch_fp32_engine if shapes is WHOLE_VECTOR_SHAPES else fp32_engine
    reference = engine(algo, ref_params, options)
    opt = getattr(fusedopt, algo)(params, master_weights=True, **options)
    for step in range(STEPS):
        grads = make_grads(params, step)
        set_grads(params, grads)
        for r, g in zip(ref_params, grads):
            r.grad = g.float()
        opt.step()
        reference.step()
        for i, (p, r) in enumerate(zip(params, ref_params)):
            master = opt.state[p][MASTER_KEY]
            assert master.dtype == torch.float32 and master.shape == p.shape
            bits_equal(master, r.detach(), f"master {i}")
            bits_equal(p.detach(), r.detach().to(param_dtype), f"param {i}")
            for key in moment_keys(reference, r):
                bits_equal(opt.state[p][key], reference.state[r][key], f"state[{i}][{key!r}]")
    assert any(not torch.equal(opt.state[p][MASTER_KEY], p.float()) for p in params), \
        "the master never held more than the param: the comparison would be vacuous"


@pytest.mark.parametrize("state_dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
def test_master_weights_with_bf16_moments_round_the_moments_only(state_dtype):
    params = make_params(torch.bfloat16)
    reference = RoundedReference("AdamW", params, torch.float32, state_dtype, {"lr": 1e-2})
    opt = fusedopt.AdamW(params, lr=1e-2, master_weights=True, state_dtype=state_dtype)
    for step in range(STEPS):
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        reference.step(grads)
        for i, (p, r) in enumerate(zip(params, reference.params)):
            bits_equal(opt.state[p][MASTER_KEY], r.detach(), f"master {i}")
            bits_equal(p.detach(), r.detach().bfloat16(), f"param {i}")
            for key in ("exp_avg", "exp_avg_sq"):
                bits_equal(opt.state[p][key], reference.opt.state[r][key].to(state_dtype), f"state[{i}][{key!r}]")


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1, bias=False))

    def forward(self, x):
        return self.layers(x)


def test_master_weights_train_like_torch_optim_on_fp32_params_rounded_to_bf16_for_the_forward():
    """The issue's definition: torch.optim on fp32 params whose values are rounded to bf16
    for the forward pass (grads flow back through the rounding)."""
    fp32_model = TinyNet()  # whole vectors only, where torch's fused kernel is bitwise fusedopt's fp32
    with torch.no_grad():  # both start from the same (bf16) values
        for p in fp32_model.parameters():
            p.copy_(p.bfloat16().float())
    bf16_model = copy.deepcopy(fp32_model).bfloat16()
    reference = torch.optim.AdamW(fp32_model.parameters(), lr=1e-3, fused=True)
    opt = fusedopt.AdamW(bf16_model.parameters(), lr=1e-3, master_weights=True)
    generator = torch.Generator().manual_seed(0)
    for step in range(8):
        x = torch.randn(64, 16, generator=generator).bfloat16()
        y = x.float().sum(1, keepdim=True).sin()
        rounded = {name: p.bfloat16() for name, p in fp32_model.named_parameters()}
        ref_loss = (torch.func.functional_call(fp32_model, rounded, (x,)).float() - y).square().mean()
        loss = (bf16_model(x).float() - y).square().mean()
        assert torch.equal(loss, ref_loss), f"step {step}: loss {loss} != {ref_loss}"
        ref_loss.backward()
        loss.backward()
        reference.step()
        opt.step()
        reference.zero_grad()
        opt.zero_grad()
    for p, r in zip(bf16_model.parameters(), fp32_model.parameters()):
        bits_equal(opt.state[p][MASTER_KEY], r.detach(), "master")


def test_master_weights_follow_a_param_the_user_wrote():
    """The param is the truth: writing to it (a model load, an init) restarts the master
    from the written value, as writing to torch.optim's fp32 params would."""
    params = make_params(torch.bfloat16)
    ref_params = [p.detach().float().clone().requires_grad_() for p in params]
    reference = torch.optim.AdamW(ref_params, lr=1e-2, fused=True)
    opt = fusedopt.AdamW(params, lr=1e-2, master_weights=True)
    for step in range(4):
        grads = make_grads(params, step)
        set_grads(params, grads)
        for r, g in zip(ref_params, grads):
            r.grad = g.float()
        if step == 2:
            with torch.no_grad():
                params[1][:10] = 0.25           # some elements written
                ref_params[1][:10] = 0.25
                params[0].copy_(torch.ones_like(params[0]))  # a whole param written
                ref_params[0].copy_(torch.ones_like(ref_params[0]))
        opt.step()
        reference.step()
    for i, (p, r) in enumerate(zip(params, ref_params)):
        bits_equal(opt.state[p][MASTER_KEY], r.detach(), f"master {i}")


# ----------------------------------------------------------------------------- stochastic rounding

def bf16_neighbours(x):
    """The bf16 values just below and above |x| in magnitude (equal where x is one)."""
    bits = x.float().view(torch.int32)
    low = (bits & ~0xFFFF).view(torch.float32)
    high = ((bits & ~0xFFFF) + 0x10000).view(torch.float32)
    exact = (bits & 0xFFFF) == 0
    return low, torch.where(exact, low, high)


def sr_sgd_step(value, update, n, seed=0, lr=1.0):
    """n bf16 params at `value` after one SGD step of exact size `update` with stochastic rounding."""
    p = torch.full((n,), value, dtype=torch.float32).bfloat16().requires_grad_()
    opt = fusedopt.SGD([p], lr=lr, stochastic_rounding=True)
    p.grad = torch.full_like(p, -update)
    torch.manual_seed(seed)
    opt.step()
    return p.detach()


def test_stochastic_rounding_is_unbiased():
    """1 + 2**-10 lies an eighth of the way from 1 to the next bf16 value (1 + 2**-7):
    1/8 of the elements must round up; round-to-nearest would leave all at 1."""
    n = 200_000
    stored = sr_sgd_step(1.0, 2.0 ** -10, n).float()
    assert set(stored.unique().tolist()) == {1.0, 1.0 + 2.0 ** -7}
    up = (stored > 1).double().mean().item()
    sigma = (0.125 * 0.875 / n) ** 0.5
    assert abs(up - 0.125) < 5 * sigma, f"fraction rounded up {up}, expected 0.125 +- {sigma}"
    assert abs(stored.double().mean().item() - (1 + 2.0 ** -10)) < 5 * sigma * 2.0 ** -7


def test_stochastic_rounding_is_unbiased_over_many_values_and_signs():
    generator = torch.Generator().manual_seed(3)
    n = 500_000
    start = torch.randn(n, generator=generator).bfloat16()
    update = torch.randn(n, generator=generator).bfloat16() * 1e-3
    exact = fusedopt.SGD([fp32 := start.float().requires_grad_()], lr=1.0)
    fp32.grad = update.float()
    exact.step()
    p = start.clone().requires_grad_()
    opt = fusedopt.SGD([p], lr=1.0, stochastic_rounding=True)
    p.grad = update.clone()
    torch.manual_seed(0)
    opt.step()
    low, high = bf16_neighbours(fp32.detach())
    stored = p.detach().float()
    assert ((stored == low) | (stored == high)).all(), "a stored value is not a neighbour of the fp32 result"
    ulp = (high - low).double()
    moved = ulp != 0  # (signed: toward larger magnitude)
    error = ((stored - fp32.detach()).double()[moved] / ulp[moved])  # in ulps, in [-1, 1]
    assert abs(error.mean().item()) < 5 * 0.5 / moved.sum().item() ** 0.5, f"mean error {error.mean()} ulp"
    # Calibrated, not just unbiased on average (rounding to nearest is that too): values a
    # fraction f of the way up round up with probability f, in every tenth of the ulp.
    fraction = (fp32.detach() - low).double()[moved] / ulp[moved]
    up = (stored.double() == high.double())[moved]
    for tenth in range(10):
        in_bin = (fraction >= tenth / 10) & (fraction < (tenth + 1) / 10)
        expected, n = fraction[in_bin].mean().item(), int(in_bin.sum())
        rate = up[in_bin].double().mean().item()
        assert abs(rate - expected) < 5 * (expected * (1 - expected) / n) ** 0.5 + 1e-3, (
            f"values {tenth / 10:.1f}-{(tenth + 1) / 10:.1f} ulp above the lower neighbour round up "
            f"{rate:.3f} of the time, expected {expected:.3f}")


def test_stochastic_rounding_is_reproducible_under_manual_seed_and_differs_across_seeds_and_steps():
    first = sr_sgd_step(1.0, 2.0 ** -10, 10_000, seed=7)
    again = sr_sgd_step(1.0, 2.0 ** -10, 10_000, seed=7)
    other = sr_sgd_step(1.0, 2.0 ** -10, 10_000, seed=8)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Two steps under one seed draw two keys: the second step's roundings are new.
    p = torch.ones(10_000, dtype=torch.bfloat16, requires_grad=True)
    opt = fusedopt.SGD([p], lr=1.0, stochastic_rounding=True)
    torch.manual_seed(7)
    ups = []
    for _ in range(2):
        with torch.no_grad():
            p.fill_(1.0)
        p.grad = torch.full_like(p, -2.0 ** -10)
        opt.step()
        ups.append(p.detach() > 1)
    assert not torch.equal(ups[0], ups[1])


@pytest.mark.parametrize("algo,options", [CONFIGS[0], CONFIGS[3], CONFIGS[6]],
                         ids=[CONFIG_IDS[0], CONFIG_IDS[3], CONFIG_IDS[6]])
def test_stochastic_rounding_stores_params_and_bf16_state_at_a_neighbour_of_the_fp32_result(algo, options):
    """One step from the same bf16 values: each stored param and state value is one of the
    two bf16 neighbours of the fp32 result (the fp32 math of the reference)."""
    params = make_params(torch.bfloat16)
    opt = getattr(fusedopt, algo)(params, stochastic_rounding=True, **options)
    reference = RoundedReference(algo, params, torch.float32, torch.float32, options)
    for step in range(3):
        grads = make_grads(params, step)
        set_grads(params, grads)
        # Start the reference from fusedopt's current (bf16) values.
        with torch.no_grad():
            for r, p in zip(reference.params, params):
                r.copy_(p.float())
                for key in moment_keys(opt, p):
                    reference.opt.state[r][key].copy_(opt.state[p][key].float())
        opt.step()
        reference.step(grads)
        for i, (p, r) in enumerate(zip(params, reference.params)):
            pairs = [(p.detach(), r.detach(), f"param {i}")]
            pairs += [(opt.state[p][k], reference.opt.state[r][k], f"state[{i}][{k!r}]") for k in moment_keys(opt, p)]
            for stored, exact, what in pairs:
                assert stored.dtype == torch.bfloat16, what
                low, high = bf16_neighbours(exact)
                ok = (stored.float() == low) | (stored.float() == high)
                assert ok.all(), f"{what}: {stored.float()[~ok][:3].tolist()} not next to {exact[~ok][:3].tolist()}"


def test_stochastic_rounding_keeps_nan_and_inf():
    p = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0] * 8, dtype=torch.bfloat16,
                     requires_grad=True)
    opt = fusedopt.SGD([p], lr=1.0, stochastic_rounding=True)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert p[0::4].isnan().all() and (p[1::4] == float("inf")).all() and (p[2::4] == -float("inf")).all()
    assert (p[3::4] == 1).all()


def test_stochastic_rounding_random_bits_are_counter_based():
    """The bits depend on (seed, element index) only: the op given the same seed twice
    rounds alike, whatever the thread split (one big row vs. rows of other sizes)."""
    n = 70_000
    results = []
    for rows in ([n], [1000, n - 1000], [n - 7, 7]):
        param = torch.ones(n, dtype=torch.bfloat16)
        step = torch.zeros(len(rows))
        offsets = [0]
        for r in rows[:-1]:
            offsets.append(offsets[-1] + r)
        segments = torch.tensor([[o, r, i] for i, (o, r) in enumerate(zip(offsets, rows))], dtype=torch.int64)
        grads = [torch.full((r,), -2.0 ** -10, dtype=torch.bfloat16) for r in rows]
        fusedopt.ops.sgd_step_([param], None, step, grads, segments, 1.0, None, 0.0, 0.0, 0.0, False, False,
                               None, None, None, False, None, torch.tensor([12345], dtype=torch.int64))
        results.append(param)
    assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])


# ----------------------------------------------------------------------------- rounding, bit for bit

# The kernels round through several code paths (at::vec's conversion, the AVX-512 word
# permutations, vcvtne2ps2bf16 with its integer fallback for NaN and denormals, AVX2's
# stochastic store); these tests pin every one of them, bit for bit, to references
# computed here: torch's own conversion for rounding to nearest, and the random bits of
# optimizer_math.h ([note: random bits]) recomputed in int64 for stochastic rounding.
# test_every_cpu_kernel_variant_rounds_bit_exact runs them under each ISA variant.

U32 = 0xFFFFFFFF
SPECIAL_FLOAT_BITS = [
    0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F80FFFF,  # ties to even (down, up), just below/above
    0x7F7F8000, 0x7F7F7FFF, 0xFF7FFFFF,              # rounds up to inf, stays finite, to -inf
    0x7F800000, 0xFF800000, 0x00000000, 0x80000000,  # infinities, zeros
    0x00000001, 0x00008000, 0x00018000, 0x007FFFFF,  # denormals: tiny, ties, to the smallest normal
    0x80012345, 0x00400000, 0x00800000,               # a negative denormal, another, smallest normal
    0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF, 0xFF800001,  # NaNs: quiet, signalling, payloads
]


def float_from_bits(bits):
    return torch.tensor([b - (1 << 32) if b >= 1 << 31 else b for b in bits], dtype=torch.int32).view(torch.float32)


def torch_bf16_bits(x):
    """torch's own conversion of float32 `x` to bfloat16 (its vectorized path for every
    element, as the kernels take: padded to whole vectors), as int32 bit patterns."""
    n = x.numel()
    padded = torch.cat([x, torch.zeros((-n) % 64, dtype=torch.float32)])
    return padded.to(torch.bfloat16).view(torch.int16).to(torch.int32)[:n] & 0xFFFF


def nan_bf16_bits():
    """How torch's vectorized conversion stores a NaN on this ISA (0xffff on AVX2/AVX-512)."""
    return int(torch_bf16_bits(torch.full((64,), float("nan")))[0])


def mix_bits(x):
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & U32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & U32
    return x ^ (x >> 16)


def rounding_key(seed):
    bits = seed & 0xFFFFFFFFFFFFFFFF
    return (bits & U32) ^ int(mix_bits(torch.tensor(bits >> 32)))


def stochastic_bf16_bits(x, first_index, seed, slot):
    """optimizer_math.h's stochastic rounding of float32 `x` (elements first_index, ...
    of the flat buffers) as value `slot` of its element, as int32 bit patterns."""
    index = torch.arange(first_index, first_index + x.numel(), dtype=torch.int64)
    element_hash = mix_bits((index * 0x9E3779B1 + rounding_key(seed)) & U32)
    pair_hash = element_hash if slot < 2 else (element_hash * 0x2C1B3C6D) & U32
    random16 = pair_hash >> 16 if slot & 1 else pair_hash & 0xFFFF
    bits = x.view(torch.int32).to(torch.int64) & U32
    rounded = ((bits + random16) & U32) >> 16
    return torch.where(x.isnan(), nan_bf16_bits(), rounded).to(torch.int32)


def bf16_bits(t):
    return t.reshape(-1).view(torch.int16).to(torch.int32) & 0xFFFF


def assert_bits(actual, expected, what):
    differ = actual != expected
    assert not differ.any(), (f"{what}: {int(differ.sum())} of {actual.numel()} differ, e.g. at "
                              f"{differ.nonzero()[:3].flatten().tolist()}: {[hex(v) for v in actual[differ][:3].tolist()]}"
                              f" != {[hex(v) for v in expected[differ][:3].tolist()]}")


def grads_with_special_values(n, generator):
    """Random normals, with every special value in a whole block of 32 and in the tail;
    blocks 0 and 2 hold none (the fast path)."""
    g = torch.randn(n, generator=generator)
    special = float_from_bits(SPECIAL_FLOAT_BITS)
    g[32:32 + special.numel()] = special
    g[n - special.numel():] = special
    return g


def test_bit_exact_round_to_nearest_matches_torch_on_ties_overflow_denormals_and_nan():
    """SGD's first step stores the grad itself as the bf16 momentum buffer: its bits must
    be torch's conversion of the grad, including denormals (which vcvtne2ps2bf16 would
    flush) and NaN (whose payload it would keep)."""
    n = 32 * 4 + len(SPECIAL_FLOAT_BITS) + 5
    g = grads_with_special_values(n, torch.Generator().manual_seed(0))
    bits = g.view(torch.int32).to(torch.int64) & U32
    by_formula = ((bits + 0x7FFF + ((bits >> 16) & 1)) & U32) >> 16
    expected = torch_bf16_bits(g)
    ordered = ~g.isnan()
    assert torch.equal(expected[ordered], by_formula[ordered].to(torch.int32)), "the oracle is not RNE"
    p = torch.zeros(n, requires_grad=True)
    opt = fusedopt.SGD([p], lr=0.1, momentum=0.9, state_dtype=torch.bfloat16)
    p.grad = g.clone()
    opt.step()
    assert_bits(bf16_bits(opt.state[p]["momentum_buffer"]), expected, "momentum_buffer")


def flat_rows(sizes):
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    return torch.tensor([[o, r, i] for i, (o, r) in enumerate(zip(offsets, sizes))], dtype=torch.int64)


@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_bit_exact_stochastic_rounding_of_params_and_moments_is_the_counter_hash(amsgrad):
    """One AdamW step of bf16 params and bf16 moments with a given seed: each stored value
    is the fp32 result (the same op on float32 copies) rounded with its own 16 bits of the
    hash of (seed, flat index), slot 0 the param, 1 exp_avg, 2 exp_avg_sq, 3 max_exp_avg_sq.
    Two rows (the second starts mid-block) with tails; values include denormal moments,
    inf and NaN."""
    generator = torch.Generator().manual_seed(1)
    sizes = [70, 45]
    n = sum(sizes)
    params = (torch.randn(n, generator=generator) * 2).bfloat16()
    grads = torch.randn(n, generator=generator).bfloat16()
    grads[3], grads[80] = 1e-20, -3e-39   # second moments and first moments go denormal
    grads[5], params[90], params[100] = float("inf"), float("nan"), float("inf")
    states = [torch.randn(n, generator=generator).bfloat16() * 1e-2,
              torch.rand(n, generator=generator).bfloat16() * 1e-3]
    states[0][80] = states[1][3] = 0.0
    states.append(states[1] * 1.5)
    segments = flat_rows(sizes)
    seed = 0x5DEECE66D1234567

    def step(dtype, rounding_seed):
        rows = [params[o:o + r].to(dtype).clone() for o, r, _ in segments.tolist()]
        row_grads = [grads[o:o + r].to(dtype).clone() for o, r, _ in segments.tolist()]
        m, v, vmax = (s.to(dtype).clone() for s in states)
        fusedopt.ops.adam_step_(rows, m, v, vmax if amsgrad else None, torch.full((2,), 4.0), row_grads, segments,
                                1e-2, None, 0.9, 0.999, 0.1, 1e-8, True, False, None, None, None, False, None,
                                rounding_seed)
        return [torch.cat(rows), m, v] + ([vmax] if amsgrad else [])

    exact = step(torch.float32, None)
    stored = step(torch.bfloat16, torch.tensor([seed], dtype=torch.int64))
    tiny = torch.finfo(torch.float32).tiny
    assert 0 < exact[1][80].abs() < tiny and 0 < exact[2][3] < tiny, "no denormal moment was stored"
    for slot, (value, fp32) in enumerate(zip(stored, exact)):
        assert_bits(bf16_bits(value), stochastic_bf16_bits(fp32, 0, seed, slot), f"slot {slot}")


def test_bit_exact_stochastic_rounding_of_sgd_params_and_momentum():
    generator = torch.Generator().manual_seed(2)
    n = 32 * 3 + 9
    params = torch.randn(n, generator=generator).bfloat16()
    grads = torch.randn(n, generator=generator).bfloat16()
    params[40], params[n - 2] = float("nan"), float("-inf")
    buf = torch.randn(n, generator=generator).bfloat16()
    segments = flat_rows([n])
    seed = -12345  # a negative int64 seed: its bits, as the kernels read them

    def step(dtype, rounding_seed):
        p, g, b = params.to(dtype).clone(), grads.to(dtype).clone(), buf.to(dtype).clone()
        fusedopt.ops.sgd_step_([p], b, torch.ones(1), [g], segments, 0.37, None, 0.9, 0.1, 0.01, True, False,
                               None, None, None, False, None, rounding_seed)
        return p, b

    exact = step(torch.float32, None)
    stored = step(torch.bfloat16, torch.tensor([seed], dtype=torch.int64))
    for slot, (value, fp32) in enumerate(zip(stored, exact)):
        assert_bits(bf16_bits(value), stochastic_bf16_bits(fp32, 0, seed, slot), f"slot {slot}")


def test_bit_exact_kernel_variant_is_the_one_asked_for():
    wanted = os.environ.get("FUSEDOPT_CPU_KERNELS")
    if not wanted:
        pytest.skip("runs inside test_every_cpu_kernel_variant_rounds_bit_exact")
    assert fusedopt.ops.CPU_ISA == wanted


def cpu_kernel_variants():
    """Every CPU kernel module this CPU can run, with the ATen capability it pairs with."""
    variants = []
    capability = torch.backends.cpu.get_cpu_capability()
    for isa in fusedopt.ops._ISA_PREFERENCE.get(capability, ("default",)):
        if fusedopt.ops._cpu_runs(isa) and importlib.util.find_spec(f"fusedopt._cpu_{isa}") is not None:
            variants.append(isa)
    return variants


@pytest.mark.parametrize("isa", ["avx512_bf16", "avx512", "avx2", "default"])
def test_every_cpu_kernel_variant_rounds_bit_exact(isa):
    """The tests above, in a fresh process per ISA variant (torch's own conversion, the
    oracle, at the matching capability): the variants round alike, NaN as torch's
    vectorized conversion stores it on that ISA."""
    if os.environ.get("FUSEDOPT_CPU_KERNELS"):
        pytest.skip("already inside a variant's run")
    if isa not in cpu_kernel_variants():
        pytest.skip(f"this CPU or build has no {isa} kernels")
    if isa == fusedopt.ops.CPU_ISA:
        pytest.skip(f"{isa} is this process's: the tests above ran on it")
    env = dict(os.environ, FUSEDOPT_CPU_KERNELS=isa)
    if isa in ("avx2", "default"):
        env["ATEN_CPU_CAPABILITY"] = isa
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "bit_exact"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "5 passed" in run.stdout, run.stdout[-500:]  # the four rounding tests and the variant check


# ----------------------------------------------------------------------------- checkpoints

MODES = {
    "bf16_state_fp32_params": (torch.float32, "Adam", {"lr": 1e-2, "state_dtype": torch.bfloat16}),
    "master_weights_bf16": (torch.bfloat16, "AdamW", {"lr": 1e-2, "master_weights": True}),
    "master_weights_fp16_bf16_state": (torch.float16, "SGD",
                                       {"lr": 0.05, "momentum": 0.9, "master_weights": True,
                                        "state_dtype": torch.bfloat16}),
    "stochastic_rounding_bf16": (torch.bfloat16, "AdamW", {"lr": 1e-2, "stochastic_rounding": True}),
    "fp16_params_bf16_state": (torch.float16, "AdamW", {"lr": 1e-2, "state_dtype": torch.bfloat16}),
}


def run_steps(opt, params, steps, first=0):
    for step in range(first, first + steps):
        set_grads(params, make_grads(params, step))
        torch.manual_seed(100 + step)  # stochastic rounding draws from torch's generator
        opt.step()


def saved_and_loaded(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("mode", MODES)
def test_checkpoint_resumes_exactly_into_an_optimizer_built_with_defaults(mode):
    dtype, algo, options = MODES[mode]
    params = make_params(dtype)
    opt = getattr(fusedopt, algo)(params, **options)
    run_steps(opt, params, 3)
    checkpoint = saved_and_loaded(opt.state_dict())
    resumed_params = [p.detach().clone().requires_grad_() for p in params]
    resumed = getattr(fusedopt, algo)(resumed_params, lr=options["lr"])  # options come from the checkpoint
    resumed.load_state_dict(checkpoint)
    for key in ("state_dtype", "master_weights", "stochastic_rounding"):  # held where not the default
        assert resumed.param_groups[0].get(key) == opt.param_groups[0].get(key)
    for p, q in zip(params, resumed_params):
        for key, value in opt.state[p].items():
            assert resumed.state[q][key].dtype == value.dtype, f"{key} came back as {resumed.state[q][key].dtype}"
            bits_equal(resumed.state[q][key], value, key)
    run_steps(opt, params, 3, first=3)
    run_steps(resumed, resumed_params, 3, first=3)
    for i, (p, q) in enumerate(zip(params, resumed_params)):
        bits_equal(q.detach(), p.detach(), f"param {i}")
        for key, value in opt.state[p].items():
            bits_equal(resumed.state[q][key], value, f"state[{i}][{key!r}]")


@pytest.mark.parametrize("mode", MODES)
def test_torch_optim_loads_fusedopts_checkpoint_casting_state_and_ignoring_the_master(mode):
    dtype, algo, options = MODES[mode]
    params = make_params(dtype)
    opt = getattr(fusedopt, algo)(params, **options)
    run_steps(opt, params, 3)
    checkpoint = saved_and_loaded(opt.state_dict())
    torch_params = [p.detach().clone().requires_grad_() for p in params]
    torch_opt = getattr(torch.optim, algo)(torch_params, lr=options["lr"], foreach=False)
    torch_opt.load_state_dict(checkpoint)
    for p, q in zip(params, torch_params):
        for key in moment_keys(opt, p):  # cast to the param's dtype, as torch.optim does
            bits_equal(torch_opt.state[q][key], opt.state[p][key].to(q.dtype), key)
    run_steps(torch_opt, torch_params, 2, first=3)  # and trains on
    assert all(torch.isfinite(p).all() for p in torch_params)


def test_torch_optim_checkpoint_loads_into_master_weights_and_bf16_state():
    """A run started with torch.optim continues in fusedopt with fewer bytes: the moments
    are rounded into bf16 and the master copy starts from the param."""
    params = make_params(torch.bfloat16)
    torch_opt = torch.optim.AdamW(params, lr=1e-2, foreach=False)
    run_steps(torch_opt, params, 2)
    fused_params = [p.detach().clone().requires_grad_() for p in params]
    opt = fusedopt.AdamW(fused_params, lr=1e-2, master_weights=True, state_dtype=torch.bfloat16)
    opt.load_state_dict(saved_and_loaded(torch_opt.state_dict()))
    assert opt.param_groups[0]["master_weights"] and opt.param_groups[0]["state_dtype"] == torch.bfloat16
    for p, q in zip(params, fused_params):
        bits_equal(opt.state[q][MASTER_KEY], q.detach().float(), "master from the param")
        bits_equal(opt.state[q]["exp_avg"], torch_opt.state[p]["exp_avg"].bfloat16(), "exp_avg")
    run_steps(opt, fused_params, 1, first=2)
    assert opt.state[fused_params[0]]["exp_avg"].dtype == torch.bfloat16


# A buffer of several huge pages is made another way (flat_buffer.empty: memory of its own
# on huge pages, [note: huge pages]); its conversion too.
@pytest.mark.parametrize("shapes", [SHAPES, [(1100, 1024), *SHAPES]], ids=["small", "huge_pages"])
def test_changing_state_dtype_in_param_groups_converts_the_state(shapes):
    params = make_params(torch.float32, shapes=shapes)
    opt = fusedopt.Adam(params, lr=1e-2)
    reference = RoundedReference("Adam", params, torch.float32, torch.float32, {"lr": 1e-2})
    for step in range(4):
        if step == 2:
            opt.param_groups[0]["state_dtype"] = torch.bfloat16
            reference.switch_state_dtype(torch.bfloat16)
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        reference.step(grads)
    reference.check(params, opt)


@pytest.mark.parametrize("edit", ["move_into_bf16_group", "switch_after_move"])
@pytest.mark.parametrize("algo,options", [CONFIGS[0], CONFIGS[5]], ids=[CONFIG_IDS[0], CONFIG_IDS[5]])
def test_state_dtype_of_one_group_leaves_a_buffer_shared_with_another_group_as_it_was(algo, options, edit):
    # At step 2 params[1] moves from the first group to the second and keeps its row in
    # the first group's flat buffer. "move_into_bf16_group": the second group keeps its
    # state in bfloat16, so params[1]'s state is rounded once; "switch_after_move": both
    # groups are float32 until the first switches to bfloat16 at step 4. Either way the
    # state of the group that did not change is never rounded (converting the shared
    # buffer rounded it, and flipped it between the two dtypes every step).
    params = make_params(torch.float32)
    second = torch.bfloat16 if edit == "move_into_bf16_group" else torch.float32
    opt = getattr(fusedopt, algo)([{"params": params[:3]}, {"params": params[3:], "state_dtype": second}],
                                  **options)
    refs = [RoundedReference(algo, [p], torch.float32, torch.float32 if i < 3 else second, options)
            for i, p in enumerate(params)]
    for step in range(6):
        if step == 2:
            opt.param_groups[0]["params"] = [params[0], params[2]]
            opt.param_groups[1]["params"].append(params[1])
            refs[1].switch_state_dtype(second)
        if step == 4 and edit == "switch_after_move":
            opt.param_groups[0]["state_dtype"] = torch.bfloat16
            refs[0].switch_state_dtype(torch.bfloat16)
            refs[2].switch_state_dtype(torch.bfloat16)
        grads = make_grads(params, step)
        set_grads(params, grads)
        opt.step()
        for i, (ref, grad) in enumerate(zip(refs, grads)):
            ref.step([grad])
            ref.check([params[i]], opt)


def test_state_set_through_optimizer_state_is_adopted_and_rounded():
    params = make_params(torch.float32)
    opt = fusedopt.Adam(params, lr=1e-2, state_dtype=torch.bfloat16)
    reference = RoundedReference("Adam", params, torch.float32, torch.bfloat16, {"lr": 1e-2})
    grads = make_grads(params, 0)
    set_grads(params, grads)
    opt.step()
    reference.step(grads)
    new = torch.full_like(params[0], 0.123456)  # an fp32 tensor put into opt.state
    opt.state[params[0]]["exp_avg"] = new
    reference.opt.state[reference.params[0]]["exp_avg"].copy_(new.bfloat16().float())
    grads = make_grads(params, 1)
    set_grads(params, grads)
    opt.step()
    reference.step(grads)
    reference.check(params, opt)


# ----------------------------------------------------------------------------- GradScaler, clip, zero_grad

@pytest.mark.parametrize("mode", MODES)
def test_grad_scaler_skip_leaves_params_state_and_master_unchanged(mode):
    dtype, algo, options = MODES[mode]
    params = make_params(dtype)
    opt = getattr(fusedopt, algo)(params, **options)
    run_steps(opt, params, 2)
    before = ([p.detach().clone() for p in params],
              [{k: v.clone() for k, v in opt.state[p].items()} for p in params])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    scaler.scale(torch.zeros((), requires_grad=True))  # initialises the scale
    set_grads(params, make_grads(params, 2))
    with torch.no_grad():
        params[1].grad[3] = float("inf")
    scaler.step(opt)
    for i, p in enumerate(params):
        bits_equal(p.detach(), before[0][i], f"param {i}")
        for key, value in before[1][i].items():
            bits_equal(opt.state[p][key], value, f"state[{i}][{key!r}]")


@pytest.mark.parametrize("mode", ["bf16_state_fp32_params", "master_weights_bf16"])
def test_grad_scale_unscales_in_the_kernel_exactly(mode):
    """Grads scaled by a power of two and unscaled by the step give the unscaled run's bits."""
    dtype, algo, options = MODES[mode]
    params = make_params(dtype)
    scaled_params = [p.detach().clone().requires_grad_() for p in params]
    opt = getattr(fusedopt, algo)(params, **options)
    scaled_opt = getattr(fusedopt, algo)(scaled_params, **options)
    for step in range(3):
        grads = make_grads(params, step)
        set_grads(params, grads)
        set_grads(scaled_params, [g * 2.0 ** 12 for g in grads])
        opt.step()
        scaled_opt.grad_scale = torch.tensor(2.0 ** 12)
        scaled_opt.found_inf = torch.tensor(0.0)
        scaled_opt.step()
    for p, q in zip(params, scaled_params):
        bits_equal(q.detach(), p.detach(), "param")
        for key, value in opt.state[p].items():
            bits_equal(scaled_opt.state[q][key], value, key)


@pytest.mark.parametrize("mode", ["bf16_state_fp32_params", "master_weights_bf16", "stochastic_rounding_bf16"])
def test_fused_clip_and_zero_grad_in_step_equal_clipping_the_grads_first(mode):
    """clip_grad_norm_ (applied inside the step) and step(zero_grad=True) give what a step
    on grads multiplied by the clip coefficient in float32 gives, and zero the grads."""
    dtype, algo, options = MODES[mode]
    params = make_params(dtype)
    ref_params = [p.detach().float().clone().requires_grad_() for p in params]
    fused = getattr(fusedopt, algo)(params, **options)
    # The reference gets the clipped grads in float32, so it runs on float32 copies with
    # the same storage rules: for master weights that is torch.optim on fp32 params.
    if options.get("master_weights"):
        reference = fp32_engine(algo, ref_params, {k: v for k, v in options.items() if k != "master_weights"})
    else:
        reference = getattr(fusedopt, algo)(ref_params, **{**options, "stochastic_rounding": False})
    for step in range(3):
        if options.get("stochastic_rounding") and step > 0:  # the reference starts from our values
            with torch.no_grad():
                for p, r in zip(params, ref_params):
                    r.copy_(p.float())
                    for key in moment_keys(fused, p):
                        reference.state[r][key].copy_(fused.state[p][key].float())
        grads = make_grads(params, step)
        set_grads(params, grads)
        total = fused.clip_grad_norm_(0.5)
        coefficient = torch.clamp(0.5 / (total.float() + 1e-6), max=1.0)
        assert coefficient < 1, "the clip never clipped: the comparison would be vacuous"
        torch.manual_seed(step)
        fused.step(zero_grad=True)
        assert all(torch.count_nonzero(p.grad) == 0 for p in params), "grads not zeroed by the step"
        for r, g in zip(ref_params, grads):
            r.grad = g.float() * coefficient
        reference.step()
        if options.get("stochastic_rounding"):  # each stored value neighbours the fp32 result
            for p, r in zip(params, ref_params):
                low, high = bf16_neighbours(r.detach())
                assert ((p.float() == low) | (p.float() == high)).all()
            continue
        for p, r in zip(params, ref_params):
            expected = reference.state[r][MASTER_KEY] if MASTER_KEY in reference.state[r] else r.detach()
            if options.get("master_weights"):
                bits_equal(fused.state[p][MASTER_KEY], r.detach(), "master")
            else:
                bits_equal(p.detach(), expected.to(dtype), "param")


# ----------------------------------------------------------------------------- errors

@pytest.mark.parametrize("algo", ["SGD", "Adam", "AdamW"])
@pytest.mark.parametrize("dtype,options,message", [
    (torch.float32, {"state_dtype": torch.int8}, "Invalid state_dtype: torch.int8"),
    (torch.float32, {"state_dtype": torch.float64}, "Invalid state_dtype: torch.float64"),
    (torch.float64, {"state_dtype": torch.bfloat16}, "needs float32, bfloat16 or float16 params"),
    (torch.float32, {"master_weights": True}, "master_weights=True keeps a float32 copy of bfloat16 or float16"),
    (torch.float32, {"stochastic_rounding": True}, "stochastic_rounding=True rounds bfloat16 params"),
    (torch.float16, {"stochastic_rounding": True}, "stochastic_rounding=True rounds bfloat16 params"),
    (torch.bfloat16, {"stochastic_rounding": True, "master_weights": True}, "exclude each other"),
    (torch.bfloat16, {"stochastic_rounding": True, "state_dtype": torch.float16}, "rounds bfloat16 values"),
], ids=["int8_state", "float64_state", "float64_params", "master_fp32_params", "sr_fp32_params",
        "sr_fp16_params", "sr_and_master", "sr_fp16_state"])
def test_bad_low_precision_options_raise_a_clear_error_at_construction(algo, dtype, options, message):
    params = make_params(dtype)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        getattr(fusedopt, algo)(params, lr=0.01, **options)


def test_a_bad_param_group_is_refused_and_not_added():
    opt = fusedopt.AdamW(make_params(torch.bfloat16), lr=1e-2, master_weights=True)
    with pytest.raises(ValueError, match="master_weights=True"):
        opt.add_param_group({"params": [torch.zeros(3, requires_grad=True)]})
    assert len(opt.param_groups) == 1


def test_options_are_param_group_hyperparameters():
    params = make_params(torch.bfloat16)
    opt = fusedopt.AdamW([{"params": params[:2], "master_weights": True},
                          {"params": params[2:], "stochastic_rounding": True}], lr=1e-2,
                         state_dtype=torch.bfloat16)
    assert opt.defaults["state_dtype"] == torch.bfloat16 and not opt.defaults["master_weights"]
    run_steps(opt, params, 2)
    assert set(opt.state[params[0]]) == {"step", "exp_avg", "exp_avg_sq", MASTER_KEY}
    assert set(opt.state[params[2]]) == {"step", "exp_avg", "exp_avg_sq"}
    assert opt.state[params[0]]["exp_avg"].dtype == torch.bfloat16
