"""Writing one beton: (path, label) samples -> NAME.beton (JPEG or raw images + integer labels), atomically.

The beton is written under a temporary name beside it and renamed when complete (fastmveb.fileio), so a crash or
Ctrl-C never leaves a partial NAME.beton behind; a writer process that dies (disk full) stops the write with one
line and the temporary file is removed (ffcv 1.0.2 itself would wait forever: dataset_prep.ffcv_guard). Next to
the beton go NAME.beton.files.txt (each sample's source file, in sample order) and NAME.beton.sha256.json (its size,
SHA-256 and labels: dataset_prep.integrity). The samples are expected to be checked already (dataset_prep.check):
an image that fails here stops the write.
"""
from __future__ import annotations

import errno
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fastmveb.fileio import atomic_path, write_text

from .check import to_rgb8
from .ffcv_guard import WriterDied, ffcv_guarded, free_shared_memory
from .integrity import make_sidecar, sidecar_path, write_sidecar
from .options import WRITE_MODES, BetonOptions, PrepError, worker_count
from .scan import NO_LABEL

CHUNK = 64   # samples per ffcv work item


class _Samples:
    """Indexable (image uint8 HxWx3, label) for ffcv's writer processes.

    A failure here cannot raise: ffcv 1.0.2's writer waits forever for a sample a dead worker never reports.
    Files were validated beforehand, so a failure means the file changed underneath us; it is recorded in
    ``fail_dir`` and the caller aborts the write (no substitute image ever reaches a finished beton).
    """

    def __init__(self, samples, max_side: int | None, fail_dir: str):
        self.samples, self.max_side, self.fail_dir = samples, max_side, fail_dir

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        try:
            with Image.open(path) as img:
                if self.max_side:
                    img.draft("RGB", (self.max_side, self.max_side))   # JPEG DCT-domain downscale: cheap
                arr = np.asarray(to_rgb8(img))
        except Exception as e:   # noqa: BLE001
            Path(self.fail_dir, str(i)).write_text(f"{path}\t{type(e).__name__}: {e}")
            arr = np.zeros((8, 8, 3), np.uint8)
        return arr, label


def _page_size(max_pixels: int, max_side: int | None) -> int:
    from ffcv.writer import MIN_PAGE_SIZE
    if max_pixels <= 0:
        return 4 * MIN_PAGE_SIZE                      # unknown: ffcv's default (8 MiB)
    if max_side:
        max_pixels = min(max_pixels, max_side * max_side)
    need = 2 * 3 * max_pixels                         # raw RGB, with room for a JPEG larger than raw (noise, q=100)
    return max(MIN_PAGE_SIZE, 1 << (need - 1).bit_length())


def write_beton(samples: list[tuple[str, int]], out: str | Path, options: BetonOptions = BetonOptions(), *,
                max_pixels: int = 0) -> dict:
    """Write (path, label) samples to ``out`` atomically; returns a summary dict.

    ``max_pixels`` (largest source image, w * h) sizes ffcv's pages: a sample larger than a page kills a writer
    process, and every worker leaves its last page part-empty, so small datasets want small pages.
    """
    out = Path(out)
    if options.write_mode not in WRITE_MODES:
        raise PrepError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, got {options.write_mode!r}")
    if out.exists() and not options.force:
        raise PrepError(f"{out} exists; pass --force to overwrite it")
    if not samples:
        raise PrepError(f"no readable images to write to {out}")
    labels = {y for _, y in samples}
    if NO_LABEL in labels and len(labels) > 1:
        raise ValueError("a beton is labelled or not: labels mix -1 (none) with class labels")
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # ImageFolder order is class-sorted; a shuffled write order lets QUASI_RANDOM (which reads pages in order)
    # still mix classes. Seeded, so rewriting gives the same sample order.
    n = len(samples)
    order = np.random.default_rng(options.seed).permutation(n) if options.shuffle else np.arange(n)
    with tempfile.TemporaryDirectory(prefix="ffcv-fail-") as fail_dir:
        written = 0   # bytes of the finished temporary, for the line that says why finishing failed
        try:
            with atomic_path(out) as tmp:
                try:
                    tmp.touch()
                except OSError as e:
                    raise PrepError(f"cannot write to {out.parent}: {e.strerror}") from None
                _run_ffcv(samples, order, tmp, out, options, max_pixels, fail_dir)
                written = tmp.stat().st_size
                record = make_sidecar(tmp, labelled=labels != {NO_LABEL})
                sidecar_path(out).unlink(missing_ok=True)   # never an old record next to a new beton
                # The file list goes first: a failure after the beton is in place must not leave it without one.
                write_text(files_path(out), "".join(f"{os.path.abspath(samples[i][0])}\n" for i in order))
        except OSError as e:
            raise PrepError(_write_failure(out, written, fail_dir, e)) from None
        try:
            write_sidecar(record, sidecar_path(out))
        except OSError as e:
            # The beton and its file list are complete and in place; only the record (the cheap checks' reference)
            # is missing, and the line must say so rather than claim a partial file was removed.
            raise PrepError(f"cannot write the integrity record of {out} ({e.strerror or e}); the beton and its "
                            f"file list are complete but unrecorded, so only structural checks apply when it is "
                            f"opened: free space and rerun with --force to write it with its record") from None
    dt = time.perf_counter() - t0
    return {"file": str(out), "images": n, "classes": len(labels - {NO_LABEL}), "bytes": out.stat().st_size,
            "seconds": dt, "images_per_s": n / dt if dt > 0 else float("inf")}


