"""Command line: ``python -m dataset_prep {synthetic,imagefolder,folder,auto,grid} --out PATH [...]``, ``... verify PATH...``
(see --help of each).

Fatal problems print one line ``error: ...`` and exit with status 2; nothing partial is left behind.
"""
from __future__ import annotations

import argparse
import sys

from fastmveb.errors import print_error, run_cli

from .options import DEFAULT_MAX_SIDE, MAX_SIDE, MIN_SIDE, WRITE_MODES, BetonOptions, PrepError


def _common(p: argparse.ArgumentParser, max_side_default, max_side_help):
    p.add_argument("--out", required=True, help="output folder for train.beton and val.beton")
    p.add_argument("--max-side", type=int, default=max_side_default, help=max_side_help)
    p.add_argument("--jpeg-quality", type=int, default=BetonOptions.jpeg_quality,
                   help=f"JPEG quality of stored images (default {BetonOptions.jpeg_quality})")
    p.add_argument("--num-workers", type=int, default=None,
                   help="processes for checking and writing (default and maximum: the core count)")
    p.add_argument("--seed", type=int, default=0, help="seed of the generated images / the shuffled write order")
    p.add_argument("--force", action="store_true", help="overwrite existing betons")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _write_options(p: argparse.ArgumentParser):
    p.add_argument("--write-mode", choices=WRITE_MODES, default=BetonOptions.write_mode,
                   help="jpg: JPEG (small, decoded at load); raw: uint8 pixels (no decode, ~10x larger); smart: "
                        "JPEG only above --smart-threshold bytes; proportion: JPEG with --compress-probability")
    p.add_argument("--compress-probability", type=float, default=BetonOptions.compress_probability,
                   help="JPEG share for --write-mode proportion")
    p.add_argument("--smart-threshold", type=int, default=BetonOptions.smart_threshold,
                   help="raw bytes above which --write-mode smart stores JPEG (default 3*256*256)")
    p.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=BetonOptions.shuffle,
                   help="shuffled (seeded) write order so QUASI_RANDOM page reads mix classes (default on)")
    p.add_argument("--allow-label-mismatch", action="store_true",
                   help="write train and val even when val holds labels train has no image of (one warning line "
                        "names them; without it, one error line before anything is written)")


_IMAGES_EPILOG = (f"Images: 16/32-bit grey is scaled to 8 bits, alpha is dropped (as torchvision's loader does), "
                  f"images with a side under {MIN_SIDE} px as stored are skipped, a side over {MAX_SIDE:,} px as "
                  f"stored (--max-side 0) stops the run naming the file. Directory symlinks are followed only to "
                  f"folders outside the data/split folder (each real folder once); links back into it (loops, other "
                  f"classes) are skipped. A sub-folder that cannot be read is skipped and listed; a class or data "
                  f"folder that cannot be read is one error line. Skips are listed in OUT/skipped-<split>.txt.")


