"""The embedded synthetic dataset: seeded, photo-like JPEGs whose class is a texture/shape family.

    python -m dataset_prep synthetic --out data/synthetic [--classes 10 --train-per-class 300 --val-per-class 50]

Why this design: MVEB's views crop down to 5% of the area, jitter and drop colour, blur and flip, so the class
must live in something all of that leaves intact. Each class is a pattern family (stripes, checks, dots,
rings, grid, zigzag, arcs, cells, triangles, crosses) covering the whole image, so every crop shows it, at a
period of 10-20% of the short side, so its shape survives the demo's 64-px decode, 40/20-px views and blur.
Everything else is drawn at random per image and carries no class information: period, orientation, phase,
image size (200-500 px a side), sensor noise, and the pattern's two colours, which are smooth colour fields
drifting across the image, one darkened and one brightened (a coin flip says which). Colour therefore tells
nothing about the class, and a random encoder's features, dominated by colour, stay near chance (about 21% kNN
top-1), while training must learn the structure that two crops of one image share.

How it got here (kNN top-1 after the demo run, seed 0, each change measured on top of the previous one):
- Flat colours per image, the pattern on 35-85% of the image under clutter: 15% trained vs 13% random init. The
  colours, region and clutter are instance cues that two crops share, so training learnt them.
- Two free colour fields: 33.8% vs 16.4% (4 epochs at 64/32 px). The pattern faded where the fields matched.
- One field darkened, one brightened (luminance contrast everywhere): 50.4% vs 22.0%.
- Cells with a shade per cell, triangles 2.4x denser (a small crop was often blank): 54.8% vs 21.2%.
- Recipe at 40/20-px views and 9 epochs in about the same time (rcs/tiny.yaml): 66.6% vs 21.2%. The confusion
  matrix then showed waves and zigzag mixed up with each other and with stripes.
- Waves replaced by arcs (Truchet tiles): 68.0% vs 21.2%. Over seeds 0-2 (python -m fastmveb.demo run, README):
  67.2-69.0% trained, 18.4-21.2% at random init.

Generation is deterministic: image (split, class, index) draws from its own generator seeded with
(seed, split, class, index), so the JPEG bytes do not depend on worker count or scheduling.
The JPEG tree is kept at OUT/jpeg/{train,val}/<class>/ (the loader benchmark reads it with PIL) and the
betons are written from it by the ImageFolder mode (dataset_prep.convert).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np

from fastmveb.fileio import atomic_path

from .convert import convert_imagefolder
from .options import BetonOptions, PrepError, check_options

CLASSES = ("stripes", "checks", "dots", "rings", "grid", "zigzag", "arcs", "cells", "triangles", "crosses")
SPLITS = {"train": 0, "val": 1}
MIN_SIDE, MAX_SIDE = 200, 500


def _coords(h, w, rng, period):
    """Rotated, scaled coordinates (u, v) in units of one pattern period."""
    theta = rng.uniform(0, np.pi)
    y, x = _grid(h, w)
    c, s = np.float32(np.cos(theta) / period), np.float32(np.sin(theta) / period)
    u = x * c + (y * s + np.float32(rng.uniform(0, 1)))       # (1, w) + (h, 1) broadcasts to (h, w)
    v = (y * c + np.float32(rng.uniform(0, 1))) - x * s
    return u, v


def _grid(h, w):
    return np.arange(h, dtype=np.float32)[:, None], np.arange(w, dtype=np.float32)[None, :]


def _pattern(kind: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Class pattern intensity in [0, 1], (h, w) float32."""
    # The period scales with the image, so the texture stays resolvable after a 64-256 px decode and a crop.
    # 10-20% of the side measured better than 16-26% (kNN top-1 after an earlier demo run, seed 0: 31.2% vs 23.0%).
    period = min(h, w) * rng.uniform(0.10, 0.20)
    name = CLASSES[kind % len(CLASSES)]
    if name == "stripes":
        u, _ = _coords(h, w, rng, period)
        return (np.sin(2 * np.pi * u) > rng.uniform(-0.3, 0.3)).astype(np.float32)
    if name == "checks":
        u, v = _coords(h, w, rng, period)
        return ((np.floor(u) + np.floor(v)) % 2).astype(np.float32)
    if name == "dots":
        u, v = _coords(h, w, rng, period)
        d = np.hypot(u - np.round(u), v - np.round(v))
        return (d < rng.uniform(0.2, 0.35)).astype(np.float32)
    if name == "rings":
        y, x = _grid(h, w)
        r = np.hypot(y - np.float32(rng.uniform(0, h)), x - np.float32(rng.uniform(0, w))) / np.float32(period)
        return (np.sin(2 * np.pi * r) > 0).astype(np.float32)
    if name == "grid":
        u, v = _coords(h, w, rng, period)
        t = rng.uniform(0.1, 0.2)
        return (((u % 1) < t) | ((v % 1) < t)).astype(np.float32)
    if name == "zigzag":
        u, v = _coords(h, w, rng, period)
        tri = np.abs((v / rng.uniform(0.8, 1.6)) % 2 - 1)          # triangle wave along the stripes
        return (np.sin(2 * np.pi * (u + rng.uniform(0.4, 0.8) * tri)) > 0).astype(np.float32)
    if name == "arcs":
        # Truchet tiles: every lattice cell holds two quarter-circle arcs joining midpoints of its sides, in one of
        # two mirror orientations drawn per cell, so the arcs link into meandering closed curves.
        u, v = _coords(h, w, rng, period)
        flip = rng.integers(0, 2, (64, 64)).astype(bool)
        fu, fv = u % 1, v % 1
        fu = np.where(flip[np.floor(u).astype(np.int64) % 64, np.floor(v).astype(np.int64) % 64], 1 - fu, fu)
        t = rng.uniform(0.12, 0.18)
        return ((np.abs(np.hypot(fu, fv) - 0.5) < t) | (np.abs(np.hypot(1 - fu, 1 - fv) - 0.5) < t)).astype(np.float32)
    if name == "cells":
        # Voronoi cell borders: label every pixel with its nearest seed (one distance transform), then mark
        # pixels whose label differs from a neighbour's.
        n = max(8, int(h * w / (period * 2.2) ** 2))
        seeds = np.full((h, w), 255, np.uint8)
        seeds[rng.integers(0, h, n), rng.integers(0, w, n)] = 0
        _, lab = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_CCOMP)
        edge = np.zeros((h, w), np.float32)
        edge[:, 1:] += lab[:, 1:] != lab[:, :-1]
        edge[1:, :] += lab[1:, :] != lab[:-1, :]
        k = max(1, int(round(period * 0.15)))
        edge = cv2.dilate((edge > 0).astype(np.float32), np.ones((k, k), np.uint8))
        # Stained glass: a shade per cell as well as the borders, so that a small crop inside one cell still
        # shows something of the class (borders alone left most 5%-area crops blank).
        shade = rng.uniform(0, 1, int(lab.max()) + 1).astype(np.float32)
        return np.maximum(edge, 0.6 * shade[lab])
    if name == "triangles":
        img = np.zeros((h, w), np.float32)
        n = int(h * w / (period * 1.6) ** 2)       # dense enough that most crops hold a triangle or two
        for _ in range(n):
            c = rng.uniform(0, 1, 2) * (w, h)
            r = period * rng.uniform(0.5, 1.0)
            a = rng.uniform(0, 2 * np.pi) + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3])
            pts = np.stack([c[0] + r * np.cos(a), c[1] + r * np.sin(a)], 1).astype(np.int32)
            cv2.fillConvexPoly(img, pts, 1.0)
        return img
    if name == "crosses":
        u, v = _coords(h, w, rng, period)
        du, dv = np.abs(u - np.round(u)), np.abs(v - np.round(v))
        arm, thick = rng.uniform(0.3, 0.45), rng.uniform(0.06, 0.12)
        return (((du < thick) & (dv < arm)) | ((dv < thick) & (du < arm))).astype(np.float32)
    raise ValueError(name)


