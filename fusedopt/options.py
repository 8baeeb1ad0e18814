"""What fusedopt accepts: parameters (dtypes, devices) and the low-precision options of a
param group, checked with torch.optim's wording where torch has one."""
from __future__ import annotations

from typing import Any

import torch
from torch.nn.parameter import is_lazy

from . import ops

SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
SUPPORTED_DEVICE_TYPES = ("cpu", "cuda", "meta")  # meta: shapes only, as torch.optim
# state_dtype= choices: the moments/momentum buffers stored in that dtype (math in float32).
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# optimizer.state key of the float32 master copy of a bf16/fp16 param (master_weights=True).
MASTER_KEY = "master_param"
# The low-precision hyperparameters, with their defaults (torch.optim's trajectory). A param
# group holds one only where it differs from its default, so that at default options
# param_groups and state_dict() are torch.optim's key for key: torch.distributed.checkpoint
# loads into the keys of the optimizer it loads into, and a torch.optim checkpoint lacks
# these. Read them with group.get(key, default); ``defaults`` records them all.
LOW_PRECISION_DEFAULTS = {"state_dtype": None, "master_weights": False, "stochastic_rounding": False}


def drop_default_options(group: dict[str, Any]) -> None:
    """Removes from a param group the low-precision options that hold their default."""
    for key, default in LOW_PRECISION_DEFAULTS.items():
        if key in group and group[key] is default:
            del group[key]


def check_state_dtype(state_dtype: Any) -> None:
    if state_dtype is not None and state_dtype not in STATE_DTYPES:
        raise ValueError(f"Invalid state_dtype: {state_dtype} (supported: None, i.e. as the params, "
                         f"{', '.join(map(str, STATE_DTYPES))})")


def check_low_precision_group(group: dict[str, Any], params: list[torch.Tensor]) -> None:
    """Raises ValueError where a param group's low-precision options do not fit its params."""
    state_dtype, master, stochastic = (group.get(k, d) for k, d in LOW_PRECISION_DEFAULTS.items())
    check_state_dtype(state_dtype)
    dtypes = {p.dtype for p in params}
    if state_dtype is not None and torch.float64 in dtypes:
        raise ValueError(f"state_dtype={state_dtype} needs float32, bfloat16 or float16 params; "
                         "a float64 param keeps float64 state")
    if master and not dtypes <= {torch.bfloat16, torch.float16}:
        raise ValueError("master_weights=True keeps a float32 copy of bfloat16 or float16 params; got "
                         f"params of dtype {', '.join(sorted(map(str, dtypes - {torch.bfloat16, torch.float16})))}")
    if stochastic and master:
        raise ValueError("stochastic_rounding=True and master_weights=True exclude each other: with "
                         "master weights the param is the float32 master rounded to nearest")
    if stochastic and not dtypes <= {torch.bfloat16}:
        raise ValueError("stochastic_rounding=True rounds bfloat16 params; got params of dtype "
                         f"{', '.join(sorted(map(str, dtypes - {torch.bfloat16})))}")
    if stochastic and state_dtype == torch.float16:
        raise ValueError("stochastic_rounding=True rounds bfloat16 values; use state_dtype=torch.bfloat16 "
                         "or torch.float32")


def reject_differentiable(differentiable: bool) -> None:
    if differentiable:
        raise ValueError("fusedopt does not support differentiable=True: its kernels update "
                         "parameters in place outside autograd; use torch.optim for that")


def hyperparameter(value: Any) -> float:
    """A 1-element tensor hyperparameter (betas, momentum set by a scheduler) as a float."""
    return value.item() if isinstance(value, torch.Tensor) else value


def check_params(name: str, params: list[torch.Tensor]) -> None:
    """Raises where a param group's parameters are not ones ``name`` (the optimizer's
    class name) can update; lazy ones are checked once materialised."""
    params = [p for p in params if not is_lazy(p)]
    if len(set(params)) != len(params):
        # torch.optim warns and then updates such a parameter twice per step; one slot
        # cannot do that, and updating it once would differ silently.
        raise ValueError(f"{name}: a parameter group lists the same parameter more than once")
    for p in params:
        if not isinstance(p, torch.Tensor):
            raise TypeError("optimizer can only optimize Tensors, but one of the params is "
                            + torch.typename(p))
        if p.is_complex():
            raise ValueError(f"{name}: complex parameters are not supported by "
                             "fusedopt; use torch.optim or pass torch.view_as_real(p)")
        if p.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}: parameters of dtype {p.dtype} are not "
                             f"supported (supported: {', '.join(map(str, SUPPORTED_DTYPES))})")
        if p.device.type not in SUPPORTED_DEVICE_TYPES:
            raise ValueError(f"{name}: parameters on {p.device} are not supported")
        if p.device.type == "cuda" and not ops.HAS_CUDA_KERNELS:
            raise RuntimeError("fusedopt was built without CUDA kernels; reinstall it on a "
                               "machine with a CUDA build of torch and the CUDA toolkit")
