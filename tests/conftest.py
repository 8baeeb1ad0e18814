"""Shared helpers: run torch.optim (the oracle) and fusedopt side by side and compare.

Every parity test builds clones of one parameter set, hands one copy to torch.optim
(foreach=False, the single-tensor reference implementation) and one to fusedopt, feeds both
identical grads and compares params, every state tensor and the param_groups.

Tolerances (why they are what they are):
* float64: both compute in double; only the order of roundings differs -> 1e-12.
* float32: both compute in float; a different association/FMA of the same formula moves a
  result by a few float ulps per step -> rtol=1e-5, atol=1e-6 over a handful of steps.
* float16 / bfloat16: torch.optim's default implementation does the math *in* the low
  dtype (fp16 Adam even divides by eps=1e-8 rounded to 0 and produces inf), so it is no
  oracle for a fused kernel. fusedopt's contract is torch's fused semantics: load each
  element, compute in float32 (opmath), store once. The oracle for that is torch.optim run
  on float32 copies whose params and state are rounded back to the low dtype after every
  step (on this torch this is bit-identical to torch.optim's own fused=True kernels). A
  different float rounding order can flip a final rounding by one low-precision ulp, so we
  require almost all elements (>= 95%, or all but 2) to be bitwise equal and every element
  within 2 ulps (relative to the element, or to the tensor's largest magnitude for values
  that pass near zero).
"""
import copy

import pytest
import torch
from torch import nn

CUDA_AVAILABLE = torch.cuda.is_available()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(
        not CUDA_AVAILABLE, reason="no CUDA device on this machine")),
]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LOW_PRECISION = (torch.float16, torch.bfloat16)
ALGOS = ("SGD", "Adam", "AdamW")

# Learning rates big enough that a step visibly moves fp16/bf16 params near 1.
DEFAULT_LR = {"SGD": 0.05, "Adam": 1e-2, "AdamW": 1e-2}


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def dtype_id(dtype):
    return str(dtype).replace("torch.", "")


def tolerances(dtype):
    dtype = {torch.complex64: torch.float32, torch.complex128: torch.float64}.get(dtype, dtype)
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    if dtype == torch.float32:
        return dict(rtol=1e-5, atol=1e-6)
    eps = torch.finfo(dtype).eps
    return dict(rtol=2 * eps, atol=2 * eps)


# ----------------------------------------------------------------------------- tensors

def clone_strided(t, dtype=None):
    """A copy of `t` with the same shape *and strides* (torch.clone may re-layout)."""
    out = torch.empty_strided(t.size(), t.stride(), dtype=dtype or t.dtype, device=t.device)
    with torch.no_grad():
        out.copy_(t)
    return out


def reference_dtype(dtype):
    return torch.float32 if dtype in LOW_PRECISION else dtype


def clone_params(params, for_reference=False):
    """Fresh leaf Parameters equal to `params` (same strides). for_reference upcasts fp16/bf16
    to float32: the oracle for a low-precision param runs in float32 (see module doc)."""
    out = []
    for p in params:
        dtype = reference_dtype(p.dtype) if for_reference else p.dtype
        out.append(nn.Parameter(clone_strided(p.detach(), dtype), requires_grad=p.requires_grad))
    return out


def make_params(shapes, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen).to(device=device, dtype=dtype))
            for s in shapes]


def random_grads(params, seed):
    """One grad per param (same shape, dtype, device; contiguous), deterministic in seed."""
    gen = torch.Generator().manual_seed(1000 + seed)
    return [torch.randn(p.shape, generator=gen).to(device=p.device, dtype=p.dtype)
            for p in params]


def set_grads(params, grads):
    """Give each param its own copy of its grad (same strides as the given grad); None clears."""
    for p, g in zip(params, grads):
        p.grad = None if g is None else clone_strided(g, p.dtype)


def snapshot(params):
    return [clone_strided(p.detach()) for p in params]


# ----------------------------------------------------------------------------- comparing

