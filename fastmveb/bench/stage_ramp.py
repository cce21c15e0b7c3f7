"""Progressive-resolution benchmark: ``python -m fastmveb.bench ramp [--rcs RC,RC...] [--short] [--compile true]``
``[--set section.key=value ...]`` (applied to every config). Not part of ``all`` (on a CPU with --compile true
each size compiles for minutes).

Times ``fastmveb.step.train_step`` (as the step benchmark does: random views already on the device, so no
loading or augmentation) at every size of each run config's resolution schedule (fastmveb/resolution.py),
in schedule order on ONE network per config, as training meets them: the first step at each size includes
whatever it compiles, and ``graphs_added`` counts the torch.compile graphs it added (dynamo's counter).
From the per-size samples/s it projects each config's mean epoch time over its schedule, relative to the
first config (default rcs/rn50.yaml, the released recipe, against rcs/rn50_fast.yaml), the whole run's time
(epochs x mean epoch time) and what the ramp saves against training every epoch at its final size.

On CUDA the configs run as written (ResNet-50, their batch, bf16, compiled); on the CPU a small network
(ResNet-18, --short ResNet-10, 512-d projector) at batch 16 (--short 8) in fp32 at the configs' real view
sizes: CPU figures are ratios between sizes, not GPU speeds. Every config uses the same batch, so the
projection compares work per sample (rn50_fast's larger per-GPU batch is not credited).
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import torch

from fastmveb.bench.common import (ROOT, build, default_threads, environment, free, identity_views, loadavg,
                                   make_accelerator, markdown_table, one_process, pick_device, pin_threads,
                                   random_views, step_iters, sync, timed_steps, write_results)
from fastmveb.build import uses_compile

DEFAULT_RCS = "rcs/rn50.yaml,rcs/rn50_fast.yaml"
COLUMNS = ["recipe", "epochs", "views", "arch", "batch", "compile", "samples_per_s", "step_ms", "first_step_s",
           "graphs_added", "epoch_time_vs_base", "mean_epoch_time_vs_base", "run_time_vs_base", "ramp_saving"]


def add_args(parser) -> None:
    parser.add_argument("--rcs", default=DEFAULT_RCS, metavar="RC,RC",
                        help="comma-separated run configs whose resolution schedules are timed; epoch times are "
                             f"projected against the first (default {DEFAULT_RCS})")
    parser.add_argument("--arch", default=None, help="backbone (default: the rcs' on CUDA; resnet18 CPU, "
                        "resnet10 CPU --short)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch of one step, the same for every config "
                        "(default: each rc's micro-batch on CUDA; CPU 16, --short 8)")
    parser.add_argument("--precision", choices=["bf16", "no"], default=None,
                        help="autocast (default: the rcs' on CUDA; CPU no)")
    parser.add_argument("--compile", choices=["auto", "true", "false"], default=None,
                        help="torch.compile (default: the rcs'; auto = on for CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads, pinned (default on CPU: 1; on CUDA: not pinned)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any other run-config override, applied to every config (repeatable)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per size (the first one compiles)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps per size")


def ramp_config(args, device: torch.device, rc: str):
    """The run config of ``rc`` with the benchmark's device defaults and the flags applied."""
    from fastmveb.config import apply_overrides, load_config
    cfg = load_config(ROOT / rc if not Path(rc).is_absolute() else rc)
    cpu = device.type == "cpu"
    sets = [("train", "progress", False),
            ("model", "arch", args.arch or (("resnet10" if args.short else "resnet18") if cpu else None)),
            ("data", "global_batch_size", args.batch_size or ((8 if args.short else 16) if cpu else None)),
            ("data", "per_device_batch_size", 0 if args.batch_size or cpu else None),
            ("train", "mixed_precision", args.precision or ("no" if cpu else None)),
            ("train", "compile", args.compile)]
    if cpu:
        sets += [("model", "proj_hidden", 512), ("model", "proj_out", 512), ("loss", "group", "local")]
    for sec, key, val in sets:
        if val is not None:
            setattr(getattr(cfg, sec), key, val)
    apply_overrides(cfg, list(args.set))   # --set section.key=value, e.g. a ramp on rcs/tiny.yaml
    return one_process(cfg)                # as the step benchmark: the rc's per-device micro-batch


