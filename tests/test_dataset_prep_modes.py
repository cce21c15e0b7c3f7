"""dataset_prep's folder, list and auto modes, and the label sets of a split (real FFCV files)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dataset_prep.__main__ import cli
from test_dataset_prep import make_tree, read_meta

ROOT = Path(__file__).resolve().parents[1]


def test_folder_mode_writes_unlabeled_betons_with_a_seeded_val_split(tmp_path, capsys):
    import json
    from dataset_prep.__main__ import auto_mode
    from dataset_prep.integrity import sidecar_path, verify
    from fastmveb.data import num_classes
    root = make_tree(tmp_path / "photos", per_class=4, splits=("2025", "2026"))   # images two folders deep
    Image.new("RGB", (40, 30)).save(root / "top.jpg")                   # and at the top
    (root / "notes.txt").write_text("not an image")
    assert auto_mode(str(root)) == ["folder", "--data", str(root)]      # images of its own: no labels
    out = tmp_path / "out"
    assert cli(["auto", "--data", str(root), "--out", str(out), "--val-fraction", "0.25", "--seed", "3",
                "--quiet"]) == 0
    n_train, meta = read_meta(out / "train.beton")
    n_val, meta_val = read_meta(out / "val.beton")
    assert (n_train, n_val) == (13, 4)                                  # 17 images, round(17 * 0.25) in val
    assert (meta["label"] == -1).all() and (meta_val["label"] == -1).all()
    assert num_classes(out / "train.beton") == 0 and num_classes(out / "val.beton") == 0
    assert json.loads(sidecar_path(out / "train.beton").read_text())["labelled"] is False
    assert "no labels" in verify(out / "train.beton")
    assert "no labels" in capsys.readouterr().out
    assert "notes.txt" in (out / "skipped-train.txt").read_text()
    # The same seed gives the same split (image sizes identify the images).
    assert cli(["folder", "--data", str(root), "--out", str(tmp_path / "again"), "--val-fraction", "0.25",
                "--seed", "3", "--quiet"]) == 0
    assert np.array_equal(np.sort(read_meta(tmp_path / "again" / "val.beton")[1]["image"]["width"]),
                          np.sort(meta_val["image"]["width"]))
    capsys.readouterr()
    for bad, message in ((["--val-fraction", "1.5"], "--val-fraction must be in (0, 1)"),
                         (["--data", str(root / "top.jpg")], "--list")):
        args = ["folder", "--out", str(tmp_path / "bad"), "--quiet"] + (bad if "--data" in bad else
                                                                        ["--data", str(root), *bad])
        assert cli(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and message in err[0], err
    assert not (tmp_path / "bad").exists() or not list((tmp_path / "bad").glob("*.beton"))


def test_list_mode_labels_and_bad_entries(tmp_path, capsys):
    from dataset_prep.__main__ import auto_mode
    root = make_tree(tmp_path / "data", per_class=2)
    (root / "fake.jpg").write_text("not an image")
    lst = tmp_path / "data" / "list.txt"                                # paths relative to the list's folder
    lst.write_text("train/cat/0.jpg\t0\ntrain/cat/1.png\t0\ntrain/dog/0.jpg\t1\n\ntrain/cat/0.jpg\t0\n"
                   "gone.jpg\t1\nfake.jpg\t1\n" + f"{root / 'val' / 'dog' / '1.png'}\t1\n")
    assert auto_mode(str(lst)) == ["folder", "--list", str(lst)]
    out = tmp_path / "out"
    assert cli(["folder", "--list", str(lst), "--out", str(out), "--quiet"]) == 0
    n, meta = read_meta(out / "train.beton")
    assert n == 4 and np.bincount(meta["label"].ravel()).tolist() == [2, 2]
    written = (out / "train.beton.files.txt").read_text().splitlines()   # each sample's source, in sample order
    assert all(os.path.isabs(f) for f in written)
    assert [Image.open(f).size for f in written] == list(zip(meta["image"]["width"].tolist(),
                                                              meta["image"]["height"].tolist()))
    listed = (out / "skipped-train.txt").read_text()
    assert "line 5: duplicate of line 1" in listed and "line 6: not found" in listed
    assert "fake.jpg\tunreadable" in listed
    capsys.readouterr()
    for text, message in (("train/cat/0.jpg\t0\ntrain/dog/0.jpg\n", "line 2: no label here"),
                          ("train/cat/0.jpg\tcat\n", "line 1: label 'cat' is not a non-negative integer"),
                          ("gone.jpg\n", "no readable images")):
        lst.write_text(text)
        assert cli(["folder", "--list", str(lst), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error")]
        assert len(err) == 1 and message in err[0], err
    assert not list((tmp_path / "o2").glob("*.beton"))


def test_auto_mode_picks_imagefolder_or_names_the_mode(tmp_path, capsys):
    from dataset_prep.__main__ import auto_mode
    data = make_tree(tmp_path / "data", per_class=1)
    assert auto_mode(str(data)) == ["imagefolder", "--data", str(data)]
    assert cli(["auto", "--data", str(data / "train"), "--out", str(tmp_path / "o")]) == 2   # class folders only
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MODE=folder" in err[0] and "train/<class>" in err[0]


# ---------------------------------------------------------------------------------------------- label sets
def _no_train_dogs(root: Path) -> Path:
    """An ImageFolder tree whose train dog images are all unreadable: the class disappears from train only."""
    data = make_tree(root, per_class=3)
    for f in (data / "train" / "dog").iterdir():
        f.write_bytes(b"not an image")
    return data


def test_a_val_label_train_lacks_is_refused_before_writing_or_named(tmp_path, capsys):
    """Before: `train.beton: 3 images, 1 classes` beside `val.beton: 6 images, 2 classes`, exit 0, no word. Now
    one error line naming the class, nothing written; --allow-label-mismatch writes the pair with one warning line,
    and each beton's record holds its label set."""
    import json
    from dataset_prep.integrity import label_counts, sidecar_path
    data, out = _no_train_dogs(tmp_path / "data"), tmp_path / "out"
    assert cli(["imagefolder", "--data", str(data), "--out", str(out), "--quiet"]) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith(("train: skipped", "  "))]
    assert err == [f"error: val has 3 image(s) of 1 label(s) that train has no image of (1 'dog'; train's files of "
                   f"them may be among those skipped ({out / 'skipped-train.txt'})): evaluations would measure "
                   "classes nothing was trained on; make train hold images of them (or leave them out of val), or "
                   "pass --allow-label-mismatch to write the pair anyway (evaluations then refuse it without their "
                   "own --allow-label-mismatch)"], err
    assert not list(out.glob("*.beton"))
    assert cli(["imagefolder", "--data", str(data), "--out", str(out), "--quiet", "--allow-label-mismatch"]) == 0
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning")]
    assert len(err) == 1 and err[0].startswith("warning: --allow-label-mismatch: val has 3 image(s) of 1 label(s)")
    assert json.loads(sidecar_path(out / "train.beton").read_text())["labels"] == {"0": 3}
    assert json.loads(sidecar_path(out / "val.beton").read_text())["labels"] == {"0": 3, "1": 3}
    assert label_counts(out / "val.beton") == {0: 3, 1: 3}


