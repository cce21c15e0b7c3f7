"""Smoke tests of the timing benchmarks: each stage runs for real at tiny sizes into a temporary folder and
writes JSON with the expected fields and positive, finite numbers; the results table is built from JSON."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastmveb.config import load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = load_config(ROOT / "rcs" / "tiny.yaml")


def bench(*args, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "fastmveb.bench", *map(str, args)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    return r


def only_json(folder: Path, stage: str) -> dict:
    files = sorted(folder.glob(f"{stage}-cpu-*.json"))
    assert len(files) == 1, files
    payload = json.loads(files[0].read_text())
    assert payload["benchmark"] == stage
    for key in ("device", "torch", "date", "git"):
        assert key in payload["env"], key
    assert payload["settings"]["device"] == "cpu" and payload["settings"]["short"] is True
    return payload


def positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def test_loader_short_whole_image_rows(small_betons, tmp_path):
    """The decode-once rows beside the old centre square, on the synthetic set and a tiny photo set, with the
    fraction of upsampled crops each decode implies."""
    bench("loader", "--short", "--device", "cpu", "--out-dir", tmp_path, "--beton", small_betons / "train.beton",
          "--jpeg-root", small_betons / "jpeg" / "train", "--only", "ffcv center 256,ffcv once 512",
          "--photos", 16, "--photos-dir", tmp_path / "photos", "--rounds", 2, "--min-time", 0.3,
          "--batch-size", 8)
    rows = only_json(tmp_path, "loader")["rows"]
    got = {(r["pipeline"], r["data"]): r for r in rows}
    assert {("ffcv center 256", "synthetic"), ("ffcv center 256", "photos max 384"),
            ("ffcv center 256", "photos max 512"), ("ffcv once 512", "photos max 512")} <= set(got)
    for r in rows:
        assert positive(r["samples_per_s"]) and 0 <= r["spread"] and 0 <= r["glob_up"] <= 1 and 0 <= r["loc_up"] <= 1
    # 500-px photos: a 512 canvas upsamples no global crop; the 256 centre square upsamples most of them.
    assert got[("ffcv once 512", "photos max 512")]["glob_up"] == 0
    assert got[("ffcv center 256", "photos max 512")]["glob_up"] > 0.8
    assert len(list((tmp_path / "photos").glob("jpeg16/*.jpg"))) == 16


def test_step_short(tmp_path):
    bench("step", "--short", "--device", "cpu", "--out-dir", tmp_path, "--warmup", 1, "--iters", 1)
    rows = only_json(tmp_path, "step")["rows"]
    assert [r["recipe"] for r in rows] == ["two-view", "multi-crop"]
    g, l = TINY.views.global_size, TINY.views.local_size       # the CPU step runs at rcs/tiny.yaml's view sizes
    assert rows[0]["views"] == f"2x{g}" and rows[1]["views"] == f"2x{g} + 6x{l}"
    for r in rows:
        for key in ("samples_per_s", "images_per_s", "step_ms", "first_step_s", "peak_mem_gb"):
            assert positive(r[key]), (key, r[key])
        assert r["arch"] == "resnet10" and r["batch"] == 16 and r["precision"] == "no" and r["compile"] is False
        assert math.isfinite(r["loss"]) and r["skipped"] is False
        assert r["images_per_s"] == pytest.approx(r["samples_per_s"] * (2 if r["recipe"] == "two-view" else 8))
    assert (tmp_path / f"{sorted(tmp_path.glob('step-*.json'))[0].stem}.md").is_file()


def test_step_flags_change_the_setting(tmp_path):
    bench("step", "--short", "--device", "cpu", "--out-dir", tmp_path, "--recipes", "two-view", "--warmup", 1,
          "--iters", 1, "--channels-last", "false", "--batch-size", 8, "--global-size", 32, "--precision", "bf16")
    (r,) = only_json(tmp_path, "step")["rows"]
    assert (r["channels_last"], r["batch"], r["views"], r["precision"]) == (False, 8, "2x32", "bf16")
    assert positive(r["samples_per_s"])


def test_train_short(small_betons, tmp_path):
    bench("train", "--short", "--device", "cpu", "--out-dir", tmp_path, "--recipes", "two-view",
          "--beton", small_betons / "train.beton", "--jpeg-root", small_betons / "jpeg" / "train",
          "--warmup", 1, "--steps", 2)
    (r,) = only_json(tmp_path, "train")["rows"]
    for key in ("fastmveb_samples_per_s", "step_samples_per_s", "e2e_over_step", "released_samples_per_s",
                "x_vs_released"):
        assert positive(r[key]), (key, r[key])
    assert 0 <= r["data_wait_frac"] < 1 and 0 <= r["released_data_wait_frac"] < 1
    assert r["e2e_over_step"] == pytest.approx(r["fastmveb_samples_per_s"] / r["step_samples_per_s"])
    assert r["x_vs_released"] == pytest.approx(r["fastmveb_samples_per_s"] / r["released_samples_per_s"])
    assert r["released_precision"] == "no" and math.isfinite(r["fastmveb_loss"]) and math.isfinite(r["released_loss"])
    assert positive(r["first_step_s"])                      # the first step (a compile where compiled), timed apart


def test_profile_short_splits_the_step_by_phase(tmp_path):
    bench("profile", "--short", "--device", "cpu", "--out-dir", tmp_path, "--recipes", "multi-crop", "--warmup", 1,
          "--steps", 1, "--top", 8, "--trace", tmp_path / "traces" / "step.json")
    rows = only_json(tmp_path, "profile")["rows"]
    trace = json.loads((tmp_path / "traces" / "step-multi-crop.json").read_text())
    assert any(e.get("name") == "fastmveb/backward" for e in trace["traceEvents"])
    wall = [r for r in rows if r["kind"] == "wall"]
    phases = {r["name"]: r for r in rows if r["kind"] == "phase"}
    ops = [r for r in rows if r["kind"] == "op"]
    views = f"2x{TINY.views.global_size} + 6x{TINY.views.local_size}"
    assert len(wall) == 1 and wall[0]["views"] == views and math.isfinite(wall[0]["loss"])
    assert positive(wall[0]["first_step_s"])
    for name in ("views", "forward", "target", "loss", "backward", "optimizer", "ema"):
        assert positive(phases[name]["ms_per_step"]), name
    # Self times never overlap, so the phases (with the uncounted rest) add up to the wall clock.
    total = sum(r["ms_per_step"] for r in phases.values())
    assert total == pytest.approx(wall[0]["ms_per_step"], rel=0.02)
    assert phases["backward"]["ms_per_step"] > phases["ema"]["ms_per_step"]
    launches = {r["name"].split(":")[0]: r["calls_per_step"] for r in rows if r["kind"] == "launches"}
    for name in ("views", "forward", "target", "loss", "backward", "optimizer", "ema"):
        assert launches[name] >= 1, name
    assert launches["step"] == sum(v for k, v in launches.items() if k != "step")
    assert launches["ema"] < 20                     # fused foreach calls, not one launch per tensor
    assert len(ops) == 8 and all(r["ms_per_step"] >= ops[i + 1]["ms_per_step"] for i, r in enumerate(ops[:-1]))
    assert any(r["name"].startswith("backward: aten::convolution_backward") for r in ops), [r["name"] for r in ops]
    assert any(r["name"].startswith("forward: ") and "convolution" in r["name"] for r in ops)
    text = __import__("fastmveb.bench.stage_report", fromlist=["build"]).build(tmp_path).read_text()
    assert "step split" in text and "backward" in text


def test_report_takes_the_newest_json_per_stage_and_device(tmp_path):
    from fastmveb.bench import stage_report as report
    from fastmveb.bench.common import write_results
    env = {"device": "cpu (x86_64, 2 cores)", "torch": "t", "date": "2026-01-01T00:00:00+00:00", "git": "g"}
    write_results("step", env, {"short": True}, [{"recipe": "two-view", "samples_per_s": 1.5}], out_dir=tmp_path)
    write_results("step", dict(env, date="2026-01-02T00:00:00+00:00"), {}, [{"recipe": "two-view",
                  "samples_per_s": 2.5, "step_ms": 3.0, "peak_mem_gb": 0.5}], out_dir=tmp_path)
    write_results("step", dict(env, device="NVIDIA H100"), {}, [{"recipe": "multi-crop", "samples_per_s": 7.5}],
                  out_dir=tmp_path)
    (tmp_path / "broken.json").write_text("{")
    text = report.build(tmp_path).read_text()
    assert "2.5" in text and "| 1.5 |" not in text                   # the older CPU file is superseded
    assert text.index("## CUDA") < text.index("## CPU") and "7.5" in text


def test_readme_speed_block_is_generated_from_the_committed_results():
    """The README's figures are the committed JSON's, rendered by report.speed_block: none typed by hand."""
    from fastmveb.bench import stage_report as report
    text = (ROOT / "README.md").read_text()
    block = text.split(report.BEGIN, 1)[1].split(report.END, 1)[0]
    newest = report.load_newest(ROOT / "benchmarks" / "results")
    assert newest and block == "\n" + report.speed_block(newest)


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_step_and_profile_on_cuda(tmp_path):
    """The GPU path of the compute bound and of the profile: rn50.yaml settings (bf16, compiled, channels-last)
    at a small batch; the profile must find the autograd thread's kernels under backward."""
    bench("step", "--short", "--device", "cuda", "--out-dir", tmp_path, "--recipes", "two-view", "--batch-size", 32)
    bench("profile", "--short", "--device", "cuda", "--out-dir", tmp_path, "--recipes", "multi-crop",
          "--batch-size", 32, "--steps", 2)
    (step_file,) = tmp_path.glob("step-cuda-*.json")
    (r,) = json.loads(step_file.read_text())["rows"]
    assert positive(r["samples_per_s"]) and r["compile"] is True and r["precision"] == "bf16"
    assert r["peak_mem_kind"] == "cuda max_memory_allocated" and math.isfinite(r["loss"]) and not r["skipped"]
    (prof_file,) = tmp_path.glob("profile-cuda-*.json")
    rows = json.loads(prof_file.read_text())["rows"]
    phases = {x["name"]: x for x in rows if x["kind"] == "phase"}
    for name in ("views", "forward", "target", "loss", "backward", "optimizer"):
        assert positive(phases[name]["ms_per_step"]), name
    assert phases["backward"]["ms_per_step"] > 0.5 * phases["forward"]["ms_per_step"]
    assert 0 <= phases["device idle"]["share"] <= 1


