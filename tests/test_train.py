"""The training spine end to end on real betons: a short run, exact resume after a kill, the NaN guard,
and two CPU processes (gloo)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from fastmveb.checkpoint import latest_checkpoint, load_checkpoint
from fastmveb.config import load_config
from fastmveb.model import MVEBModel

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "fastmveb" / "train.py")


def tiny_overrides(betons: Path, run_dir: Path, name: str, **extra) -> list[str]:
    """A ResNet-10 at 32 px: 160 images / batch 16 = 10 steps per epoch, deterministic, one FFCV thread."""
    o = {
        "data.train_beton": betons / "train.beton", "data.val_beton": betons / "val.beton",
        "data.batch_size": 16, "data.num_workers": 1, "data.decode_size": 48, "data.eval_size": 32,
        "data.eval_batch_size": 64, "views.global_size": 32, "views.n_local": 2, "views.local_size": 16,
        "model.arch": "resnet10", "model.proj_hidden": 64, "model.proj_out": 64, "loss.group": "local",
        "optim.epochs": 2, "optim.warmup_epochs": 1, "train.mixed_precision": "no", "train.compile": "false",
        "train.progress": "false", "train.log_every": 1, "train.deterministic": "true", "eval.knn_at_end": "false",
        "eval.knn_k": 10, "train.run_dir": run_dir, "train.name": name,
    }
    o.update(extra)
    return [f"{k}={v}" for k, v in o.items()]


def run(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, TRAIN, "--rc", str(ROOT / "rcs/tiny.yaml"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900, **kw)


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_short_run_end_to_end(small_betons, tmp_path):
    r = run(tiny_overrides(small_betons, tmp_path, "e2e", **{"eval.knn_at_end": "true", "train.log_every": 5}))
    assert r.returncode == 0, r.stderr[-3000:]
    d = tmp_path / "e2e"
    ls = losses(d)
    assert sorted(ls) == [5, 10, 15, 20] and all(torch.isfinite(torch.tensor(list(ls.values()))))
    rows = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    for key in ("align", "entropy", "tau", "lr", "ema_momentum", "grad_norm", "uniformity", "erank", "samples_per_s"):
        assert key in rows[0], key
    final = rows[-1]
    assert 0 <= final["final_knn_top1"] <= 100 and 0 <= final["random_knn_top1"] <= 100
    assert "kNN top-1" in r.stdout and "random init" in r.stdout
    cfg = load_config(d / "config.yaml")
    assert cfg.model.arch == "resnet10" and cfg.data.batch_size == 16
    assert json.loads((d / "meta.json").read_text())["git"]
    assert any((d / "tb").iterdir())
    state = load_checkpoint(latest_checkpoint(d))
    assert state["step"] == 20 and state["epoch"] == 2 and state["batch_in_epoch"] == 0
    model = MVEBModel.from_config(cfg.model)
    model.load_state_dict(state["model"], strict=True)                 # unwrapped: no DDP / compile prefixes
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])


def test_resume_after_kill_reproduces_the_uninterrupted_run(small_betons, tmp_path):
    full = run(tiny_overrides(small_betons, tmp_path, "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    reference = losses(tmp_path / "full")
    assert sorted(reference) == list(range(1, 21))

    # Same run, checkpoints every 3 steps (mid-epoch: an epoch is 10 steps), killed with SIGKILL.
    args = tiny_overrides(small_betons, tmp_path, "killed", **{"train.ckpt_every_steps": 3})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, TRAIN, "--rc", str(ROOT / "rcs/tiny.yaml"), *args], cwd=ROOT, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckdir = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 600
    while not (ckdir / "step_00000006.pt").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    state = load_checkpoint(latest_checkpoint(tmp_path / "killed"))
    assert state["step"] < 20, "the run finished before it could be killed"
    assert state["batch_in_epoch"] != 0 or state["step"] % 10 != 0

    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    got = losses(tmp_path / "killed")
    assert got == reference                                             # bitwise equal, every step


def test_nan_guard_skips_and_stops(small_betons, tmp_path):
    # Inject non-finite losses from step 5 on: steps are skipped (weights untouched) and the run stops
    # with one clear error line after optim.max_bad_steps consecutive bad steps, without saving NaN.
    script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import fastmveb.train as T
real, calls = T.mveb_loss, [0]
def poisoned(*a, **k):
    loss, stats = real(*a, **k)
    calls[0] += 1
    return (loss * float('nan') if calls[0] >= 5 else loss), stats
T.mveb_loss = poisoned
sys.exit(T.main(sys.argv[1:]))
"""
    args = tiny_overrides(small_betons, tmp_path, "nan", **{"optim.max_bad_steps": 3, "train.ckpt_every_steps": 1})
    r = subprocess.run([sys.executable, "-c", script, "--rc", str(ROOT / "rcs/tiny.yaml"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 1, r.stderr[-3000:]
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "3 consecutive non-finite steps" in err[0]
    ck = tmp_path / "nan" / "checkpoints"
    s4 = load_checkpoint(ck / "step_00000004.pt")
    s6 = load_checkpoint(ck / "step_00000006.pt")
    for k, v in s4["model"].items():
        assert torch.equal(v, s6["model"][k]), k                         # skipped steps moved nothing
        assert torch.equal(s4["target"][k], s6["target"][k]), k
    assert not (ck / "step_00000008.pt").exists()
    rows = [json.loads(ln) for ln in (tmp_path / "nan" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows][:7] == [0, 0, 0, 0, 1, 1, 1]


def test_two_cpu_processes(small_betons, tmp_path):
    # Two steps, then resumed for two more (2 gloo ranks; per-view BatchNorm synchronised over them).
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for steps in (2, 4):
        args = tiny_overrides(small_betons, tmp_path, "ddp", **{"train.max_steps": steps, "train.deterministic": "false",
                                                                "model.sync_bn": "true"})
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(29500 + os.getpid() % 1000), TRAIN, "--rc", str(ROOT / "rcs/tiny.yaml"), *args],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "meta.json").read_text())["resumed_from"].endswith("step_00000002.pt")
    d = tmp_path / "ddp"
    meta = json.loads((d / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["global_batch"] == 32 and meta["steps_per_epoch"] == 5
    ls = losses(d)
    assert sorted(ls) == [1, 2, 3, 4]                                   # one writer: no duplicated lines
    assert all(torch.isfinite(torch.tensor(list(ls.values()))))
    state = load_checkpoint(latest_checkpoint(d))
    assert state["step"] == 4 and len(state["rng"]) == 2
    assert not any("SyncBatchNorm" in k for k in state["model"])


def test_ddp_averages_gradients(tmp_path):
    out = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(30500 + os.getpid() % 1000), str(ROOT / "tests" / "ddp_grad_worker.py"), str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2
    a, b = res["local_grad_sums"]
    assert abs(a - b) > 1e-6 * max(abs(a), abs(b))                      # the ranks really saw different data
    assert res["max_rel_err"] < 1e-5


def test_compiled_step_runs(small_betons, tmp_path):
    # The compiled path (net, target and views under torch.compile) on the cheap aot_eager backend.
    r = run(tiny_overrides(small_betons, tmp_path, "compiled", **{"train.compile": "true",
                                                                  "train.compile_backend": "aot_eager",
                                                                  "train.max_steps": 2}))
    assert r.returncode == 0, r.stderr[-3000:]
    ls = losses(tmp_path / "compiled")
    assert sorted(ls) == [1, 2] and all(torch.isfinite(torch.tensor(list(ls.values()))))
    assert json.loads((tmp_path / "compiled" / "meta.json").read_text())["compile"] is True


@pytest.mark.slow
def test_released_rn50_recipe_starts_under_accelerate_launch(small_betons, tmp_path):
    # rcs/rn50.yaml as released (ResNet-50, 2x224 + 6x96, bf16 autocast), only the data and budget swapped.
    args = [f"data.train_beton={small_betons / 'train.beton'}", f"data.val_beton={small_betons / 'val.beton'}",
            "data.batch_size=4", "data.num_workers=1", "train.max_steps=2", "train.log_every=1",
            "eval.knn_at_end=false", f"train.run_dir={tmp_path}", "train.name=rn50", "train.progress=false"]
    accelerate = Path(sys.executable).parent / "accelerate"
    r = subprocess.run([str(accelerate), "launch", "--cpu", "--num_processes", "1", "--mixed_precision", "no",
                        "--num_machines", "1", "--dynamo_backend", "no", TRAIN, "--rc", str(ROOT / "rcs/rn50.yaml"),
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(losses(tmp_path / "rn50")) == [1, 2]
    assert load_config(tmp_path / "rn50" / "config.yaml").model.arch == "resnet50"
