"""dataset_prep: synthetic generation, ImageFolder -> beton writing, and its failure modes (real FFCV files)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_prep import synthetic, writer
from dataset_prep.__main__ import main as cli

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
    s = synthetic.make_synthetic(out, classes=3, train_per_class=6, val_per_class=2, seed=0, num_workers=2,
                                 progress=False)
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
    monkeypatch.setattr(writer, "validate", lambda split, *a, **k: split)
    out = tmp_path / "out"
    with pytest.raises(writer.PrepError, match="bad.jpg"):
        writer.convert_imagefolder(data, out, num_workers=2, progress=False)
    assert not out.exists() or list(out.iterdir()) == []


@pytest.mark.parametrize("case, message", [
    ("no_train", "train not found"),
    ("empty_class", "has no image files"),
    ("unknown_val_class", "not in train"),
])
def test_fatal_problems_are_one_line_errors(tmp_path, case, message):
    data = make_tree(tmp_path / "data", per_class=1)
    if case == "no_train":
        os.rename(data / "train", data / "elsewhere")
    elif case == "empty_class":
        (data / "train" / "empty").mkdir()
    else:
        (data / "val" / "zebra").mkdir()
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "dataset_prep", "imagefolder", "--data", str(data), "--out", str(out),
                        "--quiet"], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], r.stderr
    assert not (out / "train.beton").exists() and not (out / "val.beton").exists()


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
