"""Report: a PNG from a realistic metrics.jsonl, tolerant of partial runs; clear errors for bad input."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fastmveb.report import RunError, cli, make_report, read_jsonl, series

ROOT = Path(__file__).resolve().parents[1]


def _png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def write_metrics(run: Path, steps: int = 60) -> None:
    """Lines shaped like train.py's: training rows every 10 steps, eval rows per epoch, the final kNN line."""
    run.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in range(10, steps * 10 + 1, 10):
        rows.append({"step": s, "epoch": s / 100, "loss": -1 - math.log1p(s / 100), "align": 1.5 - math.exp(-s / 200),
                     "entropy": -s / 1000, "tau": 0.4, "lr": 0.5 * (1 + math.cos(math.pi * s / (steps * 10))),
                     "ema_momentum": 0.996 + 0.004 * s / (steps * 10), "grad_norm": 1 + math.exp(-s / 100),
                     "uniformity": -3.5, "erank": 40 + s / 10, "samples_per_s": 120.0, "time_data": 0.1,
                     "time_total": 0.5, "skipped": 0.0})
        if s % 100 == 0:
            rows.append({"step": s, "epoch": s / 100, "knn_top1": 20 + s / 20, "knn_top5": 60 + s / 30})
    rows.append({"step": steps * 10, "epoch": steps / 10, "final_knn_top1": 51.0, "final_knn_top5": 90.0,
                 "random_knn_top1": 24.0, "random_knn_top5": 66.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "meta.json").write_text(json.dumps({"git": "deadbeef", "world_size": 1}))
    (run / "eval.jsonl").write_text(json.dumps({"kind": "linear", "mode": "fast", "step": steps * 10, "top1": 61.0,
                                                "top5": 95.0, "ckpt": "step_00000600.pt"}) + "\n")


def test_report_writes_png(tmp_path):
    run = tmp_path / "run"
    write_metrics(run)
    out = make_report(run)
    assert out == run / "report.png"
    w, h = _png_size(out)
    assert w >= 800 and h >= 600 and out.stat().st_size > 20_000
    assert not list(run.glob(".*tmp*"))


def test_report_tolerates_partial_and_truncated_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    # Only a few keys, and the last line cut off mid-write (a killed run).
    (run / "metrics.jsonl").write_text('{"step": 10, "epoch": 0.1, "loss": 1.0}\n{"step": 20, "epoch": 0.2, "loss": NaN}\n{"step": 3')
    rows, bad = read_jsonl(run / "metrics.jsonl")
    assert len(rows) == 2 and bad == 1
    assert series(rows, "loss") == ([10], [1.0])                     # non-finite values are not plotted
    out = make_report(run, tmp_path / "r.png")
    assert _png_size(out)[0] > 0


def test_report_errors(tmp_path, capsys):
    with pytest.raises(RunError, match="not found"):
        make_report(tmp_path / "missing")
    with pytest.raises(RunError, match="no metrics.jsonl"):
        make_report(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("\n")
    assert cli(["--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "no metric lines" in err[0]


def test_report_cli_missing_run_dir(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastmveb.report", "--run", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr


def test_embedding_page_of_a_real_run(small_betons, tmp_path, capsys):
    """--embedding on a trained run: PCA page of trained vs random-init features, with the same kNN top-1 as the
    run's own end-of-training check (same checkpoint, same initial weights, same eval loaders)."""
    from test_train import TRAIN, tiny_overrides
    import os
    r = subprocess.run([sys.executable, TRAIN, "--rc", str(ROOT / "rcs/tiny.yaml"),
                        *tiny_overrides(small_betons, tmp_path, "emb", **{"eval.knn_at_end": "true", "optim.epochs": 1})],
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "emb"
    assert cli(["--run", str(run), "--embedding"]) == 0                 # the command's own entry, in this process
    out = capsys.readouterr().out
    assert (run / "report.png").is_file()
    w, h = _png_size(run / "embedding.png")
    assert w > 500 and h > 250
    fin = [row for row in read_jsonl(run / "metrics.jsonl")[0] if "final_knn_top1" in row][-1]
    assert f"trained {fin['final_knn_top1']:.2f}%, random init {fin['random_knn_top1']:.2f}%" in out
    # An explicit path; a run without checkpoints (or a missing folder for the PNG) is one error line.
    assert cli(["--run", str(run), "--embedding", str(tmp_path / "e.png")]) == 0 and (tmp_path / "e.png").is_file()
    bare = tmp_path / "bare"
    write_metrics(bare)
    capsys.readouterr()
    assert cli(["--run", str(bare), "--embedding"]) == 2
    assert capsys.readouterr().err.startswith("error: no checkpoint")


def test_pca_2d_matches_the_covariance_eigenvectors():
    import torch
    from fastmveb.report import pca_2d
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, generator=g) * torch.tensor([5.0, 2.0, 1.0, 0.5, 0.2, 0.1]) + 3.0
    xy, share = pca_2d(x)
    c = torch.cov(x.double().T)
    evals, evecs = torch.linalg.eigh(c)
    ref = (x.double() - x.double().mean(0)) @ evecs[:, [-1, -2]]
    assert torch.allclose(xy.double().abs(), ref.abs(), atol=1e-4)
    assert abs(share[0] - (evals[-1] / evals.sum()).item()) < 1e-6 and share[0] > share[1]
