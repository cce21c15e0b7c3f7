"""Loader benchmark: FFCV train loader vs. the released recipe's torchvision ImageFolder + PIL views.

    python -m fastmveb.bench loader [--short] [--num-workers N] [--batch-size B] [--photos N]

Measures samples/s of, in one run on the same JPEG images and with the same number of workers:
  ffcv once S       decode each WHOLE image once to an S x S canvas + its (H, W) (the GPU cuts the views)
  ffcv center S     the previous decode-once: the largest centred square of each image at S x S
  ffcv per_view     one FFCV RandomResizedCrop decode per view: 2x224, and 2x224 + 6x96 (multi-crop)
  pil released      torchvision ImageFolder + PIL decode + fastmveb/bench/reference/released_transforms.py views
                    (crop, flip, jitter, grayscale, blur, solarize, normalise on the CPU), 2x224 and 2x224 + 6x96
and, beside each, what the decode does to the crops: glob_up / loc_up = the fraction of global (224 px,
scale 0.4-1) / local (96 px, scale 0.05-0.4) crops that are upsampled, i.e. whose box covers fewer decoded
pixels than the view has along either axis (sampled by torchvision's rule on the beton's stored image sizes;
for "once", box side x S / image side on each axis; for "center", boxes on the S-px square).
FFCV workers are threads, DataLoader workers are processes. The first batches (numba compilation, worker
start) are excluded. Inputs: data/synthetic/train.beton and the JPEG tree it was written from
(data/synthetic/jpeg/train); both are generated when missing. The decode-size study (--photos N, default
512, 0 skips it) generates N photo-sized JPEGs (500 px long side, ImageNet's common 4:3, 3:2 and 5:4 shapes,
landscape and portrait) under data/photos/ and writes them at two stored max sides (384 and 512) to time
decode-once at several S next to the centre square and the per-view decode.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from fastmveb.errors import UserError

from fastmveb.bench.common import (DEFAULT_DATA, ROOT, ensure_data, environment, loadavg, markdown_table,
                                   pick_device, write_photos, write_results)


def add_args(parser):
    parser.add_argument("--beton", default=str(DEFAULT_DATA / "train.beton"))
    parser.add_argument("--jpeg-root", default=None, help="ImageFolder tree of the same images "
                        "(default: <beton folder>/jpeg/train)")
    parser.add_argument("--batch-size", type=int, default=None, help="default 64 (--short: 32)")
    parser.add_argument("--num-workers", type=int, default=None, help="default: all cores")
    parser.add_argument("--min-time", type=float, default=None, help="seconds timed per pipeline (default 20, --short 5)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timings per pipeline, taken in interleaved rounds; the median is reported (a shared, "
                             "loaded box drifts: interleaving spreads the drift over every pipeline)")
    parser.add_argument("--only", default="", help="comma-separated subset of row names (debugging)")
    parser.add_argument("--photos", type=int, default=None,
                        help="photo-sized JPEGs for the decode-size study (default 512, --short 256; 0 skips it)")
    parser.add_argument("--photos-dir", default=str(ROOT / "data/photos"), help="where the photo set is kept")


PHOTO_MAX_SIDES = (384, 512)
GLOBAL, LOCAL = (224, (0.4, 1.0)), (96, (0.05, 0.4))


def ensure_photos(root: Path, n: int) -> dict[int, Path]:
    """N photo-sized JPEGs under root/jpeg and one beton per stored max side; reused when present."""
    from dataset_prep.options import BetonOptions
    from dataset_prep.writer import write_beton
    from fastmveb.data import available_cores
    jpeg = root / f"jpeg{n}"
    if not jpeg.is_dir():
        write_photos(root / f".jpeg{n}.tmp", n, available_cores())
        (root / f".jpeg{n}.tmp").rename(jpeg)
    samples = [(str(f), 0) for f in sorted(jpeg.glob("*.jpg"))]
    out = {}
    for m in PHOTO_MAX_SIDES:
        beton = root / f"photos{n}-max{m}.beton"
        if not beton.exists():
            write_beton(samples, beton, BetonOptions(max_side=m, num_workers=2, progress=False),
                        max_pixels=500 * 500)
        out[m] = beton
    return out


def stored_sizes(beton: Path) -> "np.ndarray":
    """(M, 2) the stored (H, W) of every image, from the beton's metadata."""
    import numpy as np
    from ffcv.reader import Reader
    meta = Reader(str(beton)).metadata["f0"]
    return np.stack([meta["height"], meta["width"]], 1).astype(np.float32)


