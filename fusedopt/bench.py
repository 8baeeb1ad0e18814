"""Optimizer step-time benchmark: fusedopt against torch.optim's for-loop, foreach and
fused steps (and, on CUDA, a torch.compile'd step), all in one run.

    python -m fusedopt.bench --quick
    fusedopt-bench --models gpt2-small,resnet50 --algos adamw --dtype bfloat16 --out bench-out
    fusedopt-bench --contention 1 --models gpt2-small --algos adamw   # under load, on purpose
    fusedopt-bench --low-precision --models gpt2-small --algos adamw  # bf16 state, bf16 params, stochastic rounding

Models are parameter *shapes* only (plain tensors, no download) with random grads, so a
timed step is the optimizer's work and nothing else. Implementations are timed
round-robin, rep by rep, so machine noise hits all of them alike; reported times are
medians. The load other processes put on the machine is measured before and during the
timing and reported with the results. Writes results.json, table.md and results.png to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import fusedopt
from fusedopt import bench_fsdp, ops

# Kineto prints trace markers and "no GPU" errors to stderr on every profiled step,
# which would shred the progress bar; 6 is above its highest level. Read when the
# profiler first starts, so setting it here (after torch is imported) is in time.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

LR = 1e-6  # tiny, so hundreds of steps on random grads leave the parameters finite


# --- models: parameter shapes ------------------------------------------------------

def gpt2_small_shapes() -> list[tuple[int, ...]]:
    """GPT-2 124M as Hugging Face stores it (Conv1D weights are in x out): 148 tensors."""
    d, vocab, context, layers = 768, 50257, 1024, 12
    block = [(d,), (d,),                  # ln_1
             (d, 3 * d), (3 * d,),        # attn.c_attn
             (d, d), (d,),                # attn.c_proj
             (d,), (d,),                  # ln_2
             (d, 4 * d), (4 * d,),        # mlp.c_fc
             (4 * d, d), (d,)]            # mlp.c_proj
    return [(vocab, d), (context, d)] + block * layers + [(d,), (d,)]  # ..., ln_f


def resnet50_shapes() -> list[tuple[int, ...]]:
    """torchvision's ResNet-50: 53 convs, 53 batch norms (weight, bias), fc: 161 tensors."""
    shapes = [(64, 3, 7, 7), (64,), (64,)]  # stem conv, bn1
    in_channels = 64
    for planes, blocks in [(64, 3), (128, 4), (256, 6), (512, 3)]:
        out_channels = planes * 4  # bottleneck expansion
        for block in range(blocks):
            shapes += [(planes, in_channels, 1, 1), (planes,), (planes,),
                       (planes, planes, 3, 3), (planes,), (planes,),
                       (out_channels, planes, 1, 1), (out_channels,), (out_channels,)]
            if block == 0:  # downsample: 1x1 conv and bn on the shortcut
                shapes += [(out_channels, in_channels, 1, 1), (out_channels,), (out_channels,)]
            in_channels = out_channels
    return shapes + [(1000, 2048), (1000,)]


def bert_base_shapes() -> list[tuple[int, ...]]:
    """bert-base-uncased (BertModel with pooler): 199 tensors, 109.5M elements."""
    d, ff, layers = 768, 3072, 12
    layer = ([(d, d), (d,)] * 4           # query, key, value, attention output dense
             + [(d,), (d,)]               # attention LayerNorm
             + [(ff, d), (ff,), (d, ff), (d,)]  # intermediate, output dense
             + [(d,), (d,)])              # output LayerNorm
    embeddings = [(30522, d), (512, d), (2, d), (d,), (d,)]  # word, position, type, LayerNorm
    return embeddings + layer * layers + [(d, d), (d,)]  # ..., pooler


def many_small_shapes() -> list[tuple[int, ...]]:
    """Per-tensor overhead dominates: 3000 tensors of 2048 elements."""
    return [(2048,)] * 3000


MODELS: dict[str, Callable[[], list[tuple[int, ...]]]] = {
    "gpt2-small": gpt2_small_shapes,
    "resnet50": resnet50_shapes,
    "bert-base": bert_base_shapes,
    "many-small": many_small_shapes,
}

# Where the parameters live (--placements): tensors of their own, which fusedopt moves
# into its flat buffers; shared memory (share_memory_(), Hogwild's recipe), which it
# updates in place; FSDP2's DTensor shards (bench_fsdp.py, its own models).
OWNED, SHARED, FSDP2 = "owned", "shared-memory", "fsdp2"
PLACEMENTS = (OWNED, SHARED, FSDP2)
# Shared memory doubles the time of every model: by default only where it matters most.
SHARED_MODELS = ("many-small", "gpt2-small")
FSDP_ROUNDS = 3  # progress-bar rounds per FSDP2 case


# --- algorithms and implementations ------------------------------------------------

@dataclass(frozen=True)
class Algo:
    torch_cls: type
    fusedopt_cls: type
    kwargs: dict
    state_buffers: int  # per-parameter state tensors, each read and written every step

    @property
    def bytes_per_element(self) -> int:
        """Element-sized accesses per parameter element: param r+w, grad r, state r+w."""
        return 3 + 2 * self.state_buffers


ALGOS = {
    "sgd": Algo(torch.optim.SGD, fusedopt.SGD, {"lr": LR, "momentum": 0.9}, state_buffers=1),
    "adam": Algo(torch.optim.Adam, fusedopt.Adam, {"lr": LR}, state_buffers=2),
    "adamw": Algo(torch.optim.AdamW, fusedopt.AdamW, {"lr": LR, "weight_decay": 0.01},
                  state_buffers=2),
}


Step = Callable[[], None]


def torch_step(opt: torch.optim.Optimizer) -> Step:
    return opt.step


