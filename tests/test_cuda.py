"""The CUDA kernels against the CPU kernels, op by op.

Each test builds flat buffers and a segment table by hand, runs the same op on CPU
copies (the oracle) and on CUDA, and compares every buffer. The CUDA side gets the grad
layouts its kernels must read in place (transposed, unaligned, strided views, one flat
grad buffer); the CPU side always gets contiguous grads with the same values, so a
mismatch points at the CUDA kernels.
"""
import math

import pytest
import torch

import fusedopt  # noqa: F401  (registers the ops and their kernels)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

ops = torch.ops.fusedopt
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
ALIGN_BYTES = 64  # flat buffers start every parameter at a 64-byte boundary
# Shapes chosen to hit vector bodies and scalar tails, one-element and empty params,
# and dims that coalesce (size-1) or not when transposed.
SHAPES = [(37, 19), (256,), (1,), (8, 1, 12), (3, 5, 7), (0,), (130, 66), (5,)]


def tolerances(dtype):
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    if dtype == torch.float32:  # FMA contraction differs between nvcc and the CPU build
        return dict(rtol=1e-5, atol=1e-6)
    eps = torch.finfo(dtype).eps  # one rounding of the final store may differ
    return dict(rtol=2 * eps, atol=2 * eps)


def assert_close(actual, expected, what):
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), **tolerances(actual.dtype),
                               msg=lambda m: f"{what}: {m}")


