"""The GPU check: every speed figure of fastmveb in one time-boxed command (README "Before a long run").

    bash scripts/gpu_check.sh --out DIR [--wheelhouse WH]        # one CUDA GPU: install + check within 540 s
    bash scripts/gpu_check.sh --device cpu --short --out DIR     # the same stages at tiny shapes on a CPU
    python -m fastmveb.bench.gpu_check --out DIR [--device cpu|cuda] [--short] [--budget-s S] [--only a,b] [--force]

The stages (STAGES, most valuable first) run in order, each in its own process under its own time box
(fastmveb/bench/runner.py), sharing one inductor cache. The summary (OUT/summary.json, summary.md) is rewritten
after every stage, so a kill still leaves the stages that ended. A non-empty OUT is refused unless --force.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from fastmveb.bench.runner import ROOT, Ctx, Result, Stage, run_stages, share_compile_cache, stop_group
from fastmveb.errors import UserError, run_cli

# One device call may run 600 s; the whole command (the wheelhouse install, 14-44 s measured, then the check) is
# planned to end within CALL_S. The default budget is DEFAULT_BUDGET_S, or less when the install took longer.
CALL_S, DEFAULT_BUDGET_S, SUMMARY_RESERVE_S = 540, 480, 10
# Compile assumption behind the CUDA boxes (none measured yet: no GPU was lent to this work). A cold inductor compile
# of a ResNet-50 training graph (forward + backward, dynamic=False) is commonly a minute or more: ~60 s per input
# size on a 16-core host, ~25 s for a forward-only graph (the EMA target), ~30 s for the view maker. So multi-crop at
# 128 (one online graph over 224 and 96 px, the target at 224) is ~145 s cold; two-view after it ~45 s (a new online
# graph, but the target's graph is in the shared FX-graph cache and most kernels in the kernel cache). train, run
# and profile then load the same graphs from the cache (~10-20 s each, dynamo still traces) instead of compiling for
# minutes. The flips and sweeps need new graphs: each runs compiled only if what is left of the step box holds a
# cold compile (the multi-crop row's first step), else eagerly, and says so.
MARGIN_S = 5                                # kept back inside a box for building a model, writing results


def _copy(path, ctx) -> str:
    """A benchmark's JSON (benchmarks/results format) into OUT; its .md stays in the work folder."""
    shutil.copyfile(path, Path(ctx.out) / Path(path).name)
    return Path(path).name


def _settings(ctx, **kw):
    from fastmveb.bench.common import settings
    # A CPU dry run steps at batch 8 (ResNet-10, 2x40 + 6x20 px): seconds per stage; CUDA keeps the recipe's 128.
    return settings(short=ctx.short, **({"batch_size": 8} if ctx.cpu_short else {}), **kw)


# ------------------------------------------------------------------------------------------------ stages
def stage_env(ctx, res) -> None:
    from fastmveb.bench.common import environment
    res.set(**environment(ctx.device, detail=True), compile_cache=os.environ.get("TORCHINDUCTOR_CACHE_DIR"))
    print("env: " + ", ".join(f"{k} {res.data['result'][k]}" for k in ("device", "torch", "cuda", "cpu_count")))


def junit_counts(path: Path) -> dict:
    """Passed / failed / skipped test names from a pytest junit XML file."""
    out = {"passed": [], "failed": [], "skipped": []}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kind = ("failed" if case.find("failure") is not None or case.find("error") is not None else
                "skipped" if case.find("skipped") is not None else "passed")
        out[kind].append(name)
    return out


def stage_tests(ctx, res) -> int:
    junit = Path(ctx.work) / "gpu-tests.xml"
    # The step benchmark's own gpu test is deselected: the step and profile stages ran the same code at the
    # recipe's size. On a CPU every gpu test skips: one file proves the stage without importing the whole suite.
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}",
           "--deselect", "tests/test_bench.py::test_step_and_profile_on_cuda",
           str(ROOT / "tests" / ("test_hostsync.py" if ctx.cpu_short else ""))]
    print(" ".join(cmd), flush=True)
    rc = subprocess.call(cmd, cwd=ROOT)
    if not junit.is_file():
        res.set(returncode=rc, error="pytest wrote no report (is pytest installed?)")
        return 1
    c = junit_counts(junit)
    sync = [n for n in sum(c.values(), []) if "no_cuda_sync" in n]
    res.set(returncode=rc, passed=len(c["passed"]), failed=len(c["failed"]), skipped=len(c["skipped"]),
            failures=c["failed"], sync_debug_step=next((k for k in ("passed", "failed", "skipped")
                                                        if any(n in c[k] for n in sync)), "not found"))
    if ctx.device != "cuda":
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