@pytest.mark.slow
def test_all_short(small_betons, tmp_path):
    """Every stage in one run, then the combined table (several minutes on 2 cores)."""
    r = bench("all", "--short", "--device", "cpu", "--out-dir", tmp_path, "--beton", small_betons / "train.beton",
              "--jpeg-root", small_betons / "jpeg" / "train", "--photos", 16, "--photos-dir", tmp_path / "photos",
              "--batch-size", 8, timeout=1800)
    for stage in ("loader", "views", "entropy", "step", "train", "profile"):
        assert list(tmp_path.glob(f"{stage}-cpu-*.json")), (stage, r.stdout[-3000:])
    text = (tmp_path / "README.md").read_text()
    assert all(f"### {s}" in text for s in ("loader", "views", "entropy", "step", "train", "profile"))


def test_ramp_times_every_size_and_projects_the_saving(tmp_path):
    """`bench ramp`: one row per epoch range of each config's schedule (the ramp's sizes, in order),
    then a projection row per config against the first; the report turns them into headline lines."""
    rc = tmp_path / "ramp.yaml"
    from fastmveb.config import dump_config
    cfg = load_config(ROOT / "rcs" / "tiny.yaml", ["views.res_start_size=32", "views.res_start_epoch=0",
                                                   "views.res_end_epoch=2", "views.res_step=16", "optim.epochs=4",
                                                   "views.global_size=64", "views.local_size=32", "data.decode_size=96"])
    dump_config(cfg, rc)                          # a 4-epoch tiny.yaml with globals 32 -> 48 -> 64 over epochs 0-2
    epochs = TINY.optim.epochs
    bench("ramp", "--rcs", f"rcs/tiny.yaml,{rc}", "--short", "--device", "cpu", "--out-dir", tmp_path,
          "--warmup", 1, "--iters", 1, "--threads", 1, "--compile", "false", "--precision", "no",
          "--set", "train.seed=1")
    payload = only_json(tmp_path, "ramp")
    assert payload["settings"]["rcs"] == ["rcs/tiny.yaml", str(rc)]
    assert payload["settings"]["overrides"] == ["train.seed=1"] and payload["settings"]["timed_steps"] == 1
    rows = payload["rows"]
    assert [(r["recipe"], r["epochs"]) for r in rows] == [("tiny", f"0-{epochs - 1}"), ("tiny", f"all {epochs}"), ("ramp", "0"),
                                                          ("ramp", "1"), ("ramp", "2-3"), ("ramp", "all 4")]
    assert [r["views"] for r in rows if r["recipe"] == "ramp"][:3] == ["2x32 + 2x16", "2x48 + 2x24", "2x64 + 2x32"]
    sized = [r for r in rows if "samples_per_s" in r]
    assert all(positive(r["samples_per_s"]) and r["graphs_added"] == 0 and r["arch"] == "resnet10" for r in sized)
    assert all(r["compile"] is False and r["torch_threads"] == 1 and r["batch"] == 8 for r in sized)
    base = 1 / sized[0]["samples_per_s"]
    for r in sized:                               # epoch time relative to the base config's, per size
        assert r["epoch_time_vs_base"] == pytest.approx((1 / r["samples_per_s"]) / base)
    proj = rows[-1]
    mean = (1 / sized[1]["samples_per_s"] + 1 / sized[2]["samples_per_s"] + 2 / sized[3]["samples_per_s"]) / 4
    assert proj["mean_epoch_time_vs_base"] == pytest.approx(mean / base)
    assert proj["ramp_saving"] == pytest.approx(1 - mean * sized[3]["samples_per_s"])
    assert rows[1]["mean_epoch_time_vs_base"] == pytest.approx(1.0) and rows[1]["ramp_saving"] == pytest.approx(0.0)
    from fastmveb.bench import stage_report as report
    text = report.build(tmp_path).read_text()
    assert "ramp projected over all 4 epochs" in text and "the ramp saves" in text


