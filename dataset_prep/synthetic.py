"""The embedded synthetic dataset: seeded, photo-like JPEGs whose class is a texture/shape family.

    python -m dataset_prep synthetic --out data/synthetic [--classes 10 --train-per-class 300 --val-per-class 50]

Why this design: MVEB's views crop down to 5% of the area, jitter and drop colour, blur and flip, so the class
must live in something all of that leaves intact. Each class is a pattern family (stripes, checks, dots,
rings, grid, zigzag, waves, cells, triangles, crosses) painted into a large random region. Everything else is
drawn at random per image and carries no class information: the pattern's two colours, period, orientation
and phase; the region's shape and position; the background (colour gradient + smooth noise); clutter (lines,
ellipses, blobs); image size (200-500 px a side) and sensor noise. Patterns at one scale look alike under
blur, rings resemble stripes in a small crop and clutter hides parts of the pattern, so a random encoder's
kNN is far from perfect while a trained one can learn the families.

Generation is deterministic: image (split, class, index) draws from its own generator seeded with
(seed, split, class, index), so the JPEG bytes do not depend on worker count or scheduling.
The JPEG tree is kept at OUT/jpeg/{train,val}/<class>/ (the loader benchmark reads it with PIL) and the
betons are written from it by the ImageFolder writer (dataset_prep.writer).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import time
from pathlib import Path

import cv2
import numpy as np

CLASSES = ("stripes", "checks", "dots", "rings", "grid", "zigzag", "waves", "cells", "triangles", "crosses")
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
    # The period scales with the image, so the texture stays resolvable after a 96-256 px decode and
    # a crop (a fixed 10-px period aliases away at the demo's 64-px views).
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
    if name == "waves":
        u, v = _coords(h, w, rng, period)
        return (np.sin(2 * np.pi * (u + 0.35 * np.sin(2 * np.pi * v / rng.uniform(1.5, 3)))) > 0).astype(np.float32)
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
        return cv2.dilate((edge > 0).astype(np.float32), np.ones((k, k), np.uint8))
    if name == "triangles":
        img = np.zeros((h, w), np.float32)
        n = int(h * w / (period * 2.5) ** 2)
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


def _colour(rng):
    return rng.uniform(0, 255, 3).astype(np.float32)


def make_image(seed: int, split: str, label: int, index: int, num_classes: int = len(CLASSES)) -> np.ndarray:
    """One RGB uint8 image (H, W, 3); a pure function of its arguments."""
    rng = np.random.default_rng([seed, SPLITS[split], label, index])
    h, w = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
    # Background: a two-colour gradient at a random angle plus low-frequency noise (no class information).
    y, x = _grid(h, w)
    a = rng.uniform(0, 2 * np.pi)
    ramp = ((x * np.float32(np.cos(a) / max(h, w)) + y * np.float32(np.sin(a) / max(h, w))) + 1) / 2
    b0, b1 = _colour(rng), _colour(rng)
    img = b0 + (b1 - b0) * ramp[..., None]
    img += 30 * _smooth_noise(h, w, rng, int(rng.integers(3, 8)))[..., None] * rng.uniform(0.3, 1, 3)
    # Foreground region: a thresholded smooth field covering ~35-85% of the image, softened at the edge.
    field = _smooth_noise(h, w, rng, int(rng.integers(2, 5)))
    cover = rng.uniform(0.35, 0.85)
    mask = (field > np.quantile(field[::4, ::4], 1 - cover)).astype(np.float32)
    mask = cv2.GaussianBlur(mask, (0, 0), 2.0)[..., None]
    p = _pattern(label, h, w, rng)
    p = cv2.GaussianBlur(p, (0, 0), rng.uniform(0.5, 1.2))[..., None]   # no hard aliased edges, like a photo
    c1, c2 = _colour(rng), _colour(rng)
    if np.abs(c1 - c2).sum() < 150:   # keep the pattern visible: two near-equal colours would erase the class
        c2 = 255 - c1
    tex = c1 + (c2 - c1) * p
    img += (tex - img) * mask
    # Clutter: class-agnostic lines, ellipses and filled blobs on top.
    img = np.ascontiguousarray(img)
    for _ in range(int(rng.integers(2, 9))):
        col = tuple(float(v) for v in _colour(rng))
        p1 = tuple(int(v) for v in rng.integers(0, (w, h)))
        kind = rng.integers(0, 3)
        if kind == 0:
            p2 = tuple(int(v) for v in rng.integers(0, (w, h)))
            cv2.line(img, p1, p2, col, int(rng.integers(1, 6)), cv2.LINE_AA)
        else:
            axes = tuple(int(v) for v in rng.integers(5, max(h, w) // 5, 2))
            thick = -1 if kind == 2 else int(rng.integers(1, 5))
            cv2.ellipse(img, p1, axes, float(rng.uniform(0, 180)), 0, 360, col, thick, cv2.LINE_AA)
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 6))
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
    # cv2 threads inside forked workers only fight the other workers for the same cores.
    cv2.setNumThreads(1)
    if num_workers > 1:
        with mp.get_context("fork").Pool(num_workers) as pool:
            for _ in pool.imap_unordered(_write_one, jobs, chunksize=16):
                bar.update()
    else:
        for j in jobs:
            _write_one(j)
            bar.update()
    bar.close()
    return root


def make_synthetic(out: str | Path, *, classes: int = 10, train_per_class: int = 300, val_per_class: int = 50,
                   seed: int = 0, quality: int = 90, max_side: int | None = None, num_workers: int | None = None,
                   force: bool = False, keep_jpeg: bool = True, progress: bool = True) -> list[dict]:
    """Generate the JPEG tree under OUT/jpeg and write OUT/train.beton + OUT/val.beton from it."""
    from .writer import PrepError, convert_imagefolder
    out = Path(out)
    for name in ("train", "val"):
        if (out / f"{name}.beton").exists() and not force:
            raise PrepError(f"{out / f'{name}.beton'} exists; pass --force to overwrite it")
    tree = out / "jpeg"
    if tree.exists():
        shutil.rmtree(tree)   # stale images from other settings would leak into the betons
    t0 = time.perf_counter()
    write_jpeg_tree(tree, classes=classes, train_per_class=train_per_class, val_per_class=val_per_class,
                    seed=seed, quality=quality, num_workers=num_workers, progress=progress)
    t_gen = time.perf_counter() - t0
    print(f"generated {classes * (train_per_class + val_per_class):,} JPEGs in {tree} in {t_gen:.1f} s", flush=True)
    # The images were just written by us: skip nothing silently, but the decode check is cheap enough to keep.
    summaries = convert_imagefolder(tree, out, max_side=max_side, jpeg_quality=quality, seed=seed,
                                    num_workers=num_workers, force=force, progress=progress)
    if not keep_jpeg:
        shutil.rmtree(tree)
    return summaries
