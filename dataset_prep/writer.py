"""ImageFolder tree -> FFCV .beton files (JPEG images + integer labels).

    python -m dataset_prep imagefolder --data /path/to/imagenet --out data/in1k [--max-side 384] [--force]

DATA holds train/ and val/ in the ImageNet layout (DATA/train/<class>/<image>). Train's sorted class folder
names define the labels 0..K-1; val is written with the same mapping (a val class unknown to train is an error;
val may lack some classes). The betons land in OUT/train.beton and OUT/val.beton. A val label that train
ends up without (every train image of a class unreadable; a --val-fraction split that put a rare label in val
only) stops the run before writing, naming the labels, unless --allow-label-mismatch (then one warning line).

What can go wrong, and what happens:
- a file without an image extension (README, .DS_Store, ...): skipped, counted and listed;
- an image that PIL cannot decode completely (corrupt, truncated, not really an image): skipped and listed.
  Every file is decoded once before writing (in parallel, at reduced JPEG scale where possible) because a
  sample that fails inside FFCV's writer processes would abort, or in 1.0.2 even hang, the whole write;
- an image with a side under MIN_SIDE (16) pixels as stored (after --max-side): skipped and listed (the
  eval centre crop of a 1-px image is empty and aborts inside OpenCV);
- pixel formats: 16-bit and 32-bit integer grey (I;16, I) are scaled to 8 bits (v * 255 / 65535), 32-bit
  float grey (F) in [0, 1] is scaled by 255 (outside [0, 1] it has no known scale: skipped and listed); an
  alpha channel (RGBA, LA, P with transparency) is dropped, keeping the stored colours, as torchvision's
  ImageFolder loader does; everything else goes through PIL's convert("RGB");
- directory symlinks inside a class folder are followed only when they point outside the split folder and
  do not contain it, and each real folder is read once: a link back into the split (a loop, another class)
  is skipped and listed instead of adding the same images again, maybe under another class's label;
- missing DATA/train or DATA/val, a train class folder without images, no images at all, an existing beton
  without --force, an OUT folder that cannot be written: one-line error, exit status 2, nothing written;
- the beton is written under a temporary name in OUT and renamed when complete, so a crash or Ctrl-C never
  leaves a partial train.beton behind; a writer process that dies (disk full) stops the write with one line
  and the temporary file is removed (ffcv 1.0.2 itself would wait forever);
- next to each beton, NAME.beton.sha256.json records its size, SHA-256 and labels (dataset_prep.integrity): the
  loaders check it on every open, and `python -m dataset_prep verify PATH` checks everything;
  NAME.beton.files.txt names each sample's source file, in sample order (subset lists select by file name).
Skipped files are printed (first 20) and written in full to OUT/skipped-<split>.txt.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import multiprocessing as mp
import multiprocessing.queues
import os
import queue
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from fastmveb.errors import UserError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
WRITE_MODES = ("jpg", "raw", "smart", "proportion")
# Default --max-side: the longest side kept in the beton. 512 keeps ImageNet's usual 500-px photos whole, so
# global crops (224 px of >= 40% of the image) are cut from as many pixels as the released full-resolution
# recipe (upsampled: 0%); at 384 a 0.4-scale crop spans ~210 px and 40% of global crops are upsampled whatever
# the decode. The price, measured (python -m fastmveb.bench loader, photo set): ~1.5x slower JPEG decoding than
# 384. Lower it (384, 256) when decoding is the bottleneck and fidelity is not the goal.
DEFAULT_MAX_SIDE = 512
DEFAULT_SMART_THRESHOLD = 3 * 256 * 256   # bytes of raw RGB above which 'smart' stores JPEG (ffcv's default: never)
MAX_LISTED = 20
MIN_SIDE = 16   # px, as stored: smaller images are skipped (an empty eval centre crop aborts inside OpenCV)
# px, as stored: the beton keeps each side in a uint16, and libjpeg-turbo encodes at most 65,500 px a side. A larger
# image (only possible with --max-side 0) killed a writer process with "OverflowError ... uint16"; now it stops the
# run before anything is written, naming the file.
MAX_SIDE = 65500


class PrepError(UserError):
    """A fatal, user-facing problem; its message is the single line printed before exiting with status 2."""


class SkipImage(Exception):
    """A readable image this writer will not store; the message is the reason listed in skipped-<split>.txt."""


def to_rgb8(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB without silent damage (see the module doc); raises SkipImage."""
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