def upsampled_fraction(sizes, decode: str, s: int | None, out: int, scale, draws: int = 20_000) -> float:
    """Fraction of crops (torchvision's rule) that span fewer than ``out`` real pixels on either axis: decoded
    pixels, and never more than the stored image had there (a canvas larger than the image adds none)."""
    from fastmveb.views import sample_crop_boxes
    g = torch.Generator().manual_seed(0)
    ext = torch.from_numpy(sizes)[torch.randint(len(sizes), (draws,), generator=g)]
    ratio = (3 / 4, 4 / 3)
    if decode == "center":           # boxes on the S-px square cut from the centre min(H, W) square
        b = sample_crop_boxes(draws, s, s, scale, ratio, "cpu", g)
        keep = (ext.min(1).values / s).clamp(max=1.0)
        rows, cols = b[:, 2] * keep, b[:, 3] * keep
    else:                            # boxes on the stored image; "once" sees them through the S x S canvas
        b = sample_crop_boxes(draws, ext[:, 0], ext[:, 1], scale, ratio, "cpu", g)
        rows, cols = b[:, 2], b[:, 3]
        if decode == "once":
            rows, cols = rows * (s / ext[:, 0]).clamp(max=1.0), cols * (s / ext[:, 1]).clamp(max=1.0)
    return ((rows < out) | (cols < out)).float().mean().item()


def measure(make_iter, batch_size: int, warmup: int, min_time: float, device) -> dict:
    """Iterate (restarting epochs as needed); time batches after ``warmup`` until ``min_time`` has passed."""
    seen = 0
    n = 0
    t0 = None
    while True:
        it = make_iter()
        before = n
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
        if n == before:   # an epoch without a batch (fewer samples than a batch, drop_last) would loop for ever
            raise UserError(f"a loader timed here yields no batch of {batch_size}: its data has fewer samples than "
                            f"one batch; pass a smaller --batch-size or more --photos")


def _cases(beton: Path, jpeg_root: Path, photos: dict, bs: int, workers: int, device) -> list[tuple]:
    """(name, data label, beton, views, build, (decode, S) for the upsampled columns) of every pipeline timed.
    PIL first: DataLoader forks its workers, which is safest before ffcv/numba have started threads."""
    from fastmveb.bench.reference.released_transforms import released_imagefolder_loader
    from fastmveb.config import DataConfig, ViewsConfig
    from fastmveb.data import TrainLoaderOptions, train_loader

    def ffcv(data, **kw):
        loader = train_loader(data, bs, workers, device, TrainLoaderOptions(seed=0, **kw))
        return lambda: iter(loader)

    def pil(n_local):
        loader = released_imagefolder_loader(jpeg_root, n_local, bs, workers, persistent_workers=True)
        return lambda: iter(loader)

    default_s = DataConfig().decode_size
    two, multi = ViewsConfig(n_local=0), ViewsConfig(n_local=6)
    cases = [
        ("pil released two-view", "synthetic", beton, "2 x 224", lambda: pil(0), ("pil", None)),
        ("pil released multi-crop", "synthetic", beton, "2 x 224 + 6 x 96", lambda: pil(6), ("pil", None)),
        ("ffcv center 256", "synthetic", beton, "1 x 256 square (views on GPU)",
         lambda: ffcv(beton, decode="center", decode_size=256), ("center", 256)),
        (f"ffcv once {default_s}", "synthetic", beton, f"1 x {default_s} whole image (views on GPU)",
         lambda: ffcv(beton, decode="once", decode_size=default_s), ("once", default_s)),
        ("ffcv per_view two-view", "synthetic", beton, "2 x 224",
         lambda: ffcv(beton, decode="per_view", views=two), ("per_view", None)),
        ("ffcv per_view multi-crop", "synthetic", beton, "2 x 224 + 6 x 96",
         lambda: ffcv(beton, decode="per_view", views=multi), ("per_view", None)),
    ]
    for m, pb in photos.items():
        data = f"photos max {m}"
        cases.append(("ffcv center 256", data, pb, "1 x 256 square (views on GPU)",
                      lambda pb=pb: ffcv(pb, decode="center", decode_size=256), ("center", 256)))
        for s_ in (256, 384) if m == 384 else (256, 384, 448, 512):
            cases.append((f"ffcv once {s_}", data, pb, f"1 x {s_} whole image (views on GPU)",
                          lambda pb=pb, s_=s_: ffcv(pb, decode="once", decode_size=s_), ("once", s_)))
        cases.append(("ffcv per_view two-view", data, pb, "2 x 224",
                      lambda pb=pb: ffcv(pb, decode="per_view", views=two), ("per_view", None)))
    return cases