def fit_mode(compiled: bool, left_s: float, compile_s: float | None, steps_s: float) -> str:
    """How a step row fits what is left of the box: "compiled"; "eager" when its new graphs' compile (estimated
    as the cold compile ``compile_s`` measured first; None: not yet known, try) would not fit; "" when nothing fits."""
    if compiled and left_s >= (compile_s or 0) + steps_s + MARGIN_S:
        return "compiled"
    return "eager" if left_s >= steps_s + MARGIN_S else ""


def _largest_batch_rows(add, s, device, ref: dict) -> None:
    """Each recipe at the largest per-device batch expected to fit the card (``add``: stage_step's row maker)."""
    import torch
    from fastmveb.bench.common import bench_config
    from fastmveb.plan import estimate_memory
    capacity = torch.cuda.get_device_properties(device).total_memory / 2**30
    for recipe, n_local in [(r, n) for r, n in (("multi-crop", 6), ("two-view", 0)) if ref[r]]:
        cfg = bench_config(s, device, n_local)
        b0 = cfg.data.global_batch_size
        per_sample = (estimate_memory(cfg, 2 * b0, 2 * b0, 1)["activations"] -
                      estimate_memory(cfg, b0, b0, 1)["activations"]) / b0
        b = largest_batch(capacity, ref[recipe]["peak_mem_gb"], b0, per_sample)
        for _ in range(3):                              # an estimate: step down when it does not fit
            if b <= b0 or add(recipe, n_local, (("data", "global_batch_size", b),
                                                ("data", "per_device_batch_size", 0)),
                              f"largest batch that fits ({b})"):
                break
            b = max(b0, int(b * 0.8) // 64 * 64)


def _rn50_fast_rows(add, ctx) -> None:
    """rcs/rn50_fast.yaml's sizes: its cost can only be projected from rows measured at every size it trains at."""
    from fastmveb.config import load_config
    from fastmveb.resolution import schedule
    fast_rc = str(ROOT / "rcs" / "rn50_fast.yaml")
    fast = load_config(fast_rc)
    for _, _, r in reversed(schedule(fast)):
        add("rn50_fast", fast.views.n_local, (("views", "global_size", r.global_size),
                                              ("views", "local_size", r.local_size), ("views", "res_start_size", 0),
                                              ("data", "decode_size", r.decode_size)),
            f"rn50_fast {r.global_size}/{r.local_size}", st=_settings(ctx, rc=fast_rc))


def stage_step(ctx, res) -> int:
    import torch
    from fastmveb.bench.common import bench_config, default_threads, environment, free, step_iters, write_results
    from fastmveb.bench.stage_step import COLUMNS, VIT_RC, flips, measure_step, vit_rows
    from fastmveb.build import uses_compile
    device, cuda = torch.device(ctx.device), ctx.device == "cuda"
    s = _settings(ctx)
    (warmup, iters), threads = step_iters(s, device), default_threads(s, device)
    rows, skipped, cold = [], [], {}                        # cold: the first compiled row's first step (s)

    def add(recipe, n_local, extra, label, st=s, must=False):
        cfg = bench_config(st, device, n_local, extra)
        compiled = uses_compile(cfg, device)
        slowest = max([r["step_ms"] * (4 if r["compile"] else 1) for r in rows] or [0])   # eager: ~4x slower
        mode = "compiled" if must else fit_mode(compiled, ctx.left_s(), cold.get("s"), (warmup + iters) * slowest / 1e3)
        if not mode:
            skipped.append({"recipe": recipe, "variant": label, "reason": "cut: no time left in the step box"})
            return res.set(rows=rows, skipped_rows=skipped)
        if compiled and mode == "eager":
            cfg = bench_config(st, device, n_local, (*extra, ("train", "compile", "false")))
            label += " (eager: its compile would not fit the box)"
        oom = None
        try:
            row = {"recipe": recipe, "variant": label, **measure_step(cfg, device, warmup, iters, threads)}
        except torch.OutOfMemoryError as e:                 # a batch that does not fit: say so, go on
            oom = str(e).splitlines()[0]
        if oom:                                             # freed once the exception (and its frames) is gone
            free(device, True)
            skipped.append({"recipe": recipe, "variant": label, "reason": f"out of memory: {oom}"})
            return res.set(rows=rows, skipped_rows=skipped)
        if row["compile"] and "s" not in cold:
            cold["s"] = row["first_step_s"]
        rows.append(row)
        print(f"step {recipe:10s} {label:40s} {row['samples_per_s']:9.1f} samples/s {row['step_ms']:8.1f} ms/step "
              f"first step {row['first_step_s']:6.1f} s peak {row['peak_mem_gb']:.2f} GiB", flush=True)
        res.set(rows=rows, skipped_rows=skipped)
        return row

    # Most valuable first, so that a cut keeps the recipe's figures: multi-crop at 128, then two-view, then flips.
    ref = {"multi-crop": add("multi-crop", 6, (), "training setting", must=True),
           "two-view": add("two-view", 0, (), "training setting", must=True)}
    for label, extra in flips(bench_config(s, device, 0), device):
        if cuda or label != "compile flipped":
            add("two-view", 0, extra, label)
        else:
            skipped.append({"recipe": "two-view", "variant": label,
                            "reason": "skipped: no CUDA (inductor's compile takes minutes on this CPU)"})
    if cuda:
        _largest_batch_rows(add, s, device, ref)
        _rn50_fast_rows(add, ctx)
    else:
        skipped += [{"recipe": "two-view, multi-crop", "variant": "largest batch that fits",
                     "reason": "skipped: no CUDA (the search sizes the batch to the GPU's memory)"},
                    {"recipe": "rn50_fast", "variant": "its view sizes", "reason": "skipped: no CUDA"}]
    for recipe, n_local, extra, label in vit_rows(cuda):    # after every ResNet row: a cut keeps those
        add(recipe, n_local, extra, label, st=_settings(ctx, rc=str(ROOT / VIT_RC)))
    settings = {"rc": "rcs/rn50.yaml" if cuda else "rcs/tiny.yaml", "short": ctx.short, "device": ctx.device,
                "warmup_steps": warmup, "timed_steps": iters, "inputs": "random views already on the device",
                "by": "python -m fastmveb.bench.gpu_check (stage step)", "skipped_rows": skipped}
    path = write_results("step", environment(device), settings, rows, ["recipe", "variant"] + COLUMNS[1:],
                         out_dir=ctx.work)
    res.set(rows=rows, skipped_rows=skipped, file=_copy(path, ctx))


def stage_profile(ctx, res) -> None:
    import torch
    from fastmveb.bench import stage_profile as profile
    rows = (got := profile.run(_settings(ctx, recipes="multi-crop"), torch.device(ctx.device), top=12,
                               out_dir=ctx.work))["rows"]
    wall = next(r for r in rows if r["kind"] == "wall")
    res.set(file=_copy(got["path"], ctx), wall_ms_per_step=wall["ms_per_step"], first_step_s=wall["first_step_s"],
            phases={r["name"]: round(r["share"], 4) for r in rows if r["kind"] == "phase"},
            launches_per_step={r["name"].split(":")[0]: r["calls_per_step"] for r in rows if r["kind"] == "launches"},
            top=[{k: r[k] for k in ("name", "ms_per_step", "share")} for r in rows if r["kind"] == "op"])


def _photos(ctx, need: bool = True) -> tuple[Path, Path]:
    beton, jpeg = Path(ctx.work) / "photos" / "train.beton", Path(ctx.work) / "photos" / "jpeg"
    if need and not beton.is_file():
        raise UserError("the photo beton is missing: the data stage did not finish")
    return beton, jpeg


def stage_data(ctx, res) -> None:
    """N photo-sized JPEGs in one ImageFolder class (the released pipeline reads the tree) and their beton."""
    from dataset_prep.options import BetonOptions
    from dataset_prep.writer import write_beton
    from fastmveb.bench.common import write_photos
    n = 96 if ctx.cpu_short else 5000          # rn50: one 4096-sample step per epoch; CPU: 6 steps of 16
    workers = max(1, len(os.sched_getaffinity(0)))
    beton, jpeg = _photos(ctx, need=False)
    t0 = time.perf_counter()
    paths = write_photos(jpeg / "c0", n, workers)
    gen_s = time.perf_counter() - t0
    write_beton([(p, 0) for p in paths], beton, BetonOptions(max_side=512, num_workers=workers, progress=False,
                                                             force=True), max_pixels=500 * 500)
    dt = time.perf_counter() - t0
    res.set(beton=str(beton), jpeg_root=str(jpeg), images=n, workers=workers, generate_s=gen_s,
            write_s=dt - gen_s, beton_mib=beton.stat().st_size / 2**20)
    print(f"data: {n} photo-sized JPEGs in {gen_s:.1f} s, beton in {dt - gen_s:.1f} s ({beton})", flush=True)


def stage_train(ctx, res) -> None:
    import torch
    from fastmveb.bench import stage_train as train
    cuda = ctx.device == "cuda"
    step = {r["recipe"]: r for r in Result(ctx.work, "step").read()["result"].get("rows", [])
            if r["variant"] == "training setting"}        # the step stage's rows: no second compile and timing
    got = train.run(_settings(ctx, recipes="multi-crop"), torch.device(ctx.device), *_photos(ctx),
                    workers=max(1, len(os.sched_getaffinity(0))), warmup=5 if cuda else 1, steps=30 if cuda else 3,
                    out_dir=ctx.work, step_rows=step)
    keys = (*train.COLUMNS, "workers", "step_from")
    res.set(file=_copy(got["path"], ctx), rows=[{k: r.get(k) for k in keys} for r in got["rows"]])


def stage_entropy(ctx, res) -> None:
    from fastmveb.bench import stage_entropy as entropy
    got = entropy.run(ctx.device, [128] if ctx.cpu_short else entropy.NS, short=ctx.short, out_dir=ctx.work)
    keys = ("N", "d", "method", "ms", "peak_mib", "speedup", "rel_diff", "note")
    res.set(file=_copy(got["path"], ctx), rows=[{k: r.get(k) for k in keys} for r in got["rows"]])


def stage_run(ctx, res) -> int:
    """A training start of the recipe on one device (sync_bn off, nothing but training), stopped at its box."""
    import torch
    from fastmveb.bench.common import device_name, settings_of
    from fastmveb.config import load_config
    from fastmveb.plan import make_plan
    beton, run_root = _photos(ctx)[0], Path(ctx.work) / "runs"
    overrides = [f"data.train_beton={beton}", f"data.val_beton={beton}", "model.sync_bn=false", "train.log_every=1",
                 "train.ckpt_every_steps=0", "train.ckpt_every_epochs=0", "eval.knn_every_epochs=0",
                 "eval.knn_at_end=false", "train.progress=false", "train.name=gpu-check",
                 f"data.num_workers={max(1, len(os.sched_getaffinity(0)))}"]
    if ctx.device == "cuda":
        rc, overrides = str(ROOT / "rcs" / "rn50.yaml"), overrides + ["train.max_steps=200"]
    else:   # the demo recipe on the photo beton (96 images: 6 steps of 16; 4 logged)
        rc, overrides = str(ROOT / "rcs" / "tiny.yaml"), overrides + ["train.max_steps=4", "data.global_batch_size=16"]
    cfg = load_config(rc, overrides + [f"train.run_dir={run_root}"])
    plan = make_plan(cfg, 1, None, memory=True)
    est = plan.memory.get("total")
    res.set(rc=os.path.relpath(rc, ROOT), overrides=overrides, estimate_gib=est,
            plan={"micro_batch": plan.micro_batch, "accum_steps": plan.accum_steps, "global_batch": plan.global_batch})
    cmd = [sys.executable, str(ROOT / "fastmveb" / "train.py"), "--rc", rc, *overrides, f"train.run_dir={run_root}"]
    print(" ".join(cmd), flush=True)
    # Trains until the box is nearly spent (the box covers this process's start-up too), then stops: a training
    # start, not a run to completion.
    proc = subprocess.Popen(cmd, cwd=ROOT, start_new_session=True)
    while proc.poll() is None and ctx.left_s() > 2 * MARGIN_S:
        time.sleep(0.5)
    stopped = proc.poll() is None
    if stopped:
        stop_group(proc, MARGIN_S)
    rows = []
    metrics = run_root / "gpu-check" / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass                                            # a line cut by the stop
    steady = [r["samples_per_s"] for r in rows[1:] if "samples_per_s" in r]   # the first step compiles
    peaks = [r["peak_mem_gb"] for r in rows if r.get("peak_mem_gb") is not None]
    result = {"returncode": proc.returncode, "stopped_at_box": stopped, "steps_logged": len(rows),
              "samples_per_s": statistics.median(steady) if steady else None,
              "first_step_s": rows[0].get("time_total") if rows else None,
              "peak_mem_gb": max(peaks) if peaks else None, "loss_last": rows[-1].get("loss") if rows else None}
    if result["peak_mem_gb"] and est:
        result["peak_over_estimate"] = result["peak_mem_gb"] / est
    if steady:
        result["throughput_row"] = {"device": device_name(ctx.device), **settings_of(cfg, torch.device(ctx.device)),
                                    "batch": plan.micro_batch, "samples_per_s": result["samples_per_s"],
                                    "source": "train", "file": "summary.json (stage run)"}
    res.set(**result)
    if not steady:
        print("error: the training start logged no steady-state step", file=sys.stderr)
        return 1
    return 0 if (stopped or proc.returncode == 0) else 1


# The registry, most valuable first (a cut budget keeps the recipe's figures): name, stage, time box in seconds
# (CUDA, CPU --short; the CUDA boxes are planned from the compile costs above and sum, with the summary reserve,
# to DEFAULT_BUDGET_S), the result keys it writes, and what it measures (README's table is generated from this).
STAGES = [Stage(name, fn, box, keys, what) for name, fn, box, keys, what in (
    ("env", stage_env, (10, 30), ("device", "torch", "cuda", "python", "cpu_count", "memory_gib", "git", "packages",
                                  "gpu"), "GPU, driver, torch/CUDA, cores, memory, git revision, package versions"),
    ("step", stage_step, (200, 150), ("rows", "skipped_rows", "file"),
     "ResNet-50 2x224 + 6x96 (multi-crop), then 2x224, bf16, channels-last, compiled, at batch 128 (the first step, "
     "the compile, timed apart); then compile, channels-last and precision each flipped, the largest batch that "
     "fits, rcs/rn50_fast.yaml's sizes, then rcs/vit_s16.yaml's ViT-S/16 multi-crop, compiled while the box holds a "
     "compile, else eagerly"),
    ("data", stage_data, (20, 90), ("beton", "jpeg_root", "images", "workers", "generate_s", "write_s"),
     "a beton of 5,000 photo-sized JPEGs (500-px long side), written on all cores"),
    ("train", stage_train, (95, 180), ("file", "rows"),
     "multi-crop end to end on that beton (FFCV decode -> views -> step) beside the compute-bound step and the "
     "released-style PIL pipeline"),
    ("run", stage_run, (80, 150), ("returncode", "samples_per_s", "steps_logged", "first_step_s", "estimate_gib",
                                   "peak_mem_gb", "throughput_row"),
     "a `fastmveb/train.py --rc rcs/rn50.yaml` start on that beton (one device, sync_bn off) stopped at its box: "
     "samples/s after the first (compiling) step, peak memory beside the dry run's estimate"),
    ("entropy", stage_entropy, (20, 90), ("file", "rows"),
     "the vMF entropy estimator at N = 128 ... 8192 beside the released algorithm where it fits"),
    ("profile", stage_profile, (25, 90), ("file", "wall_ms_per_step", "first_step_s", "phases", "launches_per_step",
                                          "top"), "multi-crop: time and kernel launches per phase, top kernels"),
    ("tests", stage_tests, (20, 120), ("returncode", "passed", "failed", "skipped", "failures", "sync_debug_step"),
     "the gpu-marked tests, the training step under torch.cuda.set_sync_debug_mode(\"error\") among them"))]
NAMES = [st.name for st in STAGES]


# ------------------------------------------------------------------------------------------ orchestration
README_BEGIN, README_END = "<!-- gpu-check:begin (python -m fastmveb.bench.gpu_check --readme) -->", \
    "<!-- gpu-check:end -->"


def readme_block() -> str:
    """The README's stage table, from STAGES (one home for the boxes)."""
    from fastmveb.bench.common import markdown_table
    return markdown_table([{"stage": f"`{st.name}`", "box (s)": st.box[0], "what": st.what} for st in STAGES]) + \
        f"\n\nBoxes + the {SUMMARY_RESERVE_S}-s summary reserve = the default {DEFAULT_BUDGET_S}-s budget.\n"


def budget(text: str | None, install_s: float, cpu_short: bool) -> float:
    """--budget-s, checked; its default keeps a GPU call (install included) within CALL_S, and gives a CPU dry run
    (a rehearsal on a slow, maybe shared, CPU) its boxes."""
    if text is None:
        return float(sum(st.box[1] for st in STAGES) + SUMMARY_RESERVE_S if cpu_short else
                     min(DEFAULT_BUDGET_S, CALL_S - install_s))
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"--budget-s must be a positive number of seconds (default {DEFAULT_BUDGET_S}), got {text!r}")
    return value