@dataclass
class Split:
    name: str
    samples: list[tuple[str, int]] = field(default_factory=list)      # (path, label)
    skipped: list[tuple[str, str]] = field(default_factory=list)      # (path, reason)
    max_pixels: int = 0                                                # largest readable image (w * h)
    too_large: list[tuple[str, int]] = field(default_factory=list)    # (path, longest side as stored) > MAX_SIDE


# ------------------------------------------------------------------------------------------------ scanning
def _list_dir(folder: Path, what: str) -> list[Path]:
    """Sorted entries of ``folder``; PrepError (one line, with the fix) when it cannot be read."""
    try:
        return sorted(folder.iterdir())
    except OSError as e:
        raise PrepError(f"cannot read {what} {folder}: {e.strerror or e}; fix its permissions (chmod -R u+rX "
                        f"'{folder}') or leave it out") from None


def list_classes(train_dir: Path) -> list[str]:
    if not train_dir.is_dir():
        raise PrepError(f"{train_dir} not found: expected the ImageFolder layout DATA/train/<class>/<image> "
                        f"and DATA/val/<class>/<image>")
    classes = [d.name for d in _list_dir(train_dir, "split folder") if d.is_dir() and not d.name.startswith(".")]
    if not classes:
        raise PrepError(f"{train_dir} has no class folders: expected {train_dir}/<class>/<image>")
    return classes