def measure_schedule(cfg, device: torch.device, warmup: int, iters: int, threads: int | None) -> list[dict]:
    """One row per epoch range of the schedule: samples/s at its sizes, on one network built once."""
    from fastmveb.resolution import compiled_graphs, schedule, views_config
    from fastmveb.step import step_parts, train_step
    threads = pin_threads(threads)
    accelerator = make_accelerator(cfg, device)
    b = build(cfg, device, accelerator)
    rows = []
    for first, last, res in schedule(cfg):
        scfg = dataclasses.replace(cfg, views=views_config(cfg, res))
        v, y = random_views(scfg, device)
        parts = step_parts(b["training"], accelerator, scfg, identity_views)

        def step():
            return train_step(parts, v, y, b["lr"], b["m"])
        graphs = compiled_graphs()
        t0 = time.perf_counter()
        stats, _, _ = step()                      # compiles when compiled and the shape is new
        sync(device)
        first_s = time.perf_counter() - t0
        added = compiled_graphs() - graphs
        (stats, _, _), dt = timed_steps(step, max(0, warmup - 1), iters, device)
        n_local = cfg.views.n_local
        rows.append({"epochs": f"{first}-{last}" if last > first else str(first), "n_epochs": last - first + 1,
                     "global_size": res.global_size, "local_size": res.local_size, "decode_size": res.decode_size,
                     "views": f"2x{res.global_size}" + (f" + {n_local}x{res.local_size}" if n_local else ""),
                     "arch": cfg.model.arch, "batch": cfg.data.global_batch_size, "compile": uses_compile(cfg, device),
                     "samples_per_s": cfg.data.global_batch_size / dt, "step_ms": 1e3 * dt, "first_step_s": first_s,
                     "graphs_added": added, "loss": float(stats["loss"]), "timed_steps": iters,
                     "torch_threads": threads})
        del v, y
    del b
    free(device, uses_compile(cfg, device))
    return rows


def project(per_rc: list[tuple[str, object, list[dict]]]) -> list[dict]:
    """Per-size rows with their epoch time relative to the first config, then one projection row per config."""
    base_name, base_cfg, base_rows = per_rc[0]
    base_epoch = sum(r["n_epochs"] / r["samples_per_s"] for r in base_rows) / base_cfg.optim.epochs
    base_run = base_epoch * base_cfg.optim.epochs
    out = []
    for name, cfg, rows in per_rc:
        for r in rows:
            out.append({"recipe": name, **r, "epoch_time_vs_base": (1 / r["samples_per_s"]) / base_epoch})
        mean = sum(r["n_epochs"] / r["samples_per_s"] for r in rows) / cfg.optim.epochs
        end = 1 / rows[-1]["samples_per_s"]     # every epoch at the final size: the same config without the ramp
        out.append({"recipe": name, "epochs": f"all {cfg.optim.epochs}", "views": "schedule",
                    "arch": rows[0]["arch"], "batch": rows[0]["batch"], "compile": rows[0]["compile"],
                    "mean_epoch_time_vs_base": mean / base_epoch,
                    "run_time_vs_base": mean * cfg.optim.epochs / base_run,
                    "ramp_saving": 1 - mean / end, "base": base_name})
    return out


def main(args) -> dict:
    device = pick_device(args.device)
    warmup, iters = step_iters(args, device)
    warmup, iters = args.warmup or warmup, args.iters or iters
    load_before = loadavg()
    rcs = [r.strip() for r in args.rcs.split(",") if r.strip()]
    per_rc = []
    for rc in rcs:
        cfg = ramp_config(args, device, rc)
        rows = measure_schedule(cfg, device, warmup, iters, default_threads(args, device))
        for r in rows:
            print(f"ramp {Path(rc).stem:10s} epochs {r['epochs']:>7s} {r['views']:16s} {r['samples_per_s']:8.1f} samples/s"
                  f"  first step {r['first_step_s']:6.1f} s  +{r['graphs_added']} graphs", flush=True)
        per_rc.append((Path(rc).stem, cfg, rows))
    rows = project(per_rc)
    compiled = any(r["compile"] for r in rows)
    settings = {"rcs": rcs, "short": bool(args.short), "device": str(device), "warmup_steps": warmup,
                "timed_steps": iters, "torch_threads": torch.get_num_threads(),
                "inputs": "random views already on the device", "overrides": list(args.set),
                "inductor_cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "loadavg_before": load_before,
                "loadavg_after": loadavg()}
    print(markdown_table(rows, COLUMNS))
    name = "ramp-compiled" if compiled and device.type == "cpu" else "ramp"
    path = write_results(name, environment(device), settings, rows, COLUMNS, out_dir=args.out_dir)
    print(f"wrote {path}")
    return {"rows": rows, "settings": settings, "path": str(path)}
