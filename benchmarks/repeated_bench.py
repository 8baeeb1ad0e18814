"""`python -m fusedopt.bench` run N times, each in a fresh process, and its speedups over
torch's fused step summarised per case: every run's ratio, the median and the range. One
run's ratios move by several percent on a shared machine; this is how the figures in the
README's "Measured" and in closing notes are taken.

    python benchmarks/repeated_bench.py --runs 5 --out bench-runs -- \\
        --placements owned,shared-memory --models many-small,gpt2-small --skip for-loop,foreach

Everything after ``--`` goes to every run of the bench (its own --out is set here). With
--low-precision, a second table gives each mode's speedup over fusedopt's fp32 step. Where
torch's fused step fails (its SGD has no DTensor rule under FSDP2), the ratio is taken over
torch's fastest implementation that ran, and the table says which. Each run's load verdict
and bandwidth (the bench's bandwidth line) are listed: a LOADED run's ratios are not the
machine's quiet ones.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

TORCH_IMPLS = ("torch fused", "torch foreach", "torch for-loop")


def baseline(ms: dict[str, float | None]) -> tuple[str, float] | None:
    """(name, ms) of torch's fused step, else of torch's fastest implementation that ran."""
    if ms.get("torch fused"):
        return "torch fused", ms["torch fused"]
    ran = [(ms[name], name) for name in TORCH_IMPLS[1:] if ms.get(name)]
    return (min(ran)[1], min(ran)[0]) if ran else None


def table(runs: list[dict]) -> str:
    lines = ["| run | load | other processes (cores) | bandwidth GB/s |", "| --- | --- | ---: | ---: |"]
    for i, run in enumerate(runs, 1):
        lines.append(f"| {i} | {run['load']['verdict']} | {run['load']['during']['other_cores']:.2f} "
                     f"| {run['machine']['bandwidth']['reference_gbps']:.0f} |")
    lines += ["", "| case | algo | against | its ms | fusedopt ms | speedup per run | median | range |",
              "| --- | --- | --- | ---: | ---: | --- | ---: | --- |"]
    for model, algo in dict.fromkeys((s["model"], s["algo"]) for run in runs for s in run["summary"]):
        against, base_ms, ours, ratios = set(), [], [], []
        for run in runs:
            summary = next((s for s in run["summary"] if (s["model"], s["algo"]) == (model, algo)), None)
            base = baseline(summary["ms"]) if summary else None
            if base is None or not summary["ms"].get("fusedopt"):
                continue
            against.add(base[0])
            base_ms.append(base[1])
            ours.append(summary["ms"]["fusedopt"])
            ratios.append(base[1] / summary["ms"]["fusedopt"])
        if not ratios:
            continue
        lines.append(f"| {model} | {algo} | {', '.join(sorted(against))} | {statistics.median(base_ms):.1f} "
                     f"| {statistics.median(ours):.1f} | {' '.join(f'{r:.2f}' for r in ratios)} "
                     f"| **{statistics.median(ratios):.2f}x** | {min(ratios):.2f}-{max(ratios):.2f} |")
    if any(run["config"].get("low_precision") for run in runs):
        lines += ["", low_precision_table(runs)]
    return "\n".join(lines)


def low_precision_table(runs: list[dict]) -> str:
    """--low-precision runs: each mode's speedup over fusedopt's own fp32 step in the same
    run, beside that run's bandwidth line (what tells a fast-memory run from a slow one)."""
    lines = ["| case | algo | mode | vs fusedopt fp32 per run (bandwidth GB/s) | median | range |",
             "| --- | --- | --- | --- | ---: | --- |"]
    rows = [r for run in runs for r in run["results"]]
    modes = dict.fromkeys(r["impl"] for r in rows if r["impl"].startswith("fusedopt, "))
    for model, algo in dict.fromkeys((r["model"], r["algo"]) for r in rows):
        for mode in modes:
            ratios, cells = [], []
            for run in runs:
                ms = {r["impl"]: r["ms"] for r in run["results"] if (r["model"], r["algo"]) == (model, algo)}
                if ms.get("fusedopt") and ms.get(mode):
                    ratios.append(ms["fusedopt"] / ms[mode])
                    cells.append(f"{ratios[-1]:.2f} ({run['machine']['bandwidth']['reference_gbps']:.0f})")
            if ratios:
                lines.append(f"| {model} | {algo} | {mode.removeprefix('fusedopt, ')} | {', '.join(cells)} "
                             f"| **{statistics.median(ratios):.2f}x** | {min(ratios):.2f}-{max(ratios):.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("bench-runs"))
    parser.add_argument("--summarise", action="store_true", help="only summarise the runs already in --out")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="-- then the bench's own arguments")
    args = parser.parse_args()
    bench_args = args.bench_args[1:] if args.bench_args[:1] == ["--"] else args.bench_args
    if not args.summarise:
        for i in range(1, args.runs + 1):
            out = args.out / f"run{i}"
            print(f"run {i} of {args.runs} -> {out}", flush=True)
            subprocess.run([sys.executable, "-m", "fusedopt.bench", *bench_args, "--out", str(out)],
                           check=True, stdout=subprocess.DEVNULL)
    runs = [json.loads(path.read_text()) for path in sorted(args.out.glob("run*/results.json"))]
    text = table(runs)
    (args.out / "summary.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