def torch_compiled(opt: torch.optim.Optimizer) -> Step:
    @torch.compile(fullgraph=False)
    def step():
        opt.step()

    return step


@dataclass(frozen=True)
class Peer:
    """A torch.optim implementation, picked by keyword (foreach=..., fused=...)."""
    name: str
    options: dict
    wrap: Callable[[torch.optim.Optimizer], Step] = torch_step
    device_types: tuple[str, ...] = ("cpu", "cuda")


TORCH_FUSED = "torch fused"
FUSEDOPT = "fusedopt"
FUSEDOPT_FLAT = "fusedopt (flat grads)"
FUSEDOPT_BF16_STATE = "fusedopt, bf16 state"
FUSEDOPT_BF16 = "fusedopt, bf16 params + bf16 state"
FUSEDOPT_BF16_SR = "fusedopt, bf16 + stochastic rounding"
TORCH_PEERS = [
    Peer("torch for-loop", {"foreach": False}),
    Peer("torch foreach", {"foreach": True}),
    Peer(TORCH_FUSED, {"fused": True}),
    # On CPU, inductor would compile C++ for every (model, algo), taking longer than the
    # whole benchmark; the compiled step is a GPU baseline.
    Peer("torch compiled", {}, wrap=torch_compiled, device_types=("cuda",)),
]
IMPLEMENTATIONS = [peer.name for peer in TORCH_PEERS] + [FUSEDOPT, FUSEDOPT_FLAT]
# --skip's names for the torch peers but fused, the one every speedup is taken against.
PEER_KEYS = {peer.name.removeprefix("torch "): peer.name for peer in TORCH_PEERS if peer.name != TORCH_FUSED}


@dataclass(frozen=True)
class LowPrecision:
    """A fusedopt mode that moves fewer bytes (--low-precision): its param dtype and options."""
    name: str
    param_dtype: torch.dtype
    options: dict


# The fp32 implementations keep every buffer in float32; these store fewer bytes.
LOW_PRECISION = [
    LowPrecision(FUSEDOPT_BF16_STATE, torch.float32, {"state_dtype": torch.bfloat16}),
    LowPrecision(FUSEDOPT_BF16, torch.bfloat16, {"state_dtype": torch.bfloat16}),  # rounded to nearest
    LowPrecision(FUSEDOPT_BF16_SR, torch.bfloat16, {"state_dtype": torch.bfloat16, "stochastic_rounding": True}),
]
# With --low-precision only the fused fp32 steps run beside them (the slower torch
# steps would add their own copies of state and minutes of timing).
LOW_PRECISION_PEERS = (TORCH_FUSED,)
IMPLEMENTATIONS += [mode.name for mode in LOW_PRECISION]


def peers_for(device: torch.device, skip=()) -> list[Peer]:
    return [peer for peer in TORCH_PEERS if device.type in peer.device_types and peer.name not in skip]


@dataclass
class Runner:
    """One implementation of one (model, algo) case: its step, and the grads it reads."""
    name: str
    step: Step | None
    grads: list[torch.Tensor] = field(default_factory=list)
    note: str = ""
    times: list[float] = field(default_factory=list)
    extra_bytes: int | None = None
    params: list[torch.Tensor] | None = None  # its own params (None: the case's)
    bytes_per_element: int | None = None     # bytes one step moves per parameter element


def bytes_per_element(algo: Algo, param_dtype: torch.dtype, state_dtype: torch.dtype | None = None) -> int:
    """Param r+w and grad r in the param's dtype, state r+w in the state's."""
    param_size = torch.empty((), dtype=param_dtype).element_size()
    state_size = torch.empty((), dtype=state_dtype or param_dtype).element_size()
    return 3 * param_size + 2 * algo.state_buffers * state_size


def low_precision_runners(shapes, algo: Algo, device, seed: int, grads32: list[torch.Tensor]) -> list[Runner]:
    """One runner per LOW_PRECISION mode, each with its own params and state (their
    dtypes differ from the fp32 case's); fp32 ones read the case's grads."""
    runners = []
    for mode in LOW_PRECISION:
        generator = torch.Generator(device=device).manual_seed(seed + 1)
        params = random_tensors(shapes, device, mode.param_dtype, generator)
        optimizer = algo.fusedopt_cls(params, **algo.kwargs, **mode.options)
        grads = grads32 if mode.param_dtype == torch.float32 else random_tensors(shapes, device, mode.param_dtype,
                                                                                 generator)
        runners.append(Runner(mode.name, optimizer.step, grads, params=params,
                              bytes_per_element=bytes_per_element(algo, mode.param_dtype,
                                                                  mode.options.get("state_dtype"))))
    return runners


def random_tensors(shapes, device, dtype, generator) -> list[torch.Tensor]:
    return [torch.randn(s, generator=generator, device=device, dtype=dtype) for s in shapes]


