"""Fault injection on training runs: a locked run directory, resume guards (changed trajectory, other data, older
versions), cut metrics and corrupt checkpoints, full disks, export refusals and non-finite updates.

Each test pins the fixed behaviour on real files (tiny images, ResNet-10, a few steps): a one-line `error: ...` and a
non-zero exit, or a documented recovery; never a traceback, a hang or a silently wrong result.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from commands import train_cli
from test_faults import one_line_error

ROOT = Path(__file__).resolve().parents[1]


def _train(betons, run_dir, name, *extra, timeout=600, **over):
    import os
    from test_train import ROOT as _R, TRAIN, tiny_overrides   # the shared tiny ResNet-10 settings
    args = tiny_overrides(betons, run_dir, name, **{"train.max_steps": 2, "train.ckpt_every_steps": 1,
                                                    "train.keep_last": 0, **over})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TRAIN, "--rc", str(_R / "rcs/tiny.yaml"), *args, *extra], cwd=_R, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _steps(run: Path) -> list[int]:
    import json
    return [json.loads(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


# Case 3: two trainings in one run directory both ran to exit 0, interleaving metrics and checkpoints.
def test_second_training_in_a_locked_run_dir_stops_and_the_lock_dies_with_kill_9(small_betons, tmp_path):
    import fcntl
    import os
    import signal
    import time
    from test_train import ROOT as _R, TRAIN, tiny_overrides
    args = tiny_overrides(small_betons, tmp_path, "busy", **{"optim.epochs": 50})
    first = subprocess.Popen([sys.executable, TRAIN, "--rc", str(_R / "rcs/tiny.yaml"), *args], cwd=_R,
                             env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        lock = tmp_path / "busy" / ".lock"
        deadline = time.time() + 300
        while not (tmp_path / "busy" / "metrics.jsonl").exists() and first.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert first.poll() is None, "the first run ended early"
        second = _train(small_betons, tmp_path, "busy")
        line = one_line_error(second)
        assert f"in use by another training (pid {first.pid})" in line and "train.name" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with open(lock) as f:                                 # kill -9 left no lock behind
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    from fastmveb.rundir import lock_run_dir
    lock_run_dir(tmp_path / "busy").close()


@pytest.fixture(scope="module")
def base_run(small_betons, tmp_path_factory):
    """A 2-step run with checkpoints at steps 1 and 2."""
    d = tmp_path_factory.mktemp("base")
    r = _train(small_betons, d, "run")
    assert r.returncode == 0, r.stderr[-3000:]
    return d / "run"


def _copy_run(base: Path, tmp_path: Path) -> Path:
    import shutil
    shutil.copytree(base, tmp_path / "run")
    return tmp_path / "run"


# Case 4: the batch 16 -> 32 on resume was silent (lr jump, wrong data position, config.yaml rewritten).
# Case 13: an architecture change on resume gave a traceback.
def test_resume_with_a_changed_trajectory_stops_in_one_line(small_betons, base_run, tmp_path):
    run = _copy_run(base_run, tmp_path)
    before = (run / "config.yaml").read_bytes()
    r = _train(small_betons, tmp_path, "run", **{"data.global_batch_size": 32, "model.arch": "resnet18",
                                                   "train.max_steps": 3})
    line = one_line_error(r)
    assert "data.global_batch_size 16 -> 32" in line and "model.arch 'resnet10' -> 'resnet18'" in line
    assert "train.name" in line and "train.allow_config_change=true" in line
    assert (run / "config.yaml").read_bytes() == before and _steps(run) == [1, 2]
    # the way out that keeps the weights: the arch still cannot load, in one line
    r = _train(small_betons, tmp_path, "run", **{"model.arch": "resnet18", "train.allow_config_change": "true"})
    line = one_line_error(r)
    assert "holds a different model" in line and "train.name" in line
    # a batch change under the override runs on from the checkpoint
    r = _train(small_betons, tmp_path, "run", **{"data.global_batch_size": 32, "train.allow_config_change": "true",
                                                   "train.max_steps": 3})
    assert r.returncode == 0, r.stderr[-3000:]
    assert _steps(run) == [1, 2, 3]


def _train_here(betons, run_dir, name, **over) -> subprocess.CompletedProcess:
    """_train in this process (a monkeypatched fastmveb applies), as a fresh process would run it."""
    from accelerate.state import AcceleratorState
    from test_train import tiny_overrides
    AcceleratorState._reset_state(reset_partial_state=True)
    return train_cli("--rc", ROOT / "rcs/tiny.yaml", *tiny_overrides(
        betons, run_dir, name, **{"train.max_steps": 2, "train.ckpt_every_steps": 1, "train.keep_last": 0, **over}))


def test_a_newer_version_with_an_added_key_resumes_a_run_written_without_it(small_betons, base_run, tmp_path,
                                                                            monkeypatch):
    """Every existing run stopped at its next resume after an upgrade that added a key (`views.erase_p None -> 0.0;
    these change the training trajectory`), though the key's default keeps the old behaviour."""
    from fastmveb import config
    from newer_config import NewerConfig
    run = _copy_run(base_run, tmp_path)
    monkeypatch.setattr(config, "Config", NewerConfig)
    r = _train_here(small_betons, tmp_path, "run", **{"train.max_steps": 3})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resume           step_00000002.pt: step 2" in r.stdout and "changed keys" not in r.stdout
    assert _steps(run) == [1, 2, 3]
    # set away from its default, it is a change (the checkpoint written by the newer version records it)
    r = _train_here(small_betons, tmp_path, "run", **{"train.max_steps": 4, "views.erase_p": 0.5})
    assert "views.erase_p 0.0 -> 0.5; these change the training trajectory" in one_line_error(r)