def read_class_list(path: str | Path) -> list[str]:
    """--classes FILE: one class folder name per line, in label order (blank lines and '#' comments ignored)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PrepError(f"cannot read --classes file {path}: {getattr(e, 'strerror', None) or e}") from None
    classes, where = [], {}
    for n, line in enumerate(lines, 1):
        name = line.split("#", 1)[0].strip()
        if not name:
            continue
        if "/" in name or name in (".", ".."):
            raise PrepError(f"{path} line {n}: '{name}' is not a class folder name (one folder name per line, "
                            f"no paths)")
        if name in where:
            raise PrepError(f"{path} line {n}: class '{name}' repeats line {where[name]}; each class once")
        where[name] = n
        classes.append(name)
    if not classes:
        raise PrepError(f"--classes file {path} lists no classes (one class folder name per line)")
    return classes


def _inside(a: str, b: str) -> bool:
    """Is real path ``a`` the folder ``b`` or inside it?"""
    return a == b or a.startswith(b.rstrip(os.sep) + os.sep)


def _walk_images(top: Path, label: int, split: Split, bounds: list[str], seen: set[str], what: str) -> None:
    """Append every image file under ``top`` (any depth) to ``split.samples`` with ``label``.

    Directory symlinks are followed only to folders outside every real path in ``bounds`` (the split folder and
    its class folders) that do not contain one of them, each real folder once: a loop such as ``train/cat/up ->
    ..`` would otherwise list the whole split again, under ``cat``'s label. Skipped links, non-image files and
    sub-folders that cannot be read (permissions) go to ``split.skipped``; ``top`` itself unreadable is a
    PrepError (``what`` names it), since every image under it would be missing.
    """
    def unreadable(e: OSError):
        if os.path.realpath(e.filename or "") == os.path.realpath(top):
            raise PrepError(f"cannot read {what} {top}: {e.strerror or e}; fix its permissions (chmod -R u+rX "
                            f"'{top}') or leave it out")
        split.skipped.append((e.filename, f"folder unreadable ({e.strerror or e}): its images are not written"))

    for root, dirs, files in os.walk(top, followlinks=True, onerror=unreadable):
        keep = []
        for d in sorted(dirs):
            full = os.path.join(root, d)
            real = os.path.realpath(full)
            if os.path.islink(full) and any(_inside(real, r) or _inside(r, real) for r in bounds):
                split.skipped.append((full, f"directory link to {real}: inside the split folder or containing "
                                            f"it (a loop or another class), not followed"))
            elif real in seen:
                split.skipped.append((full, f"directory {real} already read through another link, not read again"))
            else:
                seen.add(real)
                keep.append(d)
        dirs[:] = keep
        for f in sorted(files):
            p = os.path.join(root, f)
            if f.lower().endswith(IMG_EXTENSIONS) and not f.startswith("."):
                split.samples.append((p, label))
            else:
                split.skipped.append((p, "not an image file (extension)"))


def scan_split(split_dir: Path, classes: list[str], name: str, subset: bool = False) -> Split:
    """List one split's image files with labels from ``classes`` (their order); non-image files go to ``skipped``.

    Train and val share one class-to-label mapping, so each split must hold a folder for every class, and
    (without ``subset``) no other class folder. ``subset`` (--classes FILE): other class folders are left out.
    """
    if not split_dir.is_dir():
        raise PrepError(f"{split_dir} not found: expected the ImageFolder layout {split_dir}/<class>/<image>")
    index = {c: i for i, c in enumerate(classes)}
    split = Split(name)
    entries = _list_dir(split_dir, "split folder")
    folders = {e.name for e in entries if e.is_dir() and not e.name.startswith(".")}
    unknown = sorted(folders - set(index))
    if unknown and not subset:
        raise PrepError(f"{split_dir} has {len(unknown)} class folder(s) not in train (e.g. '{unknown[0]}'); train "
                        f"and val must have the same class folders (or pass --classes FILE to write a subset)")
    missing = [c for c in classes if c not in folders]
    if missing:
        fix = ("remove it from the --classes file or add its folder" if subset else
               "train and val must have the same class folders; add it, or pass --classes FILE listing the "
               "classes to write")
        raise PrepError(f"{split_dir} has no folder for class '{missing[0]}'"
                        + (f" (nor for {len(missing) - 1} more of the {len(classes)} classes)" if len(missing) > 1
                           else "") + f"; {fix}")
    for e in entries:
        if not e.is_dir():
            split.skipped.append((str(e), "not inside a class folder"))
    class_reals = [os.path.realpath(split_dir / c) for c in classes]
    bounds = [os.path.realpath(split_dir)] + class_reals
    seen: set[str] = set(class_reals)
    for c in classes:
        cdir = split_dir / c
        n_before = len(split.samples)
        _walk_images(cdir, index[c], split, bounds, seen, "class folder")
        if len(split.samples) == n_before:
            # An empty class would get a label no sample carries (train) or no measurement (val): almost always
            # a broken copy.
            raise PrepError(f"class folder {cdir} has no image files ({', '.join(IMG_EXTENSIONS)})")
    return split


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


# ------------------------------------------------------------------------------------------------ writing
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


class WriterDied(Exception):
    """An ffcv writer process ended before its work was done (disk full, killed, out of memory)."""


@contextlib.contextmanager
def _ffcv_guarded(enabled: bool, fail_dir: str):
    """Run ffcv 1.0.2's DatasetWriter so that a dead writer process stops the write instead of hanging it.

    ffcv's main process polls a shared counter until every sample is done, then blocks on a queue for each
    worker's allocation table; it never looks at the workers. A worker that dies (ENOSPC in its page flush,
    OOM kill) therefore hangs the write forever. The hooks below (module attributes ffcv.writer looks up at
    call time): the polling sleep and the blocking queue read check the workers and raise WriterDied; each
    worker runs inside a wrapper that records its error in ``fail_dir`` and exits without a traceback. Also
    swaps ffcv's progress bar for a disabled one when ``enabled`` is False (--quiet, tests).
    """
    import ffcv.writer as fw
    from tqdm import tqdm
    main_pid, procs = os.getpid(), []

    def check_workers():
        if os.getpid() != main_pid:
            return
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead:
            raise WriterDied(f"exit code {dead[0].exitcode}")

    def process(*args, **kw):
        p = mp.Process(*args, **kw)
        procs.append(p)
        return p

    def sleep(seconds):
        check_workers()
        time_sleep(seconds)

    class WatchedQueue(multiprocessing.queues.Queue):
        def __init__(self):
            super().__init__(ctx=mp.get_context())

        def get(self, block=True, timeout=None):
            if not block or timeout is not None or os.getpid() != main_pid:
                return super().get(block, timeout)
            while True:
                try:
                    return super().get(timeout=0.2)
                except queue.Empty:
                    check_workers()

    job = fw.worker_job_indexed_dataset

    def quiet_job(*args):
        try:
            job(*args)
        except BaseException as e:   # noqa: BLE001 -- reported by the main process in one line
            Path(fail_dir, "writer").write_text(f"{type(e).__name__}: {e}".splitlines()[0])
            os._exit(1)

    time_sleep = time.sleep
    hooks = {"tqdm": tqdm if enabled else functools.partial(tqdm, disable=True), "Process": process,
             "sleep": sleep, "Queue": WatchedQueue, "worker_job_indexed_dataset": quiet_job}
    saved = {k: getattr(fw, k) for k in hooks}
    for k, v in hooks.items():
        setattr(fw, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(fw, k, v)
        for p in procs:                # after a failure the others wait forever for their turn to write
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)


def _page_size(max_pixels: int, max_side: int | None) -> int:
    from ffcv.writer import MIN_PAGE_SIZE
    if max_pixels <= 0:
        return 4 * MIN_PAGE_SIZE                      # unknown: ffcv's default (8 MiB)
    if max_side:
        max_pixels = min(max_pixels, max_side * max_side)
    need = 2 * 3 * max_pixels                         # raw RGB, with room for a JPEG larger than raw (noise, q=100)
    return max(MIN_PAGE_SIZE, 1 << (need - 1).bit_length())


def write_beton(samples: list[tuple[str, int]], out: str | Path, *, max_side: int | None = DEFAULT_MAX_SIDE,
                jpeg_quality: int = 90, write_mode: str = "jpg", compress_probability: float = 0.5,
                smart_threshold: int = DEFAULT_SMART_THRESHOLD, shuffle: bool = True, seed: int = 0,
                num_workers: int = 2, force: bool = False, max_pixels: int = 0, progress: bool = True) -> dict:
    """Write (path, label) samples to ``out`` atomically; returns a summary dict.

    ``max_pixels`` (largest source image, w * h) sizes ffcv's pages: a sample larger than a page kills a writer
    process, and every worker leaves its last page part-empty, so small datasets want small pages.
    """
    from ffcv.fields import IntField, RGBImageField
    from ffcv.writer import DatasetWriter

    out = Path(out)
    if write_mode not in WRITE_MODES:
        raise PrepError(f"--write-mode must be one of {', '.join(WRITE_MODES)}, got {write_mode!r}")
    if out.exists() and not force:
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
    order = np.random.default_rng(seed).permutation(len(samples)) if shuffle else np.arange(len(samples))
    fields = {
        "image": RGBImageField(write_mode=write_mode, max_resolution=max_side, jpeg_quality=jpeg_quality,
                               compress_probability=compress_probability, smart_threshold=smart_threshold),
        "label": IntField(),
    }
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    except OSError as e:
        raise PrepError(f"cannot write to {out.parent}: {e.strerror}") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)   # mkstemp's 0600 would make the beton private to its writer
    with tempfile.TemporaryDirectory(prefix="ffcv-fail-") as fail_dir:
        try:
            if write_mode == "proportion":
                np.random.seed(seed)   # the field draws jpg-vs-raw from numpy's global RNG (inherited by fork)
            ds = _Samples(samples, max_side, fail_dir)
            chunk = 64
            # Each writer process keeps its own last page part-empty: no more processes than chunks of work.
            workers = max(1, min(num_workers, -(-len(samples) // chunk)))
            writer = DatasetWriter(tmp, fields, num_workers=workers, page_size=_page_size(max_pixels, max_side))
            try:
                with _ffcv_guarded(progress, fail_dir):
                    writer.from_indexed_dataset(ds, indices=order.tolist(), chunksize=chunk, shuffle_indices=False)
            except (WriterDied, OSError) as e:
                _free_shared_memory(writer)
                raise PrepError(_write_failure(out, tmp, fail_dir, e)) from None
            failed = sorted((f for f in os.listdir(fail_dir) if f.isdigit()), key=int)
            if failed:
                first = Path(fail_dir, failed[0]).read_text().splitlines()[0]
                raise PrepError(f"{len(failed)} image(s) failed while writing {out} (changed since the check?): "
                                f"{first}")
            from .integrity import make_sidecar, sidecar_path, write_sidecar
            try:
                record = make_sidecar(tmp, labelled=labels != {NO_LABEL})
                sidecar_path(out).unlink(missing_ok=True)   # never an old record next to a new beton
                # The file list goes first: a failure after the beton is in place must not leave it without one.
                _write_text_atomic(files_path(out), "".join(f"{os.path.abspath(samples[i][0])}\n" for i in order))
                os.replace(tmp, out)
                write_sidecar(record, sidecar_path(out))
            except OSError as e:
                raise PrepError(_write_failure(out, tmp, fail_dir, e)) from None
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    dt = time.perf_counter() - t0
    return {"file": str(out), "images": len(samples), "classes": len(labels - {NO_LABEL}), "bytes": out.stat().st_size,
            "seconds": dt, "images_per_s": len(samples) / dt if dt > 0 else float("inf")}


def files_path(beton: str | Path) -> Path:
    """NAME.beton.files.txt: the source file of every sample (absolute path), one per line in the beton's sample
    order, so a published subset list of file names (e.g. SimCLR's 1% ImageNet) can select samples (fastmveb.eval
    finetune --subset), and the file is itself a --list for dataset_prep folder."""
    beton = Path(beton)
    return beton.with_name(beton.name + ".files.txt")


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _free_shared_memory(writer) -> None:
    """ffcv unlinks its metadata block in /dev/shm only after a successful write."""
    sm = getattr(writer, "metadata_sm", None)
    if sm is not None and hasattr(sm, "unlink"):
        with contextlib.suppress(OSError):
            sm.close()
            sm.unlink()


def _write_failure(out: Path, tmp: str, fail_dir: str, e: Exception) -> str:
    """One line for a write that failed part-way: why, and how much space there is."""
    reason = Path(fail_dir, "writer").read_text() if Path(fail_dir, "writer").is_file() else f"{type(e).__name__}: {e}"
    reason = reason.splitlines()[0] if reason else type(e).__name__
    written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
    free = shutil.disk_usage(out.parent).free
    full = "No space left" in reason or "File too large" in reason or getattr(e, "errno", None) in (errno.ENOSPC, errno.EFBIG)
    what = "disk full" if full else "a writer process failed"
    return (f"{what} while writing {out} ({reason}; {written / 2**20:,.1f} MiB written, "
            f"{free / 2**20:,.1f} MiB free in {out.parent}); the partial file was removed"
            + ("; free space or choose another --out" if full else ""))


def report_skipped(split: Split, out_dir: Path, stream=sys.stderr) -> None:
    if not split.skipped:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    listing = out_dir / f"skipped-{split.name}.txt"
    listing.write_text("".join(f"{p}\t{r}\n" for p, r in split.skipped))
    print(f"{split.name}: skipped {len(split.skipped)} file(s) (full list: {listing})", file=stream)
    for p, r in split.skipped[:MAX_LISTED]:
        print(f"  skipped {p}: {r}", file=stream)
    if len(split.skipped) > MAX_LISTED:
        print(f"  ... and {len(split.skipped) - MAX_LISTED} more", file=stream)


def check_writable(out: Path) -> None:
    """OUT can be created and written (checked before the slow validation pass)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as e:
        raise PrepError(f"cannot write to {out}: {e.strerror or e}; choose another --out") from None


