"""Resuming on another number of processes, or under a changed global batch: the position in the epoch is a
count of samples, so the run continues at the same sample. Runs the real trainer on 1 and 2 gloo
ranks over a beton whose labels are the sample indices (tests/trace_worker.py records what each step read)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fastmveb.config import load_config
from fastmveb.plan import make_plan
from test_train import ROOT, losses, tiny_overrides

WORKER = str(ROOT / "tests" / "trace_worker.py")
N = 96                     # samples; global batch 16 -> 6 steps per epoch on 1 or 2 processes


@pytest.fixture(scope="module")
def indexed_beton(tmp_path_factory) -> Path:
    """N small random JPEGs whose label is their index in the beton (written in order, not shuffled)."""
    from PIL import Image
    from dataset_prep.options import BetonOptions
    from dataset_prep.writer import write_beton
    d = tmp_path_factory.mktemp("indexed")
    rng = np.random.default_rng(0)
    samples = []
    for i in range(N):
        path = d / f"{i:03d}.jpg"
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(path, quality=90)
        samples.append((str(path), i))
    write_beton(samples, d / "train.beton", BetonOptions(shuffle=False, num_workers=1, progress=False),
                max_pixels=24 * 32)
    shutil.copy(d / "train.beton", d / "val.beton")                   # (knn is off; the trainer checks it exists)
    shutil.copy(d / "train.beton.sha256.json", d / "val.beton.sha256.json")
    return d


def train(betons: Path, run_dir: Path, trace: Path, procs: int, **over) -> subprocess.CompletedProcess:
    args = tiny_overrides(betons, run_dir, "run", **{"train.ckpt_every_steps": 1, "train.keep_last": 0,
                                                       "train.deterministic": "false", **over})
    trace.mkdir(exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", TRACE_DIR=str(trace))
    launch = [sys.executable, WORKER] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
        str(29700 + os.getpid() % 500), WORKER]
    r = subprocess.run([*launch, "--rc", str(ROOT / "rcs/tiny.yaml"), *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def steps_read(trace: Path) -> list[dict]:
    """Per optimizer step (in order): the samples all ranks read and the lr, from the trace files."""
    ranks = [[json.loads(ln) for ln in p.read_text().splitlines()] for p in sorted(trace.glob("rank*.jsonl"))]
    assert len({len(r) for r in ranks}) == 1                            # every rank took every step
    steps = [{"y": sorted(i for r in ranks for i in r[k]["y"]), "lr": {r[k]["lr"] for r in ranks}}
             for k in range(len(ranks[0]))]
    assert all(len(s["lr"]) == 1 for s in steps)
    return [dict(s, lr=s["lr"].pop()) for s in steps]


@pytest.fixture(scope="module")
def world_changes(indexed_beton, tmp_path_factory):
    """One run: steps 1-2 on 2 processes, 3-4 on 1, 5-6 (the end of epoch 0) on 2 again."""
    d = tmp_path_factory.mktemp("elastic")
    out = {}
    for part, (procs, steps) in enumerate([(2, 2), (1, 4), (2, 6)]):
        trace = d / f"trace{part}"
        r = train(indexed_beton, d, trace, procs, **{"train.max_steps": steps})
        out[part] = (r, steps_read(trace))
        if part == 1:
            shutil.copytree(d / "run", d / "after_step_4")                 # for the changed-batch test
    return d, out


def test_resume_on_fewer_and_more_processes_reads_each_sample_once(indexed_beton, world_changes):
    d, out = world_changes
    steps = [s for part in (0, 1, 2) for s in out[part][1]]
    assert [len(s["y"]) for s in steps] == [16] * 6                     # the global batch never changed
    read = [i for s in steps for i in s["y"]]
    assert sorted(read) == list(range(N))                               # epoch 0: every sample exactly once
    plan = make_plan(load_config(d / "run" / "config.yaml"), 2, dataset_len=N, memory=False)
    assert [s["lr"] for s in steps] == [plan.lr(k) for k in range(6)]   # the same lr at the same step
    assert sorted(losses(d / "run")) == [1, 2, 3, 4, 5, 6]
    meta = json.loads((d / "run" / "meta.json").read_text())
    assert meta["world_size"] == 2 and meta["global_batch"] == 16 and meta["per_process_batch"] == 8
    for part, (old, new) in ((1, (2, 1)), (2, (1, 2))):
        stdout = out[part][0].stdout
        assert f"processes {old} -> {new}: per process {16 // old} -> {16 // new} samples" in stdout
        assert "schedule unchanged: global batch 16, 12 steps" in stdout
        assert "the views' random streams restart here" in stdout
        assert f"step {2 * part}, epoch 0, sample {32 * part} of the epoch's 96" in stdout


def test_changed_global_batch_resumes_at_the_same_sample(indexed_beton, world_changes, tmp_path):
    # The case: data.global_batch_size 16 -> 32 under train.allow_config_change=true used to resume at
    # the old batch INDEX (samples skipped) and print nothing. Here: after step 4 (64 samples, 1 process).
    d, out = world_changes
    shutil.copytree(d / "after_step_4", tmp_path / "run")
    trace = tmp_path / "trace"
    r = train(indexed_beton, tmp_path, trace, 1, **{"data.global_batch_size": 32, "train.allow_config_change": "true",
                                                      "train.max_steps": 5})
    before = [i for part in (0, 1) for s in out[part][1] for i in s["y"]]
    after = steps_read(trace)
    assert [len(s["y"]) for s in after] == [32]                         # the rest of epoch 0, one batch of 32
    assert sorted(before + after[0]["y"]) == list(range(N))             # none twice, none skipped
    assert "changed keys: data.global_batch_size 16 -> 32" in r.stdout
    old = make_plan(load_config(d / "run" / "config.yaml"), 2, dataset_len=N, memory=False)
    new = make_plan(load_config(tmp_path / "run" / "config.yaml"), 1, dataset_len=N, memory=False)
    assert (old.total_steps, new.total_steps, new.steps_per_epoch) == (12, 6, 3)
    assert (f"schedule: global batch 16 -> 32, steps per epoch 6 -> 3, total steps 12 -> 6, warm-up steps 6 -> 3, "
            f"lr at step 4 {old.lr(4):.4g} -> {new.lr(4):.4g}") in r.stdout
    assert after[0]["lr"] == new.lr(4)
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------------------- preemption, a lost rank
def _torchrun(betons: Path, run_dir: Path, logs: Path | None = None, restarts: int = 0, c10d: bool = False,
              **over) -> subprocess.Popen:
    args = tiny_overrides(betons, run_dir, "run", **{"data.global_batch_size": 16, "train.deterministic": "false",
                                                       **over})
    redirect = ["--log-dir", str(logs), "--redirects", "3"] if logs else []
    redirect += ["--max-restarts", str(restarts)] if restarts else []
    port = str(29200 + os.getpid() % 500)
    redirect += ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "test"] if c10d else []
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             *([] if c10d else ["--master_port", port]), *redirect, str(ROOT / "fastmveb" / "train.py"), "--rc",
                             str(ROOT / "rcs/tiny.yaml"), *args], cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rank_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the worker process torchrun started for ``rank``."""
    for child in Path("/proc").iterdir():
        try:
            if not child.name.isdigit() or int((child / "stat").read_text().rsplit(")", 1)[1].split()[1]) != launcher.pid:
                continue
            if f"RANK={rank}".encode() in (child / "environ").read_bytes().split(b"\0"):
                return int(child.name)
        except OSError:
            continue
    raise AssertionError(f"no rank {rank} under torchrun pid {launcher.pid}")