def auto_mode(data: str) -> list[str]:
    """The dataset_prep arguments `make beton DATA=...` runs for ``data``; PrepError naming the mode to give."""
    from pathlib import Path
    from .scan import IMG_EXTENSIONS
    p = Path(data)
    if p.is_file():
        return ["folder", "--list", data]
    if not p.is_dir():
        raise PrepError(f"DATA={data} not found")
    if (p / "train").is_dir():
        return ["imagefolder", "--data", data]
    try:
        entries = list(p.iterdir())
    except OSError as e:
        raise PrepError(f"cannot read {data}: {e.strerror or e}") from None
    if any(e.is_file() and e.name.lower().endswith(IMG_EXTENSIONS) for e in entries):
        return ["folder", "--data", data]
    raise PrepError(f"{data} has no train/ folder and no images of its own: for labels lay it out as "
                    f"{data}/train/<class>/ and {data}/val/<class>/; to write every image under it without labels "
                    f"add MODE=folder (python -m dataset_prep folder --data {data})")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m dataset_prep", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synthetic", help="the embedded synthetic dataset (seeded) -> OUT/{train,val}.beton",
                       description="Generate the seeded synthetic texture-family dataset as JPEGs under OUT/jpeg "
                                   "and write OUT/train.beton and OUT/val.beton from them.")
    _common(s, 0, "longest side kept in the beton; 0 = as generated (images are already 200-500 px)")
    s.add_argument("--classes", type=int, default=10, help="number of classes, 2..10 (default 10)")
    s.add_argument("--train-per-class", type=int, default=300, help="train images per class (default 300)")
    s.add_argument("--val-per-class", type=int, default=50, help="val images per class (default 50)")
    s.add_argument("--no-keep-jpeg", action="store_true",
                   help="delete OUT/jpeg after writing (the loader benchmark reads it; it is regenerated if missing)")

    i = sub.add_parser("imagefolder", help="DATA/{train,val}/<class>/<image> -> OUT/{train,val}.beton",
                       description="Write an ImageFolder tree (ImageNet layout) to FFCV betons. Train's sorted "
                                   "class folders define the labels; val uses the same mapping. Unreadable images "
                                   "and non-image files are skipped and listed in OUT/skipped-<split>.txt.")
    _common(i, DEFAULT_MAX_SIDE,
            f"longest side stored (default {DEFAULT_MAX_SIDE}; 0 = keep originals). 512 keeps ImageNet's usual "
            "500-px photos whole, so no 224-px global crop is upsampled; 384 decodes ~1.5x faster but upsamples "
            "40%% of them (measured: python -m fastmveb.bench loader); 256 when decoding is the bottleneck")
    i.add_argument("--data", required=True, help="folder with train/ and val/ ImageFolder subfolders")
    _write_options(i)
    i.add_argument("--splits", default="train,val", help="comma-separated splits to write (default train,val)")
    i.add_argument("--classes", metavar="FILE",
                   help="write only the classes FILE lists (one class folder name per line), labelled 0..K-1 in "
                        "the file's order, in train and val alike (e.g. the ImageNet-100 list)")
    i.epilog = _IMAGES_EPILOG + (" Train and val must have the same class folders (with --classes: every listed "
                                 "class in both); otherwise one error line says which is missing.")

    f = sub.add_parser("folder", help="unlabeled images (a folder at any depth, or a list file) -> OUT/train.beton "
                                      "[+ val.beton]",
                       description="Write images that are not in the ImageFolder layout: --data DIR takes every "
                                   "image under DIR at any depth, without labels; --list FILE takes the files it "
                                   "lists, one path per line (relative to FILE's folder), optionally followed by a "
                                   "tab and an integer label (every line or none). Unlabeled betons store label -1 "
                                   "for every sample: training runs on them with the label-based monitors off. "
                                   "Missing, repeated and unreadable files are skipped and listed in "
                                   "OUT/skipped-<split>.txt.")
    _common(f, DEFAULT_MAX_SIDE, f"longest side stored (default {DEFAULT_MAX_SIDE}; 0 = keep originals)")
    source = f.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="folder of images (any depth; no labels)")
    source.add_argument("--list", dest="list_file", metavar="FILE",
                     help="file with one image path per line, optionally PATH<TAB>LABEL")
    f.add_argument("--val-fraction", type=float, default=0.0,
                   help="also write OUT/val.beton from this seeded (--seed) random fraction of the images, "
                        "e.g. 0.05 (default 0: train.beton only)")
    _write_options(f)
    f.epilog = _IMAGES_EPILOG

    a = sub.add_parser("auto", help="what `make beton DATA=...` runs: picks imagefolder or folder from DATA",
                       description="DATA/train/ exists: imagefolder. DATA is a file: folder --list DATA. DATA holds "
                                   "image files itself: folder --data DATA (unlabeled). Otherwise one error line "
                                   "names the mode to give. Every other option goes to the chosen mode.")
    a.add_argument("--data", required=True, help="ImageFolder tree, folder of images, or list file")

    v = sub.add_parser("verify", help="check betons completely: SHA-256 against NAME.beton.sha256.json + FFCV structure",
                       description="Check each beton: the FFCV header and allocation table against the file, the "
                                   "size and SHA-256 recorded when it was written (NAME.beton.sha256.json), and that "
                                   "every sample's data lies in the data region. Loaders check the cheap part on "
                                   "every open; this reads the whole file. A copy that only changed its time gets "
                                   "the new time recorded. Exit status 2 if any file fails.")
    v.add_argument("paths", nargs="+", metavar="PATH", help="beton files")
    g = sub.add_parser("grid", help="PNG of synthetic sample images, one row per class (README picture)")
    g.add_argument("--out", required=True, help="PNG path")
    g.add_argument("--per-class", type=int, default=6, help="images per class (default 6)")
    g.add_argument("--thumb", type=int, default=80, help="thumbnail side in px (default 80)")
    g.add_argument("--seed", type=int, default=0, help="seed of the generated images (default 0, as the betons)")
    return ap


