"""Fault injection (issue 13): bad folders and images, corrupted files, kills, full disks, two runs at once.

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
    r = subprocess.run([sys.executable, str(ROOT / "fastmveb/train.py"), "--rc", str(ROOT / "rcs/tiny.yaml"),
                        "train.log_every=0", f"train.run_dir={tmp_path}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
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