def format_summary(s: dict) -> str:
    classes = f"{s['classes']} classes" if s["classes"] else "no labels"
    return (f"{s['file']}: {s['images']:,} images, {classes}, {s['bytes'] / 2**20:,.1f} MiB, "
            f"{s['seconds']:.1f} s, {s['images_per_s']:,.0f} images/s")


def _check_options(out: Path, names, max_side: int | None, jpeg_quality: int, force: bool) -> None:
    """The cheap checks every mode runs before reading any image: options, existing betons, a writable OUT."""
    if not 1 <= jpeg_quality <= 100:
        raise PrepError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")
    if max_side is not None and not MIN_SIDE <= max_side <= MAX_SIDE:
        raise PrepError(f"--max-side must be in {MIN_SIDE}..{MAX_SIDE} (or 0 for no resizing), got {max_side}")
    for name in names:
        if (out / f"{name}.beton").exists() and not force:
            raise PrepError(f"{out / f'{name}.beton'} exists; pass --force to overwrite it")
    check_writable(out)


def label_mismatch(splits: list[Split], out: Path, class_names: list[str] | None = None) -> str | None:
    """None unless val holds labels train has no image of (all of a class's train images unreadable, or a seeded
    --val-fraction split that put a rare label in val only); else the line part naming them. Evaluations and the
    kNN checks compare val with what train taught: such a pair would count classes nothing was trained on."""
    from .integrity import format_labels
    by = {s.name: s for s in splits}
    if "train" not in by or "val" not in by:
        return None
    train = {y for _, y in by["train"].samples}
    val: dict[int, int] = {}
    for _, y in by["val"].samples:
        val[y] = val.get(y, 0) + 1
    missing = sorted(set(val) - train - {NO_LABEL})
    if not missing:
        return None
    why = (f"; train's files of them may be among those skipped ({out / 'skipped-train.txt'})"
           if by["train"].skipped else "")
    return (f"val has {sum(val[y] for y in missing):,} image(s) of {len(missing)} label(s) that train has no image of "
            f"({format_labels(missing, names=class_names)}{why})")


