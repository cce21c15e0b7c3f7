"""Images on disk -> FFCV .beton files (JPEG images + integer labels): the imagefolder and folder modes.

    python -m dataset_prep imagefolder --data /path/to/imagenet --out data/in1k [--max-side 384] [--force]
    python -m dataset_prep folder --data DIR | --list FILE --out OUT [--val-fraction F]

imagefolder: DATA holds train/ and val/ in the ImageNet layout (DATA/train/<class>/<image>). Train's sorted class
folder names define the labels 0..K-1; val is written with the same mapping (a val class unknown to train is an
error; val may lack some classes). The betons land in OUT/train.beton and OUT/val.beton. A val label that train
ends up without (every train image of a class unreadable; a --val-fraction split that put a rare label in val
only) stops the run before writing, naming the labels, unless --allow-label-mismatch (then one warning line).
folder: every image under a folder at any depth (unlabeled, label -1), or the files a list names (with labels
when it has them), to OUT/train.beton and, with --val-fraction, OUT/val.beton.

Each mode finds its samples (dataset_prep.scan), decodes every file once (dataset_prep.check), then writes each
split (dataset_prep.writer). What can go wrong, and what happens:
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

import sys
from dataclasses import replace
from pathlib import Path

from .check import validate
from .integrity import format_labels
from .options import DEFAULT_MAX_SIDE, MAX_SIDE, BetonOptions, PrepError, check_options, worker_count
from .scan import NO_LABEL, Split, list_classes, read_list, scan_folder, scan_split, split_off_val
from .writer import write_beton

MAX_LISTED = 20   # skipped files printed; OUT/skipped-<split>.txt lists them all


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


def format_summary(s: dict) -> str:
    classes = f"{s['classes']} classes" if s["classes"] else "no labels"
    return (f"{s['file']}: {s['images']:,} images, {classes}, {s['bytes'] / 2**20:,.1f} MiB, "
            f"{s['seconds']:.1f} s, {s['images_per_s']:,.0f} images/s")


def label_mismatch(splits: list[Split], out: Path, class_names: list[str] | None = None) -> str | None:
    """None unless val holds labels train has no image of (all of a class's train images unreadable, or a seeded
    --val-fraction split that put a rare label in val only); else the line part naming them. Evaluations and the
    kNN checks compare val with what train taught: such a pair would count classes nothing was trained on."""
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


def write_splits(splits: list[Split], out: Path, options: BetonOptions, *, source: str = "",
                 class_names: list[str] | None = None, allow_label_mismatch: bool = False) -> list[dict]:
    """Check every split (decode each file once), then write OUT/<split>.beton for each.

    Every split is checked before the first beton is written: a problem in val (no readable image, an image too
    large to store, labels train has no image of) stops the run in one line before hours of writing train, not
    after. ``allow_label_mismatch``: write such a pair anyway, with one warning line naming the labels.
    """
    options = replace(options, num_workers=worker_count(options.num_workers))
    for split in splits:
        validate(split, options.num_workers, options.progress, options.max_side)
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
        s = write_beton(split.samples, out / f"{split.name}.beton", options, max_pixels=split.max_pixels)
        s["skipped"] = len(split.skipped)
        summaries.append(s)
        print(format_summary(s) + (f", {len(split.skipped)} skipped" if split.skipped else ""), flush=True)
    return summaries


def convert_imagefolder(data: str | Path, out: str | Path, options: BetonOptions = BetonOptions(), *,
                        splits=("train", "val"), classes: list[str] | None = None, subset: bool = False,
                        allow_label_mismatch: bool = False) -> list[dict]:
    """DATA/{train,val}/<class>/* -> OUT/{train,val}.beton; returns one summary dict per split.

    ``classes``: the class folders to write, in label order (default: train's sorted class folders).
    ``subset`` (--classes FILE): other class folders are left out instead of being an error.
    """
    data, out = Path(data), Path(out)
    if not data.is_dir():
        raise PrepError(f"data folder {data} not found")
    # Fail on every cheap check before the slow part, so an overwrite error never comes after minutes of work.
    check_options(out, splits, options)
    classes = classes or list_classes(data / "train")
    scanned = [scan_split(data / name, classes, name, subset=subset) for name in splits]
    return write_splits(scanned, out, options, source=str(data), class_names=classes,
                        allow_label_mismatch=allow_label_mismatch)


def convert_folder(out: str | Path, options: BetonOptions = BetonOptions(), *, data: str | Path | None = None,
                   list_file: str | Path | None = None, val_fraction: float = 0.0,
                   allow_label_mismatch: bool = False) -> list[dict]:
    """Images without an ImageFolder layout -> OUT/train.beton (and OUT/val.beton with ``val_fraction``).

    ``data``: every image under the folder at any depth, unlabeled. ``list_file``: the files it lists, with
    their labels when it has them. Unlabeled betons store label -1 for every sample.
    """
    if (data is None) == (list_file is None):
        raise PrepError("give exactly one of --data DIR and --list FILE")
    out = Path(out)
    names = ("train", "val") if val_fraction else ("train",)
    check_options(out, names, options)
    split = scan_folder(Path(data)) if data is not None else read_list(Path(list_file))
    splits = split_off_val(split, val_fraction, options.seed) if val_fraction else [split]
    return write_splits(splits, out, options, source=str(data or list_file),
                        allow_label_mismatch=allow_label_mismatch)
