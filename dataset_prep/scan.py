"""Finding the samples of a split: image files and their labels in an ImageFolder tree, a folder of unlabeled
images at any depth, or a list file; and a seeded val split drawn from one of them.

Nothing here opens an image: a file counts as an image by its extension (ImageFolder and folder modes) or by
being listed; dataset_prep.check decodes each one before anything is written. Non-image files, folders that
cannot be read and directory links that would read the same images twice are skipped and listed (``Split.skipped``);
a layout that cannot be meant (a missing split or class folder, an unreadable list) is a PrepError.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .options import PrepError

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
NO_LABEL = -1   # the label field of an unlabeled beton: every sample -1 (readers: fastmveb.data.num_classes -> 0)


@dataclass
class Split:
    """One split's samples as found, and then as checked (dataset_prep.check moves failures to ``skipped``)."""
    name: str
    samples: list[tuple[str, int]] = field(default_factory=list)      # (path, label)
    skipped: list[tuple[str, str]] = field(default_factory=list)      # (path, reason)
    max_pixels: int = 0                                                # largest readable image (w * h)
    too_large: list[tuple[str, int]] = field(default_factory=list)    # (path, longest side as stored) > MAX_SIDE


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
