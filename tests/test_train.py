"""The training spine end to end on real betons: a short run, exact resume after a kill, the NaN guard,
and two CPU processes (gloo)."""
import contextlib
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
from fastmveb.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "fastmveb" / "train.py")


def tiny_overrides(betons: Path, run_dir: Path, name: str, **extra) -> list[str]:
    """A ResNet-10 at 32 px: 160 images / batch 16 = 10 steps per epoch, deterministic, one FFCV thread."""
    o = {
        "data.train_beton": betons / "train.beton", "data.val_beton": betons / "val.beton",
        "data.global_batch_size": 16, "data.num_workers": 1, "data.decode_size": 48, "eval.size": 32,
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
    assert cfg.model.arch == "resnet10" and cfg.data.global_batch_size == 16
    meta = json.loads((d / "meta.json").read_text())
    assert meta["git"]
    plan = make_plan(cfg, 1, dataset_len=160, memory=False)            # the dry run's numbers are the run's
    assert {k: meta[k] for k in plan.meta()} == plan.meta()
    assert (meta["steps_per_epoch"], meta["total_steps"], meta["accum_steps"]) == (10, 20, 1)
    assert "global batch     16 per optimizer step" in r.stdout          # the plan is printed at the start
    assert any((d / "tb").iterdir())
    state = load_checkpoint(latest_checkpoint(d))
    assert state["step"] == 20 and state["epoch"] == 2 and state["batch_in_epoch"] == 0
    model = MVEBModel.from_config(cfg.model)
    model.load_state_dict(state["model"], strict=True)                 # unwrapped: no DDP / compile prefixes
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["model"])


