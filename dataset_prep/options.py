"""How betons are written: the options every mode shares (BetonOptions), their defaults and limits, the checks they
get before any image is read, and the error every fatal problem raises (PrepError).

The command line builds one BetonOptions from its flags (dataset_prep.__main__); the modes and the writer take it
whole, so an option is added in one place and reaches every mode.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fastmveb.errors import UserError

WRITE_MODES = ("jpg", "raw", "smart", "proportion")
# Default --max-side: the longest side kept in the beton. 512 keeps ImageNet's usual 500-px photos whole, so
# global crops (224 px of >= 40% of the image) are cut from as many pixels as the released full-resolution
# recipe (upsampled: 0%); at 384 a 0.4-scale crop spans ~210 px and 40% of global crops are upsampled whatever
# the decode. The price, measured (python -m fastmveb.bench loader, photo set): ~1.5x slower JPEG decoding than
# 384. Lower it (384, 256) when decoding is the bottleneck and fidelity is not the goal.
DEFAULT_MAX_SIDE = 512
DEFAULT_SMART_THRESHOLD = 3 * 256 * 256   # bytes of raw RGB above which 'smart' stores JPEG (ffcv's default: never)
MIN_SIDE = 16   # px, as stored: smaller images are skipped (an empty eval centre crop aborts inside OpenCV)
# px, as stored: the beton keeps each side in a uint16, and libjpeg-turbo encodes at most 65,500 px a side. A larger
# image (only possible with --max-side 0) killed a writer process with "OverflowError ... uint16"; now it stops the
# run before anything is written, naming the file.
MAX_SIDE = 65500


class PrepError(UserError):
    """A fatal, user-facing problem; its message is the single line printed before exiting with status 2."""


@dataclass(frozen=True)
class BetonOptions:
    """How each beton is written (the flags of the same names).

    ``max_side``: longest side stored (None: as the source); ``jpeg_quality``, ``write_mode``,
    ``compress_probability``, ``smart_threshold``: ffcv's RGBImageField settings; ``shuffle``, ``seed``: the seeded
    write order (and a --val-fraction draw, the synthetic images); ``num_workers``: processes for checking and
    writing (None: every core); ``force``: overwrite existing betons; ``progress``: progress bars.
    """
    max_side: int | None = DEFAULT_MAX_SIDE
    jpeg_quality: int = 90
    write_mode: str = "jpg"
    compress_probability: float = 0.5
    smart_threshold: int = DEFAULT_SMART_THRESHOLD
    shuffle: bool = True
    seed: int = 0
    num_workers: int | None = None
    force: bool = False
    progress: bool = True


def worker_count(requested: int | None) -> int:
    """--num-workers as used: the core count by default and at most, at least 1."""
    cores = os.cpu_count() or 1
    return max(1, min(requested or cores, cores))


def check_writable(out: Path) -> None:
    """OUT can be created and written (checked before the slow validation pass)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise PrepError(f"cannot write to {out}: {e.strerror or e}; choose another --out") from None


def check_options(out: Path, names, options: BetonOptions) -> None:
    """The cheap checks every mode runs before reading any image: options, existing betons, a writable OUT."""
    if not 1 <= options.jpeg_quality <= 100:
        raise PrepError(f"--jpeg-quality must be in 1..100, got {options.jpeg_quality}")
    max_side = options.max_side
    if max_side is not None and not MIN_SIDE <= max_side <= MAX_SIDE:
        raise PrepError(f"--max-side must be in {MIN_SIDE}..{MAX_SIDE} (or 0 for no resizing), got {max_side}")
    for name in names:
        if (out / f"{name}.beton").exists() and not options.force:
            raise PrepError(f"{out / f'{name}.beton'} exists; pass --force to overwrite it")
    check_writable(out)
