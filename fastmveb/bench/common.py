"""Shared benchmark plumbing: environment description, timing, result files, markdown tables."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import time
from pathlib import Path

import torch

from fastmveb.checkpoint import git_revision

from fastmveb.report import atomic_write_text, replace_block  # noqa: F401  (README blocks, results files)

RESULTS_DIR = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(device: torch.device | str) -> dict:
    """What a reader needs to trust a number: device, versions, date, git revision."""
    rev = git_revision()
    return {
        "device": device_name(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git": rev,
    }


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, warmup: int = 1, iters: int = 5, min_time: float = 0.0) -> float:
    """Median seconds per call of fn() (device-synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    t_total = 0.0
    i = 0
    while i < iters or t_total < min_time:
        t0 = time.perf_counter()
        fn()
        sync(device)
        dt = time.perf_counter() - t0
        times.append(dt)
        t_total += dt
        i += 1
    times.sort()
    return times[len(times) // 2]


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return "(no rows)"
    columns = columns or list(rows[0].keys())

    def fmt(v):
        if isinstance(v, float):
            return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.0f}"
        return "" if v is None else str(v)
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(fmt(r.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def write_results(name: str, env: dict, settings: dict, rows: list[dict], columns: list[str] | None = None,
                  out_dir: str | Path | None = None) -> Path:
    """Write <name>-<device>-<date>.json and .md; returns the JSON path. Numbers come only from the run."""
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = "cuda" if "cpu" not in env["device"] else "cpu"
    stem = f"{name}-{dev}-{env['date'][:10]}"
    payload = {"benchmark": name, "env": env, "settings": settings, "rows": rows}
    path = out_dir / f"{stem}.json"
    atomic_write_text(path, json.dumps(payload, indent=2))
    table = markdown_table(rows, columns)
    md = (f"### {name}\n\n{env['device']}, torch {env['torch']}, {env['date']}, git {env['git']}\n\n"
          f"settings: `{json.dumps(settings)}`\n\n{table}\n")
    (out_dir / f"{stem}.md").write_text(md)
    return path