@pytest.fixture(scope="module")
def reference_losses(small_betons, tmp_path_factory) -> dict[int, float]:
    """The losses of the uninterrupted tiny run (tiny_overrides: 2 epochs of 10 steps, 1 process)."""
    d = tmp_path_factory.mktemp("reference")
    full = run(tiny_overrides(small_betons, d, "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    reference = losses(d / "full")
    assert sorted(reference) == list(range(1, 21))
    return reference


def test_resume_after_kill_reproduces_the_uninterrupted_run(small_betons, tmp_path, reference_losses):
    reference = reference_losses

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


def signal_after(p: subprocess.Popen, metrics: Path, step: int, pid: int, first: int, again: int | None = None):
    """Once ``metrics`` has a row at ``step`` or later, send ``first`` to ``pid``; then (``again``) keep sending
    that signal every 20 ms until ``p`` exits: some of them land during the checkpoint save."""
    deadline = time.time() + 600
    while p.poll() is None and time.time() < deadline:
        if metrics.exists() and any(json.loads(ln)["step"] >= step for ln in metrics.read_text().splitlines()
                                    if ln.strip().endswith("}")):
            break
        time.sleep(0.05)
    assert p.poll() is None, "the run ended before the signal"
    os.kill(pid, first)
    while again and p.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, again)
        time.sleep(0.02)
    out, err = p.communicate(timeout=600)
    return p.returncode, out, err


def test_sigusr1_stops_at_a_step_with_a_checkpoint_and_the_rerun_is_exact(small_betons, tmp_path, reference_losses):
    # Preemption: SIGUSR1, then SIGTERM every 20 ms (some during the save): the run stops at
    # the next logging step, saves there and exits with status 75; the rerun ends bitwise on the reference.
    from fastmveb.elastic import PREEMPTED_EXIT
    args = tiny_overrides(small_betons, tmp_path, "pre")
    p = subprocess.Popen([sys.executable, TRAIN, "--rc", str(ROOT / "rcs/tiny.yaml"), *args], cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    rc, _, err = signal_after(p, tmp_path / "pre" / "metrics.jsonl", 3, p.pid, signal.SIGUSR1, signal.SIGTERM)
    assert rc == PREEMPTED_EXIT == 75, err[-3000:]
    assert "Traceback" not in err
    [line] = [ln for ln in err.splitlines() if ln.startswith("stopped by SIGUSR1")]
    step = int(line.split(" at step ")[1].split(":")[0])
    assert 3 <= step < 20 and "rerun the same command to resume" in line
    assert load_checkpoint(latest_checkpoint(tmp_path / "pre"))["step"] == step == max(losses(tmp_path / "pre"))
    resumed = run(args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "pre") == reference_losses                 # bitwise equal, every step


def test_nan_guard_skips_and_stops(small_betons, tmp_path):
    # Inject non-finite losses from step 5 on: steps are skipped (weights untouched) and the run stops
    # with one clear error line after optim.max_bad_steps consecutive bad steps, without saving NaN.
    script = f"""
import sys, torch
sys.path.insert(0, {str(ROOT)!r})
import fastmveb.step as S
import fastmveb.train as T
real, calls = S.mveb_loss, [0]
def poisoned(*a, **k):
    loss, stats = real(*a, **k)
    calls[0] += 1
    return (loss * float('nan') if calls[0] >= 5 else loss), stats
S.mveb_loss = poisoned
sys.exit(T.cli(sys.argv[1:]))
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
    # Two steps, then resumed for four more (2 gloo ranks; per-view BatchNorm synchronised over them), with the
    # kNN monitor split over both ranks at the end of epoch 1 (step 5) and after training. The global batch is
    # the recipe's: 32 over 2 processes = 16 each, run as 2 accumulated micro-batches of 8.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for steps in (2, 6):
        args = tiny_overrides(small_betons, tmp_path, "ddp", **{"train.max_steps": steps, "train.deterministic": "false",
                                                                "model.sync_bn": "true", "data.global_batch_size": 32,
                                                                "data.per_device_batch_size": 8,
                                                                "eval.knn_every_epochs": 1, "eval.knn_max_train": 60,
                                                                "eval.knn_max_val": 20,
                                                                "eval.knn_at_end": str(steps == 6).lower()})
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(29500 + os.getpid() % 1000), TRAIN, "--rc", str(ROOT / "rcs/tiny.yaml"), *args],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "meta.json").read_text())["resumed_from"].endswith("step_00000002.pt")
    d = tmp_path / "ddp"
    meta = json.loads((d / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["global_batch"] == 32 and meta["steps_per_epoch"] == 5
    assert meta["per_process_batch"] == 16 and meta["micro_batch"] == 8 and meta["accum_steps"] == 2
    assert meta["peak_lr"] == pytest.approx(load_config(ROOT / "rcs/tiny.yaml").optim.base_lr * 32 / 256)
    assert meta["total_steps"] == 2 * 5 and meta["warmup_steps"] == 5
    ls = losses(d)
    assert sorted(ls) == [1, 2, 3, 4, 5, 6]                             # one writer: no duplicated lines
    assert all(torch.isfinite(torch.tensor(list(ls.values()))))
    rows = [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "knn_top1" in r] == [5] and "final_knn_top1" in rows[-1]
    state = load_checkpoint(latest_checkpoint(d))
    assert state["step"] == 6 and len(state["rng"]) == 2
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
    # gradient accumulation: the no_sync micro-step leaves ranks apart, the last one averages the sum
    assert res["first_micro_step_unsynced"] and res["accum_max_rel_err"] < 1e-5


def test_compiled_step_runs(small_betons, tmp_path):
    # The compiled path (net, target and views under torch.compile) on the cheap aot_eager backend, at two batch
    # sizes: 160 images in batches of 48 without drop_last end the epoch with a batch of 16, which recompiles
    # with a dynamic batch size (it used to crash in the view maker).
    r = run(tiny_overrides(small_betons, tmp_path, "compiled", **{"train.compile": "true",
                                                                  "train.compile_backend": "aot_eager",
                                                                  "data.global_batch_size": 48, "data.drop_last": "false",
                                                                  "train.max_steps": 4}))
    assert r.returncode == 0, r.stderr[-3000:]
    ls = losses(tmp_path / "compiled")
    assert sorted(ls) == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(list(ls.values()))))
    assert json.loads((tmp_path / "compiled" / "meta.json").read_text())["compile"] is True


@pytest.mark.slow
def test_released_rn50_recipe_starts_under_accelerate_launch(small_betons, tmp_path):
    # rcs/rn50.yaml as released (ResNet-50, 2x224 + 6x96, bf16 autocast), only the data and budget swapped.
    args = [f"data.train_beton={small_betons / 'train.beton'}", f"data.val_beton={small_betons / 'val.beton'}",
            "data.global_batch_size=4", "data.per_device_batch_size=0", "data.num_workers=1", "train.max_steps=2",
            "train.log_every=1",
            "eval.knn_at_end=false", f"train.run_dir={tmp_path}", "train.name=rn50", "train.progress=false"]
    accelerate = Path(sys.executable).parent / "accelerate"
    r = subprocess.run([str(accelerate), "launch", "--cpu", "--num_processes", "1", "--mixed_precision", "no",
                        "--num_machines", "1", "--dynamo_backend", "no", TRAIN, "--rc", str(ROOT / "rcs/rn50.yaml"),
                        *args], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(losses(tmp_path / "rn50")) == [1, 2]
    assert load_config(tmp_path / "rn50" / "config.yaml").model.arch == "resnet50"


def _step_with_micro_batches(micro, train_bn: bool, poison_second: bool = False):
    """One train_step on a fixed 16-row batch with views that involve no randomness; returns the parameters,
    LARS momenta and BN buffers before and after, and the step's stats."""
    from fastmveb.bench.common import make_accelerator
    from fastmveb.build import build_training
    from fastmveb.step import step_parts, train_step
    cfg = load_config(ROOT / "rcs/tiny.yaml", ["model.proj_hidden=32", "model.proj_out=32", "loss.group=8",
                                               "views.n_local=2", "views.global_size=32", "views.local_size=16"])
    acc = make_accelerator(cfg, torch.device("cpu"))
    torch.manual_seed(0)
    t = build_training(cfg, acc, lr_peak=2.0)
    net, target, opt = t.net, t.target, t.optimizer
    net.train(train_bn)
    target.train(train_bn)
    x = torch.randint(0, 256, (16, 3, 40, 40), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    calls = []

    def views(xk, extent=None):          # two globals, two locals; a function of the rows only
        v = xk.float() / 255
        if poison_second and calls:
            v = v * float("nan")
        calls.append(len(xk))
        g = torch.nn.functional.interpolate(v, size=32, mode="bilinear")
        lo = torch.nn.functional.interpolate(v[..., 4:36, 4:36], size=16, mode="bilinear")
        return [g, g.flip(-1), lo, lo.flip(-2)]

    model = t.model
    before = [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
    stats, skip, _ = train_step(step_parts(t, acc, cfg, views, micro), x, torch.zeros(16, dtype=torch.long), 1.5,
                                torch.tensor(0.9))
    after = [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
    momenta = [opt.state[p]["momentum_buffer"].clone() for g in opt.param_groups for p in g["params"]
               if p in opt.state]
    ema = [t.detach().clone() for t in target.parameters()]
    return before, after, momenta, ema, stats, bool(skip), calls


def test_accumulated_micro_batches_equal_one_full_batch():
    # BN in eval mode (running statistics): then a micro-batch is normalised exactly as the full batch, and
    # 2 accumulated half-batches must give the full batch's gradient, so the same LARS update, momentum and EMA.
    b1, a1, m1, e1, s1, skip1, calls1 = _step_with_micro_batches(None, train_bn=False)
    b2, a2, m2, e2, s2, skip2, calls2 = _step_with_micro_batches(8, train_bn=False)
    assert calls1 == [16] and calls2 == [8, 8] and not skip1 and not skip2
    for x, y in zip(b1, b2):
        assert torch.equal(x, y)                                        # same initial weights
    moved = sum(float((a - b).abs().sum()) for a, b in zip(a1, b1))
    assert moved > 0
    for u, v, b in zip(a1, a2, b1):
        torch.testing.assert_close(v - b, u - b, rtol=1e-4, atol=1e-7)
    for u, v in zip(m1 + e1, m2 + e2):
        torch.testing.assert_close(v, u, rtol=1e-4, atol=1e-7)
    for k in ("loss", "align", "grad_norm"):
        assert float(s2[k]) == pytest.approx(float(s1[k]), rel=1e-5), k
    # In train mode BN normalises each micro-batch by its own statistics: a real (documented) difference.
    _, t1, *_ = _step_with_micro_batches(None, train_bn=True)
    _, t2, *_ = _step_with_micro_batches(8, train_bn=True)
    assert any(not torch.allclose(u, v, rtol=1e-4, atol=1e-7) for u, v in zip(t1, t2))


def test_a_non_finite_micro_step_skips_the_whole_step():
    before, after, momenta, _, stats, skip, calls = _step_with_micro_batches(8, train_bn=True, poison_second=True)
    assert calls == [8, 8] and skip and not torch.isfinite(stats["loss"])
    for b, a in zip(before, after):                                     # weights and BN buffers untouched
        assert torch.equal(b, a)
    assert all(torch.count_nonzero(m) == 0 for m in momenta)


def test_unlabeled_beton_trains_with_label_parts_off(unlabeled_betons, tmp_path):
    """dataset_prep folder's betons (label -1): the kNN monitor, online probe and learning check switch off in one
    line; uniformity and effective rank stay. (Stopped, resumed and on 2 processes: the test below.)"""
    extra = {"eval.knn_at_end": "true", "eval.knn_every_epochs": 1, "eval.online_linear": "true",
             "train.deterministic": "false", "train.max_steps": 2}
    r = run(tiny_overrides(unlabeled_betons, tmp_path, "unl", **extra))
    assert r.returncode == 0, r.stderr[-3000:]
    notes = [ln for ln in r.stdout.splitlines() if "has no labels" in ln]
    assert len(notes) == 1 and notes[0].startswith("note:"), r.stdout
    for part in ("kNN monitor", "online linear probe", "learning check", "uniformity, effective rank"):
        assert part in notes[0]
    rows = [json.loads(ln) for ln in (tmp_path / "unl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all("uniformity" in r and "erank" in r and not any("knn" in k or "probe" in k for k in r) for r in rows)
    assert load_checkpoint(latest_checkpoint(tmp_path / "unl"))["step"] == 2


def test_loader_that_disagrees_with_the_plan_is_one_error_line(small_betons, tmp_path, monkeypatch, capsys):
    # Was an `assert` (a traceback, and nothing at all under python -O): the plan counts the beton's samples,
    # the loader reads them; a beton rewritten in between makes them disagree.
    from accelerate.state import AcceleratorState
    from fastmveb import train
    monkeypatch.setattr(train, "dataset_length", lambda path: 320)     # the plan: 20 steps; the loader: 10
    AcceleratorState._reset_state(reset_partial_state=True)
    rc = train.cli(["--rc", str(ROOT / "rcs/tiny.yaml"), *tiny_overrides(small_betons, tmp_path, "drift")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "batches per epoch" in err[0], err
    assert not (tmp_path / "drift" / "checkpoints").exists()


def test_end_to_end_benchmark_reads_the_training_loader_of_the_config(small_betons, monkeypatch):
    # bench train built its own loader (drop_last hard-coded True, never distributed): it now makes the one call
    # training makes, so a config change reaches both. data.drop_last=false is visible in the loader it times.
    from fastmveb import data
    from fastmveb.bench.stage_train import measure_fastmveb
    seen, real = [], data.train_loader_from_config

    def spy(cfg, batch_size, device, distributed=False):
        loader = real(cfg, batch_size, device, distributed)
        seen.append((cfg.data.drop_last, loader.drop_last, len(loader)))
        return loader
    monkeypatch.setattr(data, "train_loader_from_config", spy)
    cfg = load_config(ROOT / "rcs/tiny.yaml", tiny_overrides(small_betons, Path("/nonexistent"), "b",
                                                             **{"data.global_batch_size": 48, "data.drop_last": "false"}))
    r = measure_fastmveb(cfg, torch.device("cpu"), warmup=1, steps=1, threads=1)
    assert seen == [(False, False, 4)] and r["samples_per_s"] > 0      # 160 samples / 48: 3 full + 1 partial


def test_unlabeled_beton_resumes_exactly_on_two_processes(unlabeled_betons, tmp_path):
    """A resumed and multi-process run on an unlabeled beton, both at once: 2 gloo ranks on
    dataset_prep folder's betons (label -1) stop at step 3 (train.max_steps, with a checkpoint there); the rerun
    with the budget of 6 steps resumes from it and ends on the uninterrupted 2-rank run's losses, bitwise. Every
    launch says once (rank 0) that the label parts are off."""
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(name: str, steps: int) -> None:
        args = tiny_overrides(unlabeled_betons, tmp_path, name, **{"train.max_steps": steps, "eval.knn_at_end": "true",
                                                                   "eval.knn_every_epochs": 1,
                                                                   "eval.online_linear": "true"})
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(30500 + os.getpid() % 1000), TRAIN, "--rc", str(ROOT / "rcs/tiny.yaml"), *args],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert r.returncode == 0, r.stderr[-3000:]
        notes = [ln for ln in r.stdout.splitlines() if "has no labels" in ln]
        assert len(notes) == 1 and notes[0].startswith("note:") and "kNN monitor" in notes[0], r.stdout[-3000:]

    torchrun("whole", 6)
    torchrun("cut", 3)
    assert load_checkpoint(latest_checkpoint(tmp_path / "cut"))["step"] == 3
    assert sorted(losses(tmp_path / "cut")) == [1, 2, 3]
    torchrun("cut", 6)
    meta = json.loads((tmp_path / "cut" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["resumed_from"].endswith("step_00000003.pt")
    whole = losses(tmp_path / "whole")
    assert sorted(whole) == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "cut") == whole                            # bitwise equal, every step
    rows = [json.loads(ln) for ln in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert all("erank" in r and not any("knn" in k or "probe" in k for k in r) for r in rows)
