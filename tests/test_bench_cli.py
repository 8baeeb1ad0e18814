"""The step-time benchmark: its command line, the honesty of what it times (every
implementation steps shared tensors exactly as it would step its own), its load
measurement, and one small real run."""
import io
import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fusedopt import bench

REPO = Path(__file__).resolve().parents[1]


def usage_error(capsys, argv: list[str]) -> str:
    """Runs the CLI in-process; asserts argparse's exit code 2 and returns its stderr."""
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [
    (["--models", "gpt2-small,gpt3"],
     "unknown model 'gpt3'; choose from: gpt2-small, resnet50, bert-base, many-small"),
    (["--algos", "lion"], "unknown algo 'lion'; choose from: sgd, adam, adamw"),
    (["--dtype", "float16"], "invalid choice: 'float16'"),
    (["--reps", "0"], "expected a positive integer, got '0'"),
    (["--contention", "-1"], "expected a positive integer, got '-1'"),
    # fused stays: every speedup is taken against it.
    (["--skip", "fused"], "unknown torch implementation 'fused'; choose from: for-loop, foreach, compiled"),
])
def test_bad_argument_names_the_valid_choices(capsys, argv, expected):
    assert expected in usage_error(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_usage_error(capsys):
    assert "--device cuda: no CUDA device is available" in usage_error(capsys, ["--device", "cuda"])


def test_help_names_the_command_the_user_typed(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--help"])  # what the fusedopt-bench console script calls
    assert capsys.readouterr().out.startswith("usage: fusedopt-bench ")
    completed = subprocess.run([sys.executable, "-m", "fusedopt.bench", "--help"],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.stdout.startswith("usage: python -m fusedopt.bench "), completed.stdout


@pytest.mark.parametrize("model, tensors, elements", [
    ("gpt2-small", 148, 124_439_808),
    ("resnet50", 161, 25_557_032),
    ("bert-base", 199, 109_482_240),
    ("many-small", 3000, 6_144_000),
])
def test_model_shapes_match_the_real_models(model, tensors, elements):
    shapes = bench.MODELS[model]()
    assert (len(shapes), sum(math.prod(s) for s in shapes)) == (tensors, elements)


# --- what a case times ------------------------------------------------------------

SHAPES = [(16, 8), (8,), (3, 5, 2)]


def optimizer_state(state, params):
    return [{k: v.clone() for k, v in state[p].items()} for p in params]


@pytest.mark.parametrize("shared", [False, True], ids=["owned", "shared_memory"])
@pytest.mark.parametrize("algo", list(bench.ALGOS))
def test_each_implementation_steps_its_own_memory_as_it_would_on_its_own(algo, shared):
    """torch.optim's runners share one copy of params, grads and state that torch's
    allocator made, none of it in fusedopt's buffers (where it would get fusedopt's huge
    pages); fusedopt steps its flat buffers. Each step must be the update that
    implementation makes on private copies (so the tensors carry its real work)."""
    params, runners = bench.build_case(SHAPES, bench.ALGOS[algo], torch.device("cpu"),
                                       torch.float32, seed=0, shared=shared)
    assert [r.name for r in runners] == ["torch for-loop", "torch foreach", "torch fused",
                                         "fusedopt", "fusedopt (flat grads)"]
    fused_opt = runners[-1].step.__self__
    torch_params = runners[0].params
    assert all(r.params is torch_params for r in runners[:3]) and all(r.params is None for r in runners[3:])
    torch_state = runners[2].step.__self__.state
    assert len(fused_opt._own_memory()) >= 3  # its params, its flat grads, its state
    torch_memory = [*torch_params, *runners[0].grads, *(v for q in torch_params for v in torch_state[q].values())]
    for t in torch_memory:
        assert not any(start <= t.data_ptr() < end for start, end in fused_opt._own_memory())
        assert t.is_shared() == (shared and any(t is q for q in torch_params))
    assert all(p.is_shared() == shared for p in params)
    for runner in runners:
        assert runner.note == "" and runner.step is not None, runner.note
        stepped = runner.params or params
        state = torch_state if runner.params is not None else fused_opt.state
        # What torch.optim (for-loop) makes of the same values on copies of its own.
        ref_params = [p.detach().clone() for p in stepped]
        ref = bench.ALGOS[algo].torch_cls(ref_params, foreach=False, **bench.ALGOS[algo].kwargs)
        for rp, p, g in zip(ref_params, stepped, runner.grads):
            rp.grad = g.clone()
            ref.state[rp] = {k: v.clone() for k, v in state[p].items()}
        ref.step()

        bench.seat_grads(stepped, runner.grads)
        runner.step()
        for i, (p, rp) in enumerate(zip(stepped, ref_params)):
            torch.testing.assert_close(p, rp, msg=lambda m: f"{runner.name}, param {i}: {m}")
        assert_states_close(optimizer_state(state, stepped), optimizer_state(ref.state, ref_params),
                            runner.name)


def assert_states_close(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert a.keys() == e.keys()
        for key in a:
            torch.testing.assert_close(a[key], e[key], msg=lambda m: f"{what}, state {i} {key}: {m}")


def test_flat_grads_runner_reads_the_flat_buffer_and_the_others_separate_tensors():
    params, runners = bench.build_case(SHAPES, bench.ALGOS["adamw"], torch.device("cpu"),
                                       torch.float32, seed=0)
    by_name = {r.name: r for r in runners}
    flat, given = by_name["fusedopt (flat grads)"].grads, by_name["fusedopt"].grads
    assert len({g.untyped_storage().data_ptr() for g in flat}) == 1
    # Same values, other tensors (torch's allocator's): fusedopt reads these through its
    # per-tensor table.
    assert all(a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr() and torch.equal(a, b)
               for a, b in zip(given, flat))
    assert all(by_name[name].grads is given for name in ["torch for-loop", "torch foreach", "torch fused"])


def test_skip_leaves_those_torch_steps_out_and_the_rest_in():
    args = bench.parse_args(["--device", "cpu", "--skip", "foreach,compiled"], prog="bench")
    _, runners = bench.build_case(SHAPES, bench.ALGOS["sgd"], torch.device("cpu"), torch.float32,
                                  seed=0, skip=args.skip)
    assert [r.name for r in runners] == ["torch for-loop", "torch fused", "fusedopt", "fusedopt (flat grads)"]


@pytest.mark.parametrize("budget_s, timed_reps", [(None, 12), (0.0, bench.MIN_REPS)])
def test_a_case_past_its_time_budget_stops_at_the_minimum_reps(budget_s, timed_reps):
    runners = [bench.Runner(name, step=lambda: None) for name in ("torch fused", "fusedopt")]
    with bench.tqdm(total=2 + 12, file=io.StringIO()) as bar:
        bench.time_round_robin(runners, [], torch.device("cpu"), warmup=2, reps=12,
                               budget_s=budget_s, bar=bar)
        assert bar.n == 14  # the progress bar still reaches the end
    assert [len(r.times) for r in runners] == [timed_reps, timed_reps]


# --- machine load -----------------------------------------------------------------

def window(other_cores: float, seconds: float = 2.0) -> bench.LoadWindow:
    return bench.LoadWindow(seconds, other_cores * seconds, 0.0)


def test_load_window_counts_other_processes_cpu_not_ours():
    start = bench.CpuSample(wall=10.0, busy=100.0, steal=1.0, own=5.0)
    # 2 s of wall time: the machine was busy 3.5 CPU-s, 1.5 of them ours.
    end = bench.CpuSample(wall=12.0, busy=103.5, steal=1.2, own=6.5)
    measured = bench.LoadWindow()
    measured.add(start, end)
    assert measured.other_cores == pytest.approx(1.0)
    assert measured.steal_cores == pytest.approx(0.1)


@pytest.mark.parametrize("before, during, contention, verdict", [
    (0.05, 0.10, 0, "quiet"),
    (0.05, 0.90, 0, "LOADED"),   # load arrived during the run
    (0.90, 0.10, 0, "LOADED"),
    (0.05, 1.50, 1, "contention"),  # the load we made on purpose is not a warning
    (0.90, 1.50, 1, "LOADED"),
])
def test_a_loaded_run_says_so(before, during, contention, verdict):
    load = bench.load_verdict(window(before), window(during), contention, cores=2)
    assert load["verdict"] == verdict
    assert load["loaded"] == (verdict == "LOADED")
    assert load["summary"].startswith("LOADED MACHINE") == (verdict == "LOADED")
    assert f"{during:.2f}" in load["summary"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="reads /proc")
def test_contention_processes_spin_while_asked_and_are_gone_after():
    measured = bench.LoadWindow()
    with bench.busy_processes(2) as pids, bench.measuring(measured):
        assert len(pids) == 2
        time.sleep(0.5)
        assert all(cpu_seconds(pid) > 0 for pid in pids)  # spinning, not just started
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids)
    assert measured.other_cores > 0  # the meter sees them as other processes' load


# --- a real run -------------------------------------------------------------------

def readme_table_header() -> list[str]:
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in (REPO / "README.md").read_text().splitlines() if line.startswith("|")]
    return next(cells for cells in rows if cells[:3] == ["model", "algo", "torch fused ms"])


def test_readme_table_has_the_printed_tables_layout():
    assert readme_table_header() == bench.SUMMARY_COLUMNS


def test_quick_run_under_contention_writes_results(tmp_path):
    # The real entry point, as a user runs it, with one busy process the bench starts.
    completed = subprocess.run(
        [sys.executable, "-m", "fusedopt.bench", "--quick", "--device", "cpu", "--contention", "1",
         "--models", "many-small", "--algos", "adam", "--reps", "3", "--out", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr

    printed_header = completed.stdout.splitlines()[0]
    assert [c.strip() for c in printed_header.strip("|").split("|")] == bench.SUMMARY_COLUMNS
    assert re.search(r"\| many-small +\| adam .*\*\*\d+\.\d\dx\*\*", completed.stdout)
    # --quick also times the params in shared memory (updated where they live).
    assert re.search(r"\| many-small, shared memory +\| adam .*\*\*\d+\.\d\dx\*\*", completed.stdout)

    results = json.loads((tmp_path / "results.json").read_text())
    assert list(results)[0] == "load"  # first thing a reader of the file sees
    load = results["load"]
    assert load["contention_processes"] == 1 and load["verdict"] in ("contention", "LOADED")
    assert load["during"]["seconds"] > 0 and load["before"]["seconds"] > 0
    assert results["machine"]["cpu_kernels"].startswith("fusedopt._cpu_")
    assert results["machine"]["bandwidth"]["reference_gbps"] > 0

    rows = {row["impl"]: row for row in results["results"] if row["model"] == "many-small"}
    assert set(rows) == {"torch for-loop", "torch foreach", "torch fused", "fusedopt",
                         "fusedopt (flat grads)"}  # nothing listed that was not timed
    for row in rows.values():
        assert row["ms"] > 0 and len(row["times_ms"]) == 3, row
        assert row["contention_processes"] == 1
    assert rows["torch fused"]["speedup_vs_torch_fused"] == pytest.approx(1.0)
    summary, shared = results["summary"]  # the params as tensors of their own, then in shared memory
    assert shared["model"] == "many-small, shared memory" and shared["speedup"] > 0
    assert summary["speedup"] == pytest.approx(rows["torch fused"]["ms"] / rows["fusedopt"]["ms"])

    png = (tmp_path / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    table = (tmp_path / "table.md").read_text()
    assert "contention on purpose: 1 busy process" in table or "LOADED MACHINE" in table
    assert "| fusedopt (flat grads) |" in table  # the full table follows the summary


@pytest.mark.parametrize("algo", ["sgd", "adamw"])
def test_host_cost_script_times_each_part_of_a_step(algo):
    # benchmarks/host_cost.py reaches into the step (the op by name, found_inf by the op's
    # schema, _collect_work): it must keep running as those change.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    completed = subprocess.run(
        [sys.executable, "benchmarks/host_cost.py", "--algo", algo, "--count", "40", "--size", "64",
         "--shared-memory", "--parameters", "--reps", "10"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith(f"{algo}, 40 nn.Parameter of 64, shared memory; 40 param tensor(s) to the op")
    parts = dict(re.findall(r"^  (.+?) +([\d.]+) us$", completed.stdout, re.MULTILINE))
    assert list(parts) == ["torch fused step", "fusedopt step", "torch fused step, one tensor of as many elements",
                           "fusedopt step, one tensor of as many elements", "kernel op alone",
                           "op argument passing (returns before the kernel)", "per-step check (_collect_work)",
                           "step with the op stubbed out"]
    assert all(float(us) > 0 for us in parts.values())
    assert re.search(r"^  ceiling: .* = [\d.]+x .*fusedopt's: [\d.]+x\)$", completed.stdout, re.MULTILINE)