def write_splits(splits: list[Split], out: Path, *, max_side: int | None, num_workers: int | None = None,
                 progress: bool = True, source: str = "", class_names: list[str] | None = None,
                 allow_label_mismatch: bool = False, **write_kw) -> list[dict]:
    """Check every split (decode each file once), then write OUT/<split>.beton for each.

    Every split is checked before the first beton is written: a problem in val (no readable image, an image too
    large to store, labels train has no image of) stops the run in one line before hours of writing train, not
    after. ``allow_label_mismatch``: write such a pair anyway, with one warning line naming the labels.
    """
    num_workers = max(1, min(num_workers or os.cpu_count() or 1, os.cpu_count() or 1))
    for split in splits:
        validate(split, num_workers, progress, max_side)
    for split in splits:
        report_skipped(split, out)
    for split in splits:
        if split.too_large:
            path, side = split.too_large[0]
            more = f" (and {len(split.too_large) - 1} more, {split.name})" if len(split.too_large) > 1 else ""
            raise PrepError(f"{path} is {side:,} px on its longest side as stored{more}: a beton stores at most "
                            f"{MAX_SIDE:,} px a side; pass --max-side (e.g. {DEFAULT_MAX_SIDE}, the default) to "
                            f"shrink such images as they are written")
        if not split.samples:
            raise PrepError(f"{source or split.name}: {split.name} has no readable images"
                            + (f" (skipped files: {out / f'skipped-{split.name}.txt'})" if split.skipped else ""))
    mismatch = label_mismatch(splits, out, class_names)
    if mismatch and not allow_label_mismatch:
        raise PrepError(f"{mismatch}: evaluations would measure classes nothing was trained on; make train hold "
                        "images of them (or leave them out of val), or pass --allow-label-mismatch to write the pair "
                        "anyway (evaluations then refuse it without their own --allow-label-mismatch)")
    if mismatch:
        print(f"warning: --allow-label-mismatch: {mismatch}; evaluations refuse this pair without their own "
              "--allow-label-mismatch", file=sys.stderr, flush=True)
    summaries = []
    for split in splits:
        s = write_beton(split.samples, out / f"{split.name}.beton", max_side=max_side, num_workers=num_workers,
                        max_pixels=split.max_pixels, progress=progress, **write_kw)
        s["skipped"] = len(split.skipped)
        summaries.append(s)
        print(format_summary(s) + (f", {len(split.skipped)} skipped" if split.skipped else ""), flush=True)
    return summaries