def build_case(shapes, algo: Algo, device, dtype, seed: int, low_precision: bool = False, skip=(),
               shared: bool = False):
    """(params, runners): every implementation of one case, each stepping memory as it
    would allocate it. fusedopt steps its own flat buffers (params moved in, state; on
    the CPU on huge pages, [note: huge pages] in flat_buffer.py). torch.optim's steps
    share one copy of the params, grads and state that torch's allocator made, as a
    training run's own would be: its for-loop, foreach and fused optimizers are handed
    the same state tensors (a private copy for each of five implementations took 12 GB
    on GPT-2 Adam). A step reads and writes every element whatever its value, so
    sharing leaves each implementation's work unchanged, and a case's tensors are far
    larger than the caches, so none finds another's data there.

    Grads: fusedopt (flat grads) gets the views of its flat grad buffer that
    zero_grad(set_to_none=False) makes, which it steps as one range. fusedopt reads
    torch's grads, one tensor per parameter as autograd makes them, through its
    per-parameter table.

    ``shared``: the params are moved to shared memory first (``share_memory_()``, as
    PyTorch's Hogwild recipe does), where fusedopt updates them in place. Returns
    fusedopt's params."""
    generator = torch.Generator(device=device).manual_seed(seed)
    params = random_tensors(shapes, device, dtype, generator)
    torch_params = [p.clone() for p in params]
    if shared:
        for p in (*params, *torch_params):
            p.share_memory_()
    fused = algo.fusedopt_cls(params, **algo.kwargs)  # packs params into its flat buffers

    # Empty grads (no pages touched) that zero_grad moves into the flat grad buffer.
    seat_grads(params, [torch.empty_like(p) for p in params])
    fused.zero_grad(set_to_none=False)
    flat_grads = [p.grad for p in params]
    flat_note = ("" if len({g.untyped_storage().data_ptr() for g in flat_grads}) == 1
                 else "grads did not become views of one buffer")
    with torch.no_grad():
        for g in flat_grads:
            g.normal_(generator=generator)
    grads = [g.clone() for g in flat_grads]

    seat_grads(params, grads)
    fused.step()  # creates fusedopt's state; torch's is a copy of it
    torch_state = {q: {key: value.clone() for key, value in fused.state[p].items()}
                   for p, q in zip(params, torch_params)}
    runners = []
    for peer in peers_for(device, skip):
        if low_precision and peer.name not in LOW_PRECISION_PEERS:
            continue
        opt = algo.torch_cls(torch_params, **peer.options, **algo.kwargs)
        for q in torch_params:
            opt.state[q] = dict(torch_state[q])  # the same tensors in each peer's own dict
        runners.append(Runner(peer.name, peer.wrap(opt), grads, params=torch_params))
    runners += [Runner(FUSEDOPT, fused.step, grads), Runner(FUSEDOPT_FLAT, fused.step, flat_grads, flat_note)]
    if low_precision:
        runners += low_precision_runners(shapes, algo, device, seed, grads)
    for runner in runners:
        if runner.bytes_per_element is None:
            runner.bytes_per_element = bytes_per_element(algo, dtype)
        try:
            seat_grads(runner.params or params, runner.grads)
            runner.step()  # compiles, where something compiles
        except Exception as error:  # a peer failing is a result to report, not a crash
            lines = str(error).strip().splitlines() or [""]
            runner.step, runner.note = None, f"failed: {type(error).__name__}: {lines[0]}"[:120]
    return params, runners


def seat_grads(params, grads) -> None:
    for p, g in zip(params, grads):
        p.grad = g


# --- measuring ---------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step: Step, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


def time_round_robin(runners: list[Runner], params, device, warmup: int, reps: int,
                     budget_s: float | None, bar: tqdm) -> None:
    """warmup + reps rounds, each stepping every runner once; with a budget, rounds stop
    once the case has spent budget_s seconds and has MIN_REPS timed rounds."""
    live = [r for r in runners if r.step is not None]
    start = time.perf_counter()
    for rep in range(warmup + reps):
        if budget_s is not None and rep >= warmup + MIN_REPS and time.perf_counter() - start > budget_s:
            bar.update(warmup + reps - rep)
            return
        # Rotate the order each rep so no peer always runs right after the same one.
        shift = rep % max(1, len(live))
        for runner in live[shift:] + live[:shift]:
            seat_grads(runner.params or params, runner.grads)  # untimed: stands in for the backward pass
            seconds = timed(runner.step, device)
            if rep >= warmup:
                runner.times.append(seconds)
        bar.update()


def peak_extra_bytes(step: Step, device: torch.device) -> int:
    """Memory allocated beyond what existed before one step, at its peak within it."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, profile_memory=True) as prof:
        step()
    # prof.events() folds each allocation and free into the op around it, losing their
    # order; the raw records keep it, so a running sum over them finds the peak.
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    running = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        running += record.nbytes()
        peak = max(peak, running)
    return peak


def measure_bandwidth(device: torch.device, reps: int) -> dict:
    """Read+write GB/s of a 256 MiB fp32 copy and of an in-place scale of it. A CPU copy
    also reads dst into cache before writing it (write-allocate), traffic it does not
    count; optimizer steps write only what they read, as the in-place scale does, so
    the faster of the two is the reference for '% of bandwidth'."""
    elements = 64 * 2**20
    src = torch.ones(elements, device=device)
    dst = torch.zeros(elements, device=device)  # touched now so page faults stay untimed
    moved = 2 * elements * src.element_size()

    def median_gbps(step: Step) -> float:
        timed(step, device)
        return moved / statistics.median(timed(step, device) for _ in range(reps)) / 1e9

    copy_gbps = median_gbps(lambda: dst.copy_(src))
    inplace_gbps = median_gbps(lambda: dst.mul_(1.0))
    return {"copy_gbps": copy_gbps, "inplace_scale_gbps": inplace_gbps,
            "reference_gbps": max(copy_gbps, inplace_gbps)}


# --- machine load ------------------------------------------------------------------
# torch's fused CPU step opens a parallel region per tensor; when another process holds
# a core, each region waits for a descheduled thread, and torch fused slows by up to 20x
# while fusedopt (one region per step) barely moves. So load decides the ratios, and
# every run measures it: CPU time the whole machine spent busy (/proc/stat) minus this
# process's own and its children's, per second of wall time, i.e. how many cores others
# kept busy.

BUSY_CORES = 0.25  # others' average use above which a run is reported as loaded


@dataclass(frozen=True)
class CpuSample:
    wall: float
    busy: float   # machine-wide CPU seconds spent busy since boot
    steal: float  # CPU seconds the hypervisor gave this VM's CPUs to others
    own: float    # this process's CPU seconds, all threads, and its finished children's


def cpu_sample() -> CpuSample | None:
    try:
        with open("/proc/stat") as stat:
            ticks = [int(v) for v in stat.readline().split()[1:9]]
    except (OSError, ValueError):  # not Linux
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks + [0] * (8 - len(ticks))
    hz = os.sysconf("SC_CLK_TCK")
    # The FSDP2 cases' rank processes are the bench's own children: their CPU time is the
    # bench's, not another process's load (it counts once they have been joined).
    children = os.times()
    return CpuSample(time.monotonic(), (user + nice + system + irq + softirq) / hz, steal / hz,
                     time.process_time() + children.children_user + children.children_system)


@dataclass
class LoadWindow:
    """Other processes' CPU use, summed over one or more windows of wall time."""
    seconds: float = 0.0
    other_cpu_seconds: float = 0.0
    steal_cpu_seconds: float = 0.0

    def add(self, start: CpuSample | None, end: CpuSample | None) -> None:
        if start is None or end is None:
            return
        self.seconds += end.wall - start.wall
        self.other_cpu_seconds += max(0.0, (end.busy - start.busy) - (end.own - start.own))
        self.steal_cpu_seconds += end.steal - start.steal

    def merge(self, other: "LoadWindow") -> None:
        self.seconds += other.seconds
        self.other_cpu_seconds += other.other_cpu_seconds
        self.steal_cpu_seconds += other.steal_cpu_seconds

    @property
    def other_cores(self) -> float | None:
        return self.other_cpu_seconds / self.seconds if self.seconds > 0 else None

    @property
    def steal_cores(self) -> float | None:
        return self.steal_cpu_seconds / self.seconds if self.seconds > 0 else None

    def as_dict(self) -> dict:
        return {"seconds": self.seconds, "other_cores": self.other_cores,
                "steal_cores": self.steal_cores}