def _run_ffcv(samples, order, tmp: Path, out: Path, options: BetonOptions, max_pixels: int, fail_dir: str) -> None:
    """ffcv's DatasetWriter: ``samples`` in ``order`` into ``tmp``; PrepError when a writer process or an image
    failed (``out`` names the beton in the line)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    fields = {
        "image": RGBImageField(write_mode=options.write_mode, max_resolution=options.max_side,
                               jpeg_quality=options.jpeg_quality, compress_probability=options.compress_probability,
                               smart_threshold=options.smart_threshold),
        "label": IntField(),
    }
    if options.write_mode == "proportion":
        np.random.seed(options.seed)   # the field draws jpg-vs-raw from numpy's global RNG (inherited by fork)
    ds = _Samples(samples, options.max_side, fail_dir)
    requested = worker_count(None) if options.num_workers is None else options.num_workers
    # Each writer process keeps its own last page part-empty: no more processes than chunks of work.
    workers = max(1, min(requested, -(-len(samples) // CHUNK)))
    writer = DatasetWriter(str(tmp), fields, num_workers=workers,
                           page_size=_page_size(max_pixels, options.max_side))
    try:
        with ffcv_guarded(options.progress, fail_dir):
            writer.from_indexed_dataset(ds, indices=order.tolist(), chunksize=CHUNK, shuffle_indices=False)
    except (WriterDied, OSError) as e:
        free_shared_memory(writer)
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        raise PrepError(_write_failure(out, written, fail_dir, e)) from None
    failed = sorted((f for f in os.listdir(fail_dir) if f.isdigit()), key=int)
    if failed:
        first = Path(fail_dir, failed[0]).read_text().splitlines()[0]
        raise PrepError(f"{len(failed)} image(s) failed while writing {out} (changed since the check?): {first}")


def _write_failure(out: Path, written: int, fail_dir: str, e: Exception) -> str:
    """One line for a write that failed part-way (``written``: bytes of the temporary then): why, and how much
    space there is."""
    reason = Path(fail_dir, "writer").read_text() if Path(fail_dir, "writer").is_file() else f"{type(e).__name__}: {e}"
    reason = reason.splitlines()[0] if reason else type(e).__name__
    free = shutil.disk_usage(out.parent).free
    full = "No space left" in reason or "File too large" in reason or getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG)
    what = "disk full" if full else "a writer process failed"
    return (f"{what} while writing {out} ({reason}; {written / 2**20:,.1f} MiB written, "
            f"{free / 2**20:,.1f} MiB free in {out.parent}); the partial file was removed"
            + ("; free space or choose another --out" if full else ""))


def files_path(beton: str | Path) -> Path:
    """NAME.beton.files.txt: the source file of every sample (absolute path), one per line in the beton's sample
    order, so a published subset list of file names (e.g. SimCLR's 1% ImageNet) can select samples (fastmveb.eval
    finetune --subset), and the file is itself a --list for dataset_prep folder."""
    beton = Path(beton)
    return beton.with_name(beton.name + ".files.txt")

