"""The training examples run, and their torch.optim and fusedopt loss curves agree."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
# An epoch line: "epoch  torch.optim loss  fusedopt loss  |diff|".
EPOCH_LINE = re.compile(r"^\s*(\d+)\s+(\d+\.\d+)\s+(\d+\.\d+)\s+\S+$", re.MULTILINE)


def run_example(script: str, *args: str) -> str:
    # A script's folder heads sys.path, not the repository: point it at this fusedopt.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    completed = subprocess.run([sys.executable, str(REPO / "examples" / script), *args],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return completed.stdout


def loss_curves(output: str) -> list[tuple[float, float]]:
    rows = [(int(epoch), float(a), float(b)) for epoch, a, b in EPOCH_LINE.findall(output)]
    assert [epoch for epoch, _, _ in rows] == list(range(1, EPOCHS + 1)), output
    return [(a, b) for _, a, b in rows]


@pytest.mark.parametrize("optimizer", ["adamw", "adam", "sgd"])
def test_train_digits_curves_agree(optimizer):
    output = run_example("train_digits.py", "--epochs", str(EPOCHS), "--optimizer", optimizer)
    for torch_loss, fusedopt_loss in loss_curves(output):
        assert fusedopt_loss == pytest.approx(torch_loss, rel=1e-4)
    assert "agree: yes" in output


def test_amp_training_curves_agree():
    output = run_example("amp_training.py", "--epochs", str(EPOCHS), "--optimizer", "adamw")
    for torch_loss, fusedopt_loss in loss_curves(output):
        assert fusedopt_loss == pytest.approx(torch_loss, rel=2e-2, abs=1e-3)
    assert "agree: yes" in output


def test_low_precision_example_shows_round_to_nearest_falling_behind():
    """bf16 with rounding to nearest loses the small late updates; stochastic rounding and
    master weights keep the fp32 loss (within 5%)."""
    output = run_example("low_precision_training.py", "--steps", "800")
    finals = {name.strip(): float(loss) for name, loss in
              re.findall(r"^(fp32|bf16, [a-z ]+?)\s+(\d\.\d+e[-+]\d+)", output, re.MULTILINE)}
    assert set(finals) == {"fp32", "bf16, round to nearest", "bf16, stochastic rounding",
                           "bf16, master weights"}, output
    assert finals["bf16, round to nearest"] > 2 * finals["fp32"], output
    for mode in ("bf16, stochastic rounding", "bf16, master weights"):
        assert finals[mode] == pytest.approx(finals["fp32"], rel=0.05), output