def convert_imagefolder(data: str | Path, out: str | Path, *, splits=("train", "val"),
                        max_side: int | None = DEFAULT_MAX_SIDE, jpeg_quality: int = 90, write_mode: str = "jpg",
                        compress_probability: float = 0.5, smart_threshold: int = DEFAULT_SMART_THRESHOLD,
                        shuffle: bool = True, seed: int = 0, num_workers: int | None = None, force: bool = False,
                        progress: bool = True, classes: list[str] | None = None, subset: bool = False,
                        allow_label_mismatch: bool = False) -> list[dict]:
    """DATA/{train,val}/<class>/* -> OUT/{train,val}.beton; returns one summary dict per split.

    ``classes``: the class folders to write, in label order (default: train's sorted class folders).
    ``subset`` (--classes FILE): other class folders are left out instead of being an error.
    """
    data, out = Path(data), Path(out)
    if not data.is_dir():
        raise PrepError(f"data folder {data} not found")
    # Fail on every cheap check before the slow part, so an overwrite error never comes after minutes of work.
    _check_options(out, splits, max_side, jpeg_quality, force)
    classes = classes or list_classes(data / "train")
    scanned = [scan_split(data / name, classes, name, subset=subset) for name in splits]
    return write_splits(scanned, out, max_side=max_side, num_workers=num_workers, progress=progress,
                        source=str(data), class_names=classes, allow_label_mismatch=allow_label_mismatch,
                        jpeg_quality=jpeg_quality, write_mode=write_mode,
                        compress_probability=compress_probability, smart_threshold=smart_threshold,
                        shuffle=shuffle, seed=seed, force=force)