def _args(stage: str, *argv):
    """The namespace `python -m fastmveb.bench STAGE argv...` builds (same parser, same defaults)."""
    from fastmveb.bench.__main__ import _parser, stage_module
    return _parser(stage, stage_module(stage)).parse_known_args(list(argv))


def test_ramp_flags_reach_every_config():
    """`bench ramp`'s defaults (CPU: ResNet-10 under --short, batch 8, fp32, 512-d projector) and each flag that
    changes a config; `step --ramp` is gone (the ramp is its own stage)."""
    import torch
    from fastmveb.bench import stage_ramp as ramp
    cpu = torch.device("cpu")
    args, _ = _args("ramp", "--short")
    assert args.rcs == "rcs/rn50.yaml,rcs/rn50_fast.yaml" and args.warmup is None and args.iters is None
    cfg = ramp.ramp_config(args, cpu, "rcs/rn50_fast.yaml")
    assert (cfg.model.arch, cfg.data.global_batch_size, cfg.train.mixed_precision, cfg.model.proj_out) == \
        ("resnet10", 8, "no", 512)
    args, _ = _args("ramp", "--short", "--arch", "resnet18", "--batch-size", "12", "--precision", "bf16",
                    "--compile", "true", "--threads", "2", "--set", "loss.lam=0.5", "--set", "optim.epochs=90")
    cfg = ramp.ramp_config(args, cpu, "rcs/rn50_fast.yaml")
    assert (cfg.model.arch, cfg.data.global_batch_size, cfg.train.mixed_precision, cfg.train.compile) == \
        ("resnet18", 12, "bf16", "true")
    assert (cfg.loss.lam, cfg.optim.epochs, args.threads) == (0.5, 90, 2)
    _, unknown = _args("step", "--ramp")
    assert unknown == ["--ramp"]


