"""Checking images before they are written: every file is decoded once, in parallel, at reduced JPEG scale where
possible, because a sample that fails inside FFCV's writer processes would abort, or in ffcv 1.0.2 even hang, the
whole write. Also the one conversion of any PIL image to the 8-bit RGB a beton stores (to_rgb8), shared with the
writer so that what was checked is what is written.

A file PIL cannot decode completely, a pixel format without a known 8-bit scale, or an image with a side under
MIN_SIDE as stored is moved to the split's ``skipped`` list with the reason; an image over MAX_SIDE a side as stored
goes to ``too_large`` (the caller stops the run on it).
"""
from __future__ import annotations

import functools
import multiprocessing as mp

import numpy as np
from PIL import Image

from .options import MAX_SIDE, MIN_SIDE
from .scan import Split


class SkipImage(Exception):
    """A readable image this writer will not store; the message is the reason listed in skipped-<split>.txt."""


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB without silent damage (the pixel formats: dataset_prep.convert's module doc);
    raises SkipImage."""
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        # convert("RGB") clips these at 255: a 16-bit image becomes nearly binary. Scale the full range instead.
        a = np.asarray(img).astype(np.int64)
        if a.size and (a.min() < 0 or a.max() > 65535):
            raise SkipImage(f"{mode} pixels outside 0..65535: no known 8-bit scale")
        img = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8), "L")
    elif mode == "F":
        a = np.asarray(img, dtype=np.float64)
        if not np.isfinite(a).all() or (a.size and (a.min() < 0 or a.max() > 1)):
            raise SkipImage("32-bit float pixels outside [0, 1]: no known 8-bit scale")
        img = Image.fromarray(np.rint(a * 255).astype(np.uint8), "L")
    elif mode == "PA" or (mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")      # then the alpha is dropped below, keeping the palette colours
    return img if img.mode == "RGB" else img.convert("RGB")


def stored_size(w: int, h: int, max_side: int | None) -> tuple[int, int]:
    """(w, h) as ffcv's RGBImageField stores it: scaled down so the longest side is at most max_side."""
    if max_side and max(w, h) > max_side:
        r = max_side / max(w, h)
        return int(w * r), int(h * r)
    return w, h


def _check_image(path: str, max_side: int | None = None) -> tuple[str, str | None, int, int]:
    """(path, None, pixels, longest stored side) if PIL decodes the whole image and it can be stored, else
    (path, reason, 0, 0)."""
    try:
        with Image.open(path) as img:
            w, h = img.size
            pixels = w * h
            sw, sh = stored_size(w, h, max_side)
            if min(sw, sh) < MIN_SIDE:
                return path, (f"too small: {w}x{h}" + (f" ({sw}x{sh} at --max-side {max_side})" if (sw, sh) != (w, h)
                                                       else "") + f", under the {MIN_SIDE}-px minimum side"), 0, 0
            if max(sw, sh) > MAX_SIDE:
                return path, None, pixels, max(sw, sh)   # not decoded: the whole write stops on it (validate)
            # draft() lets JPEGs decode at 1/2..1/8 scale: every entropy-coded byte is still read (truncation and
            # corruption still fail) at a fraction of the IDCT cost.
            img.draft("RGB", (max(1, img.width // 8), max(1, img.height // 8)))
            img.load()
            to_rgb8(img)
        return path, None, pixels, max(sw, sh)
    except SkipImage as e:
        return path, str(e), 0, 0
    except Exception as e:   # noqa: BLE001 -- any decode failure means "skip this file"
        msg = str(e).splitlines()[0] if str(e) else ""
        return path, f"unreadable: {type(e).__name__}" + (f": {msg}" if msg else ""), 0, 0


def validate(split: Split, num_workers: int, progress: bool = True, max_side: int | None = None) -> Split:
    """Decode every file once (in parallel); move failures from ``samples`` to ``skipped``; images too large
    to store go to ``too_large``."""
    from tqdm import tqdm
    paths = [p for p, _ in split.samples]
    bad: dict[str, str] = {}
    bar = tqdm(total=len(paths), desc=f"check {split.name}", unit="img", disable=not progress, leave=False)
    pool = mp.get_context("fork").Pool(num_workers) if num_workers > 1 and len(paths) > 256 else None
    try:
        check = functools.partial(_check_image, max_side=max_side)
        results = pool.imap_unordered(check, paths, chunksize=64) if pool else map(check, paths)
        for p, reason, pixels, side in results:
            if reason:
                bad[p] = reason
            elif side > MAX_SIDE:
                split.too_large.append((p, side))
            split.max_pixels = max(split.max_pixels, pixels)
            bar.update()
    finally:
        if pool:
            pool.terminate()
    bar.close()
    if bad:
        split.samples = [(p, y) for p, y in split.samples if p not in bad]
        split.skipped.extend(sorted(bad.items()))
    split.too_large.sort()
    return split
