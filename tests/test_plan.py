"""The run plan (fastmveb/plan.py) and `train.py --dry-run`: global batch semantics, steps, lr, memory, cost."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from commands import train_cli
from fastmveb.config import ConfigError, load_config
from fastmveb.plan import IMAGENET_TRAIN, gpu_hours, make_plan, split_batch, steps_per_epoch

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "fastmveb" / "train.py")


def dry_run(*args, env_extra=None) -> subprocess.CompletedProcess:
    return train_cli("--rc", ROOT / "rcs/rn50.yaml", "--dry-run", *args, env_extra=env_extra)


@pytest.mark.parametrize("world,per_process,accum", [(1, 4096, 32), (8, 512, 4), (32, 128, 1)])
def test_dry_run_keeps_the_released_global_batch(world, per_process, accum, tmp_path):
    # the rn50 betons do not exist here: the plan says so and counts steps over ImageNet-1k's train set
    r = dry_run("--world-size", str(world), f"data.train_beton={tmp_path / 'none.beton'}")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert "global batch     4096 per optimizer step" in out
    assert f"per process      {per_process} = {accum} micro-batch" in out and " of 128 " in out
    assert "peak 4.8 (base_lr x 4096/256)" in out
    assert "1,281,167 images" in out and "assumed ImageNet-1k train" in out
    assert f"steps per epoch  {IMAGENET_TRAIN // 4096}" in out                  # 312 at every world size
    assert "800 epochs = 249,600 steps, warm-up 3,120 steps" in out
    assert "1 group of 128 rows per view per micro-batch of 128" in out
    assert "global 1 224 px scale 0.4-1" in out and "local x6 96 px scale 0.05-0.4" in out
    assert "GiB estimated" in out and "not the allocator's peak" in out
    assert "unmeasured" in out                                                  # no CUDA step benchmark committed


def test_dry_run_reads_the_beton_length_and_world_size_from_the_launcher(small_betons):
    r = dry_run(f"data.train_beton={small_betons / 'train.beton'}", "data.global_batch_size=32",
                "data.per_device_batch_size=0", env_extra={"WORLD_SIZE": "2"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert "processes        2" in r.stdout and "160 images (" in r.stdout and "steps per epoch  5" in r.stdout
    assert "16 = 1 micro-batch of 16 (no accumulation)" in r.stdout


@pytest.mark.parametrize("args,msg", [
    (["--world-size", "3"], "data.global_batch_size=4096 does not divide over 3 processes"),
    (["--world-size", "64"], "data.per_device_batch_size=128 does not divide the 64 samples per process"),
    (["data.batch_size=128"], "'data.batch_size' was replaced by data.global_batch_size"),
])
def test_dry_run_bad_batch_is_one_line(args, msg):
    r = dry_run(*args)
    assert r.returncode == 2 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], r.stderr


def test_world_size_needs_dry_run():
    r = train_cli("--rc", ROOT / "rcs/tiny.yaml", "--world-size", "2")
    assert r.returncode == 2 and r.stderr.strip() == ("error: --world-size only applies to --dry-run; a real run "
                                                       "takes it from the launcher")


def test_split_batch_and_steps():
    assert split_batch(4096, 8, 0) == (512, 512, 1)
    assert split_batch(4096, 8, 256) == (512, 256, 2)
    assert split_batch(4096, 1, 128) == (4096, 128, 32)
    with pytest.raises(ConfigError, match=r"valid nearby: .*128"):
        split_batch(4096, 8, 100)
    with pytest.raises(ConfigError, match=r"use a multiple of 3 \(e.g. 4095 or 4098\)"):
        split_batch(4096, 3, 0)
    # FFCV's distributed sampler pads n to a multiple of the world size before batching
    assert steps_per_epoch(160, 2, 16, drop_last=True) == 5
    assert steps_per_epoch(161, 2, 16, drop_last=True) == 5 and steps_per_epoch(161, 2, 16, drop_last=False) == 6
    assert steps_per_epoch(IMAGENET_TRAIN, 32, 128, True) == 312 == steps_per_epoch(IMAGENET_TRAIN, 1, 4096, True)


def test_schedule_quantities_and_the_end_of_the_cosine():
    cfg = load_config(ROOT / "rcs/rn50.yaml", ["train.max_steps=1000"])
    p = make_plan(cfg, 8, dataset_len=IMAGENET_TRAIN, memory=False)
    assert p.peak_lr == pytest.approx(4.8) and p.start_lr == pytest.approx(4.8e-3)
    assert p.end_lr / p.peak_lr == pytest.approx(1.385e-3, abs=1e-6)            # released phase (t - W) / T
    assert p.last_step == 1000 and p.total_steps == 249_600 and "stops at step 1,000" in p.format()
    assert p.memory == {}


def test_memory_estimate_scales_with_the_micro_batch():
    cfg = load_config(ROOT / "rcs/rn50.yaml")
    m128 = make_plan(cfg, 32, dataset_len=IMAGENET_TRAIN).memory
    m256 = make_plan(load_config(ROOT / "rcs/rn50.yaml", ["data.per_device_batch_size=256"]), 16,
                     dataset_len=IMAGENET_TRAIN).memory
    assert m256["activations"] == pytest.approx(2 * m128["activations"])
    # bf16 saved activations of ResNet-50 + projector: ~42 MiB per 224-px view and ~8 MiB per 96-px view
    # (docs/notes.md: 41.8 and 7.7 on real tensors), 2 + 6 views per sample -> ~16 GiB at 128 per device
    assert 14 < m128["activations"] < 19
    fp32 = make_plan(load_config(ROOT / "rcs/rn50.yaml", ["train.mixed_precision=no"]), 32,
                     dataset_len=IMAGENET_TRAIN).memory
    # twice the bytes without autocast, less the integer tensors (max-pool indices) that bf16 does not halve
    assert fp32["activations"] == pytest.approx(2 * m128["activations"], rel=0.03)
    assert fp32["activations"] < 2 * m128["activations"]
    # weights + grads + LARS momentum + EMA target + DDP buckets, fp32: 5 x 4 x 36.1 M parameters
    assert m128["state"] == pytest.approx(5 * 4 * 36_101_184 / 2**30)


def _row(**kw):
    row = {"device": "NVIDIA H200", "arch": "resnet50", "views": "2x224 + 6x96", "batch": 128, "precision": "bf16",
           "compile": True, "channels_last": True, "samples_per_s": 1000.0, "source": "step", "file": "f.json"}
    return {**row, **kw}


def test_gpu_hours_only_from_an_exact_match():
    cfg = load_config(ROOT / "rcs/rn50.yaml")
    p = make_plan(cfg, 8, dataset_len=IMAGENET_TRAIN, memory=False)
    text, detail = gpu_hours(cfg, p, [])
    assert text.startswith("unmeasured") and detail == []
    text, detail = gpu_hours(cfg, p, [_row()])
    hours = 249_600 * 4096 / 1000 / 3600
    assert text.startswith(f"~{hours:,.0f} GPU-hours on NVIDIA H200 ({hours / 8:,.1f} h wall on 8)") and "f.json" in text
    assert detail[0]["gpu_hours"] == pytest.approx(hours)
    # A near match measured something else: never used (each key the rate depends on, one at a time).
    for near in ({"batch": 256}, {"compile": False}, {"precision": "no"}, {"channels_last": False},
                 {"views": "2x224"}, {"arch": "resnet18"}, {"compile": 1}):
        assert gpu_hours(cfg, p, [_row(**near)])[0].startswith("unmeasured"), near
    # One device asked for: another device's rows do not price it.
    assert gpu_hours(cfg, p, [_row()], device="NVIDIA H100 80GB HBM3")[0].startswith("unmeasured")
    # End to end beats the compute-bound step for the same setting.
    text, detail = gpu_hours(cfg, p, [_row(), _row(samples_per_s=800.0, source="train", file="summary.json")])
    assert detail[0]["rows"][0]["source"] == "train" and "end to end" in text


def test_gpu_hours_of_a_resolution_ramp_needs_every_size():
    cfg = load_config(ROOT / "rcs/rn50_fast.yaml")
    p = make_plan(cfg, 8, dataset_len=IMAGENET_TRAIN, memory=False)
    from fastmveb.resolution import schedule, views_label
    spans = schedule(cfg)
    assert len(spans) > 1
    rows = [_row(views=views_label(cfg, r), batch=p.micro_batch, samples_per_s=1000.0 * (i + 1))
            for i, (_, _, r) in enumerate(spans)]
    assert gpu_hours(cfg, p, rows[:-1])[0].startswith("unmeasured")          # one size missing: not priced
    text, detail = gpu_hours(cfg, p, rows)
    want = sum((b - a + 1) * p.steps_per_epoch * 4096 / (1000.0 * (i + 1)) for i, (a, b, _) in enumerate(spans)) / 3600
    assert detail[0]["gpu_hours"] == pytest.approx(want)


def test_committed_and_summary_rows_read_alike(tmp_path):
    from fastmveb import throughput
    row = {"views": "2x224 + 6x96", "arch": "resnet50", "precision": "bf16", "batch": 128, "compile": True,
           "channels_last": True, "samples_per_s": 1000.0}
    (tmp_path / "step-cuda-2026-12-01.json").write_text(json.dumps({"env": {"device": "NVIDIA H200"}, "rows": [row]}))
    (tmp_path / "step-cpu-2026-12-01.json").write_text(json.dumps({"env": {"device": "cpu"}, "rows": [row]}))
    rows = throughput.committed(tmp_path)
    assert rows == [_row(file="step-cuda-2026-12-01.json")]                  # CPU files are no cost basis
    (tmp_path / "summary.json").write_text(json.dumps({"throughput": [_row(file=None)]}))
    assert throughput.read_summary(tmp_path / "summary.json") == [_row(file="summary.json")]


@pytest.mark.parametrize("content,says", [(None, "not found"), ("{", "is not JSON"), ("[]", "no \"throughput\" list"),
                                          ('{"throughput": [{"a": 1}]}', "row 0 is not a measured row")])
def test_throughput_from_a_bad_file_is_one_line(tmp_path, content, says):
    path = tmp_path / "summary.json"
    if content is not None:
        path.write_text(content)
    r = dry_run("--throughput-from", str(path))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and says in r.stderr and "make gpu-check" in r.stderr


def test_throughput_from_prices_the_dry_run_and_only_the_dry_run(tmp_path):
    path = tmp_path / "summary.json"
    path.write_text(json.dumps({"throughput": [_row()]}))
    r = dry_run("--world-size", "8", "--throughput-from", str(path))
    assert r.returncode == 0, r.stderr
    cost = next(line for line in r.stdout.splitlines() if line.startswith("cost"))
    assert f"~{249_600 * 4096 / 1000 / 3600:,.0f} GPU-hours on NVIDIA H200" in cost
    r = train_cli("--rc", ROOT / "rcs/rn50.yaml", "--throughput-from", path)
    assert r.returncode == 2 and "only applies to --dry-run" in r.stderr


def test_real_run_with_a_non_dividing_batch_stops_with_one_line(small_betons, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, TRAIN, "--rc", str(ROOT / "rcs/tiny.yaml"),
                        f"data.train_beton={small_betons / 'train.beton'}", f"data.val_beton={small_betons / 'val.beton'}",
                        "data.global_batch_size=30", "data.per_device_batch_size=7", f"train.run_dir={tmp_path}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: data.per_device_batch_size=7 does not divide the 30 samples per "
                                             "process (global 30 / 1 processes); valid nearby: 3, 5, 6, 10 "
                                             "(0 = 30, no accumulation)"]
    assert not any(tmp_path.iterdir())                                  # nothing written


@pytest.mark.parametrize("args,says", [
    (["data.global_batch_size=1"], "loss.group=local gives entropy groups of 1 embedding"),
    (["data.global_batch_size=64", "data.per_device_batch_size=1"], "loss.group=local gives entropy groups of 1 "),
    (["data.global_batch_size=1", "loss.group=128"], "loss.group=128 gives entropy groups of 1 embedding"),
    (["--world-size", "2", "data.global_batch_size=2", "loss.group=global", "model.sync_bn=false"],
     "BatchNorm would normalise each view over 1 sample"),
])
def test_a_micro_batch_the_step_cannot_use_is_refused_by_the_plan(small_betons, tmp_path, args, says):
    """A single-sample entropy group (vmf_score raised in the first step) or BatchNorm (its output is then the
    constant bias): the dry run refused nothing and printed a plan. Both the dry run and the real run stop in
    one line from make_plan, before anything is written."""
    data = [f"data.train_beton={small_betons / 'train.beton'}", f"data.val_beton={small_betons / 'val.beton'}",
            f"train.run_dir={tmp_path}"]
    r = train_cli("--rc", ROOT / "rcs/tiny.yaml", "--dry-run", *args, *data)
    assert r.returncode == 2 and r.stdout == "", r.stdout[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and says in lines[0], r.stderr
    assert "at least 2" in lines[0] and "data.global_batch_size" in lines[0]
    if "--world-size" not in args:                                     # the real run: the same line, nothing written
        real = train_cli("--rc", ROOT / "rcs/tiny.yaml", *args, *data)
        assert (real.returncode, real.stderr) == (2, r.stderr) and not any(tmp_path.iterdir())
    # two samples per group and per BatchNorm run
    assert train_cli("--rc", ROOT / "rcs/tiny.yaml", "--dry-run", "data.global_batch_size=2", *data).returncode == 0
