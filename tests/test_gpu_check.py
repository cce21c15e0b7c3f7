"""The GPU check (make gpu-check) proven on the CPU: every stage runs at tiny shapes through the real script,
writes its JSON, and the dry run prices a plan from the summary it leaves."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from fastmveb.bench.gpu_check import BOXES, STAGES, junit_counts, largest_batch
from commands import train_cli

ROOT = Path(__file__).resolve().parents[1]

STAGE_KEYS = {
    "env": {"device", "torch", "cuda", "python", "cores", "memory_gib", "git", "packages", "gpu"},
    "tests": {"returncode", "passed", "failed", "skipped", "failures", "sync_debug_step"},
    "step": {"rows", "skipped_rows", "file"},
    "profile": {"file", "wall_ms_per_step", "phases", "launches_per_step", "top"},
    "data": {"beton", "jpeg_root", "images", "workers", "generate_s", "write_s"},
    "train": {"file", "rows"},
    "entropy": {"file", "rows"},
    "run": {"returncode", "samples_per_s", "steps_logged", "estimate_gib", "peak_mem_gb", "throughput_row"},
    "summary": {"targets", "projections"},
}


@pytest.fixture(scope="module")
def cpu_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    work = tmp_path_factory.mktemp("gpu-check-work")
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--short", "--out", str(out),
                           "--work", str(work), "--budget-s", "1200"], cwd=ROOT, capture_output=True, text=True,
                          timeout=1500)
    return proc, out, work


def test_cpu_dry_run_of_the_check_runs_every_stage(cpu_check):
    proc, out, _ = cpu_check
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
    assert s["complete"] and list(s["stages"]) == STAGES + ["summary"]
    for name, keys in STAGE_KEYS.items():
        st = s["stages"][name]
        assert {"status", "seconds", "box_s", "result"} <= set(st), name
        assert keys <= set(st["result"]), (name, keys - set(st["result"]))
        # Nothing failed or was cut; what needs CUDA says so.
        assert st["status"] == "ok" or st["status"].startswith("skipped: no CUDA"), (name, st["status"])
        if name in BOXES:
            assert st["seconds"] <= BOXES[name][1] + 15
    assert s["stages"]["tests"]["status"].startswith("skipped: no CUDA")
    assert s["stages"]["tests"]["result"]["sync_debug_step"] == "skipped"
    step = s["stages"]["step"]["result"]
    assert {(r["recipe"], r["variant"]) for r in step["rows"]} == {
        ("two-view", "training setting"), ("multi-crop", "training setting"),
        ("two-view", "channels-last flipped"), ("two-view", "precision flipped")}
    assert all(r["samples_per_s"] > 0 and r["loss"] == r["loss"] for r in step["rows"])
    assert all(r["reason"].startswith("skipped: no CUDA") for r in step["skipped_rows"])
    train = s["stages"]["train"]["result"]["rows"][0]
    assert train["e2e_over_step"] > 0 and train["x_vs_released"] > 0
    run = s["stages"]["run"]["result"]
    assert run["returncode"] == 0 and run["steps_logged"] == 4 and run["samples_per_s"] > 0
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
    assert "## Stages" in md and "## Targets" in md and "## Projected cost" in md


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
    # A budget that leaves the step stage a few seconds: it is killed (or not started) and says so; env stays.
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fastmveb.bench.gpu_check", "--device", "cpu", "--short",
                           "--only", "env,step", "--budget-s", "15", "--out", str(out), "--work", str(tmp_path / "w")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    s = json.loads((out / "summary.json").read_text())
    assert s["stages"]["env"]["status"] == "ok"
    assert s["stages"]["step"]["status"].startswith("cut:"), s["stages"]["step"]
    assert s["stages"]["step"]["seconds"] <= 15
    assert "cut:" in (out / "summary.md").read_text()


def test_bad_arguments_are_one_line(tmp_path):
    for cmd in (["bash", "scripts/gpu_check.sh"],
                ["bash", "scripts/gpu_check.sh", "--out", str(tmp_path), "--bogus"],
                ["bash", "scripts/gpu_check.sh", "--out", str(tmp_path), "--python", "/nonexistent/python"],
                [sys.executable, "-m", "fastmveb.bench.gpu_check", "--out", str(tmp_path), "--only", "nope"]):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, cmd
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (cmd, proc.stderr)


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
