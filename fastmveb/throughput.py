"""Measured per-device throughput: the rows a run's cost (fastmveb/plan.py) is computed from, and nothing else.

    rows = read_summary("out/summary.json")            # what `make gpu-check OUT=out` measured
    rows = committed(RESULTS)                           # the committed CUDA step benchmarks
    best = match(rows, {"device": "NVIDIA H200", "arch": "resnet50", "views": "2x224 + 6x96", "batch": 128,
                        "precision": "bf16", "compile": True, "channels_last": True})

Every row is one dict with the same keys, whatever file it came from:
    device         "NVIDIA H200", "cpu (x86_64, 2 cores)" (fastmveb.bench.common.device_name)
    arch           torchvision name, "resnet50"
    views          fastmveb.resolution.views_label: "2x224 + 6x96"
    batch          per-device micro-batch of one forward/backward
    precision      "bf16" | "no"
    compile        bool: the networks ran under torch.compile
    channels_last  bool, or None where the file did not say
    samples_per_s  float, source images per second on that one device
    source         "step": the compute-bound step on random views (no data loading);
                   "train": end-to-end training (loader, views, step, logging)
    file           where the row came from

A match is exact on every key asked for: a throughput is a property of the whole setting, and a row that
differs in any one of them (another batch, compile off, another GPU) measured something else. This module
reads files; it neither guesses nor scales a rate.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from .config import ConfigError

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"   # the committed benchmark results
KEYS = ("device", "arch", "views", "batch", "precision", "compile", "channels_last", "samples_per_s", "source", "file")
GPU_CHECK = "run `make gpu-check OUT=DIR` on the GPU host and pass DIR/summary.json"


def read_summary(path: str | Path) -> list[dict]:
    """The rows of a gpu-check summary.json (``summary["throughput"]``); ConfigError (one line) naming the file
    and the fix when it is missing, not JSON, or has no throughput list of rows."""
    path = Path(path)
    try:
        summary = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"throughput file {path} not found; {GPU_CHECK}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"throughput file {path} cannot be read ({e.__class__.__name__}); {GPU_CHECK}") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"throughput file {path} is not JSON (line {e.lineno}: {e.msg}); {GPU_CHECK}") from None
    rows = summary.get("throughput") if isinstance(summary, dict) else None
    if not isinstance(rows, list):
        raise ConfigError(f"throughput file {path} has no \"throughput\" list (not a gpu-check summary.json?); "
                          f"{GPU_CHECK}")
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or not isinstance(row.get("samples_per_s"), (int, float)):
            raise ConfigError(f"throughput file {path}: row {i} is not a measured row (no samples_per_s); {GPU_CHECK}")
        if not measured_rate(row["samples_per_s"]):     # a cost divided by it would be infinite or nonsense
            raise ConfigError(f"throughput file {path}: row {i} has samples_per_s {row['samples_per_s']!r}, not a "
                              f"finite positive rate (a failed or edited measurement); {GPU_CHECK}")
    # a row that does not say where it came from came from this file
    return [{**row, "file": row.get("file") or path.name} for row in rows]


def measured_rate(value) -> bool:
    """A rate a cost can be priced from: a finite number above zero (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def committed(results_dir: str | Path) -> list[dict]:
    """Rows of the committed CUDA step benchmarks (``step-cuda-*.json``) under ``results_dir``; CPU files are
    skipped (a CPU box's rate is not a cost anyone plans with). Newest file first."""
    rows = []
    for path in sorted(Path(results_dir).glob("step-cuda-*.json"), reverse=True):
        try:
            payload = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"benchmark file {path} cannot be read ({e.__class__.__name__}); rerun "
                              "`make bench BENCH=step` on the GPU host or remove it") from None
        device = payload.get("env", {}).get("device")
        for r in payload.get("rows", []):
            if measured_rate(r.get("samples_per_s")):
                rows.append({"device": device, "arch": r.get("arch"), "views": r.get("views"), "batch": r.get("batch"),
                             "precision": r.get("precision"), "compile": r.get("compile"),
                             "channels_last": r.get("channels_last"), "samples_per_s": float(r["samples_per_s"]),
                             "source": "step", "file": path.name})
    return rows


def match(rows: list[dict], want: dict) -> list[dict]:
    """The rows equal to ``want`` on every one of its keys (a row lacking a key does not match), best first:
    end-to-end ("train") before compute-bound ("step"), then the newest file (date-stamped names sort by date)."""
    def same(r: dict, k: str, v) -> bool:          # True == 1 in Python; compile=1 is not compile=True here
        return k in r and r[k] == v and isinstance(r[k], bool) == isinstance(v, bool)
    hits = [r for r in rows if all(same(r, k, v) for k, v in want.items())]
    hits.sort(key=lambda r: str(r.get("file", "")), reverse=True)
    hits.sort(key=lambda r: r.get("source") != "train")          # stable: keeps newest-first within a source
    return hits
