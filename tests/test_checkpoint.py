"""Atomic saves, refusal of broken models, weights_only round trips, RNG restore, finding and pruning."""
from __future__ import annotations

import logging
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from fastmveb import checkpoint as ckpt
from fastmveb.checkpoint import (backbone_state_dict, capture_rng_state, checkpoint_path, latest_checkpoint,
                                 load_checkpoint, prune_checkpoints, restore_rng_state, save_checkpoint)
from fastmveb.config import ModelConfig
from fastmveb.model import MVEBModel, make_target, unwrap
from fastmveb.optim import LARS, param_groups

ROOT = Path(__file__).resolve().parents[1]


def tiny_state(step: int = 1, value: float = 0.0) -> dict:
    return {"model": {"w": torch.full((3,), value), "n": torch.tensor(step)}, "step": step}


def full_state(step: int = 7):
    torch.manual_seed(0)
    model = MVEBModel.from_config(ModelConfig(arch="resnet10", proj_hidden=16, proj_out=8, proj_layers=2))
    target = make_target(model)
    opt = LARS(param_groups(model, 1e-6), lr=0.1)
    model(torch.randn(2, 3, 32, 32))[1].sum().backward()
    opt.step()
    state = {"model": unwrap(torch.compile(model)).state_dict(), "target": target.state_dict(),
             "optimizer": opt.state_dict(), "step": step, "epoch": 1, "batch_in_epoch": 3,
             "rng": capture_rng_state(), "config": {"model": {"arch": "resnet10", "scale": [0.4, 1.0]}},
             "git": "abc1234", "extra": {"best": None, "pair": (1, 2.5)}}
    return model, opt, state


def test_weights_only_round_trip_loads_strictly(tmp_path):
    model, opt, state = full_state()
    path = checkpoint_path(tmp_path, 7)
    assert save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert back["step"] == 7 and back["epoch"] == 1 and back["batch_in_epoch"] == 3 and back["git"] == "abc1234"
    assert back["config"] == state["config"] and back["extra"] == {"best": None, "pair": (1, 2.5)}
    fresh = MVEBModel.from_config(ModelConfig(arch="resnet10", proj_hidden=16, proj_out=8, proj_layers=2))
    fresh.load_state_dict(back["model"], strict=True)
    make_target(fresh).load_state_dict(back["target"], strict=True)
    fresh_opt = LARS(param_groups(fresh, 1e-6), lr=0.1)
    fresh_opt.load_state_dict(back["optimizer"])
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        assert torch.equal(a, b)
    # the backbone alone loads into torchvision's ResNet under torchvision's names
    tv = ResNet(BasicBlock, [1, 1, 1, 1])
    missing, unexpected = tv.load_state_dict(backbone_state_dict(back["model"]), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


def test_rng_state_restores_the_same_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)                            # leaves a cached Gaussian in Python's state
    np.random.randn(1)                            # and in numpy's legacy state
    state = capture_rng_state()

    def draws():
        return (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(3).tolist(),
                torch.rand(3).tolist())

    first = draws()
    path = tmp_path / "rng.pt"
    assert save_checkpoint(path, {"rng": state})
    draws()                                       # move every generator on
    restore_rng_state(load_checkpoint(path)["rng"])
    assert draws() == first


def test_refuses_non_finite_model_and_keeps_the_previous_file(tmp_path, caplog):
    path = checkpoint_path(tmp_path, 1)
    assert save_checkpoint(path, tiny_state(1, 1.0))
    good = path.read_bytes()
    bad = tiny_state(1, 2.0)
    bad["model"]["w"][1] = float("nan")
    with caplog.at_level(logging.WARNING, logger="fastmveb.checkpoint"):
        assert save_checkpoint(path, bad) is False
    assert "model.w" in caplog.text
    bad_target = tiny_state(2, 2.0)
    bad_target["target"] = {"w": torch.tensor([float("inf")])}
    assert save_checkpoint(checkpoint_path(tmp_path, 2), bad_target) is False
    assert path.read_bytes() == good and latest_checkpoint(tmp_path) == path
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]


def test_failed_write_leaves_previous_checkpoint_and_no_stray_file(tmp_path, monkeypatch):
    first = checkpoint_path(tmp_path, 1)
    assert save_checkpoint(first, tiny_state(1, 1.0))

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt.os, "fsync", crash)   # fails after the bytes are written, before the rename
    with pytest.raises(OSError):
        save_checkpoint(checkpoint_path(tmp_path, 2), tiny_state(2, 2.0))
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]
    assert latest_checkpoint(tmp_path) == first


