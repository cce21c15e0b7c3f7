"""Loader benchmark: FFCV train loader vs. the released recipe's torchvision ImageFolder + PIL views.

    python -m fastmveb.bench loader [--short] [--num-workers N] [--batch-size B]

Measures samples/s of, in one run on the same JPEG images and with the same number of workers:
  ffcv once         decode each image once to a 256-px square (the GPU cuts the views; not timed here)
  ffcv per_view     one FFCV RandomResizedCrop decode per view: 2x224, and 2x224 + 6x96 (multi-crop)
  pil released      torchvision ImageFolder + PIL decode + benchmarks/released_transforms.py views
                    (crop, flip, jitter, grayscale, blur, solarize, normalise on the CPU), 2x224 and 2x224 + 6x96
FFCV workers are threads, DataLoader workers are processes. The first batches (numba compilation, worker
start) are excluded. Inputs: data/synthetic/train.beton and the JPEG tree it was written from
(data/synthetic/jpeg/train); both are generated when missing.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from .common import environment, markdown_table, write_results

ROOT = Path(__file__).resolve().parents[2]


def add_args(parser):
    parser.add_argument("--beton", default=str(ROOT / "data/synthetic/train.beton"))
    parser.add_argument("--jpeg-root", default=None, help="ImageFolder tree of the same images "
                        "(default: <beton folder>/jpeg/train)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (--short: 32)")
    parser.add_argument("--num-workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--min-time", type=float, default=None, help="seconds timed per pipeline (default 20, --short 5)")
    parser.add_argument("--only", default="", help="comma-separated subset of row names (debugging)")


def ensure_data(beton: Path, jpeg_root: Path) -> None:
    from dataset_prep.synthetic import make_synthetic, write_jpeg_tree
    default = ROOT / "data/synthetic"
    if not beton.exists():
        if beton.parent.resolve() != default.resolve():
            raise SystemExit(f"error: {beton} not found")
        print(f"{beton} missing: generating the synthetic dataset", flush=True)
        make_synthetic(default, force=True)
    if not jpeg_root.is_dir():
        if jpeg_root.resolve() != (default / "jpeg/train").resolve():
            raise SystemExit(f"error: JPEG tree {jpeg_root} not found")
        # Same defaults and seed as make_synthetic: byte-identical to the images the default beton was written from.
        print(f"{jpeg_root} missing: regenerating the synthetic JPEG tree", flush=True)
        write_jpeg_tree(default / "jpeg")


def measure(make_iter, batch_size: int, warmup: int, min_time: float, device) -> dict:
    """Iterate (restarting epochs as needed); time batches after ``warmup`` until ``min_time`` has passed."""
    seen = 0
    n = 0
    t0 = None
    while True:
        it = make_iter()
        for batch in it:
            if isinstance(batch, (tuple, list)) and isinstance(batch[0], list):   # PIL loader: (views, labels)
                batch = [v.to(device, non_blocking=True) for v in batch[0]]
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
            n += 1
            if n == warmup:
                t0 = time.perf_counter()
            elif n > warmup:
                seen += batch_size
                if time.perf_counter() - t0 >= min_time:
                    dt = time.perf_counter() - t0
                    if hasattr(it, "close"):
                        it.close()   # stop ffcv's producer thread now, not at garbage collection
                    return {"samples_per_s": seen / dt, "batches": n - warmup, "seconds": dt,
                            "ms_per_batch": 1e3 * dt / (n - warmup)}


def main(args) -> None:
    from benchmarks.released_transforms import released_imagefolder_loader
    from fastmveb.config import ViewsConfig
    from fastmveb.data import available_cores, train_loader

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    beton = Path(args.beton)
    jpeg_root = Path(args.jpeg_root) if args.jpeg_root else beton.parent / "jpeg" / "train"
    ensure_data(beton, jpeg_root)
    workers = max(1, min(args.num_workers or available_cores(), available_cores()))
    bs = args.batch_size or (32 if args.short else 64)
    min_time = args.min_time or (5.0 if args.short else 20.0)
    warmup = 2 if args.short else 3
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    load_before = os.getloadavg()

    def ffcv(**kw):
        loader = train_loader(beton, bs, workers, device, seed=0, **kw)
        return lambda: iter(loader)

    def pil(n_local):
        loader = released_imagefolder_loader(jpeg_root, n_local, bs, workers, persistent_workers=True)
        return lambda: iter(loader)

    # PIL first: DataLoader forks its workers, which is safest before ffcv/numba have started threads.
    cases = [
        ("pil released two-view", "2 x 224", lambda: pil(0)),
        ("pil released multi-crop", "2 x 224 + 6 x 96", lambda: pil(6)),
        ("ffcv once 256", "1 x 256 (views on GPU)", lambda: ffcv(decode="once", decode_size=256)),
        ("ffcv per_view two-view", "2 x 224", lambda: ffcv(decode="per_view", views=ViewsConfig(n_local=0))),
        ("ffcv per_view multi-crop", "2 x 224 + 6 x 96", lambda: ffcv(decode="per_view", views=ViewsConfig(n_local=6))),
    ]
    rows = []
    for name, views, build in cases:
        if only and name not in only:
            continue
        r = measure(build(), bs, warmup, min_time, device)
        rows.append({"pipeline": name, "views": views, **r})
        print(f"{name:28s} {r['samples_per_s']:8.1f} samples/s", flush=True)
    base = {v: r["samples_per_s"] for r in rows for v in [r["views"]] if r["pipeline"].startswith("pil")}
    for r in rows:
        ref = base.get(r["views"]) or base.get("2 x 224")
        r["x_vs_pil"] = r["samples_per_s"] / ref if ref else None
    settings = {"beton": str(beton), "jpeg_root": str(jpeg_root), "batch_size": bs, "num_workers": workers,
                "warmup_batches": warmup, "min_time_s": min_time, "device": str(device),
                "loadavg_before": [round(x, 2) for x in load_before],
                "loadavg_after": [round(x, 2) for x in os.getloadavg()],
                "note": "x_vs_pil: vs the PIL loader with the same views (ffcv once: vs PIL two-view)"}
    columns = ["pipeline", "views", "samples_per_s", "ms_per_batch", "batches", "x_vs_pil"]
    print(markdown_table(rows, columns))
    path = write_results("loader", environment(device), settings, rows, columns, args.out_dir)
    print(f"wrote {path}")
