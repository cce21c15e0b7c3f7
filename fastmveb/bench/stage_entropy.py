"""Entropy estimator benchmark: ``python -m fastmveb.bench entropy [--short] [--device cpu|cuda]``.

Times fastmveb.entropy.vmf_score against the released algorithm (fastmveb/bench/reference/released_entropy.py:
N x N x d tensor, top-k median, explicit inverse) for one group of N unit embeddings of width d, and measures the
peak memory of one call. The released algorithm runs only where its estimated memory fits --naive-budget-gib.

Peak memory ("peak_mib"):
- CPU: each (method, N) point runs in a fresh subprocess; after building z it resets the kernel's resident-set
  high-water mark (/proc/self/clear_refs = 5), reads VmRSS, makes one call and reads VmHWM. The difference is
  the resident memory the call touched at its peak (allocator caching and thread stacks included).
- CUDA: torch.cuda.max_memory_allocated minus the allocation before the call (tensors only, not the cache).
"est_mib" is the analytic size of the tensors each method allocates at its peak.
Time ("ms") is the median over calls after the first (the first one is the memory measurement; "min_ms" the
fastest, the better figure when other processes share the cores); "speedup" compares medians.
"rel_diff" = |vmf - released| / |released| (Frobenius) on the same input; the released one is float32.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastmveb.bench.common import ROOT, environment, markdown_table, pick_device, status_kib, sync, write_results

NS = [128, 256, 512, 1024, 2048, 4096, 8192]
NS_SHORT = [128, 256, 512]


def _released():
    from fastmveb.bench.reference import released_entropy
    return released_entropy


def vmf_estimated_bytes(N: int, d: int) -> int:
    """float64 Gram/K (in place) + Cholesky factor + kthvalue's copy while only the Gram exists
    (max(2, 2) N^2), float64 z, <grad, K> and score (3 N d), the output (N d, input dtype = float32)."""
    return 8 * (2 * N * N + 3 * N * d) + 4 * N * d


def make_z(N: int, d: int, device) -> torch.Tensor:
    # Moderately clustered (mean cosine ~0.5), like a projector's outputs mid-training; timing does not
    # depend on the spread, but the accuracy column is more telling away from both extremes.
    g = torch.Generator().manual_seed(N)
    z = torch.randn(N, d, generator=g) + torch.randn(1, d, generator=g)
    return F.normalize(z, dim=1).to(device)


def _status_kib(field: str) -> int:
    kib = status_kib(field)
    if kib is None:
        raise RuntimeError(f"{field} missing from /proc/self/status")
    return kib


def measure(method: str, N: int, d: int, device: str, save: str | None = None, threads: int = 0) -> dict:
    """One (method, N) point in this process: peak memory of the first call, then the median time."""
    from fastmveb.entropy import vmf_score
    if threads:
        torch.set_num_threads(threads)
    fn = (lambda z: vmf_score(z)[0]) if method == "vmf" else _released().released_score
    z = make_z(N, d, device)
    sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        base = _status_kib("VmRSS") * 1024
    t0 = time.perf_counter()
    out = fn(z)
    sync(device)
    first = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _status_kib("VmHWM") * 1024) - base
    if save:
        torch.save(out.cpu(), save)
    del out
    times = []
    for _ in range(5 if first < 2.0 else 1):
        t0 = time.perf_counter()
        fn(z)
        sync(device)
        times.append(time.perf_counter() - t0)
    times.sort()
    return {"ms": 1e3 * times[len(times) // 2], "min_ms": 1e3 * times[0], "first_ms": 1e3 * first,
            "peak_mib": peak / 2**20}


def _point(method: str, N: int, d: int, device: str, save: str | None, threads: int) -> dict:
    if device == "cuda":
        return measure(method, N, d, device, save, threads)
    # A fresh process per point, so no earlier point's heap hides this one's peak.
    code = ("import json, sys; from fastmveb.bench.stage_entropy import measure; "
            f"print('RESULT', json.dumps(measure({method!r}, {N}, {d}, 'cpu', {save!r}, {threads})))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"benchmark point {method} N={N} failed:\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def add_args(parser):
    parser.add_argument("--n", type=int, nargs="+", default=None, help=f"group sizes (default {NS}; --short {NS_SHORT})")
    parser.add_argument("--d", type=int, default=2048, help="embedding width")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads per point (0: torch's default). On a shared, loaded machine one "
                             "thread can beat two: OpenMP threads wait for each other when one is descheduled")
    parser.add_argument("--naive-budget-gib", type=float, default=None,
                        help="run the released algorithm only where its estimated memory fits "
                             "(default 8 on CPU, half the GPU's memory on CUDA)")


def main(args) -> dict:
    return run(str(pick_device(args.device)), args.n or (NS_SHORT if args.short else NS), args.d, args.threads,
               args.naive_budget_gib, args.short, args.out_dir)


def run(device: str, Ns: list[int], d: int = 2048, threads: int = 0, budget: float | None = None,
        short: bool = False, out_dir=None) -> dict:
    """Both estimators at every N (the released one where its estimate fits ``budget`` GiB); writes the results."""
    if budget is None:
        budget = 8.0 if device == "cpu" else torch.cuda.get_device_properties(0).total_memory / 2**31
    released = _released()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for N in Ns:
            pts = {}
            for method in ("released", "vmf"):
                est = released.estimated_bytes(N, d) if method == "released" else vmf_estimated_bytes(N, d)
                if method == "released" and est > budget * 2**30:
                    rows.append({"N": N, "d": d, "method": method, "est_mib": est / 2**20,
                                 "note": f"skipped: estimate over {budget:g} GiB"})
                    continue
                save = os.path.join(tmp, f"{method}-{N}.pt") if "released" in pts or method == "released" else None
                r = _point(method, N, d, device, save, threads)
                pts[method] = r
                row = {"N": N, "d": d, "method": method, **r, "est_mib": est / 2**20}
                if method == "vmf" and "released" in pts:
                    row["speedup"] = pts["released"]["ms"] / r["ms"]
                    a = torch.load(os.path.join(tmp, f"vmf-{N}.pt")).double()
                    b = torch.load(os.path.join(tmp, f"released-{N}.pt")).double()
                    row["rel_diff"] = ((a - b).norm() / b.norm()).item()
                rows.append(row)
                print(f"N={N:5d} {method:8s} {r['ms']:10.1f} ms  peak {r['peak_mib']:9.1f} MiB", flush=True)
    columns = ["N", "d", "method", "ms", "min_ms", "first_ms", "peak_mib", "est_mib", "speedup", "rel_diff", "note"]
    env = environment(device)
    settings = {"Ns": Ns, "d": d, "naive_budget_gib": budget, "device": device, "short": bool(short),
                "threads": threads or torch.get_num_threads(), "load_avg_1m": os.getloadavg()[0],
                "vmf": "fastmveb.entropy.vmf_score (float64 inside, float32 in/out)",
                "released": "fastmveb/bench/reference/released_entropy.py (float32)"}
    print(markdown_table(rows, columns))
    path = write_results("entropy", env, settings, rows, columns, out_dir=out_dir)
    print(f"wrote {path}")
    return {"env": env, "settings": settings, "rows": rows, "path": str(path)}
