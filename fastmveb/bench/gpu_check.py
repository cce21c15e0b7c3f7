"""The GPU check: every speed figure of fastmveb in one time-boxed command, ``make gpu-check OUT=DIR``.

    bash scripts/gpu_check.sh --out DIR [--wheelhouse WH]        # one CUDA GPU: at most 8 minutes
    bash scripts/gpu_check.sh --device cpu --short --out DIR     # the same stages at tiny shapes on a CPU
    python -m fastmveb.bench.gpu_check --out DIR [--device cpu|cuda] [--short] [--budget-s S] [--only a,b]

Answers "what will this recipe cost on my machine?" before 200 GPU-hours are committed. Stages, in order, each
in its own process under its own time box (a stage that would overrun is cut, and says so); the summary is
rewritten after every stage, so a kill still leaves the stages that ended:

    env      GPU, driver, torch/CUDA, cores, memory, git revision, package versions
    tests    the gpu-marked tests (pytest -m gpu), among them the training step under
             torch.cuda.set_sync_debug_mode("error") (tests/test_hostsync.py)
    step     bench step: ResNet-50 2x224 and 2x224 + 6x96, bf16, channels-last, compiled, at the recipe's
             per-device batch (128) and at the largest per-device batch that fits; compile, channels-last and
             precision each flipped once (two-view); rcs/rn50_fast.yaml's view sizes (for its cost)
    profile  bench profile, multi-crop: time and kernel launches per phase, top kernels
    data     a beton of photo-sized JPEGs (500-px long side, ImageNet's shapes), written on all cores
    train    bench train, multi-crop, on that beton: FFCV decode -> views -> step, next to the compute-bound
             step and the released-style PIL pipeline in the same run
    entropy  the vMF entropy estimator at N = 128 ... 8192 (and the released algorithm where it fits)
    run      a time-boxed fastmveb/train.py --rc rcs/rn50.yaml start on that beton (one device, sync_bn off):
             samples/s and measured peak memory beside the dry run's estimate
    summary  every target met or missed; projected GPU-hours of rcs/rn50.yaml and rcs/rn50_fast.yaml on 1 and
             8 GPUs (fastmveb.plan with the throughputs measured here; pass summary.json to
             ``train.py --dry-run --throughput-from``)

Results in OUT (at most 8 files): summary.json (one entry per stage under "stages", targets, projections,
the measured throughput rows), summary.md, gpu_check.log (everything printed), and the step, profile, train and
entropy results in the format of benchmarks/results/ (commit them there). On a CPU the CUDA-only parts (the
sync-debug mode, the largest batch, the compiled flip, rn50_fast's sizes) are reported "skipped: ..." and the
targets (written for one H100/H200) are shown but not judged.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from fastmveb.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[2]

# Time boxes in seconds (CUDA, CPU --short). The CUDA boxes add up to 480 s = 8 minutes; --budget-s caps
# the whole run as well, and each stage gets at most what is left of it.
BOXES = {
    "env": (20, 30), "tests": (55, 120), "step": (150, 150), "profile": (40, 90), "data": (40, 90),
    "train": (65, 180), "entropy": (30, 90), "run": (80, 150),
}
STAGES = list(BOXES)
SUMMARY_RESERVE_S = 8         # kept back from the budget for the summary
TARGETS = {                   # one H100/H200, ResNet-50, bf16 (issue 20)
    "two_view_samples_per_s": 2000.0,
    "multi_crop_samples_per_s": 1400.0,
    "e2e_over_step": 0.9,
    "x_vs_released": 4.0,
    "peak_memory_vs_estimate": 0.2,       # |measured / estimate - 1| at most this
}


# ------------------------------------------------------------------------------------------------- files
def atomic_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def stage_file(work: Path, name: str) -> Path:
    return work / f"stage-{name}.json"


class StageResult:
    """What a stage child writes, rewritten after each piece (a cut stage keeps what it had)."""

    def __init__(self, work: Path, name: str):
        self.path, self.data = stage_file(work, name), {"result": {}}

    def set(self, **kw) -> None:
        self.data["result"].update(kw)
        atomic_json(self.path, self.data)

    def skip(self, reason: str) -> None:
        self.data["skipped"] = reason
        atomic_json(self.path, self.data)


def bench_args(stage: str, argv: list[str]):
    """The argparse namespace `python -m fastmveb.bench STAGE argv...` would build (same defaults)."""
    import importlib
    from fastmveb.bench.__main__ import _parser
    return _parser(stage, importlib.import_module(f"fastmveb.bench.{stage}")).parse_args(argv)


def copy_result(path: str | Path, out: Path) -> str:
    """Copy a benchmark's JSON (benchmarks/results format) into OUT; its .md stays in the work folder."""
    dst = out / Path(path).name
    shutil.copyfile(path, dst)
    return dst.name


