"""Fault injection: bad folders and images, corrupted files, kills, full disks, two runs at once.

Each test reproduces one numbered case of the issue on real files (tiny images, ResNet-10, a few steps) and
pins the fixed behaviour: a one-line `error: ...` and a non-zero exit, or a documented recovery; never a
traceback, a hang or a silently wrong result.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest

from fastmveb.config import Config, ConfigError, load_config
from commands import train_cli

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The stderr of a failed command must be one `error: ...` line (numba's exit noise aside), no traceback."""
    assert r.returncode != 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, r.stderr[-3000:]
    return lines[0]


# ---------------------------------------------------------------------------------------------- config
# Case 7 (config part): non-finite numbers were accepted and reached the weights.
@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "nan"])
def test_config_rejects_non_finite_numbers(value, tmp_path):
    with pytest.raises(ConfigError, match=r"'optim.base_lr' must be a (finite )?number"):
        load_config(None, [f"optim.base_lr={value}"])
    rc = tmp_path / "nan.yaml"
    rc.write_text(f"loss:\n  lam: {value}\n")
    with pytest.raises(ConfigError, match=r"nan.yaml: 'loss.lam' must be a (finite )?number"):
        load_config(rc)


# Case 8 (config part): zero / negative sizes and cadences crashed or did nonsense.
@pytest.mark.parametrize("override, key", [
    ("data.decode_size=0", "data.decode_size"), ("views.global_size=0", "views.global_size"),
    ("train.log_every=0", "train.log_every"), ("train.max_steps=-5", "train.max_steps"),
    ("views.local_scale=[0.5, 0.1]", "views.local_scale"), ("views.flip_p=1.5", "views.flip_p"),
    ("optim.momentum=1.0", "optim.momentum"), ("eval.knn_k=0", "eval.knn_k"), ("views.std=[1, 0, 1]", "views.std"),
])
def test_config_ranges_name_key_and_range(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    msg = str(e.value)
    assert key in msg and ("must be in [" in msg or "must be in (" in msg or "low <= high" in msg), msg
    assert "\n" not in msg


def test_every_number_in_the_config_has_a_range():
    import dataclasses
    import typing

    from fastmveb.config import RANGES
    missing = []
    for section in dataclasses.fields(Config):
        for name, tp in typing.get_type_hints(type(getattr(Config(), section.name))).items():
            base = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else tp
            if base in (int, float) and f"{section.name}.{name}" not in RANGES:
                missing.append(f"{section.name}.{name}")
    assert not missing, f"add these keys to fastmveb.config.RANGES: {missing}"
    for rc in sorted((ROOT / "rcs").glob("*.yaml")):   # the provided recipes stay inside the ranges
        load_config(rc)


def test_train_cli_range_error_is_one_line(tmp_path):
    r = train_cli("--rc", ROOT / "rcs/tiny.yaml", "train.log_every=0", f"train.run_dir={tmp_path}")
    line = one_line_error(r)
    assert "train.log_every must be in [1, inf]" in line
    assert not any(tmp_path.iterdir())


# Case 11: `1e-6` was "must be a number" (YAML 1.1 reads it as a string).
def test_scientific_notation_on_command_line_and_in_rc(tmp_path):
    cfg = load_config(None, ["optim.weight_decay=1e-6", "optim.base_lr=2E+1", "loss.eta=1e-2"])
    assert cfg.optim.weight_decay == 1e-6 and cfg.optim.base_lr == 20.0 and cfg.loss.eta == 0.01
    rc = tmp_path / "sci.yaml"
    rc.write_text("optim:\n  weight_decay: 1e-6\n  final_lr_ratio: 5e-4\nviews:\n  global_scale: [4e-1, 1]\n")
    cfg = load_config(rc)
    assert cfg.optim.weight_decay == 1e-6 and cfg.optim.final_lr_ratio == 5e-4 and cfg.views.global_scale == (0.4, 1.0)
    assert math.isclose(load_config(None, ["optim.weight_decay=1.5e-6"]).optim.weight_decay, 1.5e-6)
    # strings stay strings, and no Python tags are honoured
    assert load_config(None, ["train.name=1e3"]).train.name == "1e3"
    rc.write_text("optim:\n  base_lr: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(rc)


# ---------------------------------------------------------------------------------------------- dataset_prep
def _tree(root: Path, classes=("a_stripes", "b_dots"), per_class=3, side=40, splits=("train",)) -> Path:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 255, (side, side + i, 3), dtype=np.uint8)).save(root / split / c / f"{i}.png")
    return root


def _labels(beton: Path):
    import numpy as np
    from ffcv.reader import Reader
    r = Reader(str(beton))
    return np.bincount(r.metadata["f1"].ravel()).tolist()


def _raw_images(beton: Path) -> list:
    """The stored pixels of a write_mode=raw beton, straight from the file (metadata + data pointers)."""
    import numpy as np
    from ffcv.reader import Reader
    r = Reader(str(beton))
    out = []
    for m in r.metadata["f0"]:
        h, w = int(m["height"]), int(m["width"])
        out.append(np.fromfile(beton, dtype=np.uint8, count=h * w * 3, offset=int(m["data_ptr"])).reshape(h, w, 3))
    return out