def _betons_copy(betons: Path, to: Path) -> Path:
    """train/val betons with their integrity records, copied (times kept) to a folder of their own."""
    import shutil
    to.mkdir()
    for name in ("train.beton", "val.beton"):
        for f in (name, name + ".sha256.json"):
            shutil.copy2(betons / f, to / f)
    return to


def test_resume_on_other_train_data_at_the_same_path_stops_in_one_line(small_betons, tmp_path):
    """A beton replaced at the same path was resumed as if it were the old one: a bigger one silently (the plan grew,
    the lr jumped, the position meant another sample), a smaller one with a `ValueError: skip_samples=64 exceeds`
    traceback. The checkpoint records the data's identity; a resume on other data stops in one line naming both."""
    live = _betons_copy(small_betons, tmp_path / "data_live")
    r = _train(live, tmp_path, "run", **{"train.max_steps": 4})
    assert r.returncode == 0, r.stderr[-3000:]
    run = tmp_path / "run"
    before = (run / "config.yaml").read_bytes()
    for f in ("train.beton", "train.beton.sha256.json"):             # the 40-image val set in train's place
        (live / f).write_bytes((live / f.replace("train", "val")).read_bytes())
    r = _train(live, tmp_path, "run", **{"train.max_steps": 6})
    line = one_line_error(r)
    assert "on other train data: " in line and "train.beton (160 samples" in line and "(40 samples" in line, line
    assert "sha256 " in line and "train.allow_config_change=true" in line and "train.name" in line
    assert (run / "config.yaml").read_bytes() == before and _steps(run) == [1, 2, 3, 4]
    # continuing these weights on the new data, asked for: said in the start-up lines; the old position (sample 64)
    # is past the new data's 40 samples, so the next epoch starts
    r = _train(live, tmp_path, "run", **{"train.max_steps": 6, "train.allow_config_change": "true",
                                         "data.global_batch_size": 8})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "train data changed: " in r.stdout and "steps per epoch 10 -> 5" in r.stdout, r.stdout
    assert "sample 64 of epoch 0, is past the 40 samples" in r.stdout and _steps(run) == [1, 2, 3, 4, 5, 6]


def test_the_same_train_data_at_another_path_resumes(small_betons, base_run, tmp_path):
    """A run's beton moved (a copy on a node's local disk): the identity matches, so the changed path is no change."""
    run = _copy_run(base_run, tmp_path)
    moved = _betons_copy(small_betons, tmp_path / "moved")
    r = _train(moved, tmp_path, "run", **{"train.max_steps": 3})
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"data.train_beton '{small_betons / 'train.beton'}' -> '{moved / 'train.beton'}'" in r.stdout
    assert _steps(run) == [1, 2, 3]


