"""Shared fixtures: a small real synthetic dataset written once per test session (once per pytest-xdist worker)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    # `make test` runs two pytest-xdist workers on two cores: each worker, and every process it starts, gets one
    # thread; two workers of two threads each would contend for the cores and finish later than one.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# The longest modules first. `make test` hands whole modules to two pytest-xdist workers (--dist loadscope, so a
# module's shared trained run is built once) in collection order; a long module handed out last would leave the
# other worker idle at the end. Measured with --durations: each of these takes 2-6 minutes on one core.
LONGEST_FIRST = ["test_learning.py", "test_train.py", "test_elastic.py", "test_resolution.py", "test_gpu_check.py",
                 "test_faults_runs.py", "test_bench.py"]


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))          # stable: each module keeps its order


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
    from dataset_prep.convert import convert_folder
    from dataset_prep.options import BetonOptions
    out = tmp_path_factory.mktemp("unlabeled")
    convert_folder(out, BetonOptions(max_side=128, num_workers=1, progress=False), data=small_betons / "jpeg" / "train",
                   val_fraction=0.2)
    return out