# Case 1: `ln -s .. train/00_stripes/loop` gave 656 samples from 16 images, 320 under the wrong label.
def test_symlink_loops_and_links_into_other_classes_are_not_followed(tmp_path):
    from dataset_prep.convert import convert_imagefolder
    from dataset_prep.options import BetonOptions
    data = _tree(tmp_path / "data")
    (data / "train" / "a_stripes" / "loop").symlink_to("..")                   # the split folder: a loop
    (data / "train" / "a_stripes" / "self").symlink_to(".")                    # its own folder
    (data / "train" / "a_stripes" / "other").symlink_to("../b_dots")           # another class
    (data / "train" / "a_stripes" / "up").symlink_to("../../..")               # a folder containing the split
    extra = _tree(tmp_path / "extra", classes=("x",), per_class=2)
    (data / "train" / "b_dots" / "more").symlink_to(extra / "train" / "x")     # outside: followed, once
    (data / "train" / "b_dots" / "more2").symlink_to(extra / "train" / "x")
    out = tmp_path / "out"
    s = convert_imagefolder(data, out, BetonOptions(num_workers=1, progress=False, max_side=None), splits=("train",))
    assert s[0]["images"] == 3 + 5
    assert _labels(out / "train.beton") == [3, 5]
    listed = (out / "skipped-train.txt").read_text()
    for name in ("loop", "self", "other", "up", "more2"):
        assert f"/{name}\t" in listed, listed


# Case 2: 16-bit PNGs were binarised to 0/255; other modes must be converted or skipped with a reason.
def test_high_bit_depth_and_alpha_images_are_converted_not_clipped(tmp_path):
    import numpy as np
    from PIL import Image
    from dataset_prep.convert import convert_imagefolder
    from dataset_prep.options import BetonOptions
    d = tmp_path / "data" / "train" / "c"
    d.mkdir(parents=True)
    g16 = (np.arange(32 * 48, dtype=np.int64).reshape(32, 48) * 43).astype(np.uint16)   # 0 .. 66,005 -> wraps? no
    g16 = (g16.astype(np.int64) * 65535 // g16.max()).astype(np.uint16)
    Image.fromarray(g16).save(d / "g16.png")
    assert Image.open(d / "g16.png").mode == "I;16"
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 0                                                    # fully transparent red
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(np.full((32, 32, 2), 100, np.uint8), "LA").save(d / "la.png")
    pal = Image.fromarray(np.full((32, 32), 7, np.uint8), "L").convert("P")
    pal.info["transparency"] = 7
    pal.save(d / "pal.png", transparency=7)
    Image.fromarray(np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32), "F").save(d / "f01.tif")
    Image.fromarray(np.full((32, 32), 1000.0, np.float32), "F").save(d / "fbig.tif")
    out = tmp_path / "out"
    convert_imagefolder(tmp_path / "data", out, BetonOptions(num_workers=1, progress=False, max_side=None,
                                                          write_mode="raw", shuffle=False), splits=("train",))
    imgs = {im.shape: im for im in _raw_images(out / "train.beton")}
    assert len(_raw_images(out / "train.beton")) == 5
    got = imgs[(32, 48, 3)]
    want = (g16.astype(np.int64) * 255 + 32767) // 65535
    assert (got[..., 0] == want).all() and (got[..., 1] == want).all()
    assert len(np.unique(got)) > 200                                                        # not binarised
    listed = (out / "skipped-train.txt").read_text()
    assert "fbig.tif" in listed and "no known 8-bit scale" in listed and "f01" not in listed


# Case 8 (write part): a 1x1 image passed dataset_prep, then aborted kNN evaluation inside OpenCV (rc 134).
def test_images_under_the_minimum_side_are_skipped_and_listed(tmp_path):
    import numpy as np
    from PIL import Image
    from dataset_prep.convert import convert_imagefolder
    from dataset_prep.options import MIN_SIDE, BetonOptions
    data = _tree(tmp_path / "data", per_class=2)
    c = data / "train" / "a_stripes"
    Image.new("RGB", (1, 1), (9, 9, 9)).save(c / "one.png")
    Image.new("RGB", (MIN_SIDE - 1, 64), (9, 9, 9)).save(c / "thin.png")
    Image.new("RGB", (2000, 40), (9, 9, 9)).save(c / "panorama.png")   # 384 x 7 as stored at --max-side 384
    Image.new("RGB", (MIN_SIDE, MIN_SIDE), (9, 9, 9)).save(c / "ok.png")
    out = tmp_path / "out"
    s = convert_imagefolder(data, out, BetonOptions(num_workers=1, progress=False, max_side=384), splits=("train",))
    assert s[0]["images"] == 4 + 1
    listed = (out / "skipped-train.txt").read_text()
    assert all(n in listed for n in ("one.png", "thin.png", "panorama.png")) and "ok.png" not in listed
    assert "16-px minimum side" in listed
    assert np.array(_labels(out / "train.beton")).sum() == 5


