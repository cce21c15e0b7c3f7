"""Where the step time goes: ``python -m fastmveb.bench profile [--short] [--device cpu|cuda]``.

Runs fastmveb.step.train_step with the real view maker (a random uint8 batch at the decode size already on
the device stands in for the FFCV output; loading is timed by the ``train`` stage) under torch.profiler, with
the same construction and settings as the ``step`` stage, and splits the time of the profiled steps by phase:

    views      ViewMaker: crops, flips, jitter, grayscale, blur, solarize, normalisation
    forward    online network on every view (backbone + projector)
    target     EMA target network on the two global views
    loss       MVEB loss: alignment + von Mises-Fisher Stein entropy estimate (float64 Cholesky)
    backward   autograd (on CUDA its ops run on the autograd thread; they are recognised by their
               ``autograd::engine`` ancestors)
    optimizer  gradient norm, NaN/Inf check, LARS, BN-buffer restore bookkeeping
    ema        target update

Launch rows (kind "launches") count, per phase and per step, the kernels launched on CUDA (profiler), or on the
CPU what eager CUDA would launch (LaunchCounter, one more step at the dispatcher): per-tensor loops show there.

The phases are ``torch.profiler.record_function`` ranges in train_step. What is counted: on CUDA each CPU op's
self *device* time (the kernels it launched, minus its children's), on CPU each op's self *CPU* time; each op
goes to the nearest enclosing phase. "host only" is the wall time of the profiled steps that no op accounts
for (Python, launch gaps; on CUDA: time the GPU sat idle). Rows: one per phase, then the top (phase, op) pairs by
self time (an op-level view of the same steps). ``--trace FILE`` also writes a Chrome trace (chrome://tracing,
Perfetto). The profiler slows the host side; the ``step`` stage is the timing of record, this stage says where
the time goes.
"""
from __future__ import annotations

import os
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastmveb.bench.common import (RECIPES, add_settings_args, bench_config, build, default_rc, default_threads,
                                   environment, free, make_accelerator, markdown_table, pick_device, pin_threads,
                                   recipe_names, settings_of, sync, write_results)
from fastmveb.build import uses_compile

PHASES = ["views", "forward", "target", "loss", "backward", "optimizer", "ema"]
RANGE_PREFIX = "fastmveb/"          # train_step's record_function names: fastmveb/<phase>
COLUMNS = ["recipe", "kind", "name", "ms_per_step", "share", "calls_per_step"]


def add_args(parser) -> None:
    add_settings_args(parser)
    parser.add_argument("--warmup", type=int, default=None, help="unprofiled steps first (the first compiles)")
    parser.add_argument("--steps", type=int, default=None, help="profiled steps (default: CUDA 5, CPU 2)")
    parser.add_argument("--top", type=int, default=15, help="top ops listed by self time (default 15)")
    parser.add_argument("--trace", default=None, help="also write a Chrome trace to this path "
                                                      "(the recipe name is inserted before the suffix)")


def phase_of(evt) -> str:
    """The phase of a profiler event: the nearest enclosing fastmveb/<phase> range; ops run by the autograd
    engine outside any range (CUDA: the autograd thread) are backward; else "other"."""
    backward = False
    e = evt
    while e is not None:
        name = e.name
        if name.startswith(RANGE_PREFIX) and name[len(RANGE_PREFIX):] in PHASES:
            return name[len(RANGE_PREFIX):]
        if name.startswith("autograd::engine::evaluate_function"):
            backward = True
        e = e.cpu_parent
    return "backward" if backward else "other"


def attribute(events, on_device: bool) -> tuple[dict[str, float], dict[tuple[str, str], list]]:
    """Self time (us) per phase and per (phase, op name) ([us, calls]) over host-side op events."""
    from torch.autograd import DeviceType
    phases: dict[str, float] = {}
    ops: dict[tuple[str, str], list] = {}
    for e in events:
        if e.device_type != DeviceType.CPU or e.is_async:
            continue                      # device kernels are counted through the ops that launched them
        us = e.self_device_time_total if on_device else e.self_cpu_time_total
        if e.name.startswith(RANGE_PREFIX):
            if on_device:
                continue                  # a range launches nothing itself
            name = "(python in " + e.name[len(RANGE_PREFIX):] + ")"
        else:
            name = e.name
        ph = phase_of(e)
        phases[ph] = phases.get(ph, 0.0) + us
        rec = ops.setdefault((ph, name), [0.0, 0])
        rec[0] += us
        rec[1] += 1
    return phases, ops


def kernel_launches(events) -> dict[str, int]:
    """CUDA: the device kernels launched per phase, as the profiler linked them to the ops that launched them."""
    from torch.autograd import DeviceType
    out: dict[str, int] = {}
    for e in events:
        if e.device_type == DeviceType.CPU and not e.is_async and e.kernels:
            ph = phase_of(e)
            out[ph] = out.get(ph, 0) + len(e.kernels)
    return out


