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


@pytest.fixture(scope="session")
def unlabeled_betons(small_betons, tmp_path_factory) -> Path:
    """small_betons' 160 train JPEGs (class folders = any depth) written without labels: 128 train / 32 val."""
    from dataset_prep.writer import convert_folder
    out = tmp_path_factory.mktemp("unlabeled")
    convert_folder(out, data=small_betons / "jpeg" / "train", val_fraction=0.2, max_side=128, num_workers=1,
                   progress=False)
    return out
