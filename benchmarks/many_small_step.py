"""3000 parameters of 2048 float32 elements: fusedopt's step against torch.optim's
fused=True, interleaved step by step in one process, wall time of `opt.step()` with the
device synchronized before and after (what a training loop waits for), medians of 30
steps after 3 warm-ups.

    python benchmarks/many_small_step.py [--device cuda|cpu]

It gave the H100 figures in docs/bench-cuda.md, where `python -m fusedopt.bench --device
cuda --models many-small` could not finish: compiling torch's step over 3000 tensors (its
torch.compile'd peer) took longer than 170 s and was cut off. The bench's `--skip compiled`,
added after that run, leaves that peer out.
"""
import argparse
import statistics
import time

import torch

import fusedopt

ALGOS = {"SGD": dict(lr=0.01, momentum=0.9), "AdamW": dict(lr=1e-3, weight_decay=0.01)}


def params(device, count=3000, size=2048):
    ps = [torch.randn(size, device=device, requires_grad=True) for _ in range(count)]
    for p in ps:
        p.grad = torch.randn_like(p)
    return ps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.manual_seed(0)
    for algo, hyper in ALGOS.items():
        optimizers = {"torch fused": getattr(torch.optim, algo)(params(device), fused=True, **hyper),
                      "fusedopt": getattr(fusedopt, algo)(params(device), **hyper)}
        times = {name: [] for name in optimizers}
        for step in range(3 + args.steps):
            for name, opt in optimizers.items():
                sync()
                start = time.perf_counter()
                opt.step()
                sync()
                if step >= 3:
                    times[name].append(1e3 * (time.perf_counter() - start))
        torch_ms, ours_ms = (statistics.median(times[name]) for name in optimizers)
        print(f"{device.type} 3000x2048 {algo}: torch fused {torch_ms:.3f} ms, fusedopt {ours_ms:.3f} ms, "
              f"speedup {torch_ms / ours_ms:.2f}x")


if __name__ == "__main__":
    main()