def _smooth_noise(h, w, rng, cells):
    g = rng.standard_normal((cells, cells)).astype(np.float32)
    return cv2.resize(g, (w, h), interpolation=cv2.INTER_CUBIC)


def _colour_field(h, w, rng):
    """An RGB colour that drifts across the image: smooth noise per channel over 2-3 cells a side, around grey."""
    cells = int(rng.integers(2, 4))
    f = np.stack([_smooth_noise(h, w, rng, cells) for _ in range(3)], -1)
    return np.clip(128 + 102 * f, 0, 255)


def make_image(seed: int, split: str, label: int, index: int, num_classes: int = len(CLASSES)) -> np.ndarray:
    """One RGB uint8 image (H, W, 3); a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS[split], label, index])
    h, w = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
    p = _pattern(label, h, w, rng)
    p = cv2.GaussianBlur(p, (0, 0), rng.uniform(0.5, 1.2))[..., None]   # no hard aliased edges, like a photo
    # The pattern's two colours are two independent colour fields: every image, and every region of an image,
    # has its own pair, so colour says nothing about the class and little about which image a crop came from.
    # One field is darkened and the other brightened (which one is a coin flip), so the pattern has luminance
    # contrast everywhere: with two free fields it faded wherever they happened to match.
    c1, c2 = _colour_field(h, w, rng), _colour_field(h, w, rng)
    dark, bright = np.float32(rng.uniform(0.15, 0.45)), np.float32(rng.uniform(0.9, 1.3))
    if rng.uniform() < 0.5:
        dark, bright = bright, dark
    img = c1 * bright + (c2 * dark - c1 * bright) * p
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 6))   # sensor noise
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_one(job):
    seed, split, label, index, path, quality = job
    img = make_image(seed, split, label, index)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(img, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    Path(path).write_bytes(buf.tobytes())


def write_jpeg_tree(root: str | Path, *, classes: int = 10, train_per_class: int = 300, val_per_class: int = 50,
                    seed: int = 0, quality: int = 90, num_workers: int | None = None, progress: bool = True) -> Path:
    """Write root/{train,val}/<NN_name>/<index>.jpg; returns root."""
    from tqdm import tqdm
    if not 2 <= classes <= len(CLASSES):
        raise ValueError(f"--classes must be in 2..{len(CLASSES)}, got {classes}")
    root = Path(root)
    names = [f"{k:02d}_{CLASSES[k]}" for k in range(classes)]
    jobs = []
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for k, name in enumerate(names):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            jobs += [(seed, split, k, i, str(d / f"{i:05d}.jpg"), quality) for i in range(n)]
    num_workers = max(1, min(num_workers or os.cpu_count() or 1, os.cpu_count() or 1))
    bar = tqdm(total=len(jobs), desc="generate", unit="img", disable=not progress, leave=False)
    # cv2 threads inside the workers only fight the other workers for the same cores.
    cv2.setNumThreads(1)
    if num_workers > 1:
        # forkserver, not fork: a caller with threads (torch's, a test runner's) can hold a lock at the moment of a
        # fork, and the forked worker then waits on it for ever (seen once in the test suite: the pool never ended).
        with mp.get_context("forkserver").Pool(num_workers) as pool:
            for _ in pool.imap_unordered(_write_one, jobs, chunksize=16):
                bar.update()
    else:
        for j in jobs:
            _write_one(j)
            bar.update()
    bar.close()
    return root


# The synthetic images are 200-500 px a side already: stored as generated.
SYNTHETIC_OPTIONS = BetonOptions(max_side=None)


def make_synthetic(out: str | Path, options: BetonOptions = SYNTHETIC_OPTIONS, *, classes: int = 10,
                   train_per_class: int = 300, val_per_class: int = 50, keep_jpeg: bool = True) -> list[dict]:
    """Generate the JPEG tree under OUT/jpeg and write OUT/train.beton + OUT/val.beton from it.

    ``options.seed`` and ``options.jpeg_quality`` also seed and encode the generated JPEGs.
    """
    out = Path(out)
    check_options(out, ("train", "val"), options)   # before minutes of generating, not after
    tree = out / "jpeg"
    if tree.exists():
        shutil.rmtree(tree)   # stale images from other settings would leak into the betons
    t0 = time.perf_counter()
    write_jpeg_tree(tree, classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                    seed=options.seed, quality=options.jpeg_quality, num_workers=options.num_workers,
                    progress=options.progress)
    t_gen = time.perf_counter() - t0
    print(f"generated {classes * (train_per_class + val_per_class):,} JPEGs in {tree} in {t_gen:.1f} s", flush=True)
    # The images were just written by us: skip nothing silently, but the decode check is cheap enough to keep.
    summaries = convert_imagefolder(tree, out, options)
    if not keep_jpeg:
        shutil.rmtree(tree)
    return summaries


def sample_grid(*, classes: int = len(CLASSES), per_class: int = 6, seed: int = 0, thumb: int = 96,
                split: str = "val") -> np.ndarray:
    """A class-per-row RGB uint8 mosaic of generated images (centre squares, ``thumb`` px), labelled on the left."""
    if not 2 <= classes <= len(CLASSES):
        raise ValueError(f"--classes must be in 2..{len(CLASSES)}, got {classes}")
    if per_class < 1 or thumb < 16:
        raise ValueError(f"--per-class must be >= 1 and --thumb >= 16, got {per_class} and {thumb}")
    label_w, gap = 90, 2
    grid = np.full((classes * (thumb + gap) + gap, label_w + per_class * (thumb + gap) + gap, 3), 255, np.uint8)
    for k in range(classes):
        y0 = gap + k * (thumb + gap)
        cv2.putText(grid, CLASSES[k], (4, y0 + thumb // 2 + 5), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 1,
                    cv2.LINE_AA)
        for i in range(per_class):
            img = make_image(seed, split, k, i)
            s = min(img.shape[:2])
            oy, ox = (img.shape[0] - s) // 2, (img.shape[1] - s) // 2
            t = cv2.resize(img[oy:oy + s, ox:ox + s], (thumb, thumb), interpolation=cv2.INTER_AREA)
            x0 = label_w + gap + i * (thumb + gap)
            grid[y0:y0 + thumb, x0:x0 + thumb] = t
    return grid


def write_grid(out: str | Path, **kw) -> Path:
    """sample_grid(**kw) as a PNG at ``out`` (written whole or not at all)."""
    out = Path(out)
    if not out.parent.is_dir():
        raise PrepError(f"output folder '{out.parent}' does not exist")
    if out.suffix.lower() != ".png":
        raise PrepError(f"--out must end in .png, got '{out.name}'")
    try:
        grid = sample_grid(**kw)
    except ValueError as e:
        raise PrepError(str(e)) from None
    from PIL import Image
    with atomic_path(out) as tmp:
        # A 256-colour palette keeps the README picture small (noisy gradients compress badly as RGB PNG).
        Image.fromarray(grid).quantize(256, method=Image.Quantize.MEDIANCUT).save(tmp, format="PNG", optimize=True)
    print(f"grid -> {out} ({out.stat().st_size / 1024:.0f} KiB)")
    return out