def test_a_run_written_by_an_earlier_version_resumes(small_betons, tmp_path, monkeypatch):
    """A run directory written by fastmveb 5fffe3c (tests/fixtures/run_5fffe3c/README.md) resumes under this version,
    with its own resolved config as the rc: every later version must keep resuming it. It records no identity of
    its data, which one note line says; the checkpoints written from there on record it."""
    import shutil
    import torch
    from accelerate.state import AcceleratorState
    from fastmveb.checkpoint import load_checkpoint
    run = tmp_path / "runs" / "v1"
    shutil.copytree(ROOT / "tests" / "fixtures" / "run_5fffe3c", run)
    (tmp_path / "data").symlink_to(small_betons)                       # the betons it trained on (same bytes)
    ck = run / "checkpoints" / "step_00000002.pt"
    state = load_checkpoint(ck)                                         # the fixture's tensors are stride-0 views
    full = {k: ({n: t.contiguous() for n, t in v.items()} if k in ("model", "target") else v) for k, v in state.items()}
    full["optimizer"]["state"] = {i: {n: t.contiguous() for n, t in st.items()}
                                  for i, st in state["optimizer"]["state"].items()}
    torch.save(full, ck)
    monkeypatch.chdir(tmp_path)
    AcceleratorState._reset_state(reset_partial_state=True)
    r = train_cli("--rc", "runs/v1/config.yaml", "train.max_steps=3")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resume           step_00000002.pt: step 2, epoch 0, sample 32 of the epoch's 160" in r.stdout, r.stdout
    assert "the checkpoint records no identity of its data" in r.stdout and "changed keys" not in r.stdout
    assert _steps(run) == [1, 2, 3]
    assert load_checkpoint(run / "checkpoints" / "step_00000003.pt")["data"]["train"]["num_samples"] == 160


# Cases 9 and 10: a cut last metrics line broke every resume; a corrupt newest checkpoint gave a traceback;
# temp files of killed saves (55-61 MB each here) stayed forever. Harmless keys may change on resume.
def test_resume_survives_cut_metrics_corrupt_checkpoint_and_temp_files(small_betons, base_run, tmp_path):
    run = _copy_run(base_run, tmp_path)
    ck = run / "checkpoints"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "epoch": 0.3, "lo')                     # a write cut by a kill
    newest = ck / "step_00000002.pt"
    newest.write_bytes(newest.read_bytes()[:100_000])                   # damaged on storage
    stale = ck / ".step_00000003.pt.999999.tmp"
    stale.write_bytes(b"\0" * 1000)
    r = _train(small_betons, tmp_path, "run", **{"train.max_steps": 3, "train.log_every": 1, "train.keep_last": 0,
                                                   "train.progress": "false", "eval.knn_k": 5})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert f"checkpoint {newest} is unreadable" in r.stderr
    assert "dropped 1 incomplete line" in r.stderr
    assert not stale.exists()
    assert _steps(run) == [1, 2, 3]                                     # resumed from step 1: steps 2 and 3 again
    from fastmveb.checkpoint import load_checkpoint
    assert load_checkpoint(ck / "step_00000003.pt")["step"] == 3


def test_metrics_monitors_return_nan_not_raise():
    import torch
    from fastmveb.metrics import effective_rank, uniformity
    z = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    assert torch.isfinite(effective_rank(z)) and torch.isfinite(uniformity(z))
    z[3, 2] = float("nan")
    assert torch.isnan(effective_rank(z)) and torch.isnan(uniformity(z))
    z[3, 2] = float("inf")
    assert torch.isnan(effective_rank(z)) and torch.isnan(uniformity(z))


