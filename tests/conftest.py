"""Shared fixtures: a small real synthetic dataset written once per test session."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def small_betons(tmp_path_factory) -> Path:
    """4 classes x 40 train / 10 val real JPEGs in real FFCV betons (dir with train.beton, val.beton)."""
    out = tmp_path_factory.mktemp("synthetic")
    subprocess.run([sys.executable, "-m", "dataset_prep", "synthetic", "--out", str(out), "--classes", "4",
                    "--train-per-class", "40", "--val-per-class", "10", "--max-side", "128", "--quiet"],
                   check=True, cwd=ROOT, timeout=600)
    assert (out / "train.beton").is_file() and (out / "val.beton").is_file()
    return out