def _wait_for_step(p: subprocess.Popen, metrics: Path, step: int) -> None:
    deadline = time.time() + 600
    while p.poll() is None and time.time() < deadline:
        if metrics.exists() and any(json.loads(ln)["step"] >= step for ln in metrics.read_text().splitlines()
                                    if ln.strip().endswith("}")):
            return
        time.sleep(0.05)
    raise AssertionError("the run ended or stalled before the signal")


def test_a_killed_rank_ends_the_other_within_the_collective_timeout(indexed_beton, tmp_path):
    # kill -9 of rank 1: rank 0 must not hang nor print a traceback; it ends within train.collective_timeout_s
    # (plus a margin for torchrun's own shutdown) with one line naming what failed.
    timeout = 30
    logs = tmp_path / "logs"
    p = _torchrun(indexed_beton, tmp_path, logs, **{"train.max_steps": 1000, "optim.epochs": 200,
                                                     "train.collective_timeout_s": timeout})
    _wait_for_step(p, tmp_path / "run" / "metrics.jsonl", 2)
    os.kill(_rank_pid(p, 1), signal.SIGKILL)
    t0 = time.time()
    p.communicate(timeout=600)
    seconds = time.time() - t0
    print(f"survivor ended {seconds:.1f} s after kill -9 of its peer")
    assert p.returncode != 0 and seconds < timeout + 15
    [err0] = logs.glob("*/attempt_0/0/stderr.log")
    text = err0.read_text()
    assert "Traceback" not in text, text[-3000:]
    lines = [ln for ln in text.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "rank 0 of 2: a collective failed, another process died or hung" in lines[0], text[-3000:]


TWO_PROC = {"train.max_steps": 8, "train.ckpt_every_steps": 1, "train.keep_last": 2}


@pytest.fixture(scope="module")
def two_process_reference(indexed_beton, tmp_path_factory) -> dict[int, float]:
    """The losses of an uninterrupted run of 2 processes on one node (torchrun --nproc_per_node 2)."""
    d = tmp_path_factory.mktemp("two_proc")
    p = _torchrun(indexed_beton, d, **TWO_PROC)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return losses(d / "run")


def test_sigterm_on_one_of_two_ranks_stops_both_at_one_step(indexed_beton, tmp_path, two_process_reference):
    # SIGTERM to rank 1 only: both ranks agree at the next logging step, rank 0 writes the checkpoint there
    # (every rank's RNG in it) and both exit with status 75; the rerun ends bitwise on the uninterrupted run.
    from fastmveb.checkpoint import latest_checkpoint, load_checkpoint
    p = _torchrun(indexed_beton, tmp_path, **TWO_PROC)
    _wait_for_step(p, tmp_path / "run" / "metrics.jsonl", 2)
    os.kill(_rank_pid(p, 1), signal.SIGTERM)
    _, err = p.communicate(timeout=600)
    assert p.returncode != 0
    [line] = [ln for ln in err.splitlines() if "stopped by SIGTERM at step" in ln]
    step = int(line.split(" at step ")[1].split(":")[0])
    assert "exitcode  : 75" in err                                     # torchrun's report of the workers
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert state["step"] == step == max(losses(tmp_path / "run")) and len(state["rng"]) == 2
    p = _torchrun(indexed_beton, tmp_path, **TWO_PROC)
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    assert losses(tmp_path / "run") == two_process_reference             # every step, bitwise


def test_two_nodes_of_one_process_are_one_group(indexed_beton, tmp_path, two_process_reference):
    # Two torchrun launchers on this machine as nodes 0 and 1 (one process each) sharing one run directory:
    # one group, the losses of 2 processes on one node, every file written once (by global rank 0).
    port = str(29100 + os.getpid() % 500)
    args = tiny_overrides(indexed_beton, tmp_path, "run", **{"data.global_batch_size": 16,
                                                            "train.deterministic": "false", **TWO_PROC})
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(r),
                               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", port,
                               str(ROOT / "fastmveb" / "train.py"), "--rc", str(ROOT / "rcs/tiny.yaml"), *args],
                              cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in (0, 1)]
    for p in nodes:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    d = tmp_path / "run"
    assert losses(d) == two_process_reference
    steps = [json.loads(ln)["step"] for ln in (d / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))                                   # one writer: no line twice
    assert json.loads((d / "meta.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in (d / "checkpoints").iterdir()) == ["step_00000007.pt", "step_00000008.pt"]
    assert len(list((d / "tb").iterdir())) == 1                         # one TensorBoard event file


# The c10d form runs with the slow tests (make test-all): the fast suite keeps the static form, the one that failed
# before, and the restart and resume under test are fastmveb's own in both; only torchrun's rendezvous differs.
@pytest.mark.parametrize("form", ["static", pytest.param("c10d", marks=pytest.mark.slow)])
def test_torchrun_max_restarts_resumes_a_killed_group_on_the_same_trajectory(indexed_beton, tmp_path, form,
                                                                              two_process_reference):
    # torchrun under --max-restarts, default (static) and c10d rendezvous: kill -9 of rank 1, torchrun restarts the
    # group (the static form used to fail in gloo's connectFullMesh on the dead attempt's addresses), the new
    # attempt resumes from the newest checkpoint and ends with the uninterrupted run's losses, step by step.
    p = _torchrun(indexed_beton, tmp_path, restarts=1, c10d=form == "c10d", **TWO_PROC)
    _wait_for_step(p, tmp_path / "run" / "metrics.jsonl", 3)
    os.kill(_rank_pid(p, 1), signal.SIGKILL)
    t0 = time.time()
    _, err = p.communicate(timeout=600)
    print(f"{form}: restarted group finished {time.time() - t0:.1f} s after kill -9 of rank 1")
    assert p.returncode == 0, err[-3000:]
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["resumed_from"] is not None                             # the second attempt resumed
    assert losses(tmp_path / "run") == two_process_reference


def test_ctrl_c_to_torchrun_stops_both_ranks_at_one_step(indexed_beton, tmp_path):
    # Ctrl-C reaches torchrun (its workers run in sessions of their own), which passes SIGINT to every worker: they
    # used to die in KeyboardInterrupt tracebacks without a checkpoint. Now both agree on one step, rank 0 writes
    # the checkpoint there (both ranks' RNG in it) and says so in one line, as for SIGTERM, with exit status 130.
    # (torchrun itself then ends with its own SignalException traceback: the launcher's, not the workers'.)
    from fastmveb.checkpoint import latest_checkpoint, load_checkpoint
    p = _torchrun(indexed_beton, tmp_path, **TWO_PROC)
    _wait_for_step(p, tmp_path / "run" / "metrics.jsonl", 2)
    os.kill(p.pid, signal.SIGINT)
    _, err = p.communicate(timeout=600)
    assert "KeyboardInterrupt" not in err, err[-3000:]
    [line] = [ln for ln in err.splitlines() if ln.startswith("stopped by SIGINT at step")]
    step = int(line.split(" at step ")[1].split(":")[0])
    assert line.endswith("rerun the same command to resume (exit status 130)")
    state = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert state["step"] == step == max(losses(tmp_path / "run")) < TWO_PROC["train.max_steps"]
    assert len(state["rng"]) == 2
