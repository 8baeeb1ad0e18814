"""Every torch.optim.lr_scheduler drives fusedopt exactly as it drives torch.optim: same
learning rates (get_last_lr), same cycled momentum / betas, same params, same warnings."""
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as sched

from conftest import ALGOS, OptimizerPair, default_kwargs, make_params, random_grads

STEPS = 20
# ReduceLROnPlateau sees this metric: improves, then plateaus twice.
METRICS = [1.0, 0.9, 0.8, 0.8, 0.8, 0.8, 0.7, 0.7, 0.7, 0.7] * 2

SCHEDULERS = {
    "StepLR": lambda opt: sched.StepLR(opt, step_size=5, gamma=0.5),
    "MultiStepLR": lambda opt: sched.MultiStepLR(opt, milestones=[3, 8, 15], gamma=0.3),
    "ConstantLR": lambda opt: sched.ConstantLR(opt, factor=0.5, total_iters=6),
    "LinearLR": lambda opt: sched.LinearLR(opt, start_factor=0.2, total_iters=8),
    "ExponentialLR": lambda opt: sched.ExponentialLR(opt, gamma=0.9),
    "PolynomialLR": lambda opt: sched.PolynomialLR(opt, total_iters=15, power=2.0),
    "CosineAnnealingLR": lambda opt: sched.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4),
    "CosineAnnealingWarmRestarts":
        lambda opt: sched.CosineAnnealingWarmRestarts(opt, T_0=5, T_mult=2, eta_min=1e-4),
    # cycle_momentum: SGD's momentum, Adam's beta1
    "CyclicLR": lambda opt: sched.CyclicLR(opt, base_lr=1e-3, max_lr=0.05, step_size_up=4,
                                           cycle_momentum=True, base_momentum=0.8,
                                           max_momentum=0.95),
    "OneCycleLR": lambda opt: sched.OneCycleLR(opt, max_lr=0.05, total_steps=STEPS + 1,
                                               cycle_momentum=True),
    "ReduceLROnPlateau": lambda opt: sched.ReduceLROnPlateau(opt, factor=0.5, patience=1),
    "LambdaLR": lambda opt: sched.LambdaLR(opt, lr_lambda=lambda epoch: 1.0 / (1 + epoch)),
    "MultiplicativeLR": lambda opt: sched.MultiplicativeLR(opt, lr_lambda=lambda epoch: 0.95),
    "SequentialLR": lambda opt: sched.SequentialLR(
        opt, [sched.LinearLR(opt, start_factor=0.1, total_iters=5),
              sched.ExponentialLR(opt, gamma=0.9)], milestones=[5]),
    "ChainedScheduler": lambda opt: sched.ChainedScheduler(
        [sched.ConstantLR(opt, factor=0.5, total_iters=4), sched.ExponentialLR(opt, gamma=0.9)]),
}

# Momentum so that CyclicLR / OneCycleLR have a momentum to cycle in SGD.
OPTIONS = {"SGD": {"momentum": 0.9}, "Adam": {}, "AdamW": {"amsgrad": True}}


def _last_lr(scheduler):
    return [float(lr) for lr in scheduler.get_last_lr()]


@pytest.mark.parametrize("lr_kind", ["float", "tensor"], ids=["lr_float", "lr_tensor"])
@pytest.mark.parametrize("algo", ALGOS)
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_scheduler_drives_fusedopt_like_torch(name, algo, lr_kind):
    params = make_params([(4, 3), (5,), (2, 2)])
    groups = [{"params": [0, 1]}, {"params": [2], "lr": 0.02}]
    if lr_kind == "tensor":
        groups[1]["lr"] = torch.tensor(0.02)
    pair = OptimizerPair(algo, params, groups=groups,
                         **default_kwargs(algo, lr_kind, **OPTIONS[algo]))
    caught = {}
    schedulers = {}
    for key, opt in (("ref", pair.ref), ("fused", pair.fused)):
        with warnings.catch_warnings(record=True) as caught[key]:
            warnings.simplefilter("always")
            schedulers[key] = SCHEDULERS[name](opt)
    pair.check()
    assert _last_lr(schedulers["fused"]) == _last_lr(schedulers["ref"])
    for step in range(STEPS):
        pair.set_grads(random_grads(params, step))
        for key, opt in (("ref", pair.ref), ("fused", pair.fused)):
            with warnings.catch_warnings(record=True) as w:
                warnings.simplefilter("always")
                opt.step()
                if key == "ref":
                    pair.round_reference()
                if name == "ReduceLROnPlateau":
                    schedulers[key].step(METRICS[step])
                else:
                    schedulers[key].step()
            caught[key] += w
        assert _last_lr(schedulers["fused"]) == _last_lr(schedulers["ref"]), f"step {step}"
        pair.check()  # params, state, and param_groups incl. lr, momentum / betas
    assert [str(w.message) for w in caught["fused"]] == [str(w.message) for w in caught["ref"]]
