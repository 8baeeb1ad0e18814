"""Optimizer state per rank and step time: fusedopt's ShardedOptimizer (ZeRO-1 over
equal slices of flat buffers) against torch's ZeroRedundancyOptimizer(torch.optim.AdamW)
(whole tensors per rank; its default step and its fused=True step), on CPU ranks over gloo.

    python benchmarks/sharded_memory.py            # GPT-2 small (124M) and a wte-heavy GPT-2
    python benchmarks/sharded_memory.py --quick    # the same shapes at width 192

Models are parameter shapes only with fixed random grads (the step is what is measured):
"gpt2-small" is GPT-2 124M (148 tensors); "gpt2-wte-heavy" keeps its embeddings but only
2 of its 12 blocks, so wte holds most elements and ZeRO's whole-tensor split leaves one
rank with it. State is what each optimizer keeps per rank: the storages behind its state
tensors (exp_avg, exp_avg_sq, step). Step time: median over reps after warm-up of
``optimizer.step()`` including its collectives (the slowest rank's median).
"""
import argparse
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.optim import ZeroRedundancyOptimizer

import fusedopt
from fusedopt.distributed import ShardedOptimizer

# torch.optim.AdamW's default (for-loop) step on CPU, its fused=True step, and fusedopt's.
OPTIMIZERS = ("ZeRO(AdamW)", "ZeRO(AdamW, fused=True)", "ShardedOptimizer")


def gpt2_shapes(width: int, blocks: int) -> list[tuple[int, ...]]:
    """GPT-2 as Hugging Face stores it (Conv1D weights are in x out); fusedopt.bench's
    gpt2-small at width 768 and 12 blocks."""
    d, vocab, context = width, 50257, 1024
    block = [(d,), (d,), (d, 3 * d), (3 * d,), (d, d), (d,),
             (d,), (d,), (d, 4 * d), (4 * d,), (4 * d, d), (d,)]
    return [(vocab, d), (context, d)] + block * blocks + [(d,), (d,)]


def models(quick: bool) -> dict[str, list[tuple[int, ...]]]:
    width = 192 if quick else 768
    return {"gpt2-small": gpt2_shapes(width, 12), "gpt2-wte-heavy": gpt2_shapes(width, 2)}


def make_optimizer(kind: str, params):
    if kind == "ShardedOptimizer":
        return ShardedOptimizer(params, optimizer_class=fusedopt.AdamW, lr=1e-6)
    return ZeroRedundancyOptimizer(params, optimizer_class=torch.optim.AdamW, lr=1e-6, fused="fused" in kind)


def state_bytes(optimizer) -> int:
    """Bytes of the storages behind this rank's state tensors."""
    state = optimizer.optim.state if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer.state
    storages = {}
    for entry in state.values():
        for value in entry.values():
            if torch.is_tensor(value):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def measure(kind: str, shapes, warmup: int, reps: int) -> tuple[int, float]:
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator)
    optimizer = make_optimizer(kind, params)
    times = []
    for rep in range(warmup + reps):
        dist.barrier()
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return state_bytes(optimizer), statistics.median(times[warmup:]) * 1e3


def run_rank(rank: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.world_size))  # the ranks share the cores
    dist.init_process_group("gloo", rank=rank, world_size=args.world_size)
    results = {}
    for model, shapes in models(args.quick).items():
        for kind in OPTIMIZERS:
            measured = [None] * args.world_size
            dist.all_gather_object(measured, measure(kind, shapes, args.warmup, args.reps))
            results[model, kind] = measured
    if rank == 0:
        print(f"AdamW state per rank, {args.world_size} CPU ranks (gloo), torch {torch.__version__}; max/even: "
              "the fullest rank's state against an even split of exp_avg + exp_avg_sq")
        print(table(results, args))
    dist.barrier()
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def table(results, args) -> str:
    mb = 2 ** 20
    ranks = " ".join(f"{f'rank {r} MB':>10}" for r in range(args.world_size))
    lines = [f"{'model':<16} {'optimizer':<24} {ranks} {'max/even':>9} {'step ms':>9}"]
    for model, shapes in models(args.quick).items():
        params = sum(torch.Size(s).numel() for s in shapes)
        even = params * 4 * 2 / args.world_size  # exp_avg + exp_avg_sq in float32
        fullest, slowest = {}, {}
        for kind in OPTIMIZERS:
            per_rank = results[model, kind]
            fullest[kind] = max(b for b, _ in per_rank)
            slowest[kind] = max(t for _, t in per_rank)
            lines.append(f"{model:<16} {kind:<24} " + " ".join(f"{b / mb:>10.1f}" for b, _ in per_rank)
                         + f" {fullest[kind] / even:>9.2f} {slowest[kind]:>9.1f}")
        zero, zero_fused, sharded = OPTIMIZERS
        lines.append(f"{'':<16} {'ZeRO(AdamW) / Sharded':<24} {'':>{11 * args.world_size - 1}} "
                     f"{fullest[zero] / fullest[sharded]:>8.2f}x {slowest[zero] / slowest[sharded]:>8.2f}x")
        lines.append(f"{'':<16} {'ZeRO(fused) / Sharded':<24} {'':>{11 * args.world_size - 1}} "
                     f"{fullest[zero_fused] / fullest[sharded]:>8.2f}x {slowest[zero_fused] / slowest[sharded]:>8.2f}x")
        lines.append(f"{'':<16} ({params / 1e6:.1f}M params in {len(shapes)} tensors)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="width 192 instead of 768 (seconds, not minutes)")
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args(argv)
    mp.spawn(run_rank, args=(free_port(), args), nprocs=args.world_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
