"""dataset_prep: synthetic generation, ImageFolder -> beton writing, and its failure modes (real FFCV files)."""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_prep import convert, synthetic
from dataset_prep.__main__ import cli
from dataset_prep.options import BetonOptions, PrepError

ROOT = Path(__file__).resolve().parents[1]


def read_meta(beton):
    """(num_samples, {'image': structured array, 'label': int array}) straight from the file's metadata table."""
    from ffcv.reader import Reader
    r = Reader(str(beton))
    names = list(r.handlers)
    return r.num_samples, {name: r.metadata[f"f{i}"] for i, name in enumerate(names)}


def make_tree(root: Path, per_class=3, classes=("cat", "dog"), splits=("train", "val")):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
                img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
                img.save(d / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


# ---------------------------------------------------------------------------------------------- synthetic
def test_synthetic_images_are_deterministic_and_varied():
    a = synthetic.make_image(0, "train", 3, 7)
    b = synthetic.make_image(0, "train", 3, 7)
    assert a.dtype == np.uint8 and a.ndim == 3 and a.shape[2] == 3
    assert np.array_equal(a, b)
    assert not np.array_equal(a, synthetic.make_image(1, "train", 3, 7))       # seed matters
    assert not np.array_equal(a, synthetic.make_image(0, "val", 3, 7))         # splits differ
    shapes = {synthetic.make_image(0, "train", k, i).shape[:2] for k in range(10) for i in range(2)}
    assert len(shapes) > 10
    assert all(synthetic.MIN_SIDE <= s <= synthetic.MAX_SIDE for hw in shapes for s in hw)


def test_synthetic_colour_tells_nothing_about_the_class():
    """The class is the pattern, never the colour: a nearest-centroid classifier on each image's mean RGB
    (leave-one-out, 10 classes x 20 images) stays at chance. Measured: 11.5% (chance 10%)."""
    x = np.array([synthetic.make_image(0, "train", k, i).reshape(-1, 3).mean(0) for k in range(10) for i in range(20)])
    y = np.repeat(np.arange(10), 20)
    hits = 0
    for j in range(len(x)):
        keep = np.arange(len(x)) != j
        centroids = np.stack([x[keep & (y == k)].mean(0) for k in range(10)])
        hits += int(np.argmin(((centroids - x[j]) ** 2).sum(1)) == y[j])
    assert hits / len(x) <= 0.2, f"mean colour predicts the class ({hits / len(x):.1%}; chance 10%)"


def test_jpeg_tree_bytes_do_not_depend_on_workers(tmp_path):
    kw = dict(classes=3, train_per_class=3, val_per_class=1, seed=5, progress=False)
    t1 = synthetic.write_jpeg_tree(tmp_path / "a", num_workers=1, **kw)
    t2 = synthetic.write_jpeg_tree(tmp_path / "b", num_workers=2, **kw)

    def digest(root):
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*.jpg"))}
    d1, d2 = digest(t1), digest(t2)
    assert len(d1) == 3 * 4 and d1 == d2


def test_synthetic_beton_roundtrip(tmp_path):
    out = tmp_path / "syn"
    s = synthetic.make_synthetic(out, BetonOptions(max_side=None, seed=0, num_workers=2, progress=False), classes=3,
                                 train_per_class=6, val_per_class=2)
    assert [x["images"] for x in s] == [18, 6]
    n, meta = read_meta(out / "train.beton")
    assert n == 18
    labels = meta["label"].ravel()
    assert np.bincount(labels).tolist() == [6, 6, 6]
    assert not np.array_equal(labels, np.sort(labels))   # shuffled write order
    w, h = meta["image"]["width"], meta["image"]["height"]
    assert ((w >= 200) & (w <= 500) & (h >= 200) & (h <= 500)).all() and len(set(w.tolist())) > 1
    assert (meta["image"]["mode"] == 0).all()            # stored as JPEG
    n_val, meta_val = read_meta(out / "val.beton")
    assert n_val == 6 and np.bincount(meta_val["label"].ravel()).tolist() == [2, 2, 2]
    assert len(list((out / "jpeg").rglob("*.jpg"))) == 24   # the tree is kept for the PIL benchmark baseline


# ---------------------------------------------------------------------------------------------- imagefolder
def test_imagefolder_skips_corrupt_and_non_images(tmp_path):
    data = make_tree(tmp_path / "data")
    (data / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = (data / "train" / "dog" / "0.jpg").read_bytes()
    (data / "train" / "dog" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (data / "train" / "dog" / "notes.txt").write_text("not an image")
    (data / "val" / "README").write_text("stray file")
    out = tmp_path / "out"
    assert cli(["imagefolder", "--data", str(data), "--out", str(out), "--quiet", "--num-workers", "2"]) == 0
    n, meta = read_meta(out / "train.beton")
    assert n == 6 and np.bincount(meta["label"].ravel()).tolist() == [3, 3]
    assert read_meta(out / "val.beton")[0] == 6
    listed = (out / "skipped-train.txt").read_text()
    for name in ("broken.jpg", "truncated.jpg", "notes.txt"):
        assert name in listed
    assert "README" in (out / "skipped-val.txt").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".")]   # no temporary files left


def test_max_side_resizes(tmp_path):
    data = tmp_path / "data"
    for split in ("train", "val"):
        (data / split / "a").mkdir(parents=True)
        Image.new("RGB", (300, 150), (10, 200, 30)).save(data / split / "a" / "x.jpg")
    out = tmp_path / "out"
    assert cli(["imagefolder", "--data", str(data), "--out", str(out), "--max-side", "100", "--quiet"]) == 0
    _, meta = read_meta(out / "train.beton")
    assert (int(meta["image"]["width"][0]), int(meta["image"]["height"][0])) == (100, 50)


def test_no_overwrite_without_force(tmp_path, capsys):
    data = make_tree(tmp_path / "data", per_class=1)
    out = tmp_path / "out"
    assert cli(["imagefolder", "--data", str(data), "--out", str(out), "--quiet"]) == 0
    before = (out / "train.beton").read_bytes()
    capsys.readouterr()
    assert cli(["imagefolder", "--data", str(data), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--force" in err[0]
    assert (out / "train.beton").read_bytes() == before
    assert cli(["imagefolder", "--data", str(data), "--out", str(out), "--quiet", "--force"]) == 0


def test_failure_while_writing_leaves_no_file(tmp_path, monkeypatch):
    data = make_tree(tmp_path / "data", per_class=2)
    (data / "train" / "cat" / "bad.jpg").write_bytes(b"garbage")
    # Let the bad file through the check, as if it broke between check and write: the write must abort cleanly.
    monkeypatch.setattr(convert, "validate", lambda split, *a, **k: split)
    out = tmp_path / "out"
    with pytest.raises(PrepError, match="bad.jpg"):
        convert.convert_imagefolder(data, out, BetonOptions(num_workers=2, progress=False))
    assert not out.exists() or list(out.iterdir()) == []



def test_a_failure_after_the_rename_leaves_the_beton_with_its_file_list(tmp_path, monkeypatch):
    """The finishing order: file list, beton, integrity record. A record that cannot be written (disk full) is one
    line naming the beton; the beton in place still has its file list, and no temporary is left."""
    import errno
    from dataset_prep import writer
    from dataset_prep.integrity import sidecar_path
    data = make_tree(tmp_path / "data", per_class=2, splits=("train",))
    samples = [(str(p), 0) for p in sorted((data / "train" / "cat").iterdir())]

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(writer, "write_sidecar", full)
    out = tmp_path / "out" / "x.beton"
    with pytest.raises(PrepError, match=r"^cannot write the integrity record of .*x\.beton \(No space left on device\); "
                       r"the beton and its file list are complete but unrecorded.*rerun with --force"):
        writer.write_beton(samples, out, BetonOptions(num_workers=1, progress=False))
    assert out.is_file() and not sidecar_path(out).exists()
    assert sorted(writer.files_path(out).read_text().splitlines()) == sorted(os.path.abspath(p) for p, _ in samples)
    assert sorted(p.name for p in out.parent.iterdir()) == ["x.beton", "x.beton.files.txt"]


def test_the_cli_builds_one_beton_options_from_its_flags():
    """Every writing flag reaches BetonOptions, and an absent flag means BetonOptions' own default."""
    from dataclasses import asdict
    from dataset_prep.__main__ import beton_options, parser
    from dataset_prep.synthetic import SYNTHETIC_OPTIONS
    flags = ["--max-side", "300", "--jpeg-quality", "75", "--write-mode", "proportion", "--compress-probability",
             "0.25", "--smart-threshold", "1000", "--no-shuffle", "--seed", "3", "--num-workers", "1", "--force",
             "--quiet"]
    want = BetonOptions(max_side=300, jpeg_quality=75, write_mode="proportion", compress_probability=0.25,
                        smart_threshold=1000, shuffle=False, seed=3, num_workers=1, force=True, progress=False)
    assert beton_options(parser().parse_args(["imagefolder", "--data", "d", "--out", "o", *flags])) == want
    assert beton_options(parser().parse_args(["folder", "--data", "d", "--out", "o", *flags])) == want
    assert beton_options(parser().parse_args(["imagefolder", "--data", "d", "--out", "o"])) == BetonOptions()
    assert beton_options(parser().parse_args(["folder", "--list", "f", "--out", "o", "--max-side", "0"])) == \
        BetonOptions(max_side=None)
    # synthetic has no --write-mode etc.; its --max-side 0 default stores the images as generated
    assert beton_options(parser().parse_args(["synthetic", "--out", "o"])) == SYNTHETIC_OPTIONS
    syn = beton_options(parser().parse_args(["synthetic", "--out", "o", "--jpeg-quality", "80", "--seed", "2"]))
    assert asdict(syn) == dict(asdict(SYNTHETIC_OPTIONS), jpeg_quality=80, seed=2)


@pytest.mark.parametrize("case, message", [
    ("no_train", "train not found"),
    ("empty_class", "has no image files"),
    ("unknown_val_class", "not in train"),
    ("val_lacks_class", "val has no folder for class 'dog'"),
    ("val_unreadable_images", "val has no readable images"),
    ("too_large", "65,501 px on its longest side"),
])
def test_fatal_problems_are_one_line_errors(tmp_path, case, message):
    """Each is found before any beton is written: val's problems too (train.beton used to be written first)."""
    data = make_tree(tmp_path / "data", per_class=1)
    extra = []
    if case == "no_train":
        os.rename(data / "train", data / "elsewhere")
    elif case == "empty_class":
        (data / "train" / "empty").mkdir()
    elif case == "unknown_val_class":
        (data / "val" / "zebra").mkdir()
    elif case == "val_lacks_class":                  # the reverse: used to write a val without dogs
        for f in (data / "val" / "dog").iterdir():
            f.unlink()
        (data / "val" / "dog").rmdir()
    elif case == "val_unreadable_images":
        for f in (data / "val").rglob("*.*"):
            f.write_bytes(b"not an image")
    else:                                            # a beton stores sides up to 65,500 px (--max-side 0 keeps it)
        Image.new("RGB", (65501, 16)).save(data / "val" / "cat" / "wide.png")
        extra = ["--max-side", "0"]
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "dataset_prep", "imagefolder", "--data", str(data), "--out", str(out),
                        "--quiet", *extra], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if not ln.startswith(("val: skipped", "  skipped"))]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    if case == "too_large":
        assert "wide.png" in lines[0] and "--max-side" in lines[0]
    assert not (out / "train.beton").exists() and not (out / "val.beton").exists()


def test_synthetic_option_errors_come_before_generating(tmp_path, capsys):
    """The checks every mode runs (quality, max side, an existing beton) stop synthetic before minutes of
    generating, and an existing JPEG tree is left as it was."""
    out = tmp_path / "syn"
    (out / "jpeg").mkdir(parents=True)
    (out / "jpeg" / "keep").write_text("x")
    for flags, message in ((["--jpeg-quality", "0"], "--jpeg-quality must be in 1..100"),
                           (["--max-side", "8"], "--max-side must be in 16..65500")):
        assert cli(["synthetic", "--out", str(out), "--quiet", "--classes", "2", *flags]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err
    (out / "val.beton").write_bytes(b"old")
    assert cli(["synthetic", "--out", str(out), "--quiet", "--classes", "2"]) == 2
    assert "val.beton exists; pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "jpeg").iterdir()) == ["keep"]


def _without_root_override(cmd: list[str]) -> list[str]:
    """chmod 000 does not stop root: as root, run ``cmd`` without the capabilities that bypass permissions."""
    if os.geteuid() != 0:
        return cmd
    if not shutil.which("setpriv"):
        pytest.skip("running as root without setpriv (util-linux): permissions cannot be tested")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--", *cmd]


def test_unreadable_folders_are_listed_or_one_error_line(tmp_path):
    """A fault probe: chmod 000 on a train sub-folder and a val class exited 0 with a 1-class val, listing nothing."""
    data = make_tree(tmp_path / "data", per_class=1)
    sub = data / "train" / "cat" / "more"
    sub.mkdir()
    Image.new("RGB", (32, 32)).save(sub / "x.png")
    out = tmp_path / "out"
    cmd = _without_root_override([sys.executable, "-m", "dataset_prep", "imagefolder", "--data", str(data),
                                  "--out", str(out), "--quiet"])
    try:
        sub.chmod(0)
        (data / "val" / "dog").chmod(0)
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 2 and not (out / "train.beton").exists(), r.stderr
        assert r.stderr.startswith("error: cannot read class folder") and "val/dog" in r.stderr
        assert "Permission denied" in r.stderr and len(r.stderr.strip().splitlines()) == 1
        (data / "val" / "dog").chmod(0o755)
        # A sub-folder: skipped and listed. (A 65,501-px image in val then stops the run after the listing and
        # before the write, which keeps this test from paying a second FFCV start-up; skips of a run that writes
        # are tested above.)
        Image.new("RGB", (65501, 16)).save(data / "val" / "dog" / "wide.png")
        r = subprocess.run(cmd + ["--max-side", "0"], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 2 and "wide.png" in r.stderr, r.stderr
        assert "folder unreadable (Permission denied)" in (out / "skipped-train.txt").read_text()
        assert "train: skipped 1 file(s)" in r.stderr and "cat/more" in r.stderr
    finally:
        sub.chmod(0o755)
        (data / "val" / "dog").chmod(0o755)
    assert not (out / "train.beton").exists()


# ---------------------------------------------------------------------------------------------- class subsets
def test_classes_file_writes_a_subset_in_file_order(tmp_path, capsys):
    data = make_tree(tmp_path / "data", per_class=2, classes=("cat", "dog", "fox"))
    Image.new("RGB", (32, 32)).save(data / "train" / "fox" / "extra.png")
    listing = tmp_path / "classes.txt"
    listing.write_text("# ImageNet-100 style: one folder name per line\nfox\n\ncat\n")
    out = tmp_path / "out"
    assert cli(["imagefolder", "--data", str(data), "--out", str(out), "--classes", str(listing), "--quiet"]) == 0
    _, meta = read_meta(out / "train.beton")
    assert np.bincount(meta["label"].ravel()).tolist() == [3, 2]         # fox (3 images) is 0, cat 1; no dog
    _, meta = read_meta(out / "val.beton")
    assert np.bincount(meta["label"].ravel()).tolist() == [2, 2]
    capsys.readouterr()
    for text, message in (("fox\nwolf\n", "train has no folder for class 'wolf'"),
                          ("fox\ncat\nfox\n", "line 3: class 'fox' repeats line 1"),
                          ("\n", "lists no classes")):
        listing.write_text(text)
        assert cli(["imagefolder", "--data", str(data), "--out", str(tmp_path / "o2"), "--classes", str(listing),
                    "--quiet"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    listing.write_text("cat\ndog\n")
    for f in (data / "val" / "dog").iterdir():
        f.unlink()
    assert cli(["imagefolder", "--data", str(data), "--out", str(tmp_path / "o3"), "--classes", str(listing),
                "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "val/dog has no image files" in err[0]
    assert not (tmp_path / "o2").exists() or not list((tmp_path / "o2").glob("*.beton"))
    assert not list((tmp_path / "o3").glob("*.beton"))


def test_grid_command_writes_a_class_per_row_png(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert cli(["grid", "--out", str(out), "--per-class", "3", "--thumb", "32", "--seed", "1"]) == 0
    img = np.asarray(Image.open(out).convert("RGB")).astype(np.int16)
    k = len(synthetic.CLASSES)
    assert img.shape[0] == k * 34 + 2 and img.shape[1] == 90 + 3 * 34 + 2
    # The same images (up to the 256-colour palette), not those of another seed.
    assert np.abs(img - synthetic.sample_grid(per_class=3, thumb=32, seed=1)).mean() < 6
    assert np.abs(img - synthetic.sample_grid(per_class=3, thumb=32, seed=0)).mean() > 20
    capsys.readouterr()
    for bad in (["--out", str(tmp_path / "no" / "g.png")], ["--out", str(tmp_path / "g.jpg")],
                ["--out", str(tmp_path / "g.png"), "--per-class", "0"]):
        assert cli(["grid", *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:"), bad
    assert not list(tmp_path.glob("*g.*")) and not list(tmp_path.glob(".*tmp"))



def test_a_grid_that_fails_half_written_leaves_nothing(tmp_path, monkeypatch):
    out = tmp_path / "grid.png"
    out.write_bytes(b"the previous picture")

    def half(self, fp, *a, **k):
        Path(fp).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(Image.Image, "save", half)
    with pytest.raises(OSError, match="No space left"):
        synthetic.write_grid(out, per_class=1, thumb=16)
    assert out.read_bytes() == b"the previous picture" and [p.name for p in tmp_path.iterdir()] == ["grid.png"]

# ---------------------------------------------------------------------------------------------- unlabeled data