# ------------------------------------------------------------------------------------------------ unlabeled
NO_LABEL = -1   # the label field of an unlabeled beton: every sample -1 (readers: fastmveb.data.num_classes -> 0)


def scan_folder(root: Path) -> Split:
    """Every image file under ``root`` at any depth, without labels (non-image files skipped and listed)."""
    if root.is_file():
        raise PrepError(f"{root} is a file, not a folder: a list of images goes to --list {root}")
    if not root.is_dir():
        raise PrepError(f"data folder {root} not found")
    split = Split("train")
    real = os.path.realpath(root)
    _walk_images(root, NO_LABEL, split, [real], {real}, "data folder")
    if not split.samples:
        raise PrepError(f"{root} has no image files ({', '.join(IMG_EXTENSIONS)}) at any depth")
    return split


def read_list(path: Path) -> Split:
    """--list FILE: one image path per line, optionally a tab and an integer label (every line or none).

    Relative paths are relative to the list file's folder, so a list travels with its images. A missing file,
    a folder or a repeated path is skipped and listed (the line number says where); a malformed line (label not
    a non-negative integer, labels on some lines only) is one error line, since it means the list is not what
    it looks like.
    """
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PrepError(f"cannot read --list file {path}: {getattr(e, 'strerror', None) or e}") from None
    base = Path(path).resolve().parent
    split = Split("train")
    first: dict[str, int] = {}
    labelled = None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        name, *rest = line.rstrip("\r\n").split("\t")
        if len(rest) > 1:
            raise PrepError(f"{path} line {n}: {len(rest) + 1} tab-separated fields; expected PATH or PATH<TAB>LABEL")
        if labelled is None:
            labelled = bool(rest)
        elif labelled != bool(rest):
            raise PrepError(f"{path} line {n}: {'no label' if labelled else 'a label'} here but "
                            f"{'labels' if labelled else 'none'} on the lines before; label every line or none")
        label = NO_LABEL
        if rest:
            try:
                label = int(rest[0])
            except ValueError:
                label = -1
            if label < 0:
                raise PrepError(f"{path} line {n}: label '{rest[0]}' is not a non-negative integer")
        p = os.path.normpath(base / name.strip())
        if p in first:
            split.skipped.append((p, f"line {n}: duplicate of line {first[p]}, written once"))
            continue
        first[p] = n
        if not os.path.exists(p):
            split.skipped.append((p, f"line {n}: not found"))
        elif os.path.isdir(p):
            split.skipped.append((p, f"line {n}: a folder, not an image file"))
        else:
            split.samples.append((p, label))   # any name: every file is decoded in validate() anyway
    if not split.samples and not split.skipped:
        raise PrepError(f"--list file {path} lists no paths (one image path per line)")
    return split


