"""The GPU check (make gpu-check) proven on the CPU: every stage runs at tiny shapes through the real script,
writes its JSON, and the dry run prices a plan from the summary it leaves."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fastmveb.bench import gpu_check
from fastmveb.bench.gpu_check import (CALL_S, DEFAULT_BUDGET_S, NAMES, STAGES, SUMMARY_RESERVE_S, fit_mode,
                                      junit_counts, largest_batch)
from commands import in_process, train_cli

ROOT = Path(__file__).resolve().parents[1]

STAGE_KEYS = {**{st.name: set(st.keys) for st in STAGES}, "summary": {"targets", "projections"}}


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    work = tmp_path_factory.mktemp("gpu-check-work")
    # As a user's shell starts it: inductor writes its default TORCHINDUCTOR_CACHE_DIR into os.environ once this
    # worker has compiled anything, and the check keeps a cache dir its caller chose.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TORCHINDUCTOR_")}
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--short", "--out", str(out),
                           "--work", str(work), "--budget-s", "1200"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1500, env=env)
    return proc, out, work


def test_cpu_dry_run_of_the_check_runs_every_stage(cpu_check):
    proc, out, work = cpu_check
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr
    files = sorted(p.name for p in out.rglob("*") if p.is_file())
    assert len(files) <= 8, files                         # what one device call can bring back
    assert {"summary.json", "summary.md", "gpu_check.log"} <= set(files)
    for stage in ("step", "profile", "train", "entropy"):  # benchmarks/results format, ready to commit
        (path,) = [f for f in files if f.startswith(f"{stage}-cpu-")]
        payload = json.loads((out / path).read_text())
        assert payload["benchmark"] == stage and payload["rows"] and payload["env"]["device"].startswith("cpu")

    s = json.loads((out / "summary.json").read_text())
    assert s["complete"] and list(s["stages"]) == NAMES + ["summary"]
    assert s["budget_s"] == 1200 and s["install_s"] >= 0                # no wheelhouse here: the import checks
    assert s["compile_cache"]["dir"] == str(work / "inductor-cache")    # one cache for every stage process
    boxes = {st.name: st.box for st in STAGES}
    for name, keys in STAGE_KEYS.items():
        st = s["stages"][name]
        assert {"status", "seconds", "box_s", "result"} <= set(st), name
        assert keys <= set(st["result"]), (name, keys - set(st["result"]))
        # Nothing failed or was cut; what needs CUDA says so.
        assert st["status"] == "ok" or st["status"].startswith("skipped: no CUDA"), (name, st["status"])
        if name in boxes:
            assert st["seconds"] <= boxes[name][1] + 15
    assert s["stages"]["tests"]["status"].startswith("skipped: no CUDA")
    assert s["stages"]["tests"]["result"]["sync_debug_step"] == "skipped"
    step = s["stages"]["step"]["result"]
    # Most valuable first: the recipe's multi-crop, then two-view, then the flips, then the ViT (after every ResNet row).
    assert [(r["recipe"], r["variant"]) for r in step["rows"]] == [
        ("multi-crop", "training setting"), ("two-view", "training setting"),
        ("two-view", "channels-last flipped"), ("two-view", "precision flipped"),
        ("vit_s16", "multi-crop, tiny: 2 blocks, 32 px")]
    vit = step["rows"][-1]
    assert (vit["arch"], vit["views"], vit["batch"]) == ("timm:vit_small_patch16_224", "2x32 + 6x16", 8)
    assert vit["first_step_s"] > 0 and all(r["arch"] == "resnet10" for r in step["rows"][:-1])
    assert all(r["samples_per_s"] > 0 and r["loss"] == r["loss"] and r["first_step_s"] > 0 for r in step["rows"])
    assert all(r["reason"].startswith("skipped: no CUDA") for r in step["skipped_rows"])
    train = s["stages"]["train"]["result"]["rows"][0]
    assert train["e2e_over_step"] > 0 and train["x_vs_released"] > 0 and train["first_step_s"] > 0
    # The compute bound is the step stage's multi-crop row (same setting): not compiled and timed a second time.
    mc = next(r for r in step["rows"] if r["recipe"] == "multi-crop")
    assert train["step_from"] == "given" and train["step_samples_per_s"] == mc["samples_per_s"]
    assert s["stages"]["profile"]["result"]["first_step_s"] > 0
    run = s["stages"]["run"]["result"]
    assert run["returncode"] == 0 and run["steps_logged"] == 4 and run["samples_per_s"] > 0 and run["first_step_s"] > 0
    assert run["peak_mem_gb"] is None                     # the CPU logs no CUDA peak: not compared
    # Targets are shown but not judged on a CPU; projections say "unmeasured" (no ResNet-50 CUDA row here).
    assert len(s["targets"]) == 5
    assert all(t["status"].startswith("not judged") or t["status"] == "not measured" for t in s["targets"])
    assert {(p["rc"], p["gpus"]) for p in s["projections"]} == {
        ("rcs/rn50.yaml", 1), ("rcs/rn50.yaml", 8), ("rcs/rn50_fast.yaml", 1), ("rcs/rn50_fast.yaml", 8)}
    assert all(p["gpu_hours"] is None and p["cost"].startswith("unmeasured") for p in s["projections"])
    sources = {r["source"] for r in s["throughput"]}
    assert sources == {"step", "train"}
    md = (out / "summary.md").read_text()
    assert "## Stages" in md and "## Targets" in md and "## Projected cost" in md and "## Entropy estimator" in md
    # A second check into the same OUT is refused before it starts: the first one's results stay.
    again = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--short", "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [again.stderr.strip()], again.stderr
    assert "already holds a check's summary.json" in again.stderr and "--force" in again.stderr
    assert json.loads((out / "summary.json").read_text()) == s


def test_dry_run_prices_the_plan_from_the_check_summary(cpu_check):
    # The training start's setting (tiny.yaml at batch 16 on one CPU process) was measured end to end: the dry run
    # of that setting takes its cost from summary.json.
    _, out, _ = cpu_check
    s = json.loads((out / "summary.json").read_text())
    row = s["stages"]["run"]["result"]["throughput_row"]
    assert row["batch"] == 16                             # the training start's batch (run_overrides)
    proc = train_cli("--rc", ROOT / "rcs/tiny.yaml", "--dry-run", "data.global_batch_size=16",
                     "--throughput-from", out / "summary.json")
    assert proc.returncode == 0, proc.stderr
    cost = next(line for line in proc.stdout.splitlines() if line.startswith("cost"))
    assert f"{row['samples_per_s']:,.0f} samples/s" in cost and "unmeasured" not in cost, cost
    # Another per-device batch is a near match only: not priced.
    proc = train_cli("--rc", ROOT / "rcs/tiny.yaml", "--dry-run", "data.global_batch_size=32",
                     "--throughput-from", out / "summary.json")
    assert proc.returncode == 0, proc.stderr
    cost = next(line for line in proc.stdout.splitlines() if line.startswith("cost"))
    assert "unmeasured" in cost, cost


def test_a_stage_over_its_box_is_cut_and_the_summary_keeps_the_rest(tmp_path):
    # A budget that leaves the step stage a few seconds (20 less the 10-s summary reserve, less env's time): it is
    # killed (or not started) and says so; env stays. (At 30 the step stage's rows at batch 8 fit its 18 s.)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fastmveb.bench.gpu_check", "--device", "cpu", "--short",
                           "--only", "env,step", "--budget-s", "20", "--out", str(out), "--work", str(tmp_path / "w")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["stages"]["env"]["status"] == "ok"
    assert s["stages"]["step"]["status"].startswith("cut:"), s["stages"]["step"]
    assert s["stages"]["step"]["seconds"] <= 20 + 10                    # what was left, + the kill's grace
    assert "cut:" in (out / "summary.md").read_text()


def test_bad_arguments_are_one_line(tmp_path):
    out = str(tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("x")
    for cmd, says in ((["bash", "scripts/gpu_check.sh"], "--out DIR is required"),
                      (["bash", "scripts/gpu_check.sh", "--out", out, "--bogus"], "unknown argument"),
                      (["bash", "scripts/gpu_check.sh", "--out", out, "--python", "/nonexistent/python"], "no usable"),
                      (["bash", "scripts/gpu_check.sh", "--out", out, "--budget-s", "abc"], "--budget-s must be"),
                      (["bash", "scripts/gpu_check.sh", "--out", out, "--budget-s"], "--budget-s needs a value"),
                      (["bash", "scripts/gpu_check.sh", "--out", str(tmp_path / "full")], "already holds 1 file(s)"),
                      ([sys.executable, "-m", "fastmveb.bench.gpu_check", "--out", out, "--only", "nope"],
                       "unknown stage(s) nope")):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, cmd
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], (cmd, proc.stderr)
    assert not (tmp_path / "out").exists()                              # refused before anything was written
    for bad in ("abc", "0", "-5", "nan", "inf"):
        r = in_process(gpu_check.cli, "--out", out, "--budget-s", bad)
        assert r.returncode == 2 and r.stderr.startswith("error: --budget-s must be a positive number"), (bad, r.stderr)


def test_force_replaces_a_previous_check_and_keeps_other_files(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text('{"old": true}')
    (out / "step-cuda-2026-01-01.json").write_text("{}")                  # the previous check's files go
    (out / "notes.txt").write_text("mine")                               # anything else stays
    # The script's preflight (before the install) accepts --force but removes nothing: a failed install keeps them.
    assert in_process(gpu_check.cli, "--out", out, "--force", "--preflight").returncode == 0
    assert (out / "summary.json").read_text() == '{"old": true}'
    proc = subprocess.run([sys.executable, "-m", "fastmveb.bench.gpu_check", "--device", "cpu", "--short", "--only",
                           "env", "--force", "--budget-s", "100", "--install-s", "12.5", "--out", str(out), "--work",
                           str(tmp_path / "w")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["stages"]["env"]["status"] == "ok" and (s["budget_s"], s["install_s"]) == (100, 12.5)
    assert sorted(p.name for p in out.iterdir()) == ["gpu_check.log", "notes.txt", "summary.json", "summary.md"]


def test_the_box_plan_fits_one_device_call():
    # Every CUDA box plus the summary reserve fits the default budget; the default budget plus the slowest install
    # measured (44 s) fits the 540-s call; a longer install shrinks the default budget instead of overrunning.
    assert sum(st.box[0] for st in STAGES) + SUMMARY_RESERVE_S <= DEFAULT_BUDGET_S
    assert DEFAULT_BUDGET_S + 44 <= CALL_S
    assert gpu_check.budget(None, 20.0, False) == DEFAULT_BUDGET_S and gpu_check.budget(None, 100.0, False) == 440
    assert gpu_check.budget("90", 100.0, False) == 90.0
    assert gpu_check.budget(None, 20.0, True) == sum(st.box[1] for st in STAGES) + SUMMARY_RESERVE_S   # CPU dry run
    # The stages that carry the recipe's figures come first, so that a cut budget drops the least useful ones.
    assert NAMES[:5] == ["env", "step", "data", "train", "run"]


def test_readme_stage_table_is_generated_from_the_registry():
    text = (ROOT / "README.md").read_text()
    block = text.split(gpu_check.README_BEGIN, 1)[1].split(gpu_check.README_END, 1)[0]
    assert block == "\n" + gpu_check.readme_block()
    assert "bash scripts/gpu_check.sh --out gpu-check --wheelhouse wheelhouse" in text


def test_fit_mode_runs_a_variant_eagerly_when_its_compile_would_not_fit():
    assert fit_mode(True, left_s=100, compile_s=None, steps_s=5) == "compiled"     # no compile measured yet: try
    assert fit_mode(True, left_s=100, compile_s=60, steps_s=5) == "compiled"
    assert fit_mode(True, left_s=50, compile_s=60, steps_s=5) == "eager"
    assert fit_mode(False, left_s=50, compile_s=60, steps_s=5) == "eager"
    assert fit_mode(True, left_s=8, compile_s=60, steps_s=5) == ""                 # nothing fits: cut


@pytest.mark.parametrize("rate", [0, -3.0, float("nan"), float("inf"), True])
def test_a_summary_without_a_positive_finite_rate_is_refused_in_one_line(tmp_path, rate):
    row = {"device": "NVIDIA H100 80GB HBM3", "arch": "resnet50", "views": "2x224 + 6x96", "batch": 128,
           "precision": "bf16", "compile": True, "channels_last": True, "samples_per_s": rate, "source": "step"}
    (tmp_path / "summary.json").write_text(json.dumps({"throughput": [row]}))
    r = train_cli("--rc", ROOT / "rcs/rn50.yaml", "--dry-run", "--throughput-from", tmp_path / "summary.json")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert "row 0" in r.stderr and "not a finite positive rate" in r.stderr


def test_make_gpu_check_target_passes_its_arguments():
    proc = subprocess.run(["make", "-n", "gpu-check", "OUT=/tmp/x", "WHEELHOUSE=wh", "GPU_CHECK_ARGS=--short"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "bash scripts/gpu_check.sh --out /tmp/x --wheelhouse wh --short" in proc.stdout
    assert "pip install" not in proc.stdout                # an offline host: no setup step with WHEELHOUSE


def test_largest_batch_grows_the_measured_peak_to_the_card():
    # 80 GiB card, 20 GiB measured at 128, 0.15 GiB per extra sample: (72 - 20) / 0.15 = 346 more -> 474 -> 448.
    assert largest_batch(80, 20, 128, 0.15) == 448
    assert largest_batch(80, 79, 128, 0.15) == 128        # no room: the measured batch
    assert largest_batch(80, 20, 128, 0.0) == 128


def test_junit_counts(tmp_path):
    p = tmp_path / "j.xml"
    p.write_text('<testsuites><testsuite><testcase classname="a" name="ok"/><testcase classname="a" name="bad">'
                 '<failure message="x"/></testcase><testcase classname="b" name="s"><skipped/></testcase>'
                 '</testsuite></testsuites>')
    c = junit_counts(p)
    assert c == {"passed": ["a::ok"], "failed": ["a::bad"], "skipped": ["b::s"]}


def test_the_vit_rows_come_from_the_vit_recipe_and_shrink_on_a_cpu():
    import torch
    from fastmveb.bench.common import bench_config, settings
    from fastmveb.bench.stage_step import VIT_RC, measure_step, vit_rows
    (recipe, n_local, extra, label), = vit_rows(True)         # CUDA: rcs/vit_s16.yaml's setting as it is
    cfg = bench_config(settings(rc=str(ROOT / VIT_RC)), torch.device("cuda"), n_local, extra)
    assert (recipe, label, cfg.model.arch, cfg.views.global_size, cfg.views.local_size, cfg.views.n_local) == (
        "vit_s16", "multi-crop", "timm:vit_small_patch16_224", 224, 96, 6)
    assert (cfg.train.mixed_precision, cfg.optim.name, cfg.data.global_batch_size) == ("bf16", "adamw", 128)
    # A CPU dry run: the same recipe at tiny shapes, one real step in seconds (as the check's stage builds it).
    (recipe, n_local, extra, label), = vit_rows(False)
    cfg = bench_config(settings(short=True, batch_size=8, rc=str(ROOT / VIT_RC)), torch.device("cpu"), n_local, extra)
    row = measure_step(cfg, torch.device("cpu"), 1, 1, 1)
    assert (row["arch"], row["views"], row["precision"], row["compile"]) == (
        "timm:vit_small_patch16_224", "2x32 + 6x16", "no", False)
    assert row["loss"] == row["loss"] and not row["skipped"] and row["first_step_s"] > 0


def test_a_vit_row_beside_the_resnet_rows_leaves_the_targets_judged():
    from fastmveb.bench.stage_report import check_targets
    rn = {"arch": "resnet50", "views": "2x224", "samples_per_s": 1e6}
    rows = [{**rn, "recipe": "multi-crop", "variant": "training setting"},
            {**rn, "recipe": "two-view", "variant": "training setting"},
            {"recipe": "vit_s16", "variant": "multi-crop", "arch": "timm:vit_small_patch16_224", "samples_per_s": 1.0}]
    got = {t["target"].split()[0]: t["status"] for t in check_targets({"step": {"result": {"rows": rows}}}, True)}
    assert got["two-view"] == got["multi-crop"] == "met"
    rows[0]["arch"] = "resnet18"                              # the check run with another backbone: not judged
    got = {t["target"].split()[0]: t["status"] for t in check_targets({"step": {"result": {"rows": rows}}}, True)}
    assert got["multi-crop"].startswith("not judged")