def test_a_val_fraction_split_that_puts_a_label_in_val_only_is_refused(tmp_path, capsys):
    """folder --list --val-fraction: a rare label drawn into val only was written with exit 0."""
    root = make_tree(tmp_path / "data", per_class=4, splits=("train",))
    files = sorted((root / "train").rglob("*.*"))
    lst = root / "list.txt"                                             # 7 images of label 0, 1 of label 1
    lst.write_text("".join(f"{f}\t{int(i == 0)}\n" for i, f in enumerate(files)))
    # the seed whose 25% val draw (dataset_prep's own, split_off_val) takes the label-1 image (line 1)
    seed = next(s for s in range(100) if 0 in np.random.default_rng(s).permutation(8)[:2])
    args = ["folder", "--list", str(lst), "--out", str(tmp_path / "out"), "--val-fraction", "0.25", "--seed",
            str(seed), "--quiet"]
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: val has 1 image(s) of 1 label(s) that train has no image of "
                                               "(1): "), err
    assert not list((tmp_path / "out").glob("*.beton"))


def test_label_counts_read_the_label_column_and_check_the_record(tmp_path, capsys):
    """The label set comes from the beton's label field (an older record without `labels` still works); a record
    that contradicts the beton (`"labelled": false` on a labelled beton, other labels) is refused in one line
    by every open (check_beton) and by verify."""
    import json
    from dataset_prep.integrity import BetonError, check_beton, label_counts, sidecar_path
    from fastmveb.data import labels
    data = make_tree(tmp_path / "data", per_class=2)
    out = tmp_path / "out"
    assert cli(["imagefolder", "--data", str(data), "--out", str(out), "--quiet"]) == 0
    beton = out / "train.beton"
    assert label_counts(beton) == dict(zip(*np.unique(labels(beton), return_counts=True))) == {0: 2, 1: 2}
    rec = json.loads(sidecar_path(beton).read_text())
    for i, (edit, says) in enumerate((({"labelled": False}, '"labelled": false'),
                                      ({"labels": {"0": 4}}, "labels 0"),
                                      (None, None))):                   # an older record: no labels key
        copy = tmp_path / f"c{i}" / "train.beton"
        copy.parent.mkdir()
        shutil.copy2(beton, copy)
        new = {k: v for k, v in rec.items() if k != "labels"} if edit is None else dict(rec, **edit)
        sidecar_path(copy).write_text(json.dumps(new))
        if says is None:
            check_beton(copy)
            assert label_counts(copy) == {0: 2, 1: 2}
            continue
        with pytest.raises(BetonError, match=f"holds labels 0, 1 but its record train.beton.sha256.json says {says}"):
            check_beton(copy)
        assert cli(["verify", str(copy)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "the record is not this beton's" in err[0], err
