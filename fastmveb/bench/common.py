"""What every benchmark stage shares, so that each stage module holds only its own measurement:

    environment, timing     device_name, environment, loadavg, sync, time_fn
    results                 markdown_table, write_results (JSON + markdown under benchmarks/results/)
    settings                add_settings_args (the run-config flags of step, train, profile), pick_device,
                            default_rc, settings, bench_config, one_process, RECIPES / recipe_names, step_iters,
                            settings_of,
                            pin_threads / default_threads
    construction            make_accelerator, build (as fastmveb/train.py builds), random_views, identity_views
    memory                  reset_peak_memory, peak_memory, status_kib, free
    data                    ensure_data (the synthetic beton and its JPEG tree, generated when missing), photo,
                            write_photos
"""
from __future__ import annotations

import datetime as _dt
import gc
import json
import os
import platform
import resource
import time
from pathlib import Path

import torch

from fastmveb.rundir import git_revision
from fastmveb.fileio import write_text
from fastmveb.views import view_sizes

ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = ROOT / "benchmarks" / "results"
DEFAULT_DATA = ROOT / "data" / "synthetic"
RECIPES = {"two-view": 0, "multi-crop": 6}          # recipe -> does it have local views (n_local from --n-local)


# ------------------------------------------------------------------------------------- environment, timing
def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def environment(device: torch.device | str, detail: bool = False) -> dict:
    """What a reader needs to trust a number: device, versions, date, git revision; ``detail``: also the host
    (CUDA/cuDNN, GPU and driver, memory, usable cores, load, package versions), as the GPU check records it."""
    info = {"device": device_name(device), "torch": torch.__version__, "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "git": git_revision()}
    if not detail:
        return info
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    def ver(p):
        try:
            return version(p)
        except PackageNotFoundError:
            return None
    info.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                else None, platform=platform.platform(), cores_usable=len(os.sched_getaffinity(0)), loadavg=loadavg(),
                memory_gib=(status_kib("MemTotal", "/proc/meminfo") or 0) / 2**20 or None, gpu=None,
                packages={p: ver(p) for p in ("torchvision", "ffcv", "kornia", "accelerate", "numpy", "numba", "triton",
                                              "pytest")})
    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2**30,
                       "multiprocessors": p.multi_processor_count, "count": torch.cuda.device_count()}
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            info["gpu"]["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["gpu"]["nvidia_smi"] = f"unavailable: {e}"
    return info


def loadavg() -> list[float]:
    """The 1, 5 and 15-minute load (recorded before and after a run: the CPU box is shared)."""
    return [round(x, 2) for x in os.getloadavg()]


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step, warmup: int, iters: int, device, before_timing=None):
    """``warmup`` untimed calls of step(), then ``iters`` timed ones (device-synchronised) -> (the last call's
    result, mean seconds per call). ``before_timing`` runs between the two (e.g. resetting the peak memory)."""
    for _ in range(warmup):
        step()
    sync(device)
    if before_timing is not None:
        before_timing()
    t0 = time.perf_counter()
    out = None
    for _ in range(iters):
        out = step()
    sync(device)
    return out, (time.perf_counter() - t0) / iters


def time_fn(fn, device, warmup: int = 1, iters: int = 5) -> float:
    """Median seconds per call of fn() (device-synchronised)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2]


# ------------------------------------------------------------------------------------------------ results
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
    write_text(path, json.dumps(payload, indent=2))
    table = markdown_table(rows, columns)
    md = (f"### {name}\n\n{env['device']}, torch {env['torch']}, {env['date']}, git {env['git']}\n\n"
          f"settings: `{json.dumps(settings)}`\n\n{table}\n")
    (out_dir / f"{stem}.md").write_text(md)
    return path


# ----------------------------------------------------------------------------------------------- settings
def add_settings_args(parser) -> None:
    """The run-config flags shared by the step, train and profile benchmarks."""
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


def settings(**kw):
    """The settings flags' defaults (add_settings_args) with ``kw`` set: how code picks a setting without
    writing a command line (the GPU check). Same object as the parsed flags; an unknown name is a bug."""
    import argparse
    parser = argparse.ArgumentParser(add_help=False)
    add_settings_args(parser)
    s = parser.parse_args([])
    s.short = False
    for key, value in kw.items():
        if not hasattr(s, key):
            raise TypeError(f"no setting {key!r}")
        setattr(s, key, value)
    return s


def pick_device(arg) -> torch.device:
    return torch.device(arg or ("cuda" if torch.cuda.is_available() else "cpu"))


def default_rc(device: torch.device) -> str:
    """The run config a stage measures when --rc is not given: the released recipe on CUDA, the demo's on CPU."""
    return "rcs/rn50.yaml" if device.type == "cuda" else "rcs/tiny.yaml"


def bench_config(args, device: torch.device, n_local: int, extra: tuple = ()):
    """The run config of one recipe: rc file, then the CPU size defaults, then the flags, then ``extra``
    ((section, key, value) triples). Fields are set directly (no YAML parsing of "no"/"true")."""
    from fastmveb.config import apply_overrides, load_config
    cuda = device.type == "cuda"
    cfg = load_config(args.rc or str(ROOT / default_rc(device)))
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
    return one_process(cfg)


def one_process(cfg):
    """A benchmark times one process's step WITHOUT accumulation: the batch is the micro-batch the rc runs on
    one device (rn50.yaml: 128 of 4096), held as a single-process global batch. Validates the config."""
    from fastmveb.config import validate
    from fastmveb.plan import split_batch
    cfg.data.global_batch_size = split_batch(cfg.data.global_batch_size, 1, cfg.data.per_device_batch_size)[1]
    cfg.data.per_device_batch_size = 0
    validate(cfg)
    return cfg


