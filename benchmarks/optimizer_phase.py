"""The whole optimizer phase of a mixed-precision training step, fusedopt against torch's
fastest composition, side by side in one run, on GPT-2-small parameter shapes.

    torch:    scaler.unscale_(opt)                       # pass over the grads (read + write)
              clip_grad_norm_(params, 1.0, foreach=True) # norm pass, then a scaling pass
              scaler.step(opt)                           # fused=True update
              scaler.update(); opt.zero_grad(...)
    fusedopt: opt.clip_grad_norm_(1.0, grad_scaler=scaler)  # one read pass: norm + inf check
              scaler.step(opt[, zero_grad=True])            # unscale, clip, update (and zero)
              scaler.update()

Two zero_grad modes are measured: set_to_none=True (torch's default: no zeroing pass;
the next backward allocates) and set_to_none=False (grads stay allocated: torch zeroes
them in a pass, fusedopt in the update pass). Between timed phases the grads are
refilled with fresh values outside the timing, standing in for the backward pass.

    python benchmarks/optimizer_phase.py [--device cpu|cuda] [--reps N] [--algo adamw|adam|sgd]
"""
import argparse
import statistics
import time

import torch

import fusedopt
from fusedopt.bench import gpt2_small_shapes

ALGOS = {"adamw": (torch.optim.AdamW, fusedopt.AdamW, {}),
         "adam": (torch.optim.Adam, fusedopt.Adam, {}),
         "sgd": (torch.optim.SGD, fusedopt.SGD, {"momentum": 0.9})}
MAX_NORM = 1.0


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_params(device):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * 0.02).to(device)) for s in gpt2_small_shapes()]


def torch_phase(opt, params, scaler, set_to_none):
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(params, MAX_NORM, foreach=True)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=set_to_none)


def fusedopt_phase(opt, params, scaler, set_to_none):
    opt.clip_grad_norm_(MAX_NORM, grad_scaler=scaler)
    scaler.step(opt, zero_grad=not set_to_none)
    scaler.update()
    if set_to_none:
        opt.zero_grad(set_to_none=True)


class Contender:
    def __init__(self, name, make_opt, phase, device, grads, set_to_none):
        self.name, self.phase, self.set_to_none = name, phase, set_to_none
        self.params = make_params(device)
        self.opt = make_opt(self.params)
        self.scaler = torch.amp.GradScaler(device.type, init_scale=1.0, growth_interval=10 ** 9)
        self.scaler.scale(torch.ones((), device=device))  # as scale(loss) does: creates the scale
        self.grads = grads
        self.times = []
        self.refill()
        if not set_to_none:  # grads live on between steps (fusedopt: in its flat grad buffer)
            self.opt.zero_grad(set_to_none=False)
            self.refill()

    def refill(self):
        """What backward would do: grads with fresh values (untimed)."""
        for p, g in zip(self.params, self.grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)

    def run(self, device, timed):
        synchronize(device)
        start = time.perf_counter()
        self.phase(self.opt, self.params, self.scaler, self.set_to_none)
        synchronize(device)
        if timed:
            self.times.append(time.perf_counter() - start)
        self.refill()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--algo", choices=ALGOS, default="adamw")
    parser.add_argument("--reps", type=int, default=15)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch_cls, fused_cls, kwargs = ALGOS[args.algo]
    gen = torch.Generator().manual_seed(1)
    grads = [(torch.randn(s, generator=gen) * 1e-3).to(device) for s in gpt2_small_shapes()]
    print(f"{args.algo}, GPT-2-small shapes ({sum(g.numel() for g in grads) / 1e6:.1f}M params), "
          f"{device}, torch {torch.__version__}, {args.reps} reps, median ms")
    for set_to_none in (True, False):
        contenders = [
            Contender("torch fused + foreach clip", lambda p: torch_cls(p, lr=1e-6, fused=True, **kwargs),
                      torch_phase, device, grads, set_to_none),
            Contender("fusedopt", lambda p: fused_cls(p, lr=1e-6, **kwargs), fusedopt_phase, device, grads,
                      set_to_none),
        ]
        for rep in range(args.reps + 2):  # round-robin, so machine noise hits both alike
            for c in contenders:
                c.run(device, timed=rep >= 2)
        torch_ms, fused_ms = (statistics.median(c.times) * 1e3 for c in contenders)
        print(f"zero_grad(set_to_none={set_to_none}): torch {torch_ms:8.2f}   fusedopt {fused_ms:8.2f}   "
              f"speedup {torch_ms / fused_ms:.2f}x")


if __name__ == "__main__":
    main()