def assert_tensor_matches(actual, expected, what):
    """`expected` is torch.optim's value; for a low-precision `actual` it may be the float32
    oracle (already rounded to the low dtype every step)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.device == expected.device, f"{what}: device {actual.device} != {expected.device}"
    if actual.dtype in LOW_PRECISION:
        exp = expected.detach().to(actual.dtype).float().cpu()
        act = actual.detach().float().cpu()
        n = act.numel()
        if n == 0:
            return
        differing = int((act != exp).sum())
        assert differing <= max(2, n // 20), (
            f"{what}: {differing}/{n} elements differ from torch.optim's float32-opmath "
            f"result (max abs diff {(act - exp).abs().max().item():.3g})")
        eps = torch.finfo(actual.dtype).eps
        scale = max(exp.abs().max().item(), 1e-30)
        torch.testing.assert_close(act, exp, rtol=2 * eps, atol=2 * eps * scale,
                                   msg=lambda m: f"{what}: {m}")
    else:
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
        torch.testing.assert_close(actual.detach(), expected.detach(), **tolerances(actual.dtype),
                                   msg=lambda m: f"{what}: {m}")


def assert_state_matches(ref_state, fused_state, fused_param, what):
    """Same keys as torch; `step` exactly equal (value, dtype, shape); other tensors close and
    in the param's dtype (torch keeps exp_avg & co. in the param's dtype)."""
    assert set(fused_state) == set(ref_state), (
        f"{what}: state keys {sorted(fused_state)} != torch's {sorted(ref_state)}")
    for key, ref in ref_state.items():
        got = fused_state[key]
        if not torch.is_tensor(ref):
            assert got == ref, f"{what}[{key!r}]: {got!r} != {ref!r}"
            continue
        assert torch.is_tensor(got), f"{what}[{key!r}] is {type(got).__name__}, not a tensor"
        if key == "step":
            assert got.dtype == ref.dtype, f"{what}['step'] dtype {got.dtype} != {ref.dtype}"
            assert got.shape == ref.shape, f"{what}['step'] shape {got.shape} != {ref.shape}"
            assert float(got) == float(ref), f"{what}['step'] {float(got)} != {float(ref)}"
        else:
            assert got.dtype == fused_param.dtype, (
                f"{what}[{key!r}] dtype {got.dtype}, param is {fused_param.dtype}")
            assert_tensor_matches(got, ref.to(got.device), f"{what}[{key!r}]")


def _same_value(a, b):
    if torch.is_tensor(a) or torch.is_tensor(b):
        return (torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape
                and torch.equal(a.detach().cpu().to(torch.float64),
                                b.detach().cpu().to(torch.float64)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(_same_value(x, y) for x, y in zip(a, b)))
    return type(a) is type(b) and a == b


def torch_keys(group) -> set:
    """A fusedopt ``defaults``' keys but fusedopt's own options (state_dtype, master_weights,
    stochastic_rounding), which torch.optim's do not have (a param group holds them only
    where they differ from their defaults)."""
    from fusedopt.options import LOW_PRECISION_DEFAULTS
    return set(group) - set(LOW_PRECISION_DEFAULTS)


def assert_same_tree(actual, expected, what="state_dict"):
    """``actual`` is ``expected`` key for key, in the same order, all the way down (what
    torch.distributed.checkpoint needs: it loads into the destination's keys); tensors of
    the same shape and dtype, close as in assert_tensor_matches (a ``step`` exactly),
    everything else equal and of the same type."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{what}: a {type(actual).__name__}, torch's is a dict"
        assert list(actual) == list(expected), f"{what}: keys {list(actual)} != torch's {list(expected)}"
        for key, value in expected.items():
            assert_same_tree(actual[key], value, f"{what}[{key!r}]")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), \
            f"{what}: {actual!r} != torch's {expected!r}"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_tree(a, e, f"{what}[{i}]")
    elif torch.is_tensor(expected):
        assert torch.is_tensor(actual), f"{what}: a {type(actual).__name__}, torch's is a tensor"
        assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != torch's {expected.dtype}"
        if what.endswith("['step']"):
            assert actual.shape == expected.shape and torch.equal(actual, expected), \
                f"{what}: {actual} != torch's {expected}"
        else:
            assert_tensor_matches(actual, expected, what)
    else:
        assert type(actual) is type(expected) and actual == expected, f"{what}: {actual!r} != torch's {expected!r}"