# Case 5: a beton with 1 MiB overwritten in the middle trained with 36 images silently altered.
def _small_beton(tmp_path: Path) -> Path:
    from dataset_prep.convert import convert_imagefolder
    from dataset_prep.options import BetonOptions
    data = _tree(tmp_path / "data", per_class=4, side=64)
    convert_imagefolder(data, tmp_path / "b", BetonOptions(num_workers=1, progress=False, max_side=None),
                        splits=("train",))
    return tmp_path / "b" / "train.beton"


def test_beton_integrity_record_and_checks(tmp_path, capsys):
    import os
    import shutil
    from dataset_prep.__main__ import main as prep
    from dataset_prep.integrity import BetonError, check_beton, sidecar_path, verify
    beton = _small_beton(tmp_path)
    assert sidecar_path(beton).is_file()
    check_beton(beton)
    assert "SHA-256 matches" in verify(beton)

    # overwritten in place (same size, new mtime): the open-time check hashes and refuses
    bad = tmp_path / "bad.beton"
    shutil.copy2(beton, bad)
    shutil.copy2(sidecar_path(beton), sidecar_path(bad))
    with open(bad, "r+b") as f:
        f.seek(bad.stat().st_size // 2)
        f.write(os.urandom(4096))
    with pytest.raises(BetonError, match=r"bad.beton is corrupted .*make beton FORCE=1"):
        check_beton(bad)
    # the same damage with the old time put back: only `verify` (full hash) can see it
    st = beton.stat()
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))
    check_beton(bad)
    assert prep(["verify", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "corrupted" in err[0] and "FORCE=1" in err[0]

    # truncated, and not a beton at all (with or without a record)
    cut = tmp_path / "cut.beton"
    cut.write_bytes(beton.read_bytes()[: st.st_size // 2])
    with pytest.raises(BetonError, match=r"cut.beton is truncated"):
        check_beton(cut)
    shutil.copy2(sidecar_path(beton), sidecar_path(cut))
    with pytest.raises(BetonError, match=r"cut.beton is truncated"):
        check_beton(cut)
    with pytest.raises(BetonError, match=r"README.md is not an FFCV beton.*FORCE=1"):
        check_beton(ROOT / "README.md")

    # a plain copy (new time, same bytes) is accepted once hashed; verify records the new time
    cp = tmp_path / "cp.beton"
    shutil.copy(beton, cp)
    shutil.copy(sidecar_path(beton), sidecar_path(cp))
    check_beton(cp)
    assert "SHA-256 matches" in capsys.readouterr().err
    assert prep(["verify", str(cp)]) == 0
    import json
    assert json.loads(sidecar_path(cp).read_text())["mtime_ns"] == cp.stat().st_mtime_ns


def test_train_and_eval_refuse_a_corrupted_or_foreign_beton(small_betons, tmp_path):
    import os
    import shutil
    from dataset_prep.integrity import sidecar_path
    from fastmveb.data import eval_loader
    bad = tmp_path / "train.beton"
    shutil.copy(small_betons / "train.beton", bad)
    shutil.copy(sidecar_path(small_betons / "train.beton"), sidecar_path(bad))
    with open(bad, "r+b") as f:                                     # 1 MiB overwritten in the middle
        f.seek(bad.stat().st_size // 2 - 2**19)
        f.write(os.urandom(2**20))
    for beton, what in ((bad, "is corrupted"), (ROOT / "README.md", "is not an FFCV beton")):
        r = train_cli("--rc", ROOT / "rcs/tiny.yaml", f"data.train_beton={beton}",
                      f"data.val_beton={small_betons / 'val.beton'}", f"train.run_dir={tmp_path / 'runs'}")
        line = one_line_error(r)
        assert what in line and str(beton) in line and "FORCE=1" in line
        assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="is corrupted"):
        eval_loader(bad, 8, 1, "cpu")


# Case 6: a full disk killed an ffcv writer process; the main process hung forever and left a hidden .tmp.
@pytest.fixture
def small_disk(tmp_path):
    """A 1-MiB tmpfs (root only): smaller than any beton (FFCV pages are 2 MiB)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_while_writing_a_beton_fails_in_one_line(small_disk, tmp_path):
    data = _tree(tmp_path / "data", per_class=3, side=64, splits=("train", "val"))
    out = small_disk / "out"
    r = subprocess.run([sys.executable, "-m", "dataset_prep", "imagefolder", "--data", str(data), "--out", str(out),
                        "--quiet", "--max-side", "0"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    line = one_line_error(r)
    assert r.returncode == 2 and "disk full while writing" in line and "train.beton" in line
    assert list(out.iterdir()) == []                                   # no beton, no hidden temporary file


def test_unwritable_output_fails_before_the_slow_pass(tmp_path):
    data = _tree(tmp_path / "data", per_class=1, splits=("train", "val"))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    r = subprocess.run([sys.executable, "-m", "dataset_prep", "imagefolder", "--data", str(data), "--out",
                        str(blocker / "out"), "--quiet"], cwd=ROOT, capture_output=True, text=True, timeout=240)
    line = one_line_error(r)
    assert "cannot write to" in line and "--out" in line


# ---------------------------------------------------------------------------------------------- run directory