def common_flags(args) -> list[str]:
    return ["--device", args.device] + (["--short"] if args.short else [])


def cpu_short(args) -> bool:
    """The CPU dry run of the check (make test runs it): every stage at the smallest shapes that still run it."""
    return bool(args.short) and args.device != "cuda"


def tiny_batch(args) -> list[str]:
    # A batch of 8 (ResNet-10, 2x40 + 6x20 px): each CPU stage in seconds; the CUDA check keeps the recipe's batch.
    return ["--batch-size", "8"] if cpu_short(args) else []


# ------------------------------------------------------------------------------------------------ stages
def stage_env(args, res: StageResult) -> None:
    import platform
    import torch
    from importlib.metadata import PackageNotFoundError, version
    from fastmveb.bench.common import device_name
    from fastmveb.checkpoint import git_revision
    info = {"device": device_name(args.device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
            "python": platform.python_version(), "platform": platform.platform(),
            "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)), "git": git_revision(),
            "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "loadavg": [round(x, 2) for x in os.getloadavg()]}
    try:
        info["memory_gib"] = int(open("/proc/meminfo").readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        info["memory_gib"] = None
    pkgs = {}
    for p in ("torchvision", "ffcv", "kornia", "accelerate", "numpy", "numba", "triton", "pytest"):
        try:
            pkgs[p] = version(p)
        except PackageNotFoundError:
            pkgs[p] = None
    info["packages"] = pkgs
    if args.device == "cuda":
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": p.total_memory / 2**30,
                       "multiprocessors": p.multi_processor_count, "count": torch.cuda.device_count()}
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=10)
            info["gpu"]["nvidia_smi"] = q.stdout.strip() or q.stderr.strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            info["gpu"]["nvidia_smi"] = f"unavailable: {e}"
    else:
        info["gpu"] = None
    res.set(**info)
    print("env: " + ", ".join(f"{k} {v}" for k, v in info.items() if k in ("device", "torch", "cuda", "cores")))


def junit_counts(path: Path) -> dict:
    """Passed / failed / skipped test names from a pytest junit XML file."""
    out = {"passed": [], "failed": [], "skipped": []}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            out["failed"].append(name)
        elif case.find("skipped") is not None:
            out["skipped"].append(name)
        else:
            out["passed"].append(name)
    return out


def stage_tests(args, res: StageResult, work: Path) -> int:
    junit = work / "gpu-tests.xml"
    # The step and profile benchmarks' own gpu test is deselected: the step and profile stages run the same
    # code at the recipe's size, and its two compiles alone would take this stage's box.
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "--deselect", "tests/test_bench.py::test_step_and_profile_on_cuda"]
    # On a CPU every gpu test skips: collecting one file proves the stage (pytest, report, sync-test lookup)
    # without importing the whole suite.
    cmd += [str(ROOT / "tests" / "test_hostsync.py")] if cpu_short(args) else [str(ROOT / "tests")]
    print(" ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    if not junit.is_file():
        res.set(returncode=rc, error="pytest wrote no report (is pytest installed?)")
        return 1
    c = junit_counts(junit)
    sync = [n for n in c["passed"] + c["failed"] + c["skipped"] if "no_cuda_sync" in n]
    sync_status = ("passed" if any(n in c["passed"] for n in sync) else
                   "failed" if any(n in c["failed"] for n in sync) else "skipped" if sync else "not found")
    res.set(returncode=rc, passed=len(c["passed"]), failed=len(c["failed"]), skipped=len(c["skipped"]),
            failures=c["failed"], sync_debug_step=sync_status)
    if args.device != "cuda":
        res.skip("no CUDA: every gpu-marked test skips (the sync-debug step among them)")
    return 0 if rc in (0, 5) else 1


def largest_batch(capacity_gib: float, peak_gib: float, batch: int, per_sample_gib: float,
                  headroom: float = 0.9, multiple: int = 64) -> int:
    """The per-device batch expected to fit: the measured peak at ``batch`` grown by the dry run's per-sample
    activations up to ``headroom`` of the card, rounded down to ``multiple`` (at least ``batch``)."""
    if per_sample_gib <= 0:
        return batch
    extra = (headroom * capacity_gib - peak_gib) / per_sample_gib
    return max(batch, int((batch + extra) // multiple * multiple))


def _step_row(step_args, device, n_local, extra, warmup, iters, label, recipe) -> dict:
    from fastmveb.bench.common import bench_config, default_threads
    from fastmveb.bench.step import measure_step
    cfg = bench_config(step_args, device, n_local, extra)
    row = {"recipe": recipe, "variant": label, **measure_step(cfg, device, warmup, iters,
                                                               default_threads(step_args, device))}
    print(f"step {recipe:10s} {label:32s} {row['samples_per_s']:9.1f} samples/s {row['step_ms']:8.1f} ms/step "
          f"peak {row['peak_mem_gb']:.2f} GiB", flush=True)
    return row


def stage_step(args, res: StageResult, out: Path, work: Path) -> int:
    import torch
    from fastmveb.bench.common import bench_config, environment, free, step_iters, write_results
    from fastmveb.bench.step import COLUMNS, measure_step
    from fastmveb.plan import estimate_memory
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    step_args = bench_args("step", common_flags(args) + tiny_batch(args) + ["--out-dir", str(work)])
    warmup, iters = step_iters(step_args, device)
    rows, skipped = [], []
    res.set(rows=rows, skipped_rows=skipped)

    def add(n_local, extra, label, recipe):
        oom = None
        try:
            rows.append(_step_row(step_args, device, n_local, extra, warmup, iters, label, recipe))
        except torch.OutOfMemoryError as e:                    # a batch that does not fit: say so, go on
            oom = str(e).splitlines()[0]
        if oom:                                                # freed once the exception (and its frames) is gone
            free(device, True)
            skipped.append({"recipe": recipe, "variant": label, "reason": f"out of memory: {oom}"})
        res.set(rows=rows, skipped_rows=skipped)

    add(0, (), "training setting", "two-view")
    add(6, (), "training setting", "multi-crop")
    base = bench_config(step_args, device, 0)
    cl = base.model.channels_last
    if cuda:
        add(0, (("train", "compile", "false"),), "compile flipped", "two-view")
    else:
        skipped.append({"recipe": "two-view", "variant": "compile flipped",
                        "reason": "skipped: no CUDA (inductor's compile takes minutes on this CPU)"})
    add(0, (("model", "channels_last", not cl), ("views", "channels_last", not cl)), "channels-last flipped",
        "two-view")
    add(0, (("train", "mixed_precision", "no" if base.train.mixed_precision == "bf16" else "bf16"),),
        "precision flipped", "two-view")
    if cuda:
        capacity = torch.cuda.get_device_properties(device).total_memory / 2**30
        max_batch = {}
        for recipe, n_local in (("two-view", 0), ("multi-crop", 6)):
            ref = next((r for r in rows if r["recipe"] == recipe and r["variant"] == "training setting"), None)
            if ref is None:
                continue
            cfg = bench_config(step_args, device, n_local)
            b0 = cfg.data.global_batch_size
            per_sample = (estimate_memory(cfg, 2 * b0, 2 * b0, 1)["activations"] -
                          estimate_memory(cfg, b0, b0, 1)["activations"]) / b0
            b = largest_batch(capacity, ref["peak_mem_gb"], b0, per_sample)
            for _ in range(3):                                 # an estimate: step down when it does not fit
                if b <= b0:
                    break
                n_ok = len(rows)
                add(n_local, (("data", "global_batch_size", b), ("data", "per_device_batch_size", 0)),
                    f"largest batch that fits ({b})", recipe)
                if len(rows) > n_ok:
                    max_batch[recipe] = b
                    break
                b = max(b0, int(b * 0.8) // 64 * 64)
            res.set(max_batch=max_batch, capacity_gib=capacity)
        # rcs/rn50_fast.yaml's sizes: its cost can only be projected from rows measured at every size it trains at.
        from fastmveb.config import load_config
        from fastmveb.resolution import schedule
        fast = load_config(str(ROOT / "rcs" / "rn50_fast.yaml"))
        fast_args = bench_args("step", common_flags(args) + ["--rc", str(ROOT / "rcs" / "rn50_fast.yaml")])
        for _, _, r in reversed(schedule(fast)):
            cfg_extra = (("views", "global_size", r.global_size), ("views", "local_size", r.local_size),
                         ("views", "res_start_size", 0), ("data", "decode_size", r.decode_size))
            oom = None
            try:
                cfg = bench_config(fast_args, device, fast.views.n_local, cfg_extra)
                row = {"recipe": "rn50_fast", "variant": f"rn50_fast {r.global_size}/{r.local_size}",
                       **measure_step(cfg, device, warmup, iters, None)}
                rows.append(row)
                print(f"step rn50_fast {row['views']:20s} {row['samples_per_s']:9.1f} samples/s", flush=True)
            except torch.OutOfMemoryError as e:
                oom = str(e).splitlines()[0]
            if oom:
                free(device, True)
                skipped.append({"recipe": "rn50_fast", "variant": f"{r.global_size}/{r.local_size}",
                                "reason": f"out of memory: {oom}"})
            res.set(rows=rows, skipped_rows=skipped)
    else:
        skipped.append({"recipe": "two-view, multi-crop", "variant": "largest batch that fits",
                        "reason": "skipped: no CUDA (the search sizes the batch to the GPU's memory)"})
        skipped.append({"recipe": "rn50_fast", "variant": "its view sizes", "reason": "skipped: no CUDA"})
    columns = ["recipe", "variant"] + COLUMNS[1:]
    settings = {"rc": "rcs/rn50.yaml" if cuda else "rcs/tiny.yaml", "short": bool(args.short), "device": str(device),
                "warmup_steps": warmup, "timed_steps": iters, "inputs": "random views already on the device",
                "by": "python -m fastmveb.bench.gpu_check (stage step)", "skipped_rows": skipped}
    path = write_results("step", environment(device), settings, rows, columns, out_dir=work)
    res.set(rows=rows, skipped_rows=skipped, file=copy_result(path, out))
    return 0


def stage_profile(args, res: StageResult, out: Path, work: Path) -> int:
    from fastmveb.bench import profile
    got = profile.main(bench_args("profile", common_flags(args) + tiny_batch(args) + [
        "--recipes", "multi-crop", "--out-dir", str(work), "--top", "12"]))
    rows = got["rows"]
    res.set(file=copy_result(got["path"], out),
            wall_ms_per_step=next(r["ms_per_step"] for r in rows if r["kind"] == "wall"),
            phases={r["name"]: round(r["share"], 4) for r in rows if r["kind"] == "phase"},
            launches_per_step={r["name"].split(":")[0]: r["calls_per_step"] for r in rows if r["kind"] == "launches"},
            top=[{"name": r["name"], "ms_per_step": r["ms_per_step"], "share": r["share"]}
                 for r in rows if r["kind"] == "op"])
    return 0


def _make_photo(job: tuple[int, str]) -> None:
    import numpy as np
    from PIL import Image
    from fastmveb.bench.common import photo
    i, path = job
    Image.fromarray(photo(i, np.random.default_rng(i))).save(path, quality=90)


def photo_beton(work: Path, n: int, workers: int) -> tuple[Path, Path, float]:
    """N photo-sized JPEGs in one ImageFolder class (the released pipeline reads the tree) and their beton."""
    from multiprocessing import get_context
    from dataset_prep.writer import write_beton
    jpeg = work / "photos" / "jpeg"
    (jpeg / "c0").mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(i, str(jpeg / "c0" / f"{i:05d}.jpg")) for i in range(n)]
    with get_context("spawn").Pool(workers) as pool:
        pool.map(_make_photo, jobs, chunksize=16)
    gen_s = time.perf_counter() - t0
    beton = work / "photos" / "train.beton"
    write_beton([(p, 0) for _, p in jobs], beton, max_side=512, num_workers=workers, progress=False,
                max_pixels=500 * 500, force=True)
    return beton, jpeg, gen_s


def stage_data(args, res: StageResult, work: Path) -> int:
    n = 96 if cpu_short(args) else 5000          # rn50: one 4096-sample step per epoch; CPU: 6 steps of 16
    workers = max(1, len(os.sched_getaffinity(0)))
    t0 = time.perf_counter()
    beton, jpeg, gen_s = photo_beton(work, n, workers)
    dt = time.perf_counter() - t0
    res.set(beton=str(beton), jpeg_root=str(jpeg), images=n, workers=workers, generate_s=gen_s,
            write_s=dt - gen_s, beton_mib=beton.stat().st_size / 2**20)
    print(f"data: {n} photo-sized JPEGs in {gen_s:.1f} s, beton in {dt - gen_s:.1f} s ({beton})", flush=True)
    return 0


def _photos(work: Path) -> tuple[Path, Path]:
    beton, jpeg = work / "photos" / "train.beton", work / "photos" / "jpeg"
    if not beton.is_file():
        raise SystemExit("error: the photo beton is missing: the data stage did not finish")
    return beton, jpeg


def stage_train(args, res: StageResult, out: Path, work: Path) -> int:
    from fastmveb.bench import train
    beton, jpeg = _photos(work)
    workers = str(max(1, len(os.sched_getaffinity(0))))
    got = train.main(bench_args("train", common_flags(args) + [
        "--recipes", "multi-crop", "--beton", str(beton), "--jpeg-root", str(jpeg), "--workers", workers,
        "--out-dir", str(work)] + (["--warmup", "5", "--steps", "30"] if args.device == "cuda" else []) +
        (tiny_batch(args) + ["--warmup", "1", "--steps", "3"] if cpu_short(args) else [])))
    keys = ("recipe", "views", "arch", "batch", "workers", "fastmveb_samples_per_s", "step_samples_per_s",
            "e2e_over_step", "data_wait_frac", "released_samples_per_s", "released_precision", "x_vs_released")
    res.set(file=copy_result(got["path"], out), rows=[{k: r.get(k) for k in keys} for r in got["rows"]])
    return 0


def stage_entropy(args, res: StageResult, out: Path, work: Path) -> int:
    from fastmveb.bench import entropy
    ns = ["128"] if cpu_short(args) else \
        ["128", "256", "512", "1024", "2048", "4096", "8192"]
    got = entropy.main(bench_args("entropy", common_flags(args) + ["--n", *ns, "--out-dir", str(work)]))
    path = sorted(work.glob("entropy-*.json"))[-1]
    res.set(file=copy_result(path, out),
            rows=[{k: r.get(k) for k in ("N", "d", "method", "ms", "peak_mib", "speedup", "rel_diff", "note")}
                  for r in got["rows"]])
    return 0


def run_overrides(args, beton: Path) -> tuple[str, list[str]]:
    """The training start's rc and overrides: the recipe on one device, nothing but training."""
    common = [f"data.train_beton={beton}", f"data.val_beton={beton}", "model.sync_bn=false", "train.log_every=1",
              "train.ckpt_every_steps=0", "train.ckpt_every_epochs=0", "eval.knn_every_epochs=0",
              "eval.knn_at_end=false", "train.progress=false", "train.name=gpu-check",
              f"data.num_workers={max(1, len(os.sched_getaffinity(0)))}"]
    if args.device == "cuda":
        return str(ROOT / "rcs" / "rn50.yaml"), common + ["train.max_steps=200"]
    # CPU: the demo recipe on the photo beton (96 images: 6 steps of 16; 4 logged)
    return str(ROOT / "rcs" / "tiny.yaml"), common + ["train.max_steps=4", "data.global_batch_size=16"]


def stage_run(args, res: StageResult, work: Path, box_s: float) -> int:
    import torch
    from fastmveb.config import load_config
    from fastmveb.plan import make_plan
    from fastmveb.resolution import views_label
    from fastmveb.build import uses_compile
    from fastmveb.bench.common import device_name
    beton, _ = _photos(work)
    rc, overrides = run_overrides(args, beton)
    run_root = work / "runs"
    overrides.append(f"train.run_dir={run_root}")
    cfg = load_config(rc, overrides)
    plan = make_plan(cfg, 1, None, memory=True)
    est = plan.memory.get("total")
    metrics = run_root / "gpu-check" / "metrics.jsonl"
    res.set(rc=os.path.relpath(rc, ROOT), overrides=overrides[:-1], estimate_gib=est,
            plan={"micro_batch": plan.micro_batch, "accum_steps": plan.accum_steps, "global_batch": plan.global_batch})
    cmd = [sys.executable, str(ROOT / "fastmveb" / "train.py"), "--rc", rc, *overrides]
    print(" ".join(cmd), flush=True)
    # The training itself runs until the box is nearly spent (the child's own box covers this process's
    # start-up too), then is stopped: a training start, not a run to completion.
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + max(10.0, box_s - 15)
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(1)
    stopped = proc.poll() is None
    if stopped:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    rows = []
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass                                       # a line cut by the stop
    steady = [r["samples_per_s"] for r in rows[1:] if "samples_per_s" in r]   # the first step compiles
    peaks = [r["peak_mem_gb"] for r in rows if r.get("peak_mem_gb") is not None]
    device = torch.device(args.device)
    result = {"returncode": proc.returncode, "stopped_at_box": stopped, "steps_logged": len(rows),
              "samples_per_s": statistics.median(steady) if steady else None,
              "first_step_s": rows[0].get("time_total") if rows else None,
              "peak_mem_gb": max(peaks) if peaks else None,
              "loss_last": rows[-1].get("loss") if rows else None}
    if result["peak_mem_gb"] and est:
        result["peak_over_estimate"] = result["peak_mem_gb"] / est
    if result["samples_per_s"]:
        result["throughput_row"] = {"device": device_name(device), "arch": cfg.model.arch, "views": views_label(cfg),
                                    "batch": plan.micro_batch, "precision": cfg.train.mixed_precision,
                                    "compile": uses_compile(cfg, device), "channels_last": cfg.model.channels_last,
                                    "samples_per_s": result["samples_per_s"], "source": "train",
                                    "file": "summary.json (stage run)"}
    res.set(**result)
    if not steady:
        print("error: the training start logged no steady-state step", file=sys.stderr)
        return 1
    return 0 if (stopped or proc.returncode == 0) else 1


def run_child(args) -> int:
    work, out = Path(args.work), Path(args.out)
    res = StageResult(work, args.stage)
    atomic_json(res.path, res.data)
    if args.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            res.skip("no CUDA: torch sees no GPU")
            return 0
    name = args.stage
    if name == "env":
        stage_env(args, res)
        return 0
    if name == "tests":
        return stage_tests(args, res, work)
    if name == "step":
        return stage_step(args, res, out, work)
    if name == "profile":
        return stage_profile(args, res, out, work)
    if name == "data":
        return stage_data(args, res, work)
    if name == "train":
        return stage_train(args, res, out, work)
    if name == "entropy":
        return stage_entropy(args, res, out, work)
    if name == "run":
        return stage_run(args, res, work, args.box_s)
    raise SystemExit(f"error: unknown stage {name}")


# ------------------------------------------------------------------------------------------ orchestration
class Tee:
    """Everything printed goes to the console and to OUT/gpu_check.log."""

    def __init__(self, path: Path):
        self.f = open(path, "a", buffering=1)

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.f.write(text)


def run_stage_process(args, name: str, box_s: float, tee: Tee) -> tuple[int | None, float]:
    """The stage in its own process group, its output teed; killed (group-wide) when its box is spent."""
    cmd = [sys.executable, "-m", "fastmveb.bench.gpu_check", "--stage", name, "--out", args.out, "--work", args.work,
           "--device", args.device, "--box-s", str(box_s)] + (["--short"] if args.short else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    reader = threading.Thread(target=lambda: [tee.write(line) for line in proc.stdout], daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=box_s)
    except subprocess.TimeoutExpired:
        rc = None
        for sig, grace in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    reader.join(timeout=5)
    return rc, time.monotonic() - t0


def stage_entry(work: Path, name: str, rc: int | None, seconds: float, box_s: float, log_tail: str) -> dict:
    try:
        data = json.loads(stage_file(work, name).read_text())
    except (OSError, json.JSONDecodeError):
        data = {"result": {}}
    if data.get("skipped"):
        status = f"skipped: {data['skipped']}"
    elif rc is None:
        status = f"cut: its {box_s:.0f}-s time box ran out (the results it wrote before are kept)"
    elif rc != 0:
        last = [ln for ln in log_tail.splitlines() if ln.strip()]
        status = f"failed: exit {rc}" + (f": {last[-1][:300]}" if last else "")
    else:
        status = "ok"
    return {"status": status, "seconds": round(seconds, 1), "box_s": round(box_s), "result": data.get("result", {})}


def throughput_rows(stages: dict) -> list[dict]:
    """The measured rows in the format fastmveb/throughput.py reads (train.py --throughput-from)."""
    env = stages.get("env", {}).get("result", {})
    rows = []
    for r in stages.get("step", {}).get("result", {}).get("rows", []):
        rows.append({"device": env.get("device"), "arch": r["arch"], "views": r["views"], "batch": r["batch"],
                     "precision": r["precision"], "compile": r["compile"], "channels_last": r["channels_last"],
                     "samples_per_s": r["samples_per_s"], "source": "step",
                     "file": stages["step"]["result"].get("file", "summary.json (stage step)")})
    t = stages.get("run", {}).get("result", {}).get("throughput_row")
    if t:
        rows.append(t)
    return rows


def _target(name: str, value, goal: str, ok: bool | None, judged: bool) -> dict:
    if value is None:
        status = "not measured"
    elif not judged:
        status = "not judged (the targets are for one H100/H200 with ResNet-50)"
    else:
        status = "met" if ok else "missed"
    return {"target": name, "value": value, "goal": goal, "status": status}


def targets(stages: dict, cuda: bool) -> list[dict]:
    step_rows = stages.get("step", {}).get("result", {}).get("rows", [])
    judged = cuda and all(r.get("arch") == "resnet50" for r in step_rows)

    def ref(recipe):
        return next((r for r in step_rows if r["recipe"] == recipe and r["variant"] == "training setting"), {})

    def sps(recipe):
        return ref(recipe).get("samples_per_s")
    train = (stages.get("train", {}).get("result", {}).get("rows") or [{}])[0]
    run = stages.get("run", {}).get("result", {})
    two, multi = sps("two-view"), sps("multi-crop")
    e2e, rel = train.get("e2e_over_step"), train.get("x_vs_released")
    ratio = run.get("peak_over_estimate")
    return [
        _target(f"two-view {ref('two-view').get('views', '')} step, samples/s", two, f">= {TARGETS['two_view_samples_per_s']:,.0f}",
                two is not None and two >= TARGETS["two_view_samples_per_s"], judged),
        _target(f"multi-crop {ref('multi-crop').get('views', '')} step, samples/s", multi, f">= {TARGETS['multi_crop_samples_per_s']:,.0f}",
                multi is not None and multi >= TARGETS["multi_crop_samples_per_s"], judged),
        _target("end to end / compute-bound step (multi-crop)", e2e, f">= {TARGETS['e2e_over_step']}",
                e2e is not None and e2e >= TARGETS["e2e_over_step"], judged),
        _target("end to end / released-style PIL pipeline", rel, f">= {TARGETS['x_vs_released']}x",
                rel is not None and rel >= TARGETS["x_vs_released"], judged),
        _target("training start: measured peak memory / dry-run estimate", ratio,
                f"within {TARGETS['peak_memory_vs_estimate']:.0%}",
                ratio is not None and abs(ratio - 1) <= TARGETS["peak_memory_vs_estimate"], judged),
    ]


def projections(rows: list[dict], device: str | None) -> list[dict]:
    """GPU-hours of the two ImageNet recipes from the rows measured here (fastmveb.plan: exact matches only)."""
    from fastmveb.config import load_config
    from fastmveb.plan import IMAGENET_TRAIN, make_plan
    out = []
    for rc in ("rn50.yaml", "rn50_fast.yaml"):
        cfg = load_config(str(ROOT / "rcs" / rc))
        for world in (1, 8):
            plan = make_plan(cfg, world, IMAGENET_TRAIN, memory=False, throughput=rows, device=device)
            detail = plan.cost_detail[0] if plan.cost_detail else {}
            hours = detail.get("gpu_hours")
            out.append({"rc": f"rcs/{rc}", "gpus": world, "gpu_hours": hours,
                        "wall_hours": hours / world if hours is not None else None, "cost": plan.cost})
    return out


def write_summary(args, stages: dict, t_start: float, final: bool) -> dict:
    out = Path(args.out)
    cuda = args.device == "cuda"
    rows = throughput_rows(stages)
    summary = {"check": "fastmveb gpu-check", "device": stages.get("env", {}).get("result", {}).get("device"),
               "short": bool(args.short), "budget_s": args.budget_s, "elapsed_s": round(time.monotonic() - t_start, 1),
               "complete": final, "stages": stages, "throughput": rows}
    if final:
        try:
            summary["targets"] = targets(stages, cuda)
            summary["projections"] = projections(rows, summary["device"])
            stages["summary"] = {"status": "ok", "seconds": 0.0, "box_s": SUMMARY_RESERVE_S,
                                 "result": {"targets": len(summary["targets"]),
                                            "projections": len(summary["projections"])}}
        except Exception as e:                        # the stages' results must still be written
            stages["summary"] = {"status": f"failed: {type(e).__name__}: {e}", "seconds": 0.0,
                                 "box_s": SUMMARY_RESERVE_S, "result": {}}
    atomic_json(out / "summary.json", summary)
    (out / "summary.md").write_text(summary_markdown(summary))
    return summary


def summary_markdown(s: dict) -> str:
    from fastmveb.bench.common import markdown_table
    env = s["stages"].get("env", {}).get("result", {})
    lines = [f"# fastmveb gpu-check: {s['device']}", "",
             f"torch {env.get('torch')}, CUDA {env.get('cuda')}, {env.get('cores')} cores, git {env.get('git')}, "
             f"{env.get('date')}; {s['elapsed_s']:.0f} s of a {s['budget_s']:.0f}-s budget"
             + (" (--short)" if s["short"] else ""), "",
             "## Stages", "",
             markdown_table([{"stage": k, "status": v["status"], "seconds": v["seconds"], "box_s": v["box_s"]}
                             for k, v in s["stages"].items()])]
    step = s["stages"].get("step", {}).get("result", {})
    if step.get("rows"):
        lines += ["", "## Step (compute bound, random views on the device)", "",
                  markdown_table(step["rows"], ["recipe", "variant", "views", "arch", "batch", "precision", "compile",
                                                "channels_last", "samples_per_s", "step_ms", "first_step_s",
                                                "peak_mem_gb"])]
        lines += [f"- {r['recipe']} {r['variant']}: {r['reason']}" for r in step.get("skipped_rows", [])]
    train = s["stages"].get("train", {}).get("result", {})
    if train.get("rows"):
        lines += ["", "## End to end (FFCV -> views -> step) beside the step and the released-style pipeline", "",
                  markdown_table(train["rows"])]
    run = s["stages"].get("run", {}).get("result", {})
    if run:
        lines += ["", "## Training start (fastmveb/train.py)", "",
                  f"{run.get('rc')}: {run.get('steps_logged')} steps logged, median {run.get('samples_per_s') or 0:,.1f} "
                  f"samples/s after the first; peak {run.get('peak_mem_gb')} GiB measured vs "
                  f"{run.get('estimate_gib') or 0:.1f} GiB estimated by the dry run"]
    if s.get("targets"):
        lines += ["", "## Targets", "", markdown_table(s["targets"])]
    if s.get("projections"):
        lines += ["", "## Projected cost (ImageNet-1k)", "",
                  markdown_table([{k: p[k] for k in ("rc", "gpus", "gpu_hours", "wall_hours")} for p in s["projections"]]),
                  ""] + [f"- {p['rc']} on {p['gpus']}: {p['cost']}" for p in s["projections"]]
    if s.get("throughput"):
        lines += ["", "## Measured throughput (train.py --dry-run --throughput-from summary.json)", "",
                  markdown_table(s["throughput"], ["source", "arch", "views", "batch", "precision", "compile",
                                                   "channels_last", "samples_per_s"])]
    prof = s["stages"].get("profile", {}).get("result", {})
    if prof.get("phases"):
        lines += ["", "## Where the multi-crop step goes (profile)", "",
                  ", ".join(f"{k} {v:.0%}" for k, v in prof["phases"].items()),
                  "", "launches per step: " + ", ".join(f"{k} {v:,.0f}" for k, v in prof.get("launches_per_step", {}).items())]
    return "\n".join(lines) + "\n"


def orchestrate(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out.resolve())
    if args.work is None:
        args.work = tempfile.mkdtemp(prefix="fastmveb-gpu-check-")
    Path(args.work).mkdir(parents=True, exist_ok=True)
    args.work = str(Path(args.work).resolve())
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    only = [s.strip() for s in args.only.split(",")] if args.only else STAGES
    bad = [s for s in only if s not in STAGES]
    if bad:
        raise UserError(f"unknown stage(s) {', '.join(bad)}; choose from {', '.join(STAGES)}")
    tee = Tee(out / "gpu_check.log")
    t_start = time.monotonic()
    tee.write(f"fastmveb gpu-check: device {args.device}{' (--short)' if args.short else ''}, budget {args.budget_s:.0f} s, "
              f"results in {args.out}, scratch in {args.work}\n")
    stages: dict = {}
    col = 1 if args.short and args.device != "cuda" else 0
    for name in STAGES:
        if name not in only:
            continue
        left = args.budget_s - SUMMARY_RESERVE_S - (time.monotonic() - t_start)
        box = min(BOXES[name][col], left)
        if box < 5:
            stages[name] = {"status": "cut: the check's time budget was spent before this stage", "seconds": 0.0,
                            "box_s": 0, "result": {}}
            continue
        tee.write(f"\n==== gpu-check {name} (time box {box:.0f} s) ====\n")
        log_mark = (out / "gpu_check.log").stat().st_size
        rc, seconds = run_stage_process(args, name, box, tee)
        with open(out / "gpu_check.log") as f:
            f.seek(log_mark)
            tail = f.read()[-4000:]
        stages[name] = stage_entry(Path(args.work), name, rc, seconds, box, tail)
        tee.write(f"==== {name}: {stages[name]['status']} in {seconds:.0f} s ====\n")
        write_summary(args, stages, t_start, final=False)
    summary = write_summary(args, stages, t_start, final=True)
    tee.write("\n" + summary_markdown(summary))
    tee.write(f"\nwrote {out / 'summary.json'}, {out / 'summary.md'}\n")
    failed = [k for k, v in stages.items() if v["status"].startswith("failed")]
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmveb.bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="results folder (at most 8 files are written there)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--short", action="store_true", help="tiny shapes (the CPU dry run of the check)")
    parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of the whole check "
                        "(default 480 = 8 minutes); every stage also has its own box")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(STAGES)}")
    parser.add_argument("--work", default=None, help="scratch folder (data, runs, pytest report); default a new "
                        "temporary folder")
    parser.add_argument("--stage", default=None, help=argparse.SUPPRESS)       # a stage's own process
    parser.add_argument("--box-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        return run_child(args)
    return orchestrate(args)


def cli(argv: list[str] | None = None) -> int:
    """``python -m fastmveb.bench.gpu_check``: main with a UserError as one ``error: ...`` line, exit 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