@contextmanager
def measuring(window: LoadWindow):
    start = cpu_sample()
    try:
        yield
    finally:
        window.add(start, cpu_sample())


def load_before_run(seconds: float = 1.0) -> LoadWindow:
    window = LoadWindow()
    with measuring(window):
        time.sleep(seconds)
    return window


def load_verdict(before: LoadWindow, during: LoadWindow, contention: int, cores: int) -> dict:
    """What the load means for the results: `loaded` when others used more than
    BUSY_CORES on average before the run, or (without --contention) during the timing."""
    def cores_text(window: LoadWindow) -> str:
        return "unknown" if window.other_cores is None else f"{window.other_cores:.2f}"

    checked = [before] if contention else [before, during]
    loaded = any((w.other_cores or 0) > BUSY_CORES for w in checked)
    measured = (f"other processes kept {cores_text(before)} of {cores} cores busy before the "
                f"run and {cores_text(during)} during the timing")
    if contention:
        summary = f"contention on purpose: {contention} busy process(es) during the timing; {measured}"
    else:
        summary = f"machine load: {measured}"
    if loaded:
        besides = f" (besides the {contention} busy process(es) started on purpose)" if contention else ""
        summary = (f"LOADED MACHINE{besides}: {measured}. Under load torch's fused CPU step waits on "
                   "descheduled threads, so these ratios are not this machine's quiet ones; "
                   "rerun when it is quiet" + (", or measure load on purpose with --contention N"
                                               if not contention else ""))
    short = ("LOADED" if loaded else "contention" if contention else "quiet")
    return {"verdict": short, "loaded": loaded, "summary": summary, "busy_cores_threshold": BUSY_CORES,
            "contention_processes": contention, "before": before.as_dict(), "during": during.as_dict(),
            "load_average_1min": load_average()}


def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# Spins until its parent (the benchmark) is gone, so a killed benchmark leaves no spinner.
SPINNER = """
import os, sys
parent = os.getppid()
sys.stdout.write("spinning\\n"); sys.stdout.flush()
while os.getppid() == parent:
    for _ in range(1_000_000):
        pass
"""


@contextmanager
def busy_processes(count: int):
    """`count` processes, each keeping one core busy, for the duration of the block."""
    spinners = [subprocess.Popen([sys.executable, "-c", SPINNER], stdout=subprocess.PIPE, text=True)
                for _ in range(count)]
    try:
        for spinner in spinners:
            spinner.stdout.readline()  # started and spinning
        yield [spinner.pid for spinner in spinners]
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
            spinner.stdout.close()


# --- one case ----------------------------------------------------------------------

def run_case(model, algo_name, device, args, seed, during: LoadWindow, bar, placement: str = OWNED) -> list[dict]:
    algo = ALGOS[algo_name]
    shapes = MODELS[model]()
    bar.set_postfix_str(f"{model} {algo_name}: building")
    params, runners = build_case(shapes, algo, device, getattr(torch, args.dtype), seed, args.low_precision,
                                 args.skip, shared=placement == SHARED)
    if placement == SHARED:
        model = f"{model}, shared memory"
    bar.update()
    bar.set_postfix_str(f"{model} {algo_name}: timing")
    case_load = LoadWindow()
    with busy_processes(args.contention), measuring(case_load):
        time_round_robin(runners, params, device, args.warmup, args.reps, args.case_budget_s, bar)
    during.merge(case_load)
    bar.set_postfix_str(f"{model} {algo_name}: memory")
    for runner in runners:
        if runner.step is not None:
            seat_grads(runner.params or params, runner.grads)
            runner.extra_bytes = peak_extra_bytes(runner.step, device)
    bar.update()

    elements = sum(p.numel() for p in params)
    base = {"model": model, "algo": algo_name, "dtype": args.dtype, "tensors": len(params),
            "elements": elements, "other_cores_during": case_load.other_cores,
            "contention_processes": args.contention}
    return [result_row(base, runner, runner.bytes_per_element * elements, args.bandwidth) for runner in runners]