# Case 13: a full disk during a checkpoint save gave a traceback.
def test_disk_full_during_a_checkpoint_save_is_one_line(small_betons, tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {r.stderr.strip()}")
    try:
        r = _train(small_betons, mnt, "full")
        line = one_line_error(r)
        assert "cannot write checkpoint" in line and "step_00000001.pt" in line and "no space left" in line
        assert "MiB free" in line and "needs about" in line
        assert list((mnt / "full" / "checkpoints").iterdir()) == []     # no partial file left
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ---------------------------------------------------------------------------------------------- export
class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


# Case 12: export silently overwrote an existing .pth and its .safetensors sibling.
def test_export_refuses_to_overwrite_without_force(tmp_path, capsys):
    import torch
    from fastmveb.export import cli as main
    from test_export import make_run
    run, *_ = make_run(tmp_path, "resnet10", own_target=False)
    out = tmp_path / "bb.pth"
    assert main(["--run", str(run), "--out", str(out)]) == 0
    pth, st = out.read_bytes(), out.with_suffix(".safetensors").read_bytes()
    capsys.readouterr()
    out.with_suffix(".safetensors").unlink()
    out.with_suffix(".safetensors").write_bytes(st)
    for existing in (out, out.with_suffix(".safetensors")):
        keep = existing.read_bytes()
        other = out.with_suffix(".safetensors") if existing == out else out
        other.rename(tmp_path / "aside")
        assert main(["--run", str(run), "--out", str(out), "--fc", "zero"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "exists; pass --force" in err[0] and existing.name in err[0]
        assert existing.read_bytes() == keep and not other.exists()
        (tmp_path / "aside").rename(other)
    assert main(["--run", str(run), "--out", str(out), "--force"]) == 0
    assert torch.load(out, weights_only=True).keys() == torch.load(tmp_path / "bb.pth", weights_only=True).keys()
    assert pth and st


# Case 13: export to a directory or an unwritable path, an unpicklable or malicious linear head: tracebacks.
def test_export_bad_outputs_and_bad_heads_are_one_line(tmp_path, capsys):
    import pickle

    from fastmveb.export import cli as main
    from test_export import make_run
    run, *_ = make_run(tmp_path, "resnet10", own_target=False)
    (tmp_path / "adir.pth").mkdir()
    cases = [([f"--out={tmp_path / 'adir.pth'}"], "is a directory"),
             (["--out=/sys/fastmveb_export.pth"], "cannot write")]
    for extra, what in cases:
        assert main(["--run", str(run), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and what in err[0], err
    marker = tmp_path / "pwned"
    import torch
    head = run / "linear_head.pt"
    for content, what in (({"weight": _Evil(str(marker)), "ckpt": "step_00000007.pt"}, "not loaded (unsafe to unpickle)"),
                          (pickle.dumps(_Evil(str(marker))), "is unreadable"),
                          (b"\x80\x04garbage", "is unreadable"),
                          ({"weight": "not a tensor"}, "is not a linear head")):
        if isinstance(content, bytes):
            head.write_bytes(content)
        else:
            torch.save(content, head)
        assert main(["--run", str(run), "--out", str(tmp_path / "h.pth")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0] and "weights_only=False" not in err[0], err
        assert not marker.exists()                                       # nothing in the pickle ran
        assert not (tmp_path / "h.pth").exists()


# ---------------------------------------------------------------------------------------------- NaN guard
# Case 7: base_lr=1.0e+9 stepped the weights to inf/NaN from finite gradients; the skip did not catch it.
def test_lars_skips_an_update_that_would_not_be_finite():
    import torch
    from fastmveb.optim import LARS
    w = torch.nn.Parameter(torch.full((4, 4), 3e38))
    b = torch.nn.Parameter(torch.ones(4))
    opt = LARS([{"params": [w], "lars_exclude": True}, {"params": [b], "lars_exclude": True}], lr=1.0, momentum=0.0)
    w.grad, b.grad = torch.full((4, 4), -3e38), torch.ones(4)             # finite gradients, w - lr*g overflows
    before = (w.detach().clone(), b.detach().clone())
    opt.step(skip=torch.tensor(False))
    assert bool(opt.skipped) and torch.equal(w, before[0]) and torch.equal(b, before[1])   # all groups held back
    w.grad = torch.ones(4, 4)
    opt.step(skip=torch.tensor(False))
    assert not bool(opt.skipped) and torch.isfinite(w).all() and not torch.equal(b, before[1])


def test_huge_lr_is_stopped_by_the_guard_with_finite_weights(small_betons, tmp_path):
    import torch
    from fastmveb.checkpoint import latest_checkpoint, load_checkpoint
    r = _train(small_betons, tmp_path, "lr", **{"optim.base_lr": "1.0e+9", "optim.warmup_epochs": 0,
                                                  "optim.max_bad_steps": 2, "train.max_steps": 12})
    line = one_line_error(r)
    assert "consecutive non-finite steps" in line and r.returncode == 1
    assert "not saving" not in r.stderr                                  # never a non-finite state to refuse
    state = load_checkpoint(latest_checkpoint(tmp_path / "lr"))
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