def assert_param_groups_match(ref_opt, fused_opt, ref_params, fused_params):
    """Same groups, same keys, same hyperparameter values (and types: a tensor lr stays a
    tensor), same params in the same order."""
    ref_index = {id(p): i for i, p in enumerate(ref_params)}
    fused_index = {id(p): i for i, p in enumerate(fused_params)}
    assert len(fused_opt.param_groups) == len(ref_opt.param_groups)
    for gi, (rg, fg) in enumerate(zip(ref_opt.param_groups, fused_opt.param_groups)):
        assert set(fg) == set(rg), f"group {gi}: keys {sorted(fg)} != torch's {sorted(rg)}"
        for key in rg:
            if key == "params":
                assert [fused_index.get(id(p)) for p in fg["params"]] == \
                    [ref_index.get(id(p)) for p in rg["params"]], f"group {gi}: params differ"
            else:
                assert _same_value(fg[key], rg[key]), (
                    f"group {gi}[{key!r}]: {fg[key]!r} != torch's {rg[key]!r}")


def assert_optimizers_match(ref_opt, fused_opt, ref_params, fused_params):
    """Params, every state tensor and the param_groups of fusedopt equal torch.optim's."""
    for i, (rp, fp) in enumerate(zip(ref_params, fused_params)):
        assert_tensor_matches(fp, rp, f"param {i}")
        ref_state = ref_opt.state.get(rp, {})
        fused_state = fused_opt.state.get(fp, {})
        assert_state_matches(ref_state, fused_state, fp, f"state[param {i}]")
    assert_param_groups_match(ref_opt, fused_opt, ref_params, fused_params)


# ----------------------------------------------------------------------------- side by side

def arrange_groups(params, groups):
    """groups: None (one group of all params) or a list of dicts whose 'params' are indices."""
    if groups is None:
        return list(params)
    return [{**copy.deepcopy({k: v for k, v in g.items() if k != "params"}),
             "params": [params[i] for i in g["params"]]} for g in groups]


class OptimizerPair:
    """torch.optim.<algo> (foreach=False: the oracle) and fusedopt.<algo> over clones of `params`.

    `foreach=False` is passed to both (fusedopt accepts and ignores it) so their param_groups
    are comparable key by key. fp16/bf16 params get the float32 oracle described above.
    """

    def __init__(self, algo, params, groups=None, **kwargs):
        import fusedopt

        self.algo = algo
        self.fused_params = clone_params(params)
        self.ref_params = clone_params(params, for_reference=True)
        self.strides = [p.stride() for p in self.fused_params]
        self.ref = getattr(torch.optim, algo)(
            arrange_groups(self.ref_params, groups), foreach=False, **copy.deepcopy(kwargs))
        self.fused = getattr(fusedopt, algo)(
            arrange_groups(self.fused_params, groups), foreach=False, **copy.deepcopy(kwargs))

    def set_grads(self, grads):
        set_grads(self.ref_params, grads)
        set_grads(self.fused_params, grads)

    def step(self, grads):
        self.set_grads(grads)
        self.ref.step()
        self.round_reference()
        self.fused.step()

    def round_reference(self):
        """Round the float32 oracle of each low-precision param to that precision."""
        with torch.no_grad():
            for rp, fp in zip(self.ref_params, self.fused_params):
                if fp.dtype in LOW_PRECISION:
                    rp.copy_(rp.to(fp.dtype))
                    for key, value in self.ref.state.get(rp, {}).items():
                        if key != "step" and torch.is_tensor(value):
                            value.copy_(value.to(fp.dtype))

    def check(self):
        for i, (p, stride) in enumerate(zip(self.fused_params, self.strides)):
            assert p.stride() == stride, f"param {i}: strides {p.stride()} != original {stride}"
        assert_optimizers_match(self.ref, self.fused, self.ref_params, self.fused_params)


def default_kwargs(algo, lr_kind="float", dtype=torch.float32, **options):
    """lr_kind "tensor": a 0-dim lr tensor. torch.optim divides a tensor lr by the bias
    correction *as a tensor*, i.e. in the lr's dtype; with float64 params we give a float64
    lr so that the float64 comparison measures the update math, not float32 lr rounding."""
    lr = DEFAULT_LR[algo]
    if lr_kind == "tensor":
        lr = torch.tensor(lr, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    return {"lr": lr, **options}
