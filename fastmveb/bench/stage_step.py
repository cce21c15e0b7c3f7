"""Model-step benchmark (the compute bound): ``python -m fastmveb.bench step [--short] [--device cpu|cuda]``.

Times ``fastmveb.step.train_step`` -- online forward of every view, EMA-target forward of the globals, MVEB
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

import time

import torch

from fastmveb.bench.common import (RECIPES, add_settings_args, bench_config, build, default_rc, default_threads,
                                   environment, free, identity_views, loadavg, make_accelerator, markdown_table,
                                   peak_memory, pick_device, pin_threads, random_views, recipe_names,
                                   reset_peak_memory, settings_of, step_iters, sync, timed_steps,
                                   write_results)
from fastmveb.build import uses_compile

COLUMNS = ["recipe", "views", "arch", "batch", "precision", "compile", "channels_last", "samples_per_s",
           "images_per_s", "step_ms", "first_step_s", "peak_mem_gb", "peak_mem_kind"]


def measure_step(cfg, device: torch.device, warmup: int, iters: int, threads: int | None = None) -> dict:
    """Samples/s of train_step on device-resident random views with the settings of ``cfg``."""
    from fastmveb.step import step_parts, train_step
    threads = pin_threads(threads)
    accelerator = make_accelerator(cfg, device)
    b = build(cfg, device, accelerator)
    v, y = random_views(cfg, device)
    n = cfg.data.global_batch_size
    parts = step_parts(b["training"], accelerator, cfg, identity_views)

    def step():
        return train_step(parts, v, y, b["lr"], b["m"])

    t0 = time.perf_counter()
    stats, skip, _ = step()                       # compiles when compiled
    sync(device)
    first = time.perf_counter() - t0
    (stats, skip, _), dt = timed_steps(step, max(0, warmup - 1), iters, device,
                                       before_timing=lambda: reset_peak_memory(device))
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


def flips(cfg, device: torch.device) -> list[tuple[str, tuple]]:
    """(label, bench_config extra) of the sweep: compile, channels-last and precision, each flipped alone."""
    cl = cfg.model.channels_last
    return [("compile flipped", (("train", "compile", "false" if uses_compile(cfg, device) else "true"),)),
            ("channels-last flipped", (("model", "channels_last", not cl), ("views", "channels_last", not cl))),
            ("precision flipped",
             (("train", "mixed_precision", "no" if cfg.train.mixed_precision == "bf16" else "bf16"),))]


# The GPU check's ViT rows, measured after every ResNet row (a cut of the step box keeps those): VIT_RC's multi-crop
# step (ViT-S/16, 2x224 + 6x96, bf16, AdamW, compiled) on CUDA at 128, the micro-batch its 1024 runs on 8 GPUs (the
# rc sets no per-device batch: one process would otherwise time all 1024); on a CPU dry run the same recipe shrunk as
# the ResNet rows shrink (a two-block ViT at 32 px with 8-px patches, 2x32 + 6x16, fp32, eager): seconds.
VIT_RC = "rcs/vit_s16.yaml"
VIT_TINY = (("model", "img_size", 32), ("model", "patch_size", 8), ("model", "embed_dim", 48), ("model", "depth", 2),
            ("model", "num_heads", 2), ("views", "global_size", 32), ("views", "local_size", 16),
            ("data", "decode_size", 32), ("train", "mixed_precision", "no"), ("train", "compile", "false"))


def vit_rows(cuda: bool) -> list[tuple[str, int, tuple, str]]:
    """(recipe, n_local, bench_config extra, label) of the ViT rows, each run with VIT_RC's settings."""
    if cuda:
        return [("vit_s16", 6, (("data", "per_device_batch_size", 128),), "multi-crop")]
    return [("vit_s16", 6, VIT_TINY, "multi-crop, tiny: 2 blocks, 32 px")]


# ------------------------------------------------------------------------------------------------- main
def add_args(parser) -> None:
    add_settings_args(parser)
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps (first one compiles)")
    parser.add_argument("--iters", type=int, default=None, help="timed steps")
    parser.add_argument("--sweep", action="store_true",
                        help="also flip compile, channels-last and precision, one at a time")


def main(args) -> dict:
    device = pick_device(args.device)
    warmup, iters = step_iters(args, device)
    warmup, iters = args.warmup or warmup, args.iters or iters
    load_before = loadavg()
    rows = []
    for name in recipe_names(args):
        n_local = args.n_local if RECIPES[name] else 0
        cfg = bench_config(args, device, n_local)
        for label, extra in [("training setting", ())] + (flips(cfg, device) if args.sweep else []):
            vcfg = bench_config(args, device, n_local, extra)
            row = {"recipe": name, "variant": label,
                   **measure_step(vcfg, device, warmup, iters, default_threads(args, device))}
            rows.append(row)
            print(f"step {name:10s} {label:22s} {row['samples_per_s']:9.1f} samples/s  {row['step_ms']:8.1f} ms/step"
                  f"  peak {row['peak_mem_gb']:.2f} GiB ({row['peak_mem_kind']})", flush=True)
    columns = COLUMNS[:1] + (["variant"] if args.sweep else []) + COLUMNS[1:]
    settings = {"rc": args.rc or default_rc(device), "short": bool(args.short), "device": str(device),
                "warmup_steps": warmup, "timed_steps": iters, "torch_threads": torch.get_num_threads(),
                "threads_pinned": default_threads(args, device), "inputs": "random views already on the device",
                "loadavg_before": load_before, "loadavg_after": loadavg()}
    print(markdown_table(rows, columns))
    path = write_results("step", environment(device), settings, rows, columns, out_dir=args.out_dir)
    print(f"wrote {path}")
    return {"rows": rows, "settings": settings, "path": str(path)}
