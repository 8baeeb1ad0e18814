"""The fusedopt ops themselves: torch.library.opcheck (schema, fake kernel, aliasing)
on every op and device, and the contracts of csrc/segment_table.h."""
import pytest
import torch

import fusedopt  # noqa: F401  (loads the kernels)
from fusedopt import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def segment_table(rows, device):
    return torch.tensor(rows, dtype=torch.int64, device=device).reshape(-1, 3)


def flat_inputs(device, dtype=torch.float32):
    """Two params of 5 and 3 elements at offsets 0 and 16 of a 19-element buffer."""
    gen = torch.Generator().manual_seed(0)
    make = lambda n: torch.randn(n, generator=gen).to(device, dtype)
    segments = segment_table([[0, 5, 0], [16, 3, 1]], device)
    per_segment_grads = [make(5), make(3)]
    return make(19), segments, per_segment_grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_step_passes_opcheck(device, amsgrad):
    param, segments, grads = flat_inputs(device)
    state = [torch.zeros_like(param) for _ in range(3)]
    step = torch.zeros(2, device=device)
    torch.library.opcheck(ops.adam_step_, (
        [param], state[0], state[1], state[2] if amsgrad else None, step, grads, segments,
        1e-3, None, 0.9, 0.999, 0.01, 1e-8, True, False, None, None, None, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_step_passes_opcheck(device, momentum):
    param, segments, grads = flat_inputs(device)
    buf = torch.zeros_like(param) if momentum else None
    step = torch.zeros(2, device=device)
    torch.library.opcheck(ops.sgd_step_, (
        [param], buf, step, grads, segments, 0.1, None, momentum, 0.0, 0.0, False, False,
        None, None, None, False))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_type", [2.0, float("inf"), 1.5])
def test_grad_norm_passes_opcheck_and_matches_torch(device, norm_type):
    _, segments, grads = flat_inputs(device)
    torch.library.opcheck(ops.grad_norm, (grads, segments, norm_type))
    expected = torch.linalg.vector_norm(torch.cat(grads), norm_type)
    torch.testing.assert_close(ops.grad_norm(grads, segments, norm_type), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_flat_grad_buffer_and_per_segment_grads_give_the_same_update(device):
    """The two forms of the grads list in csrc/segment_table.h read the same values;
    padding between segments is never touched."""
    param, segments, grads = flat_inputs(device)
    flat_grad = torch.zeros_like(param)
    flat_grad[0:5], flat_grad[16:19] = grads
    results = []
    for grads_list in (grads, [flat_grad]):
        p, step = param.clone(), torch.zeros(2, device=device)
        ops.sgd_step_([p], None, step, grads_list, segments, 0.5, None, 0.0, 0.0, 0.0, False, False,
                      None, None, None, False)
        results.append(p)
        assert torch.equal(p[5:16], param[5:16])
        assert step.tolist() == [0.0, 0.0]  # without momentum no buffer is started
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_strided_grad_is_read_in_logical_order(device):
    """A per-segment grad may be a strided view; the kernel reads it in place in
    row-major logical order (what a contiguous copy would hold)."""
    grad = torch.randn(6, 4).to(device).t()  # 4x6, not contiguous
    param = torch.zeros(24, device=device)
    segments = segment_table([[0, 24, 0]], device)
    ops.sgd_step_([param], None, torch.zeros(1, device=device), [grad], segments, 1.0, None, 0.0, 0.0, 0.0,
                  False, False, None, None, None, False)
    torch.testing.assert_close(param, -grad.contiguous().flatten(), rtol=0, atol=0)


@pytest.mark.parametrize("device", [
    "cpu",
    # Known limit, pinned so that a change shows: the CUDA segment table lives on the
    # device, and comparing grad sizes with it would cost a host sync every step. The
    # optimizers compare grad and param shapes before the call (fusedopt/placement.py).
    *([pytest.param("cuda", marks=pytest.mark.xfail(
        strict=True, reason="the CUDA op cannot see the device-resident segment sizes"))]
      if torch.cuda.is_available() else []),
])
def test_kernel_rejects_a_grad_of_the_wrong_size_before_writing(device):
    param, segments, grads = flat_inputs(device)
    before = param.clone()
    grads[1] = grads[1][:2]
    with pytest.raises(RuntimeError, match="grad 1 has 2 elements"):
        ops.sgd_step_([param], None, torch.zeros(2, device=device), grads, segments, 0.1, None, 0.0, 0.0,
                      0.0, False, False, None, None, None, False)
    assert torch.equal(param, before)


def adam_call(param, segments, grads, exp_avg, exp_avg_sq, step, master=None):
    params = param if isinstance(param, list) else [param]
    ops.adam_step_(params, exp_avg, exp_avg_sq, None, step, grads, segments, 1e-3, None, 0.9, 0.999, 0.0,
                   1e-8, True, False, None, None, None, False, master)


# Each bad state buffer, and the message that names it (csrc/state_buffers.h).
BAD_STATE = {
    "short_exp_avg": (lambda p: dict(exp_avg=torch.zeros(p.numel() - 1, device=p.device)),
                      "exp_avg must be a contiguous buffer of Float on .* holding every row"),
    "strided_exp_avg_sq": (lambda p: dict(exp_avg_sq=torch.zeros(2 * p.numel(), device=p.device)[::2]),
                           "exp_avg_sq must be a contiguous buffer of Float on .* holding every row"),
    "float64_exp_avg": (lambda p: dict(exp_avg=torch.zeros_like(p, dtype=torch.float64)),
                        "state of dtype Double is not supported for Float params"),
    "master_of_float32_params": (lambda p: dict(master=torch.zeros_like(p)),
                                 "master_param is for bfloat16 or float16 params"),
}


@pytest.mark.parametrize("bad", BAD_STATE)
@pytest.mark.parametrize("device", DEVICES)
def test_kernel_rejects_a_bad_state_buffer_before_writing(device, bad):
    param, segments, grads = flat_inputs(device)
    buffers = dict(exp_avg=torch.zeros_like(param), exp_avg_sq=torch.zeros_like(param))
    make, message = BAD_STATE[bad]
    buffers.update(make(param))
    step = torch.zeros(2, device=device)
    before = [t.clone() for t in (param, step, *buffers.values())]
    with pytest.raises(RuntimeError, match=message):
        adam_call(param, segments, grads, buffers["exp_avg"], buffers["exp_avg_sq"], step, buffers.get("master"))
    assert all(torch.equal(t, b) for t, b in zip((param, step, *buffers.values()), before))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("algo", ["sgd", "adam"])
def test_rows_anywhere_give_the_update_of_the_flat_buffer(device, algo):
    """segment_table.h's params list: one tensor per row, each wherever it lives (here
    one in separate memory, one a view of another tensor), updates exactly as the rows
    of one flat param buffer do, with the state at each row's flat offset, in one call."""
    param, segments, grads = flat_inputs(device)
    elsewhere = [param[0:5].clone(), torch.zeros(10, device=device)[4:7]]
    elsewhere[1].copy_(param[16:19])
    results = []
    for params in ([param.clone()], elsewhere):
        state = [torch.zeros_like(param) for _ in range(2)]
        step = torch.zeros(2, device=device)
        for _ in range(3):
            if algo == "adam":
                adam_call(params, segments, grads, state[0], state[1], step)
            else:
                ops.sgd_step_(params, state[0], step, grads, segments, 0.1, None, 0.9, 0.0, 0.01, False, False,
                              None, None, None, False)
        rows = (params[0][0:5], params[0][16:19]) if len(params) == 1 else params
        results.append((torch.cat(rows), state, step))
    (flat_rows, flat_state, flat_step), (own_rows, own_state, own_step) = results
    torch.testing.assert_close(own_rows, flat_rows, rtol=0, atol=0)
    for own, flat in zip(own_state, flat_state):
        torch.testing.assert_close(own, flat, rtol=0, atol=0)
    assert own_step.tolist() == flat_step.tolist() == [3.0, 3.0]


@pytest.mark.parametrize("device", DEVICES)
def test_a_lone_row_of_its_own_reads_its_state_at_its_flat_offset(device):
    """One param for one row of the same size is the row's own memory (read from its
    start), while its state stays at the row's flat offset of the shared state buffers."""
    own = torch.ones(3, device=device)
    buf = torch.zeros(19, device=device)
    buf[16:19] = 2.0  # a started momentum buffer at the row's offset
    segments = segment_table([[16, 3, 0]], device)
    ops.sgd_step_([own], buf, torch.ones(1, device=device), [torch.ones(3, device=device)], segments, 0.5,
                  None, 0.5, 0.0, 0.0, False, False, None, None, None, False)
    torch.testing.assert_close(buf[16:19], torch.full((3,), 2.0 * 0.5 + 1.0, device=device))
    torch.testing.assert_close(own, torch.full((3,), 1.0 - 0.5 * 2.0, device=device))
    assert torch.equal(buf[:16], torch.zeros(16, device=device))


@pytest.mark.parametrize("bad", ["wrong_size", "strided"])
def test_kernel_rejects_a_param_row_that_does_not_hold_its_segment_before_writing(bad):
    param, segments, grads = flat_inputs("cpu")
    rows = [param[0:5].clone(), param[16:19].clone()]
    rows[1] = rows[1][:2] if bad == "wrong_size" else torch.zeros(6)[::2]
    before = [r.clone() for r in rows]
    with pytest.raises(RuntimeError, match="param 1 does not hold segment 1"):
        ops.sgd_step_(rows, None, torch.zeros(2), grads, segments, 0.1, None, 0.0, 0.0, 0.0, False, False,
                      None, None, None, False)
    assert all(torch.equal(r, b) for r, b in zip(rows, before))


class FunctionLog(torch.Tensor):
    """A tensor subclass that records every function its __torch_function__ sees."""
    seen: list[str] = []

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        cls.seen.append(getattr(func, "__name__", repr(func)))
        return super().__torch_function__(func, types, args, kwargs or {})


@pytest.mark.parametrize("algo", ["SGD", "AdamW"])
def test_a_subclass_parameters_torch_function_sees_the_step_op_and_the_result_is_torchs(algo):
    # The step calls its op from C (ops.run) unless an argument is a tensor subclass,
    # whose __torch_function__ then sees the op as through torch.ops.
    torch.manual_seed(0)
    start = torch.randn(4, 3)
    logged = FunctionLog(start.clone()).requires_grad_()
    plain = torch.nn.Parameter(start.clone())
    opt = getattr(fusedopt, algo)([logged], lr=0.1)
    ref = getattr(torch.optim, algo)([plain], lr=0.1, foreach=False)
    for step in range(2):
        grad = torch.randn(4, 3)
        logged.grad, plain.grad = grad.clone(), grad.clone()
        FunctionLog.seen.clear()
        opt.step()
        ref.step()
        assert FunctionLog.seen.count("sgd_step_" if algo == "SGD" else "adam_step_") == 1, FunctionLog.seen
    torch.testing.assert_close(logged.detach().as_subclass(torch.Tensor), plain.detach())


def test_run_calls_the_op_as_torch_ops_does_and_reports_its_errors_alike():
    # ops.run is how every eager step calls its op: the same update as torch.ops, and a
    # kernel's refusal raised with the same type and message.
    params, segments, grads = flat_inputs("cpu")
    results = []
    for call in (ops.sgd_step_, lambda *args: ops.run(ops.sgd_step_, *args)):
        p, step = params.clone(), torch.zeros(2)
        with torch.no_grad():
            call([p], None, step, grads, segments, 0.5, None, 0.0, 0.0, 0.1, False, False, None, None, None,
                 False)
        results.append(p)
        with pytest.raises(RuntimeError) as refused, torch.no_grad():
            call([p], None, step, [grads[0], grads[0]], segments, 0.5, None, 0.0, 0.0, 0.1, False, False, None,
                 None, None, False)
        results.append(str(refused.value))
    assert torch.equal(results[0], results[2]) and results[1] == results[3], results