def split_off_val(split: Split, fraction: float, seed: int) -> list[Split]:
    """A seeded random ``fraction`` of the samples as "val" (at least one), the rest stay "train"."""
    if not 0 < fraction < 1:
        raise PrepError(f"--val-fraction must be in (0, 1), got {fraction}")
    n = len(split.samples)
    if n == 0:
        return [split, Split("val")]          # write_splits says that nothing is readable
    n_val = max(1, round(n * fraction))
    if n_val >= n:
        raise PrepError(f"--val-fraction {fraction} of {n} image(s) leaves no training image; lower it or add images")
    pick = np.random.default_rng(seed).permutation(n)
    val_idx = set(pick[:n_val].tolist())
    val = Split("val", samples=[s for i, s in enumerate(split.samples) if i in val_idx])
    split.samples = [s for i, s in enumerate(split.samples) if i not in val_idx]
    return [split, val]


def convert_folder(out: str | Path, *, data: str | Path | None = None, list_file: str | Path | None = None,
                   val_fraction: float = 0.0, max_side: int | None = DEFAULT_MAX_SIDE, jpeg_quality: int = 90,
                   write_mode: str = "jpg", compress_probability: float = 0.5,
                   smart_threshold: int = DEFAULT_SMART_THRESHOLD, shuffle: bool = True, seed: int = 0,
                   num_workers: int | None = None, force: bool = False, progress: bool = True,
                   allow_label_mismatch: bool = False) -> list[dict]:
    """Images without an ImageFolder layout -> OUT/train.beton (and OUT/val.beton with ``val_fraction``).

    ``data``: every image under the folder at any depth, unlabeled. ``list_file``: the files it lists, with
    their labels when it has them. Unlabeled betons store label -1 for every sample.
    """
    if (data is None) == (list_file is None):
        raise PrepError("give exactly one of --data DIR and --list FILE")
    out = Path(out)
    names = ("train", "val") if val_fraction else ("train",)
    _check_options(out, names, max_side, jpeg_quality, force)
    split = scan_folder(Path(data)) if data is not None else read_list(Path(list_file))
    splits = split_off_val(split, val_fraction, seed) if val_fraction else [split]
    return write_splits(splits, out, max_side=max_side, num_workers=num_workers, progress=progress,
                        source=str(data or list_file), allow_label_mismatch=allow_label_mismatch,
                        jpeg_quality=jpeg_quality, write_mode=write_mode,
                        compress_probability=compress_probability, smart_threshold=smart_threshold,
                        shuffle=shuffle, seed=seed, force=force)
