"""What a user sees when fusedopt cannot load, and what the package declares."""
import importlib.machinery
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def import_error_from(tree: Path) -> str:
    """Imports fusedopt from `tree` in a fresh interpreter; returns what it printed.
    -S: no site hooks, so an editable install's finder cannot serve the built tree."""
    site_packages = Path(torch.__file__).parents[1]
    completed = subprocess.run([sys.executable, "-S", "-c", "import fusedopt"], cwd=tree,
                               env={"PATH": "/usr/bin:/bin", "PYTHONPATH": f"{tree}:{site_packages}"},
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode != 0, "fusedopt imported"
    return completed.stderr


def python_sources(tmp_path: Path) -> Path:
    """A copy of the package's Python files only: a source tree nobody has built."""
    package = tmp_path / "fusedopt"
    package.mkdir()
    for source in (REPO / "fusedopt").glob("*.py"):
        if source.name != "_build_info.py":
            shutil.copy(source, package)
    return package


def test_unbuilt_source_tree_says_the_extension_is_not_built(tmp_path):
    python_sources(tmp_path)
    error = import_error_from(tmp_path)
    assert "was the extension built?" in error and "pip install --no-build-isolation -e" in error
    assert "circular import" not in error


def test_other_torch_than_the_build_is_named_before_loading(tmp_path):
    package = python_sources(tmp_path)
    # A module file in place (never loaded) and a record of another torch.
    (package / ("_C" + importlib.machinery.EXTENSION_SUFFIXES[0])).write_bytes(b"")
    (package / "_build_info.py").write_text("TORCH_VERSION = '2.4.0+cu121'\nTORCH_CUDA = '12.1'\n")
    error = import_error_from(tmp_path)
    assert "built against torch 2.4.0+cu121 (CUDA 12.1)" in error
    assert f"but torch {torch.__version__} (CUDA {torch.version.cuda}) is installed" in error


def test_package_metadata_pins_the_torch_it_builds_against(tmp_path):
    completed = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(tmp_path)],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr
    (requires,) = tmp_path.glob("*.egg-info/requires.txt")
    assert requires.read_text().splitlines()[0] == f"torch=={metadata.version('torch')}"


def test_license_is_bsd_3_clause():
    assert (REPO / "LICENSE").read_text().startswith("BSD 3-Clause License")
