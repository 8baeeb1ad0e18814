"""The benchmark's FSDP2 cases: optimizer steps over ``fully_shard``'s DTensor shards.

Each case starts ``world`` processes (gloo on the CPU; NCCL, one process per GPU, on
CUDA), shards a stack of ``Linear`` layers with ``fully_shard`` (optionally with
``CPUOffloadPolicy``: shards, grads and the step on the CPU), makes one backward pass (the
grads are FSDP2's DTensor shards; their values are then redrawn, see _worker), and then
times every implementation's ``step()`` on the same shards and grads, interleaved
round-robin as the rest of the benchmark is. Every rank enters each timed step together
(a barrier before it); a step's time is the slowest rank's, and the case reports the
median over steps. Rank 0 writes the times to a file the parent reads back.
"""
from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class FsdpCase:
    name: str        # the benchmark's model column
    layers: int
    width: int
    offload: bool    # CPUOffloadPolicy: shards, grads and the step on the CPU
    world: int       # processes (ranks); on CUDA: one per GPU
    threads: int     # torch threads per rank on the CPU


def cases(device_type: str) -> list[FsdpCase]:
    """The FSDP2 cases for a device: many small shards and a few big ones, then the same
    small ones with CPU offload (on a CPU-only machine the shards are on the CPU anyway;
    the policy still changes how FSDP2 holds them)."""
    cores = os.cpu_count() or 1
    world = torch.cuda.device_count() if device_type == "cuda" else min(2, cores)
    threads = max(1, cores // world)
    return [
        FsdpCase(f"fsdp2 300x Linear(128), {world} ranks", 300, 128, False, world, threads),
        FsdpCase(f"fsdp2 12x Linear(2048), {world} ranks", 12, 2048, False, world, threads),
        FsdpCase(f"fsdp2 + CPU offload 300x Linear(128), 1 rank x {cores} threads", 300, 128, True, 1, cores),
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(case: FsdpCase, algo_name: str, implementations: list[tuple[str, dict]], device_type: str,
        warmup: int, reps: int) -> dict:
    """{"times": per implementation (name, constructor options: {"fusedopt": True} or
    torch's), the timed steps in seconds, each the slowest rank's; "failed": per
    implementation that raised, why; "elements": the most parameter elements one rank
    steps}."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "times.json"
        config = dict(case=case.__dict__, algo=algo_name, implementations=implementations,
                      device_type=device_type, warmup=warmup, reps=reps, port=_free_port(), out=str(out))
        mp.start_processes(_worker, args=(config,), nprocs=case.world, join=True, start_method="spawn")
        return json.loads(out.read_text())


def _worker(rank: int, config: dict) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    from .bench import ALGOS

    case = FsdpCase(**config["case"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(config["port"]))
    cuda = config["device_type"] == "cuda"
    torch.set_num_threads(case.threads)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=case.world)
    try:
        device = torch.device("cuda", rank) if cuda else torch.device("cpu")
        if cuda:
            torch.cuda.set_device(device)
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(case.width, case.width) for _ in range(case.layers)]).to(device)
        policy = {"offload_policy": CPUOffloadPolicy(pin_memory=cuda)} if case.offload else {}
        for layer in model:
            fully_shard(layer, **policy)
        fully_shard(model, **policy)
        model(torch.randn(4, case.width, device=device)).sum().backward()
        params = list(model.parameters())
        # Through a stack of hundreds of Linear layers the activations vanish, and half
        # the grads of the 300-layer cases come out zero or subnormal: arithmetic on
        # subnormals takes a microcode assist on Intel CPUs (~3x slower steps for every
        # implementation here), which would time that slow path, not the optimizers. The
        # grads get N(0, 1) values instead, as every other case of the bench has.
        with torch.no_grad():
            for p in params:
                p.grad.to_local().normal_()
        grads = [p.grad for p in params]
        elements = sum(p.to_local().numel() for p in params)
        algo = ALGOS[config["algo"]]
        steps, failed = [], {}
        for name, options in config["implementations"]:
            options = dict(options)
            cls = algo.fusedopt_cls if options.pop("fusedopt", False) else algo.torch_cls
            try:  # a peer failing is a result to report (torch's fused SGD has no DTensor rule)
                optimizer = cls(params, **algo.kwargs, **options)
                optimizer.step()  # creates its state
            except Exception as error:
                lines = str(error).strip().splitlines() or [""]
                failed[name] = f"failed: {type(error).__name__}: {lines[0]}"[:120]
                continue
            steps.append((name, optimizer.step))
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        times: dict[str, list[float]] = {name: [] for name, _ in steps}
        for rep in range(config["warmup"] + config["reps"]):
            shift = rep % len(steps)
            for name, step in steps[shift:] + steps[:shift]:
                for p, g in zip(params, grads):
                    p.grad = g
                sync()
                dist.barrier()
                start = time.perf_counter()
                step()
                sync()
                if rep >= config["warmup"]:
                    times[name].append(time.perf_counter() - start)
        # A step's time is the slowest rank's.
        gathered = [None] * case.world
        dist.all_gather_object(gathered, (times, elements))
        if rank == 0:
            slowest = {name: [max(rank_times[name][i] for rank_times, _ in gathered)
                              for i in range(len(times[name]))] for name in times}
            Path(config["out"]).write_text(json.dumps(
                {"times": slowest, "failed": failed, "elements": max(count for _, count in gathered)}))
        # Every rank leaves together. One bench run died at a case's end ("terminate
        # called without an active exception"), likely a rank tearing gloo down while
        # another was still in all_gather_object (not reproduced in 45 runs since).
        dist.barrier()
    finally:
        dist.destroy_process_group()
