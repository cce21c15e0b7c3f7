"""Model-step benchmark (the compute bound): ``python -m fastmveb.bench step [--short] [--device cpu|cuda]``.

Times ``fastmveb.train.train_step`` -- online forward of every view, EMA-target forward of the globals, MVEB
loss with the Stein entropy estimate, backward, LARS, EMA update -- on views that are random tensors already
on the device (the view maker is the identity), so no loading, decoding or augmentation is timed. The
network, optimizer, Accelerator, precision, memory format and compilation are built exactly as
fastmveb/train.py builds them, from a run config:

    cuda  rcs/rn50.yaml   ResNet-50, batch 128 (its micro-batch), 2x224 (+ 6x96), bf16 autocast, compiled, channels-last
    cpu   rcs/tiny.yaml   ResNet-18 (--short: ResNet-10) at its view sizes (2x40 + 6x20), batch 64 (--short: 16), fp32, eager

Two recipes per run: two-view (2 global views) and multi-crop (2 global + 6 local). Flags change one setting
at a time (--arch, --batch-size, --compile, --channels-last, --precision, --set section.key=value, ...);
--sweep adds a row per flipped setting (compile, channels-last, precision) beside the training setting.

Reported per row: samples/s (source images per second; each sample is 2 or 8 views), images/s through the
online network (every view), mean step time over the timed steps (one device sync at the end, none inside,
as in training), the first (compiling) step's time, and peak memory: on CUDA torch.cuda.max_memory_allocated
over the timed steps (tensors, not the allocator cache); on CPU the process's resident-set high-water mark
over the timed steps (kernel VmHWM after resetting it; includes weights, the Python runtime and allocator
caching, so it is an upper bound on what the step needs).
"""
from __future__ import annotations

import gc
import os
import resource
import time
from pathlib import Path

import torch

from fastmveb.bench import common
from fastmveb.build import uses_compile  # noqa: F401  (bench modules import it from here)
from fastmveb.resolution import views_label  # noqa: F401  (lives with the view sizes; re-exported for bench users)

ROOT = Path(__file__).resolve().parents[2]
RECIPES = {"two-view": 0, "multi-crop": 6}
COLUMNS = ["recipe", "views", "arch", "batch", "precision", "compile", "channels_last", "samples_per_s",
           "images_per_s", "step_ms", "first_step_s", "peak_mem_gb", "peak_mem_kind"]


# --------------------------------------------------------------------------------------------- settings
def add_settings_args(parser) -> None:
    """The run-config flags shared by the step and train benchmarks."""
    parser.add_argument("--rc", default=None, help="run config the settings come from "
                        "(default: rcs/rn50.yaml on CUDA, rcs/tiny.yaml on CPU)")
    parser.add_argument("--recipes", default="two-view,multi-crop", help="comma-separated: two-view, multi-crop")
    parser.add_argument("--n-local", type=int, default=6, help="local views of the multi-crop recipe (default 6)")
    parser.add_argument("--arch", default=None, help="backbone (default: the rc's on CUDA; resnet18 CPU, "
                        "resnet10 CPU --short)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch of one forward/backward on one "
                        "device (default: the rc's micro-batch on one process; CPU --short 16)")
    parser.add_argument("--global-size", type=int, default=None)
    parser.add_argument("--local-size", type=int, default=None)
    parser.add_argument("--precision", choices=["bf16", "no"], default=None, help="autocast (default: the rc's)")
    parser.add_argument("--compile", choices=["auto", "true", "false"], default=None,
                        help="torch.compile (default: the rc's; auto = on for CUDA)")
    parser.add_argument("--channels-last", choices=["true", "false"], default=None,
                        help="model (and views) memory format (default: the rc's)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads, pinned for every timed pipeline (default on CPU: 1, see "
                             "pin_threads; on CUDA: not pinned, FFCV sets them to its worker count)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="any other run-config override (repeatable)")


def pick_device(arg) -> torch.device:
    return torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))


def bench_config(args, device: torch.device, n_local: int, extra: tuple = ()):
    """The run config of one recipe: rc file, then the CPU size defaults, then the flags, then ``extra``
    ((section, key, value) triples). Fields are set directly (no YAML parsing of "no"/"true")."""
    from fastmveb.config import apply_overrides, load_config, validate
    cuda = device.type == "cuda"
    rc = args.rc or str(ROOT / "rcs" / ("rn50.yaml" if cuda else "tiny.yaml"))
    cfg = load_config(rc)
    sets = [("views", "n_local", n_local), ("train", "progress", False)]
    if not cuda and args.rc is None:
        sets.append(("model", "arch", "resnet10" if args.short else "resnet18"))
        if args.short:
            sets.append(("data", "global_batch_size", 16))
            sets.append(("data", "per_device_batch_size", 0))
    cl = None if args.channels_last is None else args.channels_last == "true"
    for sec, key, val in (("model", "arch", args.arch), ("data", "global_batch_size", args.batch_size),
                          ("data", "per_device_batch_size", 0 if args.batch_size else None),
                          ("views", "global_size", args.global_size), ("views", "local_size", args.local_size),
                          ("train", "mixed_precision", args.precision), ("train", "compile", args.compile),
                          ("model", "channels_last", cl), ("views", "channels_last", cl)):
        if val is not None:
            sets.append((sec, key, val))
    for sec, key, val in sets:
        setattr(getattr(cfg, sec), key, val)
    apply_overrides(cfg, list(args.set))   # explicit overrides win over the defaults above
    for sec, key, val in extra:
        setattr(getattr(cfg, sec), key, val)
    # A benchmark times one process's step WITHOUT accumulation: the batch is the micro-batch the rc runs on
    # one device (rn50.yaml: 128 of 4096), held as a single-process global batch.
    from fastmveb.plan import split_batch
    cfg.data.global_batch_size = split_batch(cfg.data.global_batch_size, 1, cfg.data.per_device_batch_size)[1]
    cfg.data.per_device_batch_size = 0
    validate(cfg)
    return cfg


