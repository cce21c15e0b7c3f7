"""Export: strict torchvision loads for every arch with equal outputs, the fc choice, safetensors metadata, CLI errors."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from fastmveb.config import Config, dump_config, to_dict
from fastmveb.checkpoint import load_run_backbone
from fastmveb.errors import RunError
from fastmveb.eval.online import OnlineLinearProbe
from fastmveb.export import cli, export_backbone, torchvision_model
from fastmveb.model import build_backbone

ROOT = Path(__file__).resolve().parents[1]


def _randomise_bn(net: nn.Module, seed: int) -> None:
    """Non-trivial running stats and affine params, so an eval-mode comparison can tell weights apart."""
    g = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))


def make_run(tmp: Path, arch: str, step: int = 7, probe: bool = False, own_target: bool = True):
    """A run directory laid out as train.py writes it: config.yaml + checkpoints/step_XXXXXXXX.pt.

    own_target=False stores the online weights as the target too (torch.save keeps shared tensors once: faster).
    """
    torch.manual_seed(step)
    online, dim = build_backbone(arch)
    target = build_backbone(arch)[0] if own_target else online
    with torch.no_grad():
        _randomise_bn(online, 1)
        if own_target:
            _randomise_bn(target, 2)
    cfg = Config()
    cfg.model.arch = arch
    run = tmp / f"run_{arch}"
    (run / "checkpoints").mkdir(parents=True)
    dump_config(cfg, run / "config.yaml")
    proj = {"projector.0.weight": torch.randn(4, dim), "projector.2.bias": torch.zeros(4)}
    state = {"model": {**{f"backbone.{k}": v for k, v in online.state_dict().items()}, **proj},
             "target": {**{f"backbone.{k}": v for k, v in target.state_dict().items()}, **proj},
             "optimizer": {}, "step": step, "epoch": 1, "batch_in_epoch": 0, "rng": {},
             "config": to_dict(cfg), "git": "0123abcd"}
    if probe:
        p = OnlineLinearProbe(dim, 5)
        p.train()
        for _ in range(3):
            p(torch.randn(8, dim) + 1.0, torch.randint(0, 5, (8,)))
        state["probe"] = p.eval().state_dict()
    torch.save(state, run / "checkpoints" / f"step_{step:08d}.pt")
    return run, online, target, state


def _features(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net.eval()(x)


@pytest.mark.parametrize("arch", ["resnet10", "resnet18", "resnet34", "resnet50"])
def test_export_loads_strictly_into_torchvision_with_equal_outputs(tmp_path, arch):
    run, online, _, _ = make_run(tmp_path, arch, own_target=False)
    r = export_backbone(tmp_path / "bb.pth", run=run)
    sd = torch.load(r["pth"], weights_only=True)
    tv = torchvision_model(arch)
    x = torch.randn(2, 3, 32, 32)
    fresh = _features(nn.Sequential(*list(tv.children())[:-1], nn.Flatten()), x)
    tv.load_state_dict(sd, strict=True)                               # raises on any missing / extra key
    assert sd["fc.weight"].shape == (1000, tv.fc.in_features) and not sd["fc.weight"].any()
    tv.fc = nn.Identity()
    torch.testing.assert_close(_features(tv, x), _features(online, x), rtol=0, atol=0)
    # A randomly initialised model differs: the comparison above is not vacuous.
    assert not torch.allclose(fresh, _features(online, x))
    st = load_file(str(r["safetensors"]))
    assert st.keys() == sd.keys() and all(torch.equal(st[k], sd[k]) for k in sd)
    assert not list(tmp_path.glob(".*tmp"))                           # temp files renamed away


def test_export_target_and_metadata(tmp_path):
    run, online, target, state = make_run(tmp_path, "resnet10", step=42)
    r = export_backbone(tmp_path / "t.pth", run=run, which="target")
    tv = torchvision_model("resnet10")
    tv.load_state_dict(torch.load(r["pth"], weights_only=True), strict=True)
    tv.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_features(tv, x), _features(target, x), rtol=0, atol=0)
    with safe_open(str(r["safetensors"]), "pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "resnet10" and meta["step"] == "42" and meta["git"] == "0123abcd"
    assert meta["which"] == "target" and meta["fc"].startswith("zero")
    assert json.loads(meta["config"]) == state["config"]


def test_export_uses_matching_linear_head_only(tmp_path):
    run, *_ = make_run(tmp_path, "resnet10", step=3)
    head = {"weight": torch.randn(10, 512), "bias": torch.randn(10)}
    torch.save({**head, "ckpt": "step_00000003.pt", "which": "online", "mode": "fast", "top1": 50.0}, run / "linear_head.pt")
    sd = torch.load(export_backbone(tmp_path / "a.pth", run=run)["pth"], weights_only=True)
    assert torch.equal(sd["fc.weight"], head["weight"]) and torch.equal(sd["fc.bias"], head["bias"])
    tv = torchvision_model("resnet10")
    tv.fc = nn.Linear(512, 10)
    tv.load_state_dict(sd, strict=True)
    # A head trained on another checkpoint is not used.
    torch.save({**head, "ckpt": "step_00000002.pt", "which": "online", "mode": "fast", "top1": 50.0}, run / "linear_head.pt")
    sd = torch.load(export_backbone(tmp_path / "b.pth", run=run)["pth"], weights_only=True)
    assert sd["fc.weight"].shape == (1000, 512)
    # --fc zero ignores even a matching head.
    torch.save({**head, "ckpt": "step_00000003.pt", "which": "online", "mode": "fast", "top1": 50.0}, run / "linear_head.pt")
    sd = torch.load(export_backbone(tmp_path / "c.pth", run=run, fc="zero")["pth"], weights_only=True)
    assert sd["fc.weight"].shape == (1000, 512)


def test_export_names_the_heads_top1(tmp_path, capsys):
    """The printed fc line says which saved head is shipped and its top-1 (what eval linear recorded beside it)."""
    run, *_ = make_run(tmp_path, "resnet10", step=3)
    torch.save({"weight": torch.randn(10, 512), "bias": torch.randn(10), "ckpt": "step_00000003.pt",
                "which": "online", "mode": "fast", "top1": 26.2}, run / "linear_head.pt")
    assert cli(["--run", str(run), "--out", str(tmp_path / "a.pth")]) == 0
    assert "fc: linear probe (fast, top-1 26.20%, linear_head.pt)" in capsys.readouterr().out


def test_export_force_on_a_full_disk_keeps_the_old_pair(tmp_path, capsys, monkeypatch):
    """--force over an existing export whose second file (.safetensors) fails to write (ENOSPC): one error line,
    exit 2, the old .pth and .safetensors byte for byte, and no temporary file left. Before, the new .pth landed
    beside the old .safetensors (two different models) with a traceback."""
    import errno
    import safetensors.torch
    run, *_ = make_run(tmp_path, "resnet10", step=3)
    out = tmp_path / "out"
    out.mkdir()
    assert cli(["--run", str(run), "--out", str(out / "bb.pth")]) == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(old) == ["bb.pth", "bb.safetensors"]
    capsys.readouterr()
    torch.save({"weight": torch.randn(10, 512), "bias": torch.randn(10), "ckpt": "step_00000003.pt",
                "which": "online", "mode": "fast", "top1": 50.0}, run / "linear_head.pt")   # a different fc

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    assert cli(["--run", str(run), "--out", str(out / "bb.pth"), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot write") and "No space left on device" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old     # nothing else there: no temporaries


def test_export_a_failed_second_rename_puts_the_first_file_back(tmp_path, capsys, monkeypatch):
    """Both files written, the .pth renamed into place, then the .safetensors rename fails: the old .pth returns,
    so the pair on disk is still the old one and no temporary or backup file is left."""
    import errno
    import os
    run, *_ = make_run(tmp_path, "resnet10", step=3)
    out = tmp_path / "out"
    out.mkdir()
    assert cli(["--run", str(run), "--out", str(out / "bb.pth")]) == 0
    old = {p.name: p.read_bytes() for p in out.iterdir()}
    torch.save({"weight": torch.randn(10, 512), "bias": torch.randn(10), "ckpt": "step_00000003.pt",
                "which": "online", "mode": "fast", "top1": 50.0}, run / "linear_head.pt")   # a different fc
    replace = os.replace

    def failing_replace(src, dst):
        if str(dst).endswith("bb.safetensors") and str(src).endswith(".tmp"):
            raise OSError(errno.EIO, "Input/output error")
        return replace(src, dst)
    monkeypatch.setattr(os, "replace", failing_replace)
    capsys.readouterr()
    assert cli(["--run", str(run), "--out", str(out / "bb.pth"), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Input/output error" in err[0] and "previous pair is unchanged" in err[0], err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == old


def test_export_folds_online_probe_into_fc(tmp_path):
    run, online, _, state = make_run(tmp_path, "resnet10", probe=True)
    r = export_backbone(tmp_path / "p.pth", run=run)
    assert r["fc"].startswith("online linear probe")
    tv = torchvision_model("resnet10")
    tv.fc = nn.Linear(512, 5)
    tv.load_state_dict(torch.load(r["pth"], weights_only=True), strict=True)
    probe = OnlineLinearProbe(512, 5)
    probe.load_state_dict(state["probe"])
    x = torch.randn(2, 3, 32, 32)
    expect = probe.eval().fc(probe.bn(_features(online, x)))
    torch.testing.assert_close(_features(tv, x), expect, rtol=1e-4, atol=1e-4)


def test_load_run_backbone_matches_checkpoint(tmp_path):
    run, online, _, _ = make_run(tmp_path, "resnet10")
    bb, info = load_run_backbone(run)
    assert info["ckpt_path"].name == "step_00000007.pt" and info["cfg"].model.arch == "resnet10"
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(_features(bb, x), _features(online, x), rtol=0, atol=0)


def test_export_errors(tmp_path, capsys):
    with pytest.raises(RunError, match="not found"):
        export_backbone(tmp_path / "x.pth", run=tmp_path / "missing")
    with pytest.raises(RunError, match="no checkpoint"):
        export_backbone(tmp_path / "x.pth", run=tmp_path)
    with pytest.raises(RunError, match=r"\.pth"):
        export_backbone(tmp_path / "x.bin", run=tmp_path)
    assert cli(["--run", str(tmp_path), "--out", str(tmp_path / "x.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_export_cli_missing_run_dir(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastmveb.export", "--run", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o.pth")], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("error:") and "Traceback" not in r.stderr
    assert not (tmp_path / "o.pth").exists()


# detectron2's ResNet-50 backbone, every tensor its checkpoint holds (FrozenBN: 4 per norm), written out rather than
# derived so that a wrong renaming rule cannot agree with itself: stem, then res2..res5 with 3, 4, 6, 3 bottleneck
# blocks, the first of each with a shortcut.
D2_R50_KEYS = """
stem.conv1.weight stem.conv1.norm.weight stem.conv1.norm.bias stem.conv1.norm.running_mean stem.conv1.norm.running_var
res2.0.shortcut.weight res2.0.shortcut.norm.weight res2.0.shortcut.norm.bias res2.0.shortcut.norm.running_mean res2.0.shortcut.norm.running_var
res2.0.conv1.weight res2.0.conv1.norm.weight res2.0.conv1.norm.bias res2.0.conv1.norm.running_mean res2.0.conv1.norm.running_var
res2.0.conv2.weight res2.0.conv2.norm.weight res2.0.conv2.norm.bias res2.0.conv2.norm.running_mean res2.0.conv2.norm.running_var
res2.0.conv3.weight res2.0.conv3.norm.weight res2.0.conv3.norm.bias res2.0.conv3.norm.running_mean res2.0.conv3.norm.running_var
res2.1.conv1.weight res2.1.conv1.norm.weight res2.1.conv1.norm.bias res2.1.conv1.norm.running_mean res2.1.conv1.norm.running_var
res2.1.conv2.weight res2.1.conv2.norm.weight res2.1.conv2.norm.bias res2.1.conv2.norm.running_mean res2.1.conv2.norm.running_var
res2.1.conv3.weight res2.1.conv3.norm.weight res2.1.conv3.norm.bias res2.1.conv3.norm.running_mean res2.1.conv3.norm.running_var
res2.2.conv1.weight res2.2.conv1.norm.weight res2.2.conv1.norm.bias res2.2.conv1.norm.running_mean res2.2.conv1.norm.running_var
res2.2.conv2.weight res2.2.conv2.norm.weight res2.2.conv2.norm.bias res2.2.conv2.norm.running_mean res2.2.conv2.norm.running_var
res2.2.conv3.weight res2.2.conv3.norm.weight res2.2.conv3.norm.bias res2.2.conv3.norm.running_mean res2.2.conv3.norm.running_var
res3.0.shortcut.weight res3.0.shortcut.norm.weight res3.0.shortcut.norm.bias res3.0.shortcut.norm.running_mean res3.0.shortcut.norm.running_var
res3.0.conv1.weight res3.0.conv1.norm.weight res3.0.conv1.norm.bias res3.0.conv1.norm.running_mean res3.0.conv1.norm.running_var
res3.0.conv2.weight res3.0.conv2.norm.weight res3.0.conv2.norm.bias res3.0.conv2.norm.running_mean res3.0.conv2.norm.running_var
res3.0.conv3.weight res3.0.conv3.norm.weight res3.0.conv3.norm.bias res3.0.conv3.norm.running_mean res3.0.conv3.norm.running_var
res3.1.conv1.weight res3.1.conv1.norm.weight res3.1.conv1.norm.bias res3.1.conv1.norm.running_mean res3.1.conv1.norm.running_var
res3.1.conv2.weight res3.1.conv2.norm.weight res3.1.conv2.norm.bias res3.1.conv2.norm.running_mean res3.1.conv2.norm.running_var
res3.1.conv3.weight res3.1.conv3.norm.weight res3.1.conv3.norm.bias res3.1.conv3.norm.running_mean res3.1.conv3.norm.running_var
res3.2.conv1.weight res3.2.conv1.norm.weight res3.2.conv1.norm.bias res3.2.conv1.norm.running_mean res3.2.conv1.norm.running_var
res3.2.conv2.weight res3.2.conv2.norm.weight res3.2.conv2.norm.bias res3.2.conv2.norm.running_mean res3.2.conv2.norm.running_var
res3.2.conv3.weight res3.2.conv3.norm.weight res3.2.conv3.norm.bias res3.2.conv3.norm.running_mean res3.2.conv3.norm.running_var
res3.3.conv1.weight res3.3.conv1.norm.weight res3.3.conv1.norm.bias res3.3.conv1.norm.running_mean res3.3.conv1.norm.running_var
res3.3.conv2.weight res3.3.conv2.norm.weight res3.3.conv2.norm.bias res3.3.conv2.norm.running_mean res3.3.conv2.norm.running_var
res3.3.conv3.weight res3.3.conv3.norm.weight res3.3.conv3.norm.bias res3.3.conv3.norm.running_mean res3.3.conv3.norm.running_var
res4.0.shortcut.weight res4.0.shortcut.norm.weight res4.0.shortcut.norm.bias res4.0.shortcut.norm.running_mean res4.0.shortcut.norm.running_var
res4.0.conv1.weight res4.0.conv1.norm.weight res4.0.conv1.norm.bias res4.0.conv1.norm.running_mean res4.0.conv1.norm.running_var
res4.0.conv2.weight res4.0.conv2.norm.weight res4.0.conv2.norm.bias res4.0.conv2.norm.running_mean res4.0.conv2.norm.running_var
res4.0.conv3.weight res4.0.conv3.norm.weight res4.0.conv3.norm.bias res4.0.conv3.norm.running_mean res4.0.conv3.norm.running_var
res4.1.conv1.weight res4.1.conv1.norm.weight res4.1.conv1.norm.bias res4.1.conv1.norm.running_mean res4.1.conv1.norm.running_var
res4.1.conv2.weight res4.1.conv2.norm.weight res4.1.conv2.norm.bias res4.1.conv2.norm.running_mean res4.1.conv2.norm.running_var
res4.1.conv3.weight res4.1.conv3.norm.weight res4.1.conv3.norm.bias res4.1.conv3.norm.running_mean res4.1.conv3.norm.running_var
res4.2.conv1.weight res4.2.conv1.norm.weight res4.2.conv1.norm.bias res4.2.conv1.norm.running_mean res4.2.conv1.norm.running_var
res4.2.conv2.weight res4.2.conv2.norm.weight res4.2.conv2.norm.bias res4.2.conv2.norm.running_mean res4.2.conv2.norm.running_var
res4.2.conv3.weight res4.2.conv3.norm.weight res4.2.conv3.norm.bias res4.2.conv3.norm.running_mean res4.2.conv3.norm.running_var
res4.3.conv1.weight res4.3.conv1.norm.weight res4.3.conv1.norm.bias res4.3.conv1.norm.running_mean res4.3.conv1.norm.running_var
res4.3.conv2.weight res4.3.conv2.norm.weight res4.3.conv2.norm.bias res4.3.conv2.norm.running_mean res4.3.conv2.norm.running_var
res4.3.conv3.weight res4.3.conv3.norm.weight res4.3.conv3.norm.bias res4.3.conv3.norm.running_mean res4.3.conv3.norm.running_var
res4.4.conv1.weight res4.4.conv1.norm.weight res4.4.conv1.norm.bias res4.4.conv1.norm.running_mean res4.4.conv1.norm.running_var
res4.4.conv2.weight res4.4.conv2.norm.weight res4.4.conv2.norm.bias res4.4.conv2.norm.running_mean res4.4.conv2.norm.running_var
res4.4.conv3.weight res4.4.conv3.norm.weight res4.4.conv3.norm.bias res4.4.conv3.norm.running_mean res4.4.conv3.norm.running_var
res4.5.conv1.weight res4.5.conv1.norm.weight res4.5.conv1.norm.bias res4.5.conv1.norm.running_mean res4.5.conv1.norm.running_var
res4.5.conv2.weight res4.5.conv2.norm.weight res4.5.conv2.norm.bias res4.5.conv2.norm.running_mean res4.5.conv2.norm.running_var
res4.5.conv3.weight res4.5.conv3.norm.weight res4.5.conv3.norm.bias res4.5.conv3.norm.running_mean res4.5.conv3.norm.running_var
res5.0.shortcut.weight res5.0.shortcut.norm.weight res5.0.shortcut.norm.bias res5.0.shortcut.norm.running_mean res5.0.shortcut.norm.running_var
res5.0.conv1.weight res5.0.conv1.norm.weight res5.0.conv1.norm.bias res5.0.conv1.norm.running_mean res5.0.conv1.norm.running_var
res5.0.conv2.weight res5.0.conv2.norm.weight res5.0.conv2.norm.bias res5.0.conv2.norm.running_mean res5.0.conv2.norm.running_var
res5.0.conv3.weight res5.0.conv3.norm.weight res5.0.conv3.norm.bias res5.0.conv3.norm.running_mean res5.0.conv3.norm.running_var
res5.1.conv1.weight res5.1.conv1.norm.weight res5.1.conv1.norm.bias res5.1.conv1.norm.running_mean res5.1.conv1.norm.running_var
res5.1.conv2.weight res5.1.conv2.norm.weight res5.1.conv2.norm.bias res5.1.conv2.norm.running_mean res5.1.conv2.norm.running_var
res5.1.conv3.weight res5.1.conv3.norm.weight res5.1.conv3.norm.bias res5.1.conv3.norm.running_mean res5.1.conv3.norm.running_var
res5.2.conv1.weight res5.2.conv1.norm.weight res5.2.conv1.norm.bias res5.2.conv1.norm.running_mean res5.2.conv1.norm.running_var
res5.2.conv2.weight res5.2.conv2.norm.weight res5.2.conv2.norm.bias res5.2.conv2.norm.running_mean res5.2.conv2.norm.running_var
res5.2.conv3.weight res5.2.conv3.norm.weight res5.2.conv3.norm.bias res5.2.conv3.norm.running_mean res5.2.conv3.norm.running_var
""".split()


def test_detectron2_export_has_detectron2s_r50_names_and_the_weights(tmp_path, capsys):
    import pickle
    import numpy as np
    run, online, _, _ = make_run(tmp_path, "resnet50", own_target=False)
    r = export_backbone(tmp_path / "R-50.pkl", run=run, fmt="detectron2")
    assert r["safetensors"] is None and r["fc"].startswith("dropped")
    with open(r["pth"], "rb") as f:
        blob = pickle.load(f)                                           # plain pickle: numpy arrays, no torch
    assert blob["matching_heuristics"] is True and blob["__author__"].startswith("fastmveb resnet50")
    model = blob["model"]
    assert len(D2_R50_KEYS) == 265 and sorted(model) == sorted(D2_R50_KEYS)
    sd = online.state_dict()
    pairs = {"stem.conv1.weight": "conv1.weight", "stem.conv1.norm.running_var": "bn1.running_var",
             "res2.0.shortcut.weight": "layer1.0.downsample.0.weight", "res3.3.conv2.norm.bias": "layer2.3.bn2.bias",
             "res4.5.conv3.weight": "layer3.5.conv3.weight", "res5.0.shortcut.norm.weight": "layer4.0.downsample.1.weight",
             "res5.2.conv3.norm.running_mean": "layer4.2.bn3.running_mean"}
    for d2, tv in pairs.items():
        assert model[d2].dtype == np.float32 and np.array_equal(model[d2], sd[tv].numpy()), d2
    assert model["res5.2.conv3.weight"].shape == (2048, 512, 1, 1) and model["stem.conv1.weight"].shape == (64, 3, 7, 7)
    assert cli(["--run", str(run), "--format", "detectron2", "--out", str(tmp_path / "R-50.pth")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".pkl" in err[0]
    assert cli(["--run", str(run), "--format", "detectron2", "--out", str(r["pth"])]) == 2   # exists: --force
    assert "--force" in capsys.readouterr().err


def test_timm_export_loads_strictly_into_timm_with_equal_features(tmp_path):
    import timm
    run, online, _, _ = make_run(tmp_path, "resnet50", own_target=False)
    r = export_backbone(tmp_path / "rn50_timm.pth", run=run, fmt="timm")
    assert r["check"].startswith("loads strictly into timm")
    model = timm.create_model("resnet50", pretrained=False)
    model.load_state_dict(torch.load(r["pth"], weights_only=True), strict=True)
    model.reset_classifier(0)                                           # pooled 2048-d features
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(_features(model, x), _features(online, x), rtol=0, atol=0)
    from safetensors import safe_open
    with safe_open(str(r["safetensors"]), "pt") as f:
        assert f.metadata()["layout"] == "timm"
