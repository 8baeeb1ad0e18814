"""The step-time benchmark's command line: usage errors, and one small real run."""
import json
import math
import os
import subprocess
import sys
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
])
def test_bad_argument_names_the_valid_choices(capsys, argv, expected):
    assert expected in usage_error(capsys, argv)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_without_cuda_is_a_usage_error(capsys):
    assert "--device cuda: no CUDA device is available" in usage_error(capsys, ["--device", "cuda"])


@pytest.mark.parametrize("model, tensors, elements", [
    ("gpt2-small", 148, 124_439_808),
    ("resnet50", 161, 25_557_032),
    ("bert-base", 199, 109_482_240),
    ("many-small", 3000, 6_144_000),
])
def test_model_shapes_match_the_real_models(model, tensors, elements):
    shapes = bench.MODELS[model]()
    assert (len(shapes), sum(math.prod(s) for s in shapes)) == (tensors, elements)


def test_quick_run_writes_results(tmp_path):
    # One thread: this checks outputs, not timings, and on a busy machine torch's fused
    # CPU step (a parallel region per tensor) crawls when it has two.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The real entry point, as a user runs it.
    completed = subprocess.run(
        [sys.executable, "-m", "fusedopt.bench", "--quick", "--device", "cpu",
         "--models", "many-small", "--algos", "adam", "--reps", "3", "--out", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    assert "fusedopt (flat grads)" in completed.stdout  # the table was printed

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["machine"]["bandwidth"]["reference_gbps"] > 0
    rows = {row["impl"]: row for row in results["results"]}
    for impl in ["torch for-loop", "torch foreach", "fusedopt", "fusedopt (flat grads)"]:
        assert rows[impl]["ms"] > 0 and len(rows[impl]["times_ms"]) == 3, rows[impl]
        assert rows[impl]["model"] == "many-small" and rows[impl]["algo"] == "adam"
    assert rows["fusedopt"]["fusedopt_speedup"] == pytest.approx(1.0)

    png = (tmp_path / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert "| fusedopt |" in (tmp_path / "table.md").read_text()