def run_fsdp_case(case, algo_name, device, args, during: LoadWindow, bar) -> list[dict]:
    """One FSDP2 case (bench_fsdp.py): torch's for-loop, foreach and fused steps and
    fusedopt's, over fully_shard's DTensor shards, in processes of their own."""
    algo = ALGOS[algo_name]
    bar.set_postfix_str(f"{case.name} {algo_name}")
    implementations = [(peer.name, peer.options) for peer in peers_for(device, args.skip)
                       if peer.wrap is torch_step]
    implementations.append((FUSEDOPT, {"fusedopt": True}))
    case_load = LoadWindow()
    with busy_processes(args.contention), measuring(case_load):
        result = bench_fsdp.run(case, algo_name, implementations, device.type, args.warmup, args.reps)
    during.merge(case_load)
    bar.update(FSDP_ROUNDS)
    elements = result["elements"]
    base = {"model": case.name, "algo": algo_name, "dtype": "float32", "tensors": 2 * case.layers,
            "elements": elements, "other_cores_during": case_load.other_cores,
            "contention_processes": args.contention}
    rows = []
    for name, _ in implementations:
        note = result["failed"].get(name, "slowest rank per step" + ("; shards on the CPU" if case.offload else ""))
        runner = Runner(name, None, times=result["times"].get(name, []),
                        bytes_per_element=bytes_per_element(algo, torch.float32), note=note)
        rows.append(result_row(base, runner, runner.bytes_per_element * elements, args.bandwidth))
    return rows


def result_row(base: dict, runner: Runner, bytes_per_step: int, bandwidth: dict) -> dict:
    row = {**base, "impl": runner.name, "note": runner.note, "times_ms": None, "ms": None,
           "gbps": None, "bw_share_pct": None, "bytes_per_step": bytes_per_step,
           "bytes_per_element": runner.bytes_per_element,
           "extra_mib": None if runner.extra_bytes is None else runner.extra_bytes / 2**20}
    if runner.times:
        ms = statistics.median(runner.times) * 1e3
        gbps = bytes_per_step / (ms / 1e3) / 1e9
        row.update(times_ms=[t * 1e3 for t in runner.times], ms=ms, gbps=gbps,
                   bw_share_pct=100 * gbps / bandwidth["reference_gbps"])
    return row


def case_ms(rows: list[dict], model: str, algo: str) -> dict[str, float | None]:
    return {r["impl"]: r["ms"] for r in rows if (r["model"], r["algo"]) == (model, algo)}


def speedup(ms: dict, ours: str, theirs: str = TORCH_FUSED) -> float | None:
    """theirs' time / ours: >1 means `ours` is faster."""
    if ms.get(ours) and ms.get(theirs):
        return ms[theirs] / ms[ours]
    return None


def add_speedups(rows: list[dict]) -> None:
    """Per row: torch fused's time / this row's time (>1: this row is faster)."""
    for row in rows:
        ms = case_ms(rows, row["model"], row["algo"])
        row["speedup_vs_torch_fused"] = speedup(ms, row["impl"])


def summary_rows(rows: list[dict], models, algos) -> list[dict]:
    """The headline: per case, fusedopt's speedup over torch fused, and the other times."""
    summary = []
    for model in models:
        for algo in algos:
            ms = case_ms(rows, model, algo)
            summary.append({"model": model, "algo": algo, "ms": ms,
                            "speedup": speedup(ms, FUSEDOPT),
                            "flat_speedup": speedup(ms, FUSEDOPT_FLAT)})
    return summary


# --- reporting ---------------------------------------------------------------------

# The README's "Measured" table has exactly these columns (tests/test_bench_cli.py checks).
SUMMARY_COLUMNS = ["model", "algo", "torch fused ms", "fusedopt ms", "speedup",
                   "fusedopt, flat grads ms", "speedup", "torch foreach ms", "torch for-loop ms"]
FULL_COLUMNS = ["model", "algo", "impl", "B/elem", "ms", "GB/s", "%bw", "extra MiB", "vs torch fused", "note"]
LOW_PRECISION_COLUMNS = ["model", "algo", "impl", "bytes/element", "ms", "vs torch fused fp32", "vs fusedopt fp32"]


def fmt(value, spec: str, suffix: str = "") -> str:
    return "-" if value is None else format(value, spec) + suffix


def summary_cells(row: dict) -> list[str]:
    ms = row["ms"]
    return [row["model"], row["algo"], fmt(ms.get(TORCH_FUSED), ".1f"), fmt(ms.get(FUSEDOPT), ".1f"),
            "**" + fmt(row["speedup"], ".2f", "x") + "**", fmt(ms.get(FUSEDOPT_FLAT), ".1f"),
            fmt(row["flat_speedup"], ".2f", "x"), fmt(ms.get("torch foreach"), ".1f"),
            fmt(ms.get("torch for-loop"), ".1f")]


def full_cells(row: dict) -> list[str]:
    return [row["model"], row["algo"], row["impl"], fmt(row["bytes_per_element"], "d"), fmt(row["ms"], ".3f"),
            fmt(row["gbps"], ".1f"),
            fmt(row["bw_share_pct"], ".0f"), fmt(row["extra_mib"], ".1f"),
            fmt(row["speedup_vs_torch_fused"], ".2f", "x"), row["note"]]


