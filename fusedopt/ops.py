"""Python face of the fusedopt ops: loads the kernels and registers fake kernels.

The schemas live in csrc/ops.cpp (module ``fusedopt._C``). CPU kernels come in one
module per x86 ISA level; the best one the running CPU supports is loaded here, so the
same build runs on any x86-64 machine.
"""
import importlib
import importlib.util
import os

import torch


def _check_build() -> None:
    """Says why the compiled modules cannot load, before Python's own errors would
    (an unbuilt tree: "cannot import name '_C' ... circular import"; another torch:
    "libc10_cuda.so: cannot open shared object file")."""
    here = os.path.dirname(os.path.abspath(__file__))
    rebuild = f"pip install --no-build-isolation -e {os.path.dirname(here)}"
    if importlib.util.find_spec("fusedopt._C") is None:
        raise ImportError(f"fusedopt: the extension is not built in {here}; was the extension built? "
                          f"Build it with: {rebuild}")
    try:
        from . import _build_info
    except ImportError:  # built by a setup.py that did not record its torch
        return
    if (_build_info.TORCH_VERSION, _build_info.TORCH_CUDA) != (torch.__version__, torch.version.cuda):
        raise ImportError(
            f"fusedopt was built against torch {_build_info.TORCH_VERSION} (CUDA "
            f"{_build_info.TORCH_CUDA}), but torch {torch.__version__} (CUDA {torch.version.cuda}) "
            f"is installed; its compiled modules only load with the torch they were built with. "
            f"Rebuild it for this torch ({rebuild}) or install torch=={_build_info.TORCH_VERSION}.")


_check_build()
from . import _C  # noqa: E402, F401  (registers the op schemas, and CUDA kernels in CUDA builds)

# torch's own reading of the CPU (it also honours ATEN_CPU_CAPABILITY).
_ISA_PREFERENCE = {
    "AVX512": ("avx512_bf16", "avx512", "avx2", "default"),
    "AVX2": ("avx2", "default"),
}
# Variants that need more than their ATen capability: the CPU feature each needs.
_ISA_FEATURES = {"avx512_bf16": "_is_avx512_bf16_supported"}


def _cpu_runs(isa: str) -> bool:
    feature = _ISA_FEATURES.get(isa)
    return feature is None or bool(getattr(torch.cpu, feature, lambda: False)())


def _load_cpu_kernels() -> str:
    candidates = [isa for isa in _ISA_PREFERENCE.get(torch.backends.cpu.get_cpu_capability(), ("default",))
                  if _cpu_runs(isa)]
    # FUSEDOPT_CPU_KERNELS=<isa> loads that variant instead of the best one (the tests run
    # every variant this CPU can; no user needs it).
    wanted = os.environ.get("FUSEDOPT_CPU_KERNELS")
    if wanted:
        if wanted not in candidates:
            raise ImportError(f"fusedopt: FUSEDOPT_CPU_KERNELS={wanted!r}, but this CPU runs {candidates}")
        candidates = [wanted]
    for isa in candidates:
        try:
            importlib.import_module(f"fusedopt._cpu_{isa}")
            return isa
        except ImportError:
            continue
    raise ImportError("fusedopt: no CPU kernel module could be loaded; was the extension built?")


CPU_ISA = _load_cpu_kernels()
HAS_CUDA_KERNELS = torch._C._dispatch_has_kernel_for_dispatch_key("fusedopt::adam_step_", "CUDA")

adam_step_ = torch.ops.fusedopt.adam_step_
sgd_step_ = torch.ops.fusedopt.sgd_step_
grad_norm = torch.ops.fusedopt.grad_norm


def run(op, *args) -> None:
    """``op(*args)`` for a step op: called from C (``_C.call_op``; [note: op calls from
    C] in csrc/python_module.cpp says what that saves) when it runs eagerly under
    no_grad, as fusedopt's step does; through torch.ops under torch.compile, with grad
    mode or a __torch_function__ mode on, or when an argument is a tensor subclass. Any
    other callable (a test's counting wrapper) is called as it is."""
    if torch.compiler.is_compiling():
        op(*args)
        return
    name = getattr(op, "_qualified_op_name", None)
    if (name is None or torch.is_grad_enabled() or torch._C._is_torch_function_mode_enabled()
            or _C.call_op(name, args) is NotImplemented):
        op(*args)


# Fake kernels: shapes only, so torch.compile and torch.library.opcheck can trace the ops.
@torch.library.register_fake("fusedopt::adam_step_")
def _adam_step_fake(params, exp_avg, exp_avg_sq, max_exp_avg_sq, step, grads, segments, lr, scheduled,
                    beta1, beta2, weight_decay, eps, decoupled_weight_decay, maximize, grad_scale,
                    found_inf, grad_multiplier, zero_grads, master_param=None, rounding_seed=None):
    return None


@torch.library.register_fake("fusedopt::sgd_step_")
def _sgd_step_fake(params, momentum_buffer, step, grads, segments, lr, scheduled, momentum, dampening,
                   weight_decay, nesterov, maximize, grad_scale, found_inf, grad_multiplier, zero_grads,
                   master_param=None, rounding_seed=None):
    return None


@torch.library.register_fake("fusedopt::grad_norm")
def _grad_norm_fake(grads, segments, norm_type):
    dtype = torch.float64 if grads[0].dtype == torch.float64 else torch.float32
    return grads[0].new_empty((), dtype=dtype)