def test_settings_flags_reach_the_benchmark_config():
    """The run-config flags step, train and profile share (common.add_settings_args -> common.bench_config)."""
    import torch
    from fastmveb.bench.common import bench_config, default_threads
    cpu = torch.device("cpu")
    args, _ = _args("step", "--short")
    cfg = bench_config(args, cpu, 6)
    assert (cfg.model.arch, cfg.data.global_batch_size, cfg.views.n_local, cfg.data.per_device_batch_size) == \
        ("resnet10", 16, 6, 0)
    assert default_threads(args, cpu) == 1
    args, _ = _args("step", "--short", "--rc", str(ROOT / "rcs" / "tiny.yaml"), "--arch", "resnet18",
                    "--batch-size", "12", "--global-size", "48", "--local-size", "24", "--precision", "bf16",
                    "--compile", "true", "--channels-last", "false", "--threads", "2", "--set", "loss.lam=0.5",
                    "--n-local", "4", "--recipes", "multi-crop")
    cfg = bench_config(args, cpu, args.n_local)
    assert (cfg.model.arch, cfg.data.global_batch_size, cfg.views.global_size, cfg.views.local_size) == \
        ("resnet18", 12, 48, 24)
    assert (cfg.train.mixed_precision, cfg.train.compile, cfg.model.channels_last, cfg.views.channels_last) == \
        ("bf16", "true", False, False)
    assert (cfg.loss.lam, cfg.views.n_local, default_threads(args, cpu)) == (0.5, 4, 2)