def markdown_table(columns: list[str], lines: list[list[str]], numeric: range) -> str:
    """A markdown table padded to read as plain text too; `numeric` columns right-aligned."""
    lines = [columns] + lines
    widths = [max(3, *(len(line[i]) for line in lines)) for i in range(len(columns))]
    rule = ["-" * (w - 1) + ":" if i in numeric else "-" * w for i, w in enumerate(widths)]
    text = ["| " + " | ".join(c.rjust(w) if i in numeric else c.ljust(w)
                              for i, (c, w) in enumerate(zip(line, widths))) + " |"
            for line in [lines[0], rule] + lines[1:]]
    return "\n".join(text)


def summary_table(summary: list[dict]) -> str:
    return markdown_table(SUMMARY_COLUMNS, [summary_cells(r) for r in summary], range(2, 9))


def full_table(rows: list[dict]) -> str:
    return markdown_table(FULL_COLUMNS, [full_cells(r) for r in rows], range(3, 9))


def low_precision_table(rows: list[dict]) -> str:
    """--low-precision's headline: each mode's bytes per element and time beside torch fused fp32."""
    shown = [r for r in rows if r["impl"] in (TORCH_FUSED, FUSEDOPT, *(m.name for m in LOW_PRECISION))]
    fp32 = {(r["model"], r["algo"]): r["ms"] for r in shown if r["impl"] == FUSEDOPT}

    def vs_fp32(r):  # the mode's speedup over fusedopt's own fp32 step in the same run
        base = fp32.get((r["model"], r["algo"]))
        return base / r["ms"] if base and r["ms"] else None

    return markdown_table(LOW_PRECISION_COLUMNS, [
        [r["model"], r["algo"], r["impl"], fmt(r["bytes_per_element"], "d"), fmt(r["ms"], ".1f"),
         "**" + fmt(r["speedup_vs_torch_fused"], ".2f", "x") + "**", fmt(vs_fp32(r), ".2f", "x")]
        for r in shown], range(3, 7))


def reps_text(rows: list[dict], args) -> str:
    done = sorted({len(r["times_ms"]) for r in rows if r["times_ms"]})
    if len(done) <= 1:
        return f"{done[0] if done else args.reps} steps"
    return (f"{done[0]} to {done[-1]} steps (a case stops timing after {args.case_budget_s:.0f} s "
            f"once it has {MIN_REPS})")


def footer_notes(args, machine: dict, load: dict, rows: list[dict]) -> list[str]:
    bandwidth = machine["bandwidth"]
    memory = ("torch.cuda.max_memory_allocated during the step minus memory_allocated before it"
              if args.device.type == "cuda" else
              "peak of the running sum of the CPU allocations and frees that torch.profiler "
              "(profile_memory=True) records during one step; allocations outside torch's "
              "CPU allocator are not seen")
    skipped = [peer.name for peer in TORCH_PEERS if args.device.type not in peer.device_types]
    left_out = [name for name in args.skip if name not in skipped]
    return [
        load["summary"] + ".",
        f"{machine['device_name']}, {machine['torch_threads']} threads, torch {machine['torch_version']}, "
        f"fusedopt CPU kernels {machine['cpu_kernels']}, {args.dtype}.",
        f"ms: median of {reps_text(rows, args)} after {args.warmup} warm-up (plus one first step); "
        "implementations interleaved round-robin, all stepping the same parameters and state."
        + (f" Not timed on {args.device.type}: {', '.join(skipped)}." if skipped else "")
        + (f" Left out (--skip): {', '.join(left_out)}." if left_out else ""),
        "speedup: torch fused's ms / fusedopt's (>1: fusedopt is faster). fusedopt reads grads "
        "as autograd leaves them; flat grads: after zero_grad(set_to_none=False) they are views "
        "of one buffer.",
        "GB/s: bytes the update must move / ms; per element SGD-momentum 5 accesses "
        "(param r+w, grad r, buf r+w), Adam/AdamW 7 (param r+w, grad r, m r+w, v r+w), each of "
        "its buffer's element size (B/elem: their sum; fp32 AdamW 28).",
        f"%bw: share of {bandwidth['reference_gbps']:.1f} GB/s measured in this run, the faster of "
        f"a 256 MiB fp32 copy ({bandwidth['copy_gbps']:.1f} GB/s) and an in-place scale "
        f"({bandwidth['inplace_scale_gbps']:.1f} GB/s), read+write bytes; a step that keeps "
        "more streams in flight can exceed 100%.",
        f"extra MiB: {memory}.",
    ]


# Okabe & Ito's colour-blind-safe palette: the two bars a reader compares, torch fused
# and fusedopt, are orange and blue; the slower torch steps are greys.
COLOURS = {"torch for-loop": "#bbbbbb", "torch foreach": "#888888", TORCH_FUSED: "#e69f00",
           "torch compiled": "#cc79a7", FUSEDOPT: "#0072b2", FUSEDOPT_FLAT: "#56b4e9",
           FUSEDOPT_BF16_STATE: "#009e73", FUSEDOPT_BF16: "#f0e442", FUSEDOPT_BF16_SR: "#d55e00"}