class Problem:
    """Flat param and state buffers with padding between parameters, per-parameter
    steps, a segment table over `rows`, and one logical grad per parameter."""

    def __init__(self, shapes, dtype, rows=None, seed=0):
        gen = torch.Generator().manual_seed(seed)
        align = ALIGN_BYTES // torch.empty((), dtype=dtype).element_size()
        self.shapes, self.dtype = shapes, dtype
        self.offsets, total = [], 0
        for shape in shapes:
            total = -(-total // align) * align
            self.offsets.append(total)
            total += math.prod(shape)
        self.numel = -(-total // align) * align
        self.rows = list(range(len(shapes))) if rows is None else rows

        def randn(*size, scale=1.0):
            return (torch.randn(*size, generator=gen, dtype=torch.float64) * scale).to(dtype)

        self.buffers = {
            "param": randn(self.numel),
            "exp_avg": randn(self.numel, scale=0.1),
            "exp_avg_sq": randn(self.numel, scale=0.1).abs(),
            "momentum_buffer": randn(self.numel, scale=0.1),
        }
        self.buffers["max_exp_avg_sq"] = self.buffers["exp_avg_sq"] + randn(self.numel, scale=0.05).abs()
        # Mixed counters: a first step (0) next to parameters well into training.
        self.step = torch.tensor([float((3 * i) % 5) for i in range(len(shapes))])
        self.grads = [randn(*shape) for shape in shapes]
        self.segments = torch.tensor([[self.offsets[i], math.prod(shapes[i]), i] for i in self.rows],
                                     dtype=torch.int64).reshape(-1, 3)

    def state(self, device, names):
        return {name: self.buffers[name].clone().to(device) for name in names}

    def cpu_grads(self):
        return [self.grads[i].clone() for i in self.rows]

    def cuda_grads(self, layout, device="cuda"):
        """The grads as the CUDA op reads them. Returns (grads list, tensors to inspect
        afterwards for zero_grads: (tensor, mask of elements that were read))."""
        if layout == "flat":
            flat = torch.full((self.numel,), 7.0, dtype=self.dtype)
            read = torch.zeros(self.numel, dtype=torch.bool)
            for i in self.rows:
                n = self.grads[i].numel()
                flat[self.offsets[i]:self.offsets[i] + n] = self.grads[i].reshape(-1)
                read[self.offsets[i]:self.offsets[i] + n] = True
            flat = flat.to(device)
            return [flat], [(flat, read)]
        grads, inspect = [], []
        for k, i in enumerate(self.rows):
            g = self.grads[i]
            kind = layout if layout != "mixed" else ("contiguous", "transposed", "unaligned", "strided")[k % 4]
            if kind == "transposed" and g.dim() >= 2:
                dims = list(reversed(range(g.dim())))
                view = g.permute(dims).contiguous().to(device).permute(dims)
                base = view
            elif kind == "unaligned":
                base = torch.zeros(g.numel() + 1, dtype=self.dtype, device=device)
                view = base[1:].view(g.shape)
                view.copy_(g.to(device))
            elif kind == "strided":
                base = torch.zeros(2 * g.numel(), dtype=self.dtype, device=device)
                view = base[::2].view(g.shape)
                view.copy_(g.to(device))
            else:
                view = base = g.clone().to(device)
            grads.append(view)
            inspect.append((view, None))
        return grads, inspect


def assert_grads_zeroed(inspect):
    for tensor, read in inspect:
        t = tensor.cpu()
        if read is None:
            assert torch.all(t == 0), "a grad that was read was not zeroed"
        else:
            assert torch.all(t[read] == 0), "flat grad elements that were read were not zeroed"
            assert torch.all(t[~read] == 7.0), "flat grad padding (never read) was written"


def scalar(value, device, dtype=torch.float32):
    return torch.tensor(value, dtype=dtype, device=device)


def scheduled_tensor(values, device, dtype=torch.float64):
    """The ops' `scheduled` argument: Adam (lr, beta1, beta2), SGD (lr, momentum)."""
    return torch.tensor(values, dtype=dtype, device=device)


def run_adam(problem, device, grads, amsgrad, *, steps=3, lr=1e-2, scheduled=None, beta1=0.9,
             beta2=0.999, weight_decay=0.0, eps=1e-8, decoupled=False, maximize=False, grad_scale=None,
             found_inf=None, grad_multiplier=None, zero_grads=False):
    names = ["param", "exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    state = problem.state(device, names)
    step = problem.step.clone().to(device)
    segments = problem.segments.to(device)
    for _ in range(steps):
        ops.adam_step_([state["param"]], state["exp_avg"], state["exp_avg_sq"], state.get("max_exp_avg_sq"),
                       step, grads, segments, lr, scheduled, beta1, beta2, weight_decay, eps, decoupled,
                       maximize, grad_scale, found_inf, grad_multiplier, zero_grads)
    return state, step


def run_sgd(problem, device, grads, *, momentum=0.9, steps=3, lr=0.05, scheduled=None, dampening=0.0,
            weight_decay=0.0, nesterov=False, maximize=False, grad_scale=None, found_inf=None,
            grad_multiplier=None, zero_grads=False):
    names = ["param"] + (["momentum_buffer"] if momentum else [])
    state = problem.state(device, names)
    step = problem.step.clone().to(device)
    segments = problem.segments.to(device)
    for _ in range(steps):
        ops.sgd_step_([state["param"]], state.get("momentum_buffer"), step, grads, segments, lr, scheduled,
                      momentum, dampening, weight_decay, nesterov, maximize, grad_scale, found_inf,
                      grad_multiplier, zero_grads)
    return state, step


def assert_same_result(cuda_result, cpu_result):
    cuda_state, cuda_step = cuda_result
    cpu_state, cpu_step = cpu_result
    assert torch.equal(cuda_step.cpu(), cpu_step), f"steps {cuda_step.cpu()} != {cpu_step}"
    for name in cpu_state:
        assert_close(cuda_state[name], cpu_state[name], name)


# ----------------------------------------------------------------------------- Adam

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
@pytest.mark.parametrize("layout", ["contiguous", "mixed", "flat"])
@pytest.mark.parametrize("options", [
    dict(),
    dict(weight_decay=0.1),
    dict(weight_decay=0.1, decoupled=True),
    dict(maximize=True, weight_decay=0.05),
], ids=["plain", "l2", "adamw", "maximize"])
def test_adam_matches_cpu(dtype, amsgrad, layout, options):
    problem = Problem(SHAPES, dtype)
    cuda_grads, _ = problem.cuda_grads(layout)
    expected = run_adam(problem, "cpu", problem.cpu_grads(), amsgrad, **options)
    assert_same_result(run_adam(problem, "cuda", cuda_grads, amsgrad, **options), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["mixed", "flat"])
def test_adam_grad_transform_scheduled_tensor_and_zero_grads(dtype, layout):
    problem = Problem(SHAPES, dtype, rows=[0, 1, 3, 4, 6])  # 2, 5, 7 have no grad this step
    cuda_grads, inspect = problem.cuda_grads(layout)
    options = dict(steps=1, weight_decay=0.01, decoupled=True, zero_grads=True)
    options.update(lr=0.0, beta1=0.0, beta2=0.0)  # the scheduled tensor replaces these
    expected = run_adam(problem, "cpu", problem.cpu_grads(), True, scheduled=scheduled_tensor([3e-3, 0.8, 0.99], "cpu"),
                        grad_scale=scalar(1024.0, "cpu"), grad_multiplier=scalar(0.25, "cpu"),
                        found_inf=scalar(0.0, "cpu"), **options)
    actual = run_adam(problem, "cuda", cuda_grads, True, scheduled=scheduled_tensor([3e-3, 0.8, 0.99], "cuda"),
                      grad_scale=scalar(1024.0, "cuda"), grad_multiplier=scalar(0.25, "cuda"),
                      found_inf=scalar(0.0, "cuda"), **options)
    assert_same_result(actual, expected)
    assert_grads_zeroed(inspect)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
def test_scheduled_tensor_equals_floats(dtype):
    problem = Problem(SHAPES, torch.float32)
    grads, _ = problem.cuda_grads("mixed")
    scheduled = scheduled_tensor([0.01, 0.9, 0.999], "cuda", dtype)
    lr, beta1, beta2 = scheduled.tolist()  # the values the tensor holds
    by_float, _ = run_adam(problem, "cuda", grads, False, lr=lr, beta1=beta1, beta2=beta2)
    by_tensor, _ = run_adam(problem, "cuda", grads, False, lr=123.0, beta1=0.1, beta2=0.2, scheduled=scheduled)
    for name in by_float:
        assert torch.equal(by_tensor[name], by_float[name]), f"{name} differs between floats and the tensor"


@pytest.mark.parametrize("layout", ["mixed", "flat"])
@pytest.mark.parametrize("zero_grads", [False, True], ids=["keep_grads", "zero_grads"])
def test_found_inf_skips_the_step(layout, zero_grads):
    # Nothing changes but, with zero_grads, the grads: they are zeroed whole (padding of
    # a flat grad buffer included) so the overflowed values do not reach the next step.
    problem = Problem(SHAPES, torch.float32)
    grads, inspect = problem.cuda_grads(layout)
    before = [g.clone() for g, _ in inspect]
    found_inf = scalar(1.0, "cuda")
    for algo in ("adam", "sgd"):
        if algo == "adam":
            state, step = run_adam(problem, "cuda", grads, True, found_inf=found_inf, zero_grads=zero_grads)
        else:
            state, step = run_sgd(problem, "cuda", grads, found_inf=found_inf, zero_grads=zero_grads)
        for name, buf in state.items():
            assert torch.equal(buf.cpu(), problem.buffers[name]), f"{algo}: {name} changed on found_inf"
        assert torch.equal(step.cpu(), problem.step), f"{algo}: steps advanced on found_inf"
        for (g, _), old in zip(inspect, before):
            assert torch.equal(g, torch.zeros_like(g) if zero_grads else old), f"{algo}: grads on found_inf"


# ----------------------------------------------------------------------------- SGD

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "mixed", "flat"])
@pytest.mark.parametrize("options", [
    dict(momentum=0.0),
    dict(momentum=0.9),
    dict(momentum=0.9, dampening=0.1, weight_decay=0.01),
    dict(momentum=0.9, nesterov=True, maximize=True),
], ids=["plain", "momentum", "dampening_l2", "nesterov_maximize"])
def test_sgd_matches_cpu(dtype, layout, options):
    problem = Problem(SHAPES, dtype)
    cuda_grads, _ = problem.cuda_grads(layout)
    expected = run_sgd(problem, "cpu", problem.cpu_grads(), **options)
    assert_same_result(run_sgd(problem, "cuda", cuda_grads, **options), expected)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["mixed", "flat"])