def recipe_names(args) -> list[str]:
    names = [r.strip() for r in args.recipes.split(",") if r.strip()]
    bad = [r for r in names if r not in RECIPES]
    if bad:
        raise SystemExit(f"error: unknown recipe(s) {', '.join(bad)}; choose from {', '.join(RECIPES)}")
    return names


def step_iters(args, device: torch.device) -> tuple[int, int]:
    """(warmup, timed) steps; compiled runs need a few steps to settle (compile, then cudnn autotune)."""
    if device.type == "cuda":
        return (3, 10) if args.short else (5, 30)
    return (1, 2) if args.short else (2, 5)


def settings_of(cfg, device) -> dict:
    """The row fields that say which training setting was measured."""
    from fastmveb.build import uses_compile
    from fastmveb.resolution import views_label
    return {"views": views_label(cfg), "arch": cfg.model.arch, "batch": cfg.data.global_batch_size,
            "precision": cfg.train.mixed_precision, "compile": uses_compile(cfg, device),
            "channels_last": cfg.model.channels_last}


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


# ------------------------------------------------------------------------------------------- construction
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
    lr, m."""
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
            "views_c": t.view_maker(cfg.views), "lr": lr, "m": m}


def random_views(cfg, device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """What the view maker would hand over: V normalised float views (cfg dtype and memory format)."""
    g = torch.Generator(device=device).manual_seed(0)
    n = cfg.data.global_batch_size
    dtype = torch.bfloat16 if cfg.views.dtype == "bfloat16" else torch.float32
    fmt = torch.channels_last if cfg.views.channels_last else torch.contiguous_format
    v = [torch.randn(n, 3, s, s, device=device, generator=g).to(dtype).contiguous(memory_format=fmt)
         for s in view_sizes(cfg.views)]
    y = torch.randint(0, 1000, (n,), device=device, generator=g)
    return v, y


def identity_views(v, extent=None):
    """The view maker of a step timed on random_views: the views are already made."""
    return v


# ------------------------------------------------------------------------------------------------- memory
def status_kib(field: str, path: str = "/proc/self/status") -> int | None:
    """A kiB field of /proc/self/status (VmRSS, VmHWM) or of /proc/meminfo (MemTotal); None where there is none."""
    try:
        for line in open(path):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


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
    hwm = status_kib("VmHWM")
    if hwm is not None:
        return hwm * 1024 / 2**30, "cpu process RSS high-water mark"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, "cpu process max RSS (lifetime)"


def free(device: torch.device, compiled: bool) -> None:
    gc.collect()
    if compiled:
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------- data
def ensure_data(beton: Path, jpeg_root: Path) -> None:
    """The default synthetic beton and the JPEG tree it was written from, generated when missing (another
    missing path is an error)."""
    from dataclasses import replace
    from dataset_prep.synthetic import SYNTHETIC_OPTIONS, make_synthetic, write_jpeg_tree
    if not beton.exists():
        if beton.parent.resolve() != DEFAULT_DATA.resolve():
            raise SystemExit(f"error: {beton} not found")
        print(f"{beton} missing: generating the synthetic dataset", flush=True)
        make_synthetic(DEFAULT_DATA, replace(SYNTHETIC_OPTIONS, force=True))
    if not jpeg_root.is_dir():
        if jpeg_root.resolve() != (DEFAULT_DATA / "jpeg" / "train").resolve():
            raise SystemExit(f"error: JPEG tree {jpeg_root} not found")
        # Same defaults and seed as make_synthetic: byte-identical to the images the default beton was written from.
        print(f"{jpeg_root} missing: regenerating the synthetic JPEG tree", flush=True)
        write_jpeg_tree(DEFAULT_DATA / "jpeg")


# The photo set (bench loader's decode-size study, the GPU check's data): ImageNet's common shapes at its common
# 500-px long side, (H, W).
PHOTO_SHAPES = [(375, 500), (500, 375), (333, 500), (500, 333), (400, 500), (500, 400), (375, 500), (333, 500)]


def photo(i: int, rng):
    """A photo stand-in, (H, W, 3) uint8: smooth colour field + oriented texture + sensor noise (so the JPEG is
    ~photo-sized)."""
    import cv2
    import numpy as np
    h, w = PHOTO_SHAPES[i % len(PHOTO_SHAPES)]
    low = rng.uniform(0, 255, (6, 8, 3)).astype(np.float32)
    img = cv2.resize(low, (w, h), interpolation=cv2.INTER_CUBIC)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    theta, period = rng.uniform(0, np.pi), rng.uniform(4, 24)
    img += 40 * np.sin((x * np.cos(theta) + y * np.sin(theta)) * 2 * np.pi / period)[..., None]
    img += rng.normal(0, 6, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_photo(job: tuple[int, str]) -> None:
    import numpy as np
    from PIL import Image
    i, path = job
    Image.fromarray(photo(i, np.random.default_rng(i))).save(path, quality=90)


def write_photos(folder: Path, n: int, workers: int) -> list[str]:
    """N photo-sized JPEGs (``photo(i)``, quality 90) written into ``folder`` on ``workers`` processes; their paths."""
    from multiprocessing import get_context
    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(i, str(folder / f"{i:05d}.jpg")) for i in range(n)]
    with get_context("spawn").Pool(workers) as pool:
        pool.map(_write_photo, jobs, chunksize=16)
    return [p for _, p in jobs]