def _rows(cases: list[tuple], runs: list[list[dict]]) -> list[dict]:
    """One row per case: the median round, its spread, the upsampled fractions and the ratio against PIL."""
    rows = []
    for (name, data, src, views, _, (decode, s_)), rs in zip(cases, runs):
        rates = sorted(r["samples_per_s"] for r in rs)
        mid = rates[len(rates) // 2]
        r = dict(next(r for r in rs if r["samples_per_s"] == mid), spread=(rates[-1] - rates[0]) / mid)
        sizes = stored_sizes(src)
        up = {f"{k}_up": upsampled_fraction(sizes, decode, s_, out, scale)
              for k, (out, scale) in (("glob", GLOBAL), ("loc", LOCAL))}
        rows.append({"pipeline": name, "data": data, "views": views, **r, **up})
    # Ratios against PIL on the synthetic set only (PIL does not run on the photo set).
    base = {r["views"]: r["samples_per_s"] for r in rows if r["pipeline"].startswith("pil")}
    for r in rows:
        ref = (base.get(r["views"]) or base.get("2 x 224")) if r["data"] == "synthetic" else None
        r["x_vs_pil"] = r["samples_per_s"] / ref if ref else None
    return rows


def main(args) -> None:
    from fastmveb.data import available_cores

    device = pick_device(args.device)
    beton = Path(args.beton)
    jpeg_root = Path(args.jpeg_root) if args.jpeg_root else beton.parent / "jpeg" / "train"
    ensure_data(beton, jpeg_root)
    workers = max(1, min(args.num_workers or available_cores(), available_cores()))
    bs = args.batch_size or (32 if args.short else 64)
    min_time = args.min_time or (5.0 if args.short else 20.0)
    warmup = 2 if args.short else 3
    only = {s_.strip() for s_ in args.only.split(",") if s_.strip()}
    load_before = loadavg()

    n_photos = args.photos if args.photos is not None else (256 if args.short else 512)
    photos = ensure_photos(Path(args.photos_dir), n_photos) if n_photos else {}
    cases = [c for c in _cases(beton, jpeg_root, photos, bs, workers, device) if not only or c[0] in only]
    iters = [build() for *_, build, _ in cases]          # each loader built (and numba-compiled) once
    runs: list[list[dict]] = [[] for _ in cases]
    for rnd in range(max(1, args.rounds)):
        for i, (name, data, *_rest) in enumerate(cases):
            runs[i].append(measure(iters[i], bs, warmup, min_time, device))
            print(f"round {rnd + 1}: {name:28s} {data:16s} {runs[i][-1]['samples_per_s']:8.1f} samples/s", flush=True)
    rows = _rows(cases, runs)
    settings = {"beton": str(beton), "jpeg_root": str(jpeg_root), "batch_size": bs, "num_workers": workers,
                "short": bool(args.short), "warmup_batches": warmup, "min_time_s": min_time,
                "rounds": max(1, args.rounds),
                "device": str(device),
                "loadavg_before": load_before,
                "loadavg_after": loadavg(),
                "photos": n_photos,
                "note": "samples_per_s: median of the rounds, spread: (max - min) / median; x_vs_pil: vs the PIL "
                        "loader with the same views (ffcv once/center: vs PIL two-view); glob_up/loc_up: fraction "
                        "of global/local crops upsampled (see the module doc)"}
    columns = ["pipeline", "data", "views", "samples_per_s", "spread", "ms_per_batch", "batches", "x_vs_pil",
               "glob_up", "loc_up"]
    print(markdown_table(rows, columns))
    path = write_results("loader", environment(device), settings, rows, columns, args.out_dir)
    print(f"wrote {path}")