def beton_options(args: argparse.Namespace) -> BetonOptions:
    """The writing flags as the one BetonOptions every mode takes (synthetic has no --write-mode etc.: defaults)."""
    more = {}
    if hasattr(args, "write_mode"):
        more = dict(write_mode=args.write_mode, compress_probability=args.compress_probability,
                    smart_threshold=args.smart_threshold, shuffle=args.shuffle)
    return BetonOptions(max_side=args.max_side or None, jpeg_quality=args.jpeg_quality, seed=args.seed,
                        num_workers=args.num_workers, force=args.force, progress=not args.quiet, **more)


def _imagefolder(args: argparse.Namespace) -> None:
    from pathlib import Path
    from .convert import convert_imagefolder
    from .scan import list_classes, read_class_list
    splits = tuple(s.strip() for s in args.splits.split(",") if s.strip())
    if not splits or any(s not in ("train", "val") for s in splits):
        raise PrepError(f"--splits must list train and/or val, got {args.splits!r}")
    classes = None
    if args.classes:
        classes = read_class_list(args.classes)
    elif "train" not in splits:
        classes = list_classes(Path(args.data) / "train")   # val's labels still come from train
    convert_imagefolder(args.data, args.out, beton_options(args), splits=splits, classes=classes,
                        subset=bool(args.classes), allow_label_mismatch=args.allow_label_mismatch)


def main(argv: list[str] | None = None) -> int:
    """Run the command; bad input raises a PrepError (``cli`` prints it as one line and exits 2)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["auto"]:
        known, rest = parser().parse_known_args(argv)
        argv = auto_mode(known.data) + rest
    args = parser().parse_args(argv)
    if args.cmd == "verify":
        from .integrity import BetonError, verify
        code = 0
        for path in args.paths:          # every beton gets its line: one bad file does not hide the others
            try:
                print(verify(path))
            except BetonError as e:
                print_error(str(e))
                code = e.exit_code
        return code
    try:                                 # a PrepError propagates to cli: one error line, exit 2
        if args.cmd == "grid":
            from .synthetic import write_grid
            write_grid(args.out, per_class=args.per_class, thumb=args.thumb, seed=args.seed)
        elif args.cmd == "synthetic":
            from .synthetic import make_synthetic
            if args.train_per_class < 1 or args.val_per_class < 1:
                raise PrepError("--train-per-class and --val-per-class must be >= 1")
            try:
                make_synthetic(args.out, beton_options(args), classes=args.classes,
                               train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                               keep_jpeg=not args.no_keep_jpeg)
            except ValueError as e:
                raise PrepError(str(e)) from None
        elif args.cmd == "folder":
            from .convert import convert_folder
            convert_folder(args.out, beton_options(args), data=args.data, list_file=args.list_file,
                           val_fraction=args.val_fraction, allow_label_mismatch=args.allow_label_mismatch)
        else:
            _imagefolder(args)
    except KeyboardInterrupt:
        print_error("interrupted; no beton was left half-written")
        return 130
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``fastmveb-prep``: main with a UserError (PrepError, BetonError) as one ``error: ...`` line, exit 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