class LaunchCounter(TorchDispatchMode):
    """CPU stand-in for CUDA kernel launches, per phase: one per op at the dispatcher (views and allocations
    launch nothing), and for a foreach op what CUDA's multi-tensor path does: ~one launch per call when its
    tensor lists match in shape, one per tensor when they do not (e.g. a list of 0-d weights)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from fastmveb.step import phase
        n = self.launches(func, args)
        if n:
            self.counts[phase.current] = self.counts.get(phase.current, 0) + n
        return func(*args, **(kwargs or {}))

    @staticmethod
    def launches(func, args) -> int:
        name = func.__name__
        if func.is_view or name.startswith(("empty", "detach", "_local_scalar_dense", "lift_fresh")):
            return 0
        if name.startswith("_foreach_"):
            lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor)]
            shapes = [[t.shape for t in lst] for lst in lists]
            if any(s != shapes[0] for s in shapes[1:]):
                return len(lists[0])
            return -(-len(lists[0]) // 110) if lists else 1    # CUDA's multi-tensor chunks: <= 110 tensors
        return 1


def profile_recipe(cfg, device: torch.device, name: str, warmup: int, steps: int, top: int,
                   threads: int | None, trace: str | None) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile
    from fastmveb.step import step_parts, train_step
    threads = pin_threads(threads)
    accelerator = make_accelerator(cfg, device)
    b = build(cfg, device, accelerator)
    views_c = b["views_c"]
    g = torch.Generator(device=device).manual_seed(0)
    n, s = cfg.data.global_batch_size, cfg.data.decode_size
    x = torch.randint(0, 256, (n, 3, s, s), dtype=torch.uint8, device=device, generator=g)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (n,), device=device, generator=g)
    parts = step_parts(b["training"], accelerator, cfg, views_c)

    def step():
        return train_step(parts, x, y, b["lr"], b["m"])

    t0 = time.perf_counter()
    stats = step()[0]                     # compiles when compiled
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        stats = step()[0]
    sync(device)
    on_device = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            stats = step()[0]
        sync(device)
        wall_us = (time.perf_counter() - t0) * 1e6
    loss = float(stats["loss"])
    if trace:
        root, ext = os.path.splitext(trace)
        os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
        prof.export_chrome_trace(f"{root}-{name}{ext or '.json'}")
    phases, ops = attribute(prof.events(), on_device)
    if on_device:
        counts = {k: v / steps for k, v in kernel_launches(prof.events()).items()}
    elif not uses_compile(cfg, device):   # eager CPU: count at the dispatcher over one more step
        with LaunchCounter() as counter:
            step()
        counts = counter.counts
    else:
        counts = {}                       # compiled on the CPU: inductor's kernels bypass the dispatcher
    counted = sum(phases.values())
    settings = settings_of(cfg, device)
    per = 1e-3 / steps                                                    # us over all steps -> ms per step
    rows = [{"recipe": name, "kind": "wall", "name": "profiled step (wall clock)", "ms_per_step": wall_us * per,
             "share": 1.0, **settings, "loss": loss, "first_step_s": first, "time_counted": "device" if on_device else "cpu"}]
    for ph in PHASES + sorted(set(phases) - set(PHASES)):
        if ph in phases:
            rows.append({"recipe": name, "kind": "phase", "name": ph, "ms_per_step": phases[ph] * per,
                         "share": phases[ph] / wall_us})
    rows.append({"recipe": name, "kind": "phase", "name": "host only (no op running)" if not on_device
                 else "device idle", "ms_per_step": max(0.0, wall_us - counted) * per,
                 "share": max(0.0, wall_us - counted) / wall_us})
    what = "kernel launches" if on_device else "launches as on CUDA eager (counted at the dispatcher)"
    for ph in PHASES + sorted(set(counts) - set(PHASES)):
        if ph in counts:
            rows.append({"recipe": name, "kind": "launches", "name": f"{ph}: {what}", "calls_per_step": counts[ph]})
    rows.append({"recipe": name, "kind": "launches", "name": f"step: {what}", "calls_per_step": sum(counts.values())})
    for (ph, op), (us, calls) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]:
        rows.append({"recipe": name, "kind": "op", "name": f"{ph}: {op}", "ms_per_step": us * per, "share": us / wall_us,
                     "calls_per_step": calls / steps})
    del b, views_c, x, y, prof
    free(device, uses_compile(cfg, device))
    return rows


def main(args) -> dict:
    return run(args, pick_device(args.device), args.warmup, args.steps, args.top, args.trace, args.out_dir)


def run(args, device: torch.device, warmup: int | None = None, steps: int | None = None, top: int = 15,
        trace: str | None = None, out_dir=None) -> dict:
    """Profile each recipe of the settings ``args`` (common.settings), write the results; {rows, settings, path}."""
    cuda = device.type == "cuda"
    warmup = max(1, warmup or ((3 if args.short else 5) if cuda else 1))
    steps = steps or (5 if cuda else 2)
    rows = []
    for name in recipe_names(args):
        cfg = bench_config(args, device, args.n_local if RECIPES[name] else 0)
        got = profile_recipe(cfg, device, name, warmup, steps, top, default_threads(args, device), trace)
        rows += got
        wall = got[0]["ms_per_step"]
        print(f"profile {name}: {wall:.1f} ms/step under the profiler; " + ", ".join(
            f"{r['name']} {r['share']:.0%}" for r in got if r["kind"] == "phase") + "; launches/step: " + ", ".join(
            f"{r['name'].split(':')[0]} {r['calls_per_step']:.0f}" for r in got if r["kind"] == "launches"), flush=True)
    settings = {"rc": args.rc or default_rc(device), "short": bool(args.short),
                "device": str(device), "warmup_steps": warmup, "profiled_steps": steps,
                "threads_pinned": default_threads(args, device),
                "inputs": "random uint8 batch at the decode size, already on the device; real ViewMaker",
                "time_counted": "self CUDA time of each op's kernels" if cuda else "self CPU time of each op"}
    print(markdown_table(rows, COLUMNS))
    path = write_results("profile", environment(device), settings, rows, COLUMNS, out_dir=out_dir)
    print(f"wrote {path}")
    return {"rows": rows, "settings": settings, "path": str(path)}