def test_benchmarks_set_no_backend_flags_and_build_as_training_does():
    """No benchmark sets torch.backends flags itself (fastmveb.build.make_accelerator sets them for training and
    benchmarks alike), and the end-to-end stage reads training's loader call and view switch."""
    import re
    bench_dir = ROOT / "fastmveb" / "bench"
    setters = [f"{p.relative_to(ROOT)}: {m.group(0)}" for p in bench_dir.rglob("*.py")
               for m in re.finditer(r"torch\.backends\.[\w.]+\s*=(?!=)", p.read_text())]
    assert not setters, setters
    source = (bench_dir / "stage_train.py").read_text()
    assert "train_loader_from_config(cfg," in source and 'ViewSwitch(cfg, b["training"].view_maker, loader)' in source


def test_all_and_the_gpu_check_share_one_runner(tmp_path):
    """`bench all` and the GPU check are registries of runner.Stage run by runner.run_stages; `all` passes every
    option on and each stage ignores the ones it does not know (and only then)."""
    from fastmveb.bench import __main__ as bench_main, gpu_check, runner
    assert [s.name for s in bench_main.STAGES] == ["loader", "views", "entropy", "step", "train", "profile"]
    assert all(isinstance(s, runner.Stage) for s in bench_main.STAGES + gpu_check.STAGES)
    bench_main.run_stage("report", ["--out-dir", str(tmp_path), "--warmup", "3"], lenient=True)
    assert (tmp_path / "README.md").is_file()
    with pytest.raises(SystemExit):
        bench_main.run_stage("report", ["--out-dir", str(tmp_path), "--warmup", "3"])


def test_settings_are_the_flags_defaults_with_keywords_set():
    """common.settings: how code (the GPU check) picks a benchmark setting without writing a command line."""
    from fastmveb.bench.common import settings
    args, _ = _args("step", "--short", "--batch-size", "8", "--recipes", "multi-crop")
    s = settings(short=True, batch_size=8, recipes="multi-crop")
    assert {k: getattr(s, k) for k in vars(s)} == {k: getattr(args, k) for k in vars(s)}
    with pytest.raises(TypeError):
        settings(batch=8)


def test_a_loader_without_a_full_batch_is_refused_not_timed_for_ever():
    """A timed loader whose data holds fewer samples than one batch (drop_last) yields no batch per epoch: the loader
    stage says so in one line instead of restarting empty epochs for ever (what `bench all --photos 16` at the
    short batch of 32 did)."""
    from fastmveb.bench.stage_loader import measure
    from fastmveb.errors import UserError
    with pytest.raises(UserError, match="yields no batch of 32.*--batch-size"):
        measure(lambda: iter(()), 32, warmup=2, min_time=0.1, device="cpu")
    r = measure(lambda: iter([torch.zeros(1)] * 4), 8, warmup=1, min_time=0.0, device="cpu")
    assert r["batches"] >= 1 and r["samples_per_s"] > 0