def pin_threads(threads: int | None) -> int:
    """Set torch's intra-op thread count (when given) and return the count in force.

    Why pinned: importing ffcv sets torch to 1 thread and an FFCV Loader sets it to its worker count, so
    without pinning, step-only and end-to-end timings in one process would run at different counts. Why 1
    on CPU by default: the FFCV threads / DataLoader processes need the cores too, and on the shared 2-core
    box two OpenMP threads under oversubscription ran the step 6-10x slower than one (spinning barriers).
    """
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def default_threads(args, device: torch.device) -> int | None:
    return args.threads or (1 if device.type == "cpu" else None)


def settings_of(cfg, device) -> dict:
    """The row fields that say which training setting was measured."""
    return {"views": views_label(cfg), "arch": cfg.model.arch, "batch": cfg.data.global_batch_size,
            "precision": cfg.train.mixed_precision, "compile": uses_compile(cfg, device),
            "channels_last": cfg.model.channels_last}


# ------------------------------------------------------------------------------------------------ build
def make_accelerator(cfg, device: torch.device):
    """The run's Accelerator (fastmveb.build.make_accelerator: precision, backend flags) on ``device``; its
    process-wide state is reset first so that several settings (bf16 and fp32, this benchmark and the next)
    can run in one process."""
    from accelerate.state import AcceleratorState
    from fastmveb.build import make_accelerator as run_accelerator
    AcceleratorState._reset_state(reset_partial_state=True)
    return run_accelerator(cfg, cpu=device.type == "cpu")


def build(cfg, device: torch.device, accelerator) -> dict:
    """The training objects built as fastmveb/train.py builds them (fastmveb.build.build_training), a view maker
    at the config's sizes (compiled when training compiles; torch.compile is lazy: a caller that never calls it
    pays nothing), a mid-training lr and the EMA momentum. Keys: training, net_c, target_c, optimizer, views_c,
    lr, m, accelerator."""
    from accelerate.utils import set_seed
    from fastmveb.build import build_training
    from fastmveb.optim import lr_at, peak_lr

    set_seed(cfg.train.seed)
    lr_peak = peak_lr(cfg.optim.base_lr, cfg.data.global_batch_size * accelerator.num_processes)
    t = build_training(cfg, accelerator, lr_peak)
    # A mid-training lr: warm-up over, cosine not yet low (the value does not change the work done).
    lr = lr_at(1000, 10_000, 100, lr_peak, cfg.optim.warmup_start_ratio, cfg.optim.final_lr_ratio)
    m = torch.tensor(cfg.model.ema_momentum, device=device)
    t.net.train()
    t.target.train()
    return {"training": t, "net_c": t.net_c, "target_c": t.target_c, "optimizer": t.optimizer,
            "views_c": t.view_maker(cfg.views), "lr": lr, "m": m, "accelerator": accelerator}


def random_views(cfg, device: torch.device, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor]:
    """What the view maker would hand over: V normalised float views (cfg dtype and memory format)."""
    g = torch.Generator(device=device).manual_seed(seed)
    n = cfg.data.global_batch_size
    dtype = torch.bfloat16 if cfg.views.dtype == "bfloat16" else torch.float32
    fmt = torch.channels_last if cfg.views.channels_last else torch.contiguous_format
    sizes = [cfg.views.global_size] * 2 + [cfg.views.local_size] * cfg.views.n_local
    v = [torch.randn(n, 3, s, s, device=device, generator=g).to(dtype).contiguous(memory_format=fmt) for s in sizes]
    y = torch.randint(0, 1000, (n,), device=device, generator=g)
    return v, y


def _identity(v, extent=None):
    return v


