"""Optimizer step-time benchmark: fusedopt against torch.optim's for-loop, foreach and
fused steps (and, on CUDA, a torch.compile'd step), all in one run.

    python -m fusedopt.bench --quick
    fusedopt-bench --models gpt2-small,resnet50 --algos adamw --dtype bfloat16 --out bench-out

Models are parameter *shapes* only (plain tensors, no download) with random grads
assigned once, so a timed step is the optimizer's work and nothing else. Peers are
timed round-robin, rep by rep, so machine noise hits all of them alike; reported
times are medians. Writes results.json, table.md and results.png to --out.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

import fusedopt

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


def torch_step(algo: Algo, params: list[torch.Tensor], **implementation):
    """torch.optim with its implementation picked by keyword (foreach=..., fused=...)."""
    opt = algo.torch_cls(params, **implementation, **algo.kwargs)
    return opt, opt.step


def torch_compiled(algo: Algo, params: list[torch.Tensor]):
    opt = algo.torch_cls(params, **algo.kwargs)

    @torch.compile(fullgraph=False)
    def step():
        opt.step()

    return opt, step


def fusedopt_step(algo: Algo, params: list[torch.Tensor]):
    opt = algo.fusedopt_cls(params, **algo.kwargs)
    return opt, opt.step


@dataclass(frozen=True)
class Peer:
    name: str
    make: Callable[[Algo, list[torch.Tensor]], tuple[torch.optim.Optimizer, Step]]
    # Re-seat the grads as views of fusedopt's flat grad buffer before timing.
    flat_grads: bool = False
    device_types: tuple[str, ...] = ("cpu", "cuda")


FUSEDOPT = "fusedopt"
FUSEDOPT_FLAT = "fusedopt (flat grads)"
PEERS = [
    Peer("torch for-loop", partial(torch_step, foreach=False)),
    Peer("torch foreach", partial(torch_step, foreach=True)),
    Peer("torch fused", partial(torch_step, fused=True)),
    # On CPU, inductor would compile C++ for every (model, algo), taking longer than the
    # whole benchmark; the compiled step is a GPU baseline.
    Peer("torch compiled", torch_compiled, device_types=("cuda",)),
    Peer(FUSEDOPT, fusedopt_step),
    Peer(FUSEDOPT_FLAT, fusedopt_step, flat_grads=True),
]


@dataclass
class Runner:
    """One implementation of one (model, algo) case, with its own params, grads and state."""
    name: str
    step: Step | None
    note: str = ""
    times: list[float] = field(default_factory=list)
    extra_bytes: int | None = None


def build_runner(peer: Peer, algo: Algo, ref_params, ref_grads) -> Runner:
    device_type = ref_params[0].device.type
    if device_type not in peer.device_types:
        return Runner(peer.name, None, f"skipped: timed on {', '.join(peer.device_types)} only")
    params = [p.clone() for p in ref_params]
    for p, g in zip(params, ref_grads):
        p.grad = g.clone()
    try:
        opt, step = peer.make(algo, params)
        step()  # creates the state (and compiles), so timing sees steady-state steps
    except Exception as error:  # a peer failing is a result to report, not a crash
        lines = str(error).strip().splitlines() or [""]
        return Runner(peer.name, None, f"failed: {type(error).__name__}: {lines[0]}"[:120])
    note = ""
    if peer.flat_grads:
        opt.zero_grad(set_to_none=False)
        with torch.no_grad():
            for p, g in zip(params, ref_grads):
                p.grad.copy_(g)
        if len({p.grad.untyped_storage().data_ptr() for p in params}) != 1:
            note = "grads did not become views of one buffer"
    return Runner(peer.name, step, note)


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


def time_round_robin(runners: list[Runner], device, warmup: int, reps: int, bar: tqdm) -> None:
    live = [r for r in runners if r.step is not None]
    for rep in range(warmup + reps):
        # Rotate the order each rep so no peer always runs right after the same one.
        shift = rep % max(1, len(live))
        for runner in live[shift:] + live[:shift]:
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


def random_model(shapes, device, dtype, seed: int):
    generator = torch.Generator(device=device).manual_seed(seed)
    params = [torch.randn(s, generator=generator, device=device, dtype=dtype) for s in shapes]
    grads = [torch.randn(s, generator=generator, device=device, dtype=dtype) for s in shapes]
    return params, grads


def run_case(model, algo_name, ref_params, ref_grads, device, args, bar) -> list[dict]:
    algo = ALGOS[algo_name]
    bar.set_postfix_str(f"{model} {algo_name}: building")
    runners = [build_runner(peer, algo, ref_params, ref_grads) for peer in PEERS]
    bar.update()
    gc.collect()
    bar.set_postfix_str(f"{model} {algo_name}: timing")
    time_round_robin(runners, device, args.warmup, args.reps, bar)
    bar.set_postfix_str(f"{model} {algo_name}: memory")
    for runner in runners:
        if runner.step is not None:
            runner.extra_bytes = peak_extra_bytes(runner.step, device)
    bar.update()

    elements = sum(p.numel() for p in ref_params)
    bytes_per_step = algo.bytes_per_element * ref_params[0].element_size() * elements
    base = {"model": model, "algo": algo_name, "dtype": args.dtype, "tensors": len(ref_params),
            "elements": elements, "bytes_per_step": bytes_per_step}
    return [result_row(base, runner, bytes_per_step, args.bandwidth) for runner in runners]


def result_row(base: dict, runner: Runner, bytes_per_step: int, bandwidth: dict) -> dict:
    row = {**base, "impl": runner.name, "note": runner.note, "times_ms": None, "ms": None,
           "gbps": None, "bw_share_pct": None,
           "extra_mib": None if runner.extra_bytes is None else runner.extra_bytes / 2**20}
    if runner.times:
        ms = statistics.median(runner.times) * 1e3
        gbps = bytes_per_step / (ms / 1e3) / 1e9
        row.update(times_ms=[t * 1e3 for t in runner.times], ms=ms, gbps=gbps,
                   bw_share_pct=100 * gbps / bandwidth["reference_gbps"])
    return row


def add_speedups(rows: list[dict]) -> None:
    """speedup = this impl's time / fusedopt's time (>1: fusedopt is faster)."""
    for row in rows:
        same_case = [r for r in rows if (r["model"], r["algo"]) == (row["model"], row["algo"])]
        for impl, key in [(FUSEDOPT, "fusedopt_speedup"), (FUSEDOPT_FLAT, "fusedopt_flat_speedup")]:
            ours = next(r["ms"] for r in same_case if r["impl"] == impl)
            row[key] = row["ms"] / ours if row["ms"] and ours else None


# --- reporting ---------------------------------------------------------------------

COLUMNS = ["model", "algo", "impl", "ms", "GB/s", "%bw", "extra MiB",
           "fusedopt x", "flat x", "note"]


def table_cells(row: dict) -> list[str]:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)
    return [row["model"], row["algo"], row["impl"], fmt(row["ms"], ".3f"), fmt(row["gbps"], ".1f"),
            fmt(row["bw_share_pct"], ".0f"), fmt(row["extra_mib"], ".1f"),
            fmt(row["fusedopt_speedup"], ".2f"), fmt(row["fusedopt_flat_speedup"], ".2f"),
            row["note"]]


def footer_notes(args, machine: dict) -> list[str]:
    bandwidth = machine["bandwidth"]
    memory = ("torch.cuda.max_memory_allocated during the step minus memory_allocated before it"
              if args.device.type == "cuda" else
              "peak of the running sum of the CPU allocations and frees that torch.profiler "
              "(profile_memory=True) records during one step; allocations outside torch's "
              "CPU allocator are not seen")
    return [
        f"ms: median of {args.reps} steps after {args.warmup} warm-up (plus one state-creating "
        f"first step); implementations interleaved round-robin. dtype {args.dtype}, "
        f"device {machine['device_name']}.",
        "GB/s: bytes the update must move / ms; per element SGD-momentum 5 accesses "
        "(param r+w, grad r, buf r+w), Adam/AdamW 7 (param r+w, grad r, m r+w, v r+w).",
        f"%bw: share of {bandwidth['reference_gbps']:.1f} GB/s measured in this run, the faster of "
        f"a 256 MiB fp32 copy ({bandwidth['copy_gbps']:.1f} GB/s) and an in-place scale "
        f"({bandwidth['inplace_scale_gbps']:.1f} GB/s), read+write bytes; a step that keeps "
        "more streams in flight can exceed 100%.",
        f"extra MiB: {memory}.",
        "fusedopt x / flat x: this row's ms divided by fusedopt's (grads as given) / fusedopt's "
        "with flat grads (zero_grad(set_to_none=False), then grads copied in); >1 means "
        "fusedopt is faster.",
    ]


def plain_table(rows: list[dict]) -> str:
    lines = [COLUMNS] + [table_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(COLUMNS))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(text)


def markdown_table(rows: list[dict]) -> str:
    lines = [COLUMNS, ["---"] * len(COLUMNS)] + [table_cells(r) for r in rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def plot(rows: list[dict], models: list[str], algos: list[str], title: str, path: Path) -> None:
    # Figure without pyplot: renders with Agg and leaves the global backend alone.
    from matplotlib.figure import Figure

    impls = [peer.name for peer in PEERS if any(r["impl"] == peer.name and r["ms"] for r in rows)]
    metrics = [("ms", "step time (ms, log scale)"), ("bw_share_pct", "% of measured bandwidth")]
    fig = Figure(figsize=(4.5 * len(algos) + 2, 7), layout="constrained")
    axes = fig.subplots(len(metrics), len(algos), squeeze=False)
    width = 0.8 / len(impls)
    for col, algo in enumerate(algos):
        for line, (metric, label) in enumerate(metrics):
            ax = axes[line][col]
            for k, impl in enumerate(impls):
                values = [next((r[metric] for r in rows if (r["model"], r["algo"], r["impl"])
                                == (model, algo, impl) and r[metric]), float("nan"))
                          for model in models]
                ax.bar([m + k * width for m in range(len(models))], values, width, label=impl)
            ax.set_xticks([m + 0.4 - width / 2 for m in range(len(models))], models)
            ax.set_title(f"{algo}: {label}", fontsize=10)
            if metric == "ms":
                ax.set_yscale("log")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle(title)
    fig.savefig(path, dpi=110)


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


def load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def warn_if_busy() -> None:
    # Other processes on the cores skew every peer, and torch's per-tensor parallel
    # regions (fused steps on CPU) wait on descheduled threads, up to 100x slower.
    load, cores = load_average(), os.cpu_count() or 1
    if load is not None and load > 0.5 * cores:
        print(f"warning: load average {load:.1f} on {cores} cores; other processes will skew "
              "these timings", file=sys.stderr)


def machine_info(device: torch.device, bandwidth: dict) -> dict:
    cuda = device.type == "cuda"
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": load_average(),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda,
        "fusedopt_version": fusedopt_version(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "bandwidth": bandwidth,
    }


# --- command line ------------------------------------------------------------------

QUICK_MODELS = ["gpt2-small", "many-small"]
# Cloning gpt2-small's 1 GB of params and grads for each implementation dominates a
# quick run on a small CPU, so it times one algorithm.
QUICK_ALGOS = ["adamw"]


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


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fusedopt.bench",
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
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="parameter, grad and state dtype (default: float32)")
    parser.add_argument("--reps", type=positive_int, default=None,
                        help="timed steps per implementation (default: 20; with --quick: 3)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run (under a minute on a 2-core CPU): 3 reps, 1 warm-up, "
                             "models and algos as listed above unless given")
    parser.add_argument("--out", type=Path, default=Path("bench-out"),
                        help="folder for results.json, table.md, results.png (default: bench-out)")
    return parser


def parse_args(argv) -> argparse.Namespace:
    parser = make_parser()
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available "
                     "(torch.cuda.is_available() is False); use --device cpu or auto")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.device = torch.device(args.device)
    args.models = args.models or (QUICK_MODELS if args.quick else list(MODELS))
    args.algos = args.algos or (QUICK_ALGOS if args.quick else list(ALGOS))
    args.reps = args.reps or (3 if args.quick else 20)
    args.warmup = 1 if args.quick else 3
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    warn_if_busy()
    dtype = getattr(torch, args.dtype)
    args.bandwidth = measure_bandwidth(args.device, reps=max(args.reps, 5))
    machine = machine_info(args.device, args.bandwidth)

    rows = []
    rounds_per_case = 1 + args.warmup + args.reps + 1  # build, warm-up, timed reps, memory
    with tqdm(total=len(args.models) * len(args.algos) * rounds_per_case, unit="round",
              desc="fusedopt.bench") as bar:
        for seed, model in enumerate(args.models):
            bar.set_postfix_str(f"{model}: random params and grads")
            ref_params, ref_grads = random_model(MODELS[model](), args.device, dtype, seed)
            for algo in args.algos:
                rows += run_case(model, algo, ref_params, ref_grads, args.device, args, bar)
                gc.collect()
            del ref_params, ref_grads  # before the next model's tensors are made
    add_speedups(rows)

    notes = footer_notes(args, machine)
    print(plain_table(rows))
    print("\n".join(f"  {note}" for note in notes))
    args.out.mkdir(parents=True, exist_ok=True)
    config = {"device": str(args.device), "models": args.models, "algos": args.algos,
              "dtype": args.dtype, "reps": args.reps, "warmup": args.warmup, "quick": args.quick,
              "lr": LR}
    (args.out / "results.json").write_text(json.dumps(
        {"machine": machine, "config": config, "notes": notes, "results": rows}, indent=2) + "\n")
    (args.out / "table.md").write_text(
        markdown_table(rows) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n")
    plot(rows, args.models, args.algos, f"fusedopt.bench: {machine['device_name']}, {args.dtype}",
         args.out / "results.png")
    print(f"wrote {args.out / 'results.json'}, {args.out / 'table.md'}, {args.out / 'results.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