def test_killed_mid_write_leaves_previous_checkpoint(tmp_path):
    first = checkpoint_path(tmp_path, 1)
    assert save_checkpoint(first, tiny_state(1, 1.0))
    # A hard kill (no cleanup runs) half way through torch.save of the next checkpoint.
    code = f"""
import os, torch
from fastmveb import checkpoint as ckpt
def half_save(obj, f):
    f.write(b"PK\\x03\\x04 partial bytes")
    f.flush()
    os._exit(9)
ckpt.torch.save = half_save
ckpt.save_checkpoint(ckpt.checkpoint_path({str(tmp_path)!r}, 2), {{"model": {{}}, "step": 2}})
"""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, timeout=120)
    assert r.returncode == 9, r.stderr.decode()[-2000:]
    names = sorted(p.name for p in first.parent.iterdir())
    assert len(names) == 2 and any(n.endswith(".tmp") for n in names)   # the debris of the kill
    assert latest_checkpoint(tmp_path) == first
    assert load_checkpoint(first)["step"] == 1


def test_latest_and_prune(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    for s in (5, 100, 20, 3, 7):
        assert save_checkpoint(checkpoint_path(tmp_path, s), tiny_state(s))
    stray = checkpoint_path(tmp_path, 999).parent / ".step_00000999.pt.123.tmp"
    stray.write_bytes(b"half")
    assert checkpoint_path(tmp_path, 42).name == "step_00000042.pt"
    assert latest_checkpoint(tmp_path) == checkpoint_path(tmp_path, 100)
    assert prune_checkpoints(tmp_path, 0) == []
    deleted = prune_checkpoints(tmp_path, 2)
    assert sorted(p.name for p in deleted) == ["step_00000003.pt", "step_00000005.pt", "step_00000007.pt"]
    left = sorted(p.name for p in stray.parent.iterdir() if not p.name.startswith("."))
    assert left == ["step_00000020.pt", "step_00000100.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 100


def test_unwrap_strips_nested_wrappers():
    m = nn.Linear(2, 2)
    assert unwrap(m) is m
    assert unwrap(torch.compile(nn.DataParallel(m))) is m
    assert list(unwrap(torch.compile(m)).state_dict()) == ["weight", "bias"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_rng_round_trip_through_a_cuda_map_location(tmp_path):
    torch.cuda.manual_seed_all(5)
    np.random.seed(5)
    state = capture_rng_state()
    first = (torch.rand(2, device="cuda").tolist(), np.random.rand(2).tolist())
    path = tmp_path / "rng.pt"
    assert save_checkpoint(path, {"rng": state, "model": {"w": torch.ones(2, device="cuda")}})
    restore_rng_state(load_checkpoint(path, map_location="cuda")["rng"])
    assert (torch.rand(2, device="cuda").tolist(), np.random.rand(2).tolist()) == first


def test_data_position_reads_samples_and_converts_old_batch_indices():
    # New checkpoints keep the position as samples of the global order and name the order's generator.
    assert ckpt.data_position({"samples_in_epoch": 48, "batch_in_epoch": 3, "shuffle": "numpy", "rng": [{}, {}]}) \
        == (48, "numpy")
    # Older ones: a batch index under their own global batch, the generator implied by their process count.
    old = {"batch_in_epoch": 3, "config": {"data": {"global_batch_size": 16}}, "rng": [{}]}
    assert ckpt.data_position(old) == (48, "numpy")
    assert ckpt.data_position(dict(old, rng=[{}, {}])) == (48, "torch")
    with pytest.raises(ckpt.CheckpointError, match="global batch"):
        ckpt.data_position({"batch_in_epoch": 3, "rng": [{}]})


def test_data_identity_tells_betons_apart_cheaply_with_or_without_a_record(small_betons, tmp_path):
    """The identity a checkpoint records: the integrity record's SHA-256 where there is one, a digest of the beton's
    layout always; the path does not count. Train data decide a resume, val data make a note."""
    import shutil
    from dataset_prep.integrity import beton_identity, same_beton
    from fastmveb.rundir import RunDirError, check_data, data_changes
    train, val = beton_identity(small_betons / "train.beton"), beton_identity(small_betons / "val.beton")
    assert train["num_samples"] == 160 and len(train["sha256"]) == len(train["layout"]) == 64
    copy = tmp_path / "train.beton"                                    # moved, and without its record
    shutil.copy(small_betons / "train.beton", copy)
    bare = beton_identity(copy)
    assert bare["sha256"] is None and bare["layout"] == train["layout"] and same_beton(train, bare)
    assert not same_beton(train, val) and not same_beton(dict(train, sha256=None), dict(val, sha256=None))
    old = {"train": train, "val": val}
    assert data_changes(old, {"train": bare, "val": val}) == (None, [])
    check_data(old, {"train": bare, "val": None}, "ckpt")                # the monitors off: nothing to compare
    with pytest.raises(RunDirError, match=r"resuming ckpt on other train data: .*train.beton \(160 samples.*"
                                          r"val.beton \(40 samples"):
        check_data(old, {"train": val, "val": val}, "ckpt")
    check_data(old, {"train": val, "val": val}, "ckpt", allow=True)
    train_change, notes = data_changes(old, {"train": train, "val": train})
    assert train_change is None and len(notes) == 1 and notes[0].startswith("val data changed: ")
    assert "different val sets" in notes[0]
    # a checkpoint written before identities were recorded: resumed, with a note
    train_change, notes = data_changes(None, {"train": train, "val": None})
    assert train_change is None and "records no identity of its data" in notes[0]
