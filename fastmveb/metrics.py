"""Run metrics: JSONL + TensorBoard on the main process, and the collapse monitors.

The trainer reads device scalars only every ``train.log_every`` steps (one host sync per read); everything
here runs at those points only. The monitors return NaN, never raise, when the embeddings are not finite
(the trainer's NaN guard then reports the cause, not a LinAlgError from inside an SVD).
"""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch

from fastmveb.fileio import write_text


@torch.no_grad()
def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log E_{i != j} exp(-t ||z_i - z_j||^2) for L2-normalised z (Wang & Isola): -4 when spread, 0 when collapsed."""
    z, finite = _finite(z)
    n = z.shape[0]
    sq = (2 - 2 * z @ z.T).clamp_min(0)            # ||zi - zj||^2 on the sphere
    off = ~torch.eye(n, dtype=torch.bool, device=z.device)
    u = torch.logsumexp(-t * sq[off], dim=0) - math.log(n * (n - 1))
    return torch.where(finite, u, torch.full_like(u, float("nan")))


@torch.no_grad()
def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """exp(entropy of the normalised singular values) of the centred embeddings (Roy & Vetterli, 2007).

    1 for a collapse onto one direction, up to min(N, d) for a spread batch.
    """
    z, finite = _finite(z)
    s = torch.linalg.svdvals(z - z.mean(0, keepdim=True))   # raises on NaN/inf input: hence _finite
    p = s / s.sum().clamp_min(1e-12)
    r = torch.exp(-(p * torch.log(p.clamp_min(1e-12))).sum())
    return torch.where(finite, r, torch.full_like(r, float("nan")))


def _finite(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(z as float with non-finite entries zeroed, 0-d bool: all finite), without a host sync."""
    z = z.detach().float()
    ok = torch.isfinite(z)
    return torch.where(ok, z, torch.zeros_like(z)), ok.all()


def collapse_warning(erank: float, unif: float, batch: int, dim: int) -> str | None:
    """A one-line warning when the embeddings look collapsed (thresholds chosen far from healthy runs)."""
    if erank < max(2.0, 0.01 * min(batch, dim)):
        return f"embeddings look collapsed: effective rank {erank:.2f} of at most {min(batch, dim)}"
    if unif > -0.05:
        return f"embeddings look collapsed: uniformity {unif:.3f} (0 = all equal, about -4 = spread)"
    return None


class LogWindow:
    """The step statistics of one logging window, summed ON THE DEVICE (no host sync per step), read once.

    ``add`` after every step; ``read`` every train.log_every steps syncs once, for all the window's numbers
    together, and starts the next window. ``max_bad`` is the longest run of consecutive skipped (non-finite)
    steps inside the window, counted across window borders.
    """

    def __init__(self, device: torch.device):
        self.consecutive_bad = torch.zeros((), dtype=torch.int64, device=device)
        self._start()

    def _start(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.steps, self.data_wait, self.t0 = 0, 0.0, time.perf_counter()
        self.max_bad = torch.zeros_like(self.consecutive_bad)

    def add(self, stats: dict[str, torch.Tensor], skip: torch.Tensor, data_wait: float) -> None:
        self.consecutive_bad = torch.where(skip, self.consecutive_bad + 1, torch.zeros_like(self.consecutive_bad))
        self.max_bad = torch.maximum(self.max_bad, self.consecutive_bad)
        for k, val in stats.items():
            self.sums[k] = self.sums[k] + val.float() if k in self.sums else val.float()
        self.sums["skipped"] = self.sums.get("skipped", 0) + skip.float()
        self.steps, self.data_wait = self.steps + 1, self.data_wait + data_wait

    def read(self, z: torch.Tensor, batch: int) -> tuple[dict, int]:
        """(row of window means, the skipped count, the collapse monitors of ``z`` and the timings; the most
        consecutive skipped steps). One host sync. ``batch``: samples per step (the global batch)."""
        keys = list(self.sums)
        vals = torch.stack([self.sums[k] for k in keys]
                           + [uniformity(z), effective_rank(z), self.max_bad.float()]).tolist()
        seconds = time.perf_counter() - self.t0
        row = {k: v / self.steps for k, v in zip(keys, vals)}
        row.update(skipped=vals[keys.index("skipped")], uniformity=vals[-3], erank=vals[-2],
                   samples_per_s=self.steps * batch / seconds, time_data=self.data_wait / self.steps,
                   time_total=seconds / self.steps)
        max_bad = int(vals[-1])
        self._start()
        return row, max_bad


class MetricsLogger:
    """Appends one JSON object per call to run_dir/metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines past the checkpoint so the file reads as one uninterrupted run."""
        if not (self.enabled and self.path.exists()):
            return
        keep, bad = [], 0
        for ln in self.path.read_text(errors="replace").splitlines():
            if not ln.strip():
                continue
            try:
                row = json.loads(ln)
                s = int(row["step"])
            except (ValueError, KeyError, TypeError):
                bad += 1               # a line cut by a kill mid-write (the last one), or damaged
                continue
            if s <= step:
                keep.append(ln)
        if bad:
            print(f"warning: {self.path}: dropped {bad} incomplete line(s) (a write cut by a kill)", file=sys.stderr)
        write_text(self.path, "".join(ln + "\n" for ln in keep))

    def log(self, step: int, epoch: float, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), "epoch": round(float(epoch), 4)}
        row.update({k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                    for k, v in values.items()})
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float) and math.isfinite(v):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