def plot(rows: list[dict], summary: list[dict], title: str, loaded: bool, path: Path) -> None:
    """Top: fusedopt's speedup over torch fused per case, the headline. Below: each
    model's step times, one panel per model (own linear axis), every implementation."""
    # Figure without pyplot: renders with Agg and leaves the global backend alone.
    from matplotlib.figure import Figure

    models = list(dict.fromkeys(r["model"] for r in summary))
    algos = list(dict.fromkeys(r["algo"] for r in summary))
    impls = [name for name in IMPLEMENTATIONS if any(r["impl"] == name and r["ms"] for r in rows)]
    top_height, bottom_height = 0.5 * len(summary) + 1.6, 0.22 * len(impls) * len(algos) + 1.8
    fig = Figure(figsize=(12, top_height + bottom_height + 0.6), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[top_height, bottom_height])

    ax = top.subplots()
    y = list(range(len(summary)))[::-1]  # first case on top
    height = 0.38
    for offset, key, name in [(height / 2, "speedup", FUSEDOPT), (-height / 2, "flat_speedup", FUSEDOPT_FLAT)]:
        values = [r[key] or 0.0 for r in summary]
        bars = ax.barh([i + offset for i in y], values, height, color=COLOURS[name],
                       label=f"{name}: torch fused's ms / fusedopt's")
        ax.bar_label(bars, [fmt(v or None, ".2f", "x") for v in values], padding=3, fontsize=9)
    ax.axvline(1.0, color="black", linewidth=1.2, label="1x = as fast as torch fused")
    ax.set_yticks(y, [f"{r['model']}  {r['algo']}" for r in summary])
    ax.set_xlim(0, max([r[k] or 0 for r in summary for k in ("speedup", "flat_speedup")] + [1]) * 1.12)
    ax.set_xlabel("speedup over torch.optim's fused=True step (linear; >1: fusedopt is faster)")
    ax.set_title("How much faster is fusedopt's step here?", fontsize=12, loc="left", weight="bold")
    if loaded:
        ax.text(0.5, 0.5, "LOADED MACHINE", transform=ax.transAxes, ha="center", va="center",
                fontsize=44, weight="bold", color="#d55e00", alpha=0.3)
    top.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncol=3, fontsize=8,
               frameon=False)

    axes = bottom.subplots(1, len(models), squeeze=False)[0]
    height = 0.8 / len(impls)
    for ax, model in zip(axes, models):
        longest = 0.0
        for k, name in enumerate(impls):
            values = [case_ms(rows, model, algo).get(name) or 0.0 for algo in algos]
            longest = max([longest, *values])
            bars = ax.barh([len(algos) - 1 - a + 0.4 - (k + 0.5) * height for a in range(len(algos))],
                           values, height, color=COLOURS[name], label=name)
            ax.bar_label(bars, [fmt(v or None, ".1f") for v in values], padding=2, fontsize=7)
        ax.set_yticks(range(len(algos))[::-1], algos)
        ax.set_xlim(0, longest * 1.25 or 1)
        ax.set_xlabel("ms per step (linear)", fontsize=8)
        ax.set_title(model, fontsize=10)
    bottom.suptitle("Step time of every implementation (lower is better)", fontsize=11, x=0.01,
                    ha="left", weight="bold")
    bottom.legend(*axes[0].get_legend_handles_labels(), loc="outside lower center", ncol=len(impls),
                  fontsize=8, frameon=False)
    fig.suptitle(title, fontsize=10, color="#d55e00" if loaded else "black")
    fig.savefig(path, dpi=100)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fusedopt_version() -> str:
    try:
        return metadata.version("fusedopt")
    except metadata.PackageNotFoundError:  # imported from a source tree, not installed
        return getattr(fusedopt, "__version__", "unknown")


def machine_info(device: torch.device, bandwidth: dict) -> dict:
    cuda = device.type == "cuda"
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cuda_version": torch.version.cuda,
        "fusedopt_version": fusedopt_version(),
        "cpu_kernels": f"fusedopt._cpu_{ops.CPU_ISA}",
        "cuda_kernels_built": ops.HAS_CUDA_KERNELS,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "bandwidth": bandwidth,
    }


def plot_title(machine: dict, args, load: dict) -> str:
    during = load["during"]["other_cores"]
    others = "unknown" if during is None else f"{during:.2f}"
    return (f"fusedopt vs torch.optim, {args.dtype}: {machine['device_name']}, {machine['torch_threads']} "
            f"threads, torch {machine['torch_version']}, fusedopt kernels {ops.CPU_ISA}\n"
            + {"quiet": f"quiet machine (others kept {others} cores busy while timing)",
               "contention": f"under contention on purpose: {args.contention} busy process(es) "
                             f"(others kept {others} cores busy while timing)",
               "LOADED": f"LOADED MACHINE: others kept {others} cores busy while timing; "
                         "ratios are not this machine's quiet ones"}[load["verdict"]])


# --- command line ------------------------------------------------------------------

# Without --reps, a case stops timing after this long once it has MIN_REPS steps: a quiet
# 2-core machine times 13 to 20 steps of each case within it, and a loaded one (where
# torch's steps crawl) still finishes the default run in minutes.
CASE_BUDGET_S = 10.0
MIN_REPS = 5

# 25.6M and 6.1M parameters: a quick run stays well under 2 GB.
QUICK_MODELS = ["resnet50", "many-small"]
QUICK_ALGOS = ["adamw"]
QUICK_PLACEMENTS = [OWNED, SHARED]