def test_sgd_grad_transform_scheduled_tensor_and_zero_grads(dtype, layout):
    problem = Problem(SHAPES, dtype, rows=[1, 2, 4, 6, 7])
    cuda_grads, inspect = problem.cuda_grads(layout)
    options = dict(steps=1, momentum=0.9, zero_grads=True)
    expected = run_sgd(problem, "cpu", problem.cpu_grads(), lr=0.0, scheduled=scheduled_tensor([0.1, 0.8], "cpu"),
                       grad_scale=scalar(64.0, "cpu"), grad_multiplier=scalar(0.5, "cpu"), **options)
    actual = run_sgd(problem, "cuda", cuda_grads, lr=0.0, scheduled=scheduled_tensor([0.1, 0.8], "cuda"),
                     grad_scale=scalar(64.0, "cuda"), grad_multiplier=scalar(0.5, "cuda"), **options)
    assert_same_result(actual, expected)
    assert_grads_zeroed(inspect)


# ----------------------------------------------------------------------------- grad_norm

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "mixed", "flat"])
@pytest.mark.parametrize("norm_type", [2.0, 1.0, math.inf, 3.0])
def test_grad_norm_matches_cpu(dtype, layout, norm_type):
    problem = Problem(SHAPES, dtype)
    grads, _ = problem.cuda_grads(layout)
    expected = ops.grad_norm(problem.cpu_grads(), problem.segments, norm_type)
    actual = ops.grad_norm(grads, problem.segments.cuda(), norm_type)
    assert actual.device.type == "cuda" and actual.dim() == 0
    assert actual.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(actual.cpu(), expected, rtol=1e-6 if dtype != torch.float64 else 1e-12, atol=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("norm_type", [2.0, math.inf, 3.0])
def test_grad_norm_propagates_nonfinite(bad, norm_type):
    problem = Problem(SHAPES, torch.float32)
    problem.grads[6][100, 7] = bad
    grads, _ = problem.cuda_grads("mixed")
    norm = ops.grad_norm(grads, problem.segments.cuda(), norm_type).item()
    assert math.isnan(norm) if math.isnan(bad) else math.isinf(norm)


def test_grad_norm_one_row_of_a_flat_grad_buffer():
    # A flat grad buffer with a one-row table: the row is read at its flat offset.
    problem = Problem(SHAPES, torch.float32, rows=[6])
    (flat,), _ = problem.cuda_grads("flat")
    expected = problem.grads[6].double().norm().item()
    actual = ops.grad_norm([flat], problem.segments.cuda(), 2.0).item()
    assert actual == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- walking and caching

@pytest.mark.parametrize("layout", ["mixed", "flat"])
def test_many_small_parameters(layout):
    gen = torch.Generator().manual_seed(5)
    shapes = [tuple(int(s) for s in torch.randint(1, 40, (int(torch.randint(1, 3, (1,), generator=gen)),),
                                                  generator=gen)) for _ in range(3000)]
    problem = Problem(shapes, torch.float32, seed=5)
    grads, _ = problem.cuda_grads(layout)
    expected = run_adam(problem, "cpu", problem.cpu_grads(), False, weight_decay=0.1, steps=2)
    assert_same_result(run_adam(problem, "cuda", grads, False, weight_decay=0.1, steps=2), expected)
    expected_norm = ops.grad_norm(problem.cpu_grads(), problem.segments, 2.0)
    torch.testing.assert_close(ops.grad_norm(grads, problem.segments.cuda(), 2.0).cpu(), expected_norm,
                               rtol=1e-6, atol=0)


def test_new_grad_tensors_with_the_same_segments():
    # The device table of grad addresses is cached per segments tensor; new grads (and
    # new layouts of them) must still be read, not the ones of the previous call.
    problem = Problem(SHAPES, torch.float32)
    segments_cpu, segments = problem.segments, problem.segments.cuda()
    state = problem.state("cuda", ["param", "exp_avg", "exp_avg_sq"])
    ref = problem.state("cpu", ["param", "exp_avg", "exp_avg_sq"])
    step, ref_step = problem.step.clone().cuda(), problem.step.clone()
    for seed, layout in enumerate(["contiguous", "mixed", "mixed", "transposed", "contiguous"]):
        problem.grads = [torch.randn(s, generator=torch.Generator().manual_seed(seed)) for s in SHAPES]
        grads, _ = problem.cuda_grads(layout)
        for (p, m, v, st, gs, seg) in ((state["param"], state["exp_avg"], state["exp_avg_sq"], step, grads, segments),
                                       (ref["param"], ref["exp_avg"], ref["exp_avg_sq"], ref_step,
                                        problem.cpu_grads(), segments_cpu)):
            ops.adam_step_([p], m, v, None, st, gs, seg, 1e-2, None, 0.9, 0.999, 0.0, 1e-8, False, False,
                           None, None, None, False)
    assert_same_result((state, step), (ref, ref_step))


def test_side_stream():
    problem = Problem(SHAPES, torch.float32)
    grads, _ = problem.cuda_grads("mixed")
    expected = run_sgd(problem, "cpu", problem.cpu_grads())
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        actual = run_sgd(problem, "cuda", grads)
    stream.synchronize()
    assert_same_result(actual, expected)


def test_no_host_sync():
    problem = Problem(SHAPES, torch.bfloat16)
    grads, _ = problem.cuda_grads("mixed")
    state = problem.state("cuda", ["param", "exp_avg", "exp_avg_sq"])
    step, segments = problem.step.cuda(), problem.segments.cuda()
    scale, found_inf, multiplier = (scalar(v, "cuda") for v in (2.0, 0.0, 0.5))
    scheduled = scheduled_tensor([1e-3, 0.9, 0.999], "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):  # the first call uploads the grad table, the second reuses it
            ops.adam_step_([state["param"]], state["exp_avg"], state["exp_avg_sq"], None, step, grads, segments,
                           0.0, scheduled, 0.9, 0.999, 0.0, 1e-8, True, False, scale, found_inf, multiplier,
                           True)
            ops.grad_norm(grads, segments, 2.0)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ----------------------------------------------------------------------------- big and multi-GPU

@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs a CUDA device with 40 GB")
def test_buffer_beyond_2_pow_31_elements():
    dtype, n_tail = torch.bfloat16, 4096
    numel = 2**31 + 3 * n_tail
    gen = torch.Generator().manual_seed(3)
    # Row 0 spans the 2**31 boundary; row 1 is the last n_tail elements. Everything
    # below 2**31 is constant, everything from 2**31 on is random (`tail`).
    segments_cpu = torch.tensor([[0, numel - n_tail, 0], [numel - n_tail, n_tail, 1]])
    tail = slice(2**31, numel)
    values = {name: torch.randn(3 * n_tail, generator=gen).to(dtype) for name in ("param", "grad", "exp_avg")}
    values["exp_avg_sq"] = values["exp_avg"].abs()
    buffers = {}
    for name in ("param", "grad", "exp_avg", "exp_avg_sq"):
        buffers[name] = torch.full((numel,), 0.5, dtype=dtype, device="cuda")
        buffers[name][tail] = values[name].cuda()
    step = torch.tensor([4.0, 0.0], device="cuda")
    ops.adam_step_([buffers["param"]], buffers["exp_avg"], buffers["exp_avg_sq"], None, step, [buffers["grad"]],
                   segments_cpu.cuda(), 1e-2, None, 0.9, 0.999, 0.0, 1e-8, False, False, None, None, None, False)

    # The same update on a small CPU buffer holding only the tail: 2 * n_tail elements of
    # row 0, then row 1.
    ref = {name: v.clone() for name, v in values.items()}
    ref_step = torch.tensor([4.0, 0.0])
    ref_segments = torch.tensor([[0, 2 * n_tail, 0], [2 * n_tail, n_tail, 1]])
    ops.adam_step_([ref["param"]], ref["exp_avg"], ref["exp_avg_sq"], None, ref_step, [ref["grad"]], ref_segments,
                   1e-2, None, 0.9, 0.999, 0.0, 1e-8, False, False, None, None, None, False)
    assert torch.equal(step.cpu(), ref_step)
    for name in ("param", "exp_avg", "exp_avg_sq"):
        assert_close(buffers[name][tail], ref[name], f"{name} tail")
    # The constant elements just below 2**31 moved like the first one.
    below = buffers["param"][2**31 - 4:2**31].cpu()
    assert torch.all(below == buffers["param"][0].cpu()) and below[0] != 0.5

    buffers["grad"][numel - 1] = 1e30
    norm = ops.grad_norm([buffers["grad"]], segments_cpu.cuda(), math.inf)
    assert norm.item() == pytest.approx(float(torch.tensor(1e30, dtype=dtype)))


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices")
def test_second_device_while_first_is_current():
    problem = Problem(SHAPES, torch.float32)
    grads, _ = problem.cuda_grads("mixed", device="cuda:1")
    with torch.cuda.device(0):
        actual = run_adam(problem, "cuda:1", grads, True, weight_decay=0.1,
                          grad_scale=scalar(2.0, "cuda:1"))
        expected = run_adam(problem, "cpu", problem.cpu_grads(), True, weight_decay=0.1,
                            grad_scale=scalar(2.0, "cpu"))
        assert torch.cuda.current_device() == 0
        norm = ops.grad_norm(grads, problem.segments.to("cuda:1"), 2.0)
    assert actual[0]["param"].device == torch.device("cuda:1") and norm.device == torch.device("cuda:1")
    assert_same_result(actual, expected)
    torch.testing.assert_close(norm.cpu(), ops.grad_norm(problem.cpu_grads(), problem.segments, 2.0), rtol=1e-6, atol=0)


LOW_PRECISION_MODES = {
    "bf16_state": (torch.float32, {"state_dtype": torch.bfloat16}),
    "fp16_params_bf16_state": (torch.float16, {"state_dtype": torch.bfloat16}),
    "master_weights": (torch.bfloat16, {"master_weights": True}),
    "stochastic_rounding": (torch.bfloat16, {"stochastic_rounding": True}),
}


@pytest.mark.parametrize("mode", LOW_PRECISION_MODES)
@pytest.mark.parametrize("algo", ["SGD", "AdamW"])
def test_low_precision_modes_match_cpu(algo, mode):
    """bf16 state, master weights and stochastic rounding on CUDA as on the CPU. Given the
    same seed the random bits are the same (a counter-based hash of seed and element
    index), so stochastic rounding differs only where the fp32 math itself does (FMA
    contraction) and the rounding falls the other way: rarely, and by one bf16 ulp."""
    dtype, options = LOW_PRECISION_MODES[mode]
    hyper = {"lr": 0.05, "momentum": 0.9} if algo == "SGD" else {"lr": 1e-2, "weight_decay": 0.1}
    generator = torch.Generator().manual_seed(0)
    shapes = [s for s in SHAPES if 0 not in s]
    cpu = [torch.randn(s, generator=generator).to(dtype).requires_grad_() for s in shapes]
    gpu = [p.detach().cuda().requires_grad_() for p in cpu]
    optimizers = [getattr(fusedopt, algo)(ps, **hyper, **options) for ps in (cpu, gpu)]
    for step in range(3):
        grads = [torch.randn(p.shape, generator=generator).to(dtype) for p in cpu]
        for params, optimizer in zip((cpu, gpu), optimizers):
            for p, g in zip(params, grads):
                p.grad = g.to(p.device)
            # The same seed on both devices (each would draw from its own generator).
            optimizer._rounding_seed = lambda group, buf, step=step: (
                torch.tensor([1234 + step]) if group.get("stochastic_rounding") else None)
            optimizer.step()
    for i, (c, g) in enumerate(zip(cpu, gpu)):
        pairs = [(g.detach(), c.detach(), f"param {i}")]
        pairs += [(optimizers[1].state[g][k], optimizers[0].state[c][k], f"state[{i}][{k!r}]")
                  for k in optimizers[0].state[c] if k != "step"]
        for actual, expected, what in pairs:
            assert actual.dtype == expected.dtype, what
            if mode != "stochastic_rounding":
                assert_close(actual, expected, what)
                continue
            actual, expected = actual.cpu().float(), expected.float()
            same = (actual == expected).float().mean().item()
            assert same > 0.98, f"{what}: only {same:.3f} of the elements round alike"
            ulp = torch.finfo(torch.bfloat16).eps * expected.abs().clamp_min(1e-30)
            assert ((actual - expected).abs() <= 2 * ulp).all(), what