def prepare_out(out: Path, force: bool, preflight: bool) -> None:
    """Refuse an OUT that holds anything unless --force; with it, a previous check's files are removed (not by the
    preflight: a failed install must leave them)."""
    old = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if old and not force:
        what = "a check's summary.json" if "summary.json" in old else f"{len(old)} file(s)"
        raise UserError(f"--out {out} already holds {what}; pass --force to replace a previous check's results, "
                        "or choose an empty folder")
    for name in old if not preflight else []:
        if name.startswith(("summary.", "gpu_check.log", "step-", "profile-", "train-", "entropy-")):
            (out / name).unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastmveb.bench.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="results folder, empty (at most 8 files are written there)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=None, help="default: cuda when available")
    parser.add_argument("--short", action="store_true", help="tiny shapes (the CPU dry run of the check)")
    parser.add_argument("--budget-s", default=None, help=f"wall-clock budget of the check (default {DEFAULT_BUDGET_S}, "
                        f"or {CALL_S} less --install-s if less; CPU --short: its boxes); each stage has its own box")
    parser.add_argument("--install-s", type=float, default=0.0, help="seconds the wheelhouse install took before "
                        "(scripts/gpu_check.sh passes it; recorded in summary.json)")
    parser.add_argument("--force", action="store_true", help="replace the results of a previous check in --out")
    parser.add_argument("--only", default=None, help=f"comma-separated subset of: {', '.join(NAMES)}")
    parser.add_argument("--work", default=None, help="scratch folder (data, runs, compile cache); default a new "
                        "temporary folder")
    parser.add_argument("--preflight", action="store_true", help="only check the arguments and --out (exit 0/2)")
    parser.add_argument("--readme", action="store_true", help="rewrite the stage table of README.md from STAGES")
    args = parser.parse_args(argv)
    if args.readme:
        from fastmveb.report import replace_block
        return 0 if replace_block(ROOT / "README.md", README_BEGIN, README_END, readme_block()) else 1
    if not args.out:
        raise UserError("--out DIR is required (where the results go)")
    budget(args.budget_s, args.install_s, False)                # checked before anything is installed
    only = [s.strip() for s in args.only.split(",")] if args.only else list(NAMES)
    bad = [s for s in only if s not in NAMES]
    if bad:
        raise UserError(f"unknown stage(s) {', '.join(bad)}; choose from {', '.join(NAMES)}")
    out = Path(args.out).resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; name a folder")
    prepare_out(out, args.force, args.preflight)
    if args.preflight:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    args.out, args.work = str(out), str(Path(args.work or tempfile.mkdtemp(prefix="fastmveb-gpu-check-")).resolve())
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.device is None:
        import torch
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.budget_s = budget(args.budget_s, args.install_s, args.short and args.device != "cuda")
    share_compile_cache(args.work)
    log = open(out / "gpu_check.log", "w", buffering=1)

    def write(text: str) -> None:                # everything printed goes to the console and to the log
        sys.stdout.write(text)
        sys.stdout.flush()
        log.write(text)
    t_start = time.monotonic()
    write(f"fastmveb gpu-check: device {args.device}{' (--short)' if args.short else ''}, budget {args.budget_s:.0f} s "
          f"(after a {args.install_s:.0f}-s install), results in {args.out}, scratch in {args.work}, compile cache "
          f"{os.environ['TORCHINDUCTOR_CACHE_DIR']}\n")
    ctx = Ctx("fastmveb.bench.gpu_check", args.work, args.out, args.device, args.short)
    from fastmveb.bench.stage_report import write_check_summary
    meta = {"short": args.short, "budget_s": args.budget_s, "install_s": args.install_s, "t_start": t_start,
            "cuda": args.device == "cuda", "reserve_s": SUMMARY_RESERVE_S}
    stages = run_stages(ctx, [st for st in STAGES if st.name in only], write, args.budget_s, SUMMARY_RESERVE_S,
                        after=lambda entries: write_check_summary(out, entries, meta, final=False))
    md = write_check_summary(out, stages, meta, final=True)
    write(f"\n{md}\nwrote {out / 'summary.json'}, {out / 'summary.md'}\n")
    return 1 if any(v["status"].startswith("failed") for v in stages.values()) else 0


def cli(argv: list[str] | None = None) -> int:
    """``python -m fastmveb.bench.gpu_check``: main with a UserError as one ``error: ...`` line, exit 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