def name_list(valid, what: str):
    def parse(text: str) -> list[str]:
        names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
        unknown = [n for n in names if n not in valid]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown)) or repr(text)}; "
                f"choose from: {', '.join(valid)}")
        return names
    return parse


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def make_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Time fusedopt's SGD/Adam/AdamW steps against torch.optim's "
                    "for-loop, foreach, fused (and on CUDA torch.compile'd) steps.")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: cuda if available, else cpu (default: auto)")
    parser.add_argument("--models", type=name_list(MODELS, "model"), default=None,
                        help=f"comma list from {', '.join(MODELS)} (default: all; "
                             f"with --quick: {','.join(QUICK_MODELS)})")
    parser.add_argument("--algos", type=name_list(ALGOS, "algo"), default=None,
                        help=f"comma list from {', '.join(ALGOS)} (default: all; "
                             f"with --quick: {','.join(QUICK_ALGOS)})")
    parser.add_argument("--placements", type=name_list(PLACEMENTS, "placement"), default=None,
                        help=f"where the parameters live, comma list from {', '.join(PLACEMENTS)} (default: all; "
                             f"shared-memory for {', '.join(SHARED_MODELS)} among the models asked for, fsdp2 "
                             f"with its own models: {len(bench_fsdp.cases('cpu'))} cases per algo, processes of "
                             f"their own; with --quick: {','.join(QUICK_PLACEMENTS)})")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="parameter, grad and state dtype (default: float32)")
    parser.add_argument("--reps", type=positive_int, default=None,
                        help=f"timed steps per implementation (default: 20, fewer (down to {MIN_REPS}) "
                             f"where a case passes {CASE_BUDGET_S:.0f} s; with --quick: 5)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (seconds, under 2 GB): 5 reps, 1 warm-up, "
                             "models and algos as listed above unless given")
    parser.add_argument("--contention", type=positive_int, default=0, metavar="N",
                        help="time every case while N processes the benchmark starts keep one "
                             "core busy each (and stops afterwards): how each implementation "
                             "holds up under load (default: none)")
    parser.add_argument("--low-precision", action="store_true",
                        help="also time fusedopt with bf16 state (fp32 params), with bf16 params and bf16 "
                             "state (rounded to nearest), and with those and stochastic rounding, beside "
                             "torch fused fp32 (only torch's fused step runs of torch's)")
    parser.add_argument("--skip", type=name_list(PEER_KEYS, "torch implementation"), default=[],
                        help=f"comma list of torch implementations not to time, from {', '.join(PEER_KEYS)} "
                             "(default: none; compiled: torch.compile of a step over 3000 tensors, "
                             "many-small's, took over 170 s on an H100)")
    parser.add_argument("--out", type=Path, default=Path("bench-out"),
                        help="folder for results.json, table.md, results.png (default: bench-out)")
    return parser


def parse_args(argv, prog: str) -> argparse.Namespace:
    parser = make_parser(prog)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available "
                     "(torch.cuda.is_available() is False); use --device cpu or auto")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    args.skip = [PEER_KEYS[key] for key in args.skip]
    args.models = args.models or (QUICK_MODELS if args.quick else list(MODELS))
    args.algos = args.algos or (QUICK_ALGOS if args.quick else list(ALGOS))
    args.placements = args.placements or (QUICK_PLACEMENTS if args.quick else list(PLACEMENTS))
    if args.low_precision or args.dtype != "float32":  # the placement cases are float32 ones
        args.placements = [OWNED]
    args.case_budget_s = None if args.reps else CASE_BUDGET_S
    args.reps = args.reps or (5 if args.quick else 20)
    args.warmup = 1 if args.quick else 3
    return args


def main(argv=None, prog: str = "fusedopt-bench") -> int:
    args = parse_args(argv, prog)
    cores = os.cpu_count() or 1
    before = load_before_run()
    if (before.other_cores or 0) > BUSY_CORES:
        print(f"warning: other processes keep {before.other_cores:.2f} of {cores} cores busy; "
              "the results will say so", file=sys.stderr)
    args.bandwidth = measure_bandwidth(args.device, reps=max(args.reps, 5))
    machine = machine_info(args.device, args.bandwidth)

    rows = []
    during = LoadWindow()
    rounds_per_case = 1 + args.warmup + args.reps + 1  # build, warm-up, timed reps, memory
    cases = [(model, placement) for model in args.models for placement in (OWNED, SHARED)
             if placement in args.placements and (placement == OWNED or model in SHARED_MODELS)]
    fsdp_cases = bench_fsdp.cases(args.device.type) if FSDP2 in args.placements else []
    total = len(args.algos) * (len(cases) * rounds_per_case + len(fsdp_cases) * FSDP_ROUNDS)
    with tqdm(total=total, unit="round", desc="fusedopt.bench") as bar:
        for model, placement in cases:
            for algo in args.algos:
                rows += run_case(model, algo, args.device, args, args.models.index(model), during, bar, placement)
                gc.collect()  # frees this case's tensors before the next case makes its own
        for case in fsdp_cases:
            for algo in args.algos:
                rows += run_fsdp_case(case, algo, args.device, args, during, bar)
    add_speedups(rows)
    summary = summary_rows(rows, list(dict.fromkeys(r["model"] for r in rows)), args.algos)
    load = load_verdict(before, during, args.contention, cores)

    notes = footer_notes(args, machine, load, rows)
    print(low_precision_table(rows) if args.low_precision else summary_table(summary))
    print("\n".join(f"  {note}" for note in notes))
    args.out.mkdir(parents=True, exist_ok=True)
    config = {"device": str(args.device), "models": args.models, "algos": args.algos,
              "dtype": args.dtype, "reps": args.reps, "case_budget_s": args.case_budget_s,
              "warmup": args.warmup, "quick": args.quick,
              "contention": args.contention, "lr": LR, "low_precision": args.low_precision,
              "placements": args.placements,
              "skip": args.skip}
    (args.out / "results.json").write_text(json.dumps(
        {"load": load, "machine": machine, "config": config, "notes": notes,
         "summary": summary, "results": rows}, indent=2) + "\n")
    (args.out / "table.md").write_text(
        ("**" + load["summary"] + "**\n\n" if load["loaded"] else "")
        + (low_precision_table(rows) + "\n\n" if args.low_precision else "")
        + summary_table(summary) + "\n\n" + "\n".join(f"- {note}" for note in notes)
        + "\n\nEvery implementation:\n\n" + full_table(rows) + "\n")
    plot(rows, summary, plot_title(machine, args, load), load["loaded"], args.out / "results.png")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'table.md'}, {args.out / 'results.png'}")
    if load["loaded"]:
        print(f"\n*** {load['summary']} ***", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(prog="python -m fusedopt.bench"))