# ------------------------------------------------------------------------------------------ memory, time
def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:   # resets the kernel's VmHWM to the current RSS (Linux >= 4.0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory(device: torch.device) -> tuple[float | None, str]:
    """(GiB, what it is)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda max_memory_allocated"
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 2**30, "cpu process RSS high-water mark"
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, "cpu process max RSS (lifetime)"


def free(device: torch.device, compiled: bool) -> None:
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measure_step(cfg, device: torch.device, warmup: int, iters: int, threads: int | None = None) -> dict:
    """Samples/s of train_step on device-resident random views with the settings of ``cfg``."""
    from fastmveb.train import train_step
    threads = pin_threads(threads)
    accelerator = make_accelerator(cfg, device)
    b = build(cfg, device, accelerator)
    v, y = random_views(cfg, device)
    n = cfg.data.global_batch_size

    def step():
        return train_step(b["net_c"], b["target_c"], _identity, b["optimizer"], v, y, b["lr"], b["m"], cfg,
                          accelerator)

    t0 = time.perf_counter()
    stats, skip, _ = step()                       # compiles when compiled
    common.sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        step()
    common.sync(device)
    reset_peak_memory(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        stats, skip, _ = step()
    common.sync(device)
    dt = (time.perf_counter() - t0) / iters
    mem, mem_kind = peak_memory(device)
    loss = float(stats["loss"])                   # after timing: a finite loss says the step really ran
    skipped = bool(skip)
    row = {**settings_of(cfg, device), "samples_per_s": n / dt, "images_per_s": n * (2 + cfg.views.n_local) / dt,
           "step_ms": 1e3 * dt, "first_step_s": first, "peak_mem_gb": mem, "peak_mem_kind": mem_kind,
           "loss": loss, "skipped": skipped, "timed_steps": iters, "warmup_steps": warmup,
           "torch_threads": threads}
    compiled = uses_compile(cfg, device)
    del b, v, y, stats, skip
    free(device, compiled)
    return row


def step_iters(args, device: torch.device) -> tuple[int, int]:
    """(warmup, timed) steps; compiled runs need a few steps to settle (compile, then cudnn autotune)."""
    if device.type == "cuda":
        return (3, 10) if args.short else (5, 30)
    return (1, 2) if args.short else (2, 5)


# ------------------------------------------------------------------------------------------------- main
def add_args(parser) -> None:
    add_settings_args(parser)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (first one compiles)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps")
    parser.add_argument("--sweep", action="store_true",
                        help="also flip compile, channels-last and precision, one at a time")
    parser.add_argument("--ramp", nargs="?", const="rcs/rn50.yaml,rcs/rn50_fast.yaml", default=None, metavar="RC,RC",
                        help="instead: time every size of these configs' progressive-resolution schedules and "
                             "project their epoch times against the first (default rn50 vs rn50_fast; "
                             "fastmveb/bench/ramp.py)")


def recipe_names(args) -> list[str]:
    names = [r.strip() for r in args.recipes.split(",") if r.strip()]
    bad = [r for r in names if r not in RECIPES]
    if bad:
        raise SystemExit(f"error: unknown recipe(s) {', '.join(bad)}; choose from {', '.join(RECIPES)}")
    return names


def main(args) -> dict:
    if args.ramp:
        from fastmveb.bench import ramp
        return ramp.main(args)
    device = pick_device(args.device)
    warmup, iters = step_iters(args, device)
    warmup, iters = args.warmup or warmup, args.iters or iters
    load_before = os.getloadavg()
    rows = []
    for name in recipe_names(args):
        n_local = args.n_local if RECIPES[name] else 0
        cfg = bench_config(args, device, n_local)
        variants = [("training setting", [])]
        if args.sweep:
            cl = cfg.model.channels_last
            variants += [
                ("compile flipped", [("train", "compile", "false" if uses_compile(cfg, device) else "true")]),
                ("channels-last flipped", [("model", "channels_last", not cl), ("views", "channels_last", not cl)]),
                ("precision flipped", [("train", "mixed_precision",
                                        "no" if cfg.train.mixed_precision == "bf16" else "bf16")]),
            ]
        for label, extra in variants:
            vcfg = bench_config(args, device, n_local, extra)
            row = {"recipe": name, "variant": label,
                   **measure_step(vcfg, device, warmup, iters, default_threads(args, device))}
            rows.append(row)
            print(f"step {name:10s} {label:22s} {row['samples_per_s']:9.1f} samples/s  {row['step_ms']:8.1f} ms/step"
                  f"  peak {row['peak_mem_gb']:.2f} GiB ({row['peak_mem_kind']})", flush=True)
    columns = COLUMNS[:1] + (["variant"] if args.sweep else []) + COLUMNS[1:]
    settings = {"rc": args.rc or ("rcs/rn50.yaml" if device.type == "cuda" else "rcs/tiny.yaml"),
                "short": bool(args.short), "device": str(device), "warmup_steps": warmup, "timed_steps": iters,
                "torch_threads": torch.get_num_threads(), "threads_pinned": default_threads(args, device), "inputs": "random views already on the device",
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()]}
    print(common.markdown_table(rows, columns))
    path = common.write_results("step", common.environment(device), settings, rows, columns, out_dir=args.out_dir)
    print(f"wrote {path}")
    return {"rows": rows, "settings": settings, "path": str(path)}
