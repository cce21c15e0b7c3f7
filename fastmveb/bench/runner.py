"""The one stage runner of ``python -m fastmveb.bench all`` and of the GPU check (fastmveb/bench/gpu_check.py).

A stage is a ``Stage(name, fn, box, keys)`` in its module's ``STAGES`` registry; ``fn(ctx, res)`` measures, writes
what it found with ``res.set(...)`` as it goes (a stage cut by its box keeps what it had) and returns an exit
status (None: 0). Each stage runs in its own process (its threads, compile caches and memory high-water marks
do not leak into the next) and in its own process group, killed group-wide when its time box is spent. Every
stage process shares one inductor cache (TORCHINDUCTOR_CACHE_DIR, set once here unless the caller set it), so a
graph compiled by one stage is loaded, not compiled again, by the next.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from fastmveb.fileio import write_text

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Stage:
    name: str
    fn: Callable                          # fn(ctx, res) -> exit status or None
    box: tuple[float, float] | None = None  # seconds (CUDA, CPU --short); None: no time box
    keys: tuple[str, ...] = ()            # the result keys it writes (tests pin them)
    what: str = ""                        # what it measures, one line


@dataclasses.dataclass
class Ctx:
    """What every stage process is given (JSON on its command line)."""
    registry: str                         # the module whose STAGES holds the stage
    work: str                             # scratch folder: stage results, data, runs
    out: str | None = None                # results folder
    device: str = "cpu"
    short: bool = False
    box_s: float = 0.0                    # this stage's box (0: none)
    argv: list = dataclasses.field(default_factory=list)   # bench all: the options passed on to every stage
    started: float = 0.0                  # time.time() when the stage process started

    @property
    def cpu_short(self) -> bool:
        return self.short and self.device != "cuda"

    def left_s(self) -> float:
        """Seconds left in this stage's box (inf without a box)."""
        return self.box_s - (time.time() - self.started) if self.box_s else float("inf")


def write_result(path: Path, data: dict) -> None:
    """A stage's result file replaced whole (the runner may read it while the stage process writes it)."""
    write_text(path, json.dumps(data, indent=2, default=str))


class Result:
    """What a stage process writes, rewritten after each piece."""

    def __init__(self, work: str | Path, name: str):
        self.path, self.data = Path(work) / f"stage-{name}.json", {"result": {}}

    def set(self, **kw) -> None:
        self.data["result"].update(kw)
        write_result(self.path, self.data)

    def skip(self, reason: str) -> None:
        self.data["skipped"] = reason
        write_result(self.path, self.data)

    def read(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {"result": {}}


def share_compile_cache(work: str | Path) -> str:
    """One inductor cache (FX graph + AOTAutograd caches) for every stage process from here on."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(work) / "inductor-cache"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def stop_group(proc: subprocess.Popen, grace_s: float = 5) -> int | None:
    """SIGTERM to the process group started with ``proc`` (start_new_session), SIGKILL after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            return proc.wait(timeout=grace_s)
        except ProcessLookupError:
            return proc.wait()
        except subprocess.TimeoutExpired:
            continue
    return proc.wait()


def run_stage(ctx: Ctx, name: str, write: Callable[[str], None]) -> tuple[int | None, float, str]:
    """The stage in its own process group, its output passed to ``write``; (exit status, None when its box ran
    out; seconds; the last 4,000 characters it printed)."""
    cmd = [sys.executable, "-m", "fastmveb.bench.runner", name, json.dumps(dataclasses.asdict(ctx))]
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    tail: list[str] = []

    def read():
        for line in proc.stdout:
            write(line)
            tail.append(line)
            del tail[:-60]
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=ctx.box_s or None)
    except subprocess.TimeoutExpired:
        stop_group(proc)
        rc = None
    reader.join(timeout=5)
    return rc, time.monotonic() - t0, "".join(tail)[-4000:]


def status(data: dict, rc: int | None, box_s: float, tail: str) -> str:
    if data.get("skipped"):
        return f"skipped: {data['skipped']}"
    if rc is None:
        return f"cut: its {box_s:.0f}-s time box ran out (the results it wrote before are kept)"
    if rc != 0:
        last = [ln for ln in tail.splitlines() if ln.strip()]
        return f"failed: exit {rc}" + (f": {last[-1][:300]}" if last else "")
    return "ok"


def run_stages(ctx: Ctx, stages: list[Stage], write: Callable[[str], None], budget_s: float | None = None,
               reserve_s: float = 0.0, after: Callable[[dict], None] | None = None) -> dict[str, dict]:
    """Run ``stages`` in order, each under its box (the CUDA or the CPU --short column) and what is left of
    ``budget_s`` less ``reserve_s``; {name: {status, seconds, box_s, result}}, ``after(entries)`` after each."""
    t0, entries = time.monotonic(), {}
    for st in stages:
        box = st.box[1 if ctx.cpu_short else 0] if st.box else 0.0
        if budget_s is not None:
            left = budget_s - reserve_s - (time.monotonic() - t0)
            box = min(box or left, left)
            if box < 5:
                entries[st.name] = {"status": "cut: the check's time budget was spent before this stage",
                                    "seconds": 0.0, "box_s": 0, "result": {}}
                continue
        write(f"\n==== {st.name}" + (f" (time box {box:.0f} s)" if box else "") + " ====\n")
        rc, seconds, tail = run_stage(dataclasses.replace(ctx, box_s=box), st.name, write)
        data = Result(ctx.work, st.name).read()
        entries[st.name] = {"status": status(data, rc, box, tail), "seconds": round(seconds, 1), "box_s": round(box),
                            "result": data.get("result", {})}
        write(f"==== {st.name}: {entries[st.name]['status']} in {seconds:.0f} s ====\n")
        if after:
            after(entries)
    return entries


def child(name: str, ctx_json: str) -> int:
    ctx = Ctx(**json.loads(ctx_json))
    ctx.started = time.time()
    stage = {s.name: s for s in importlib.import_module(ctx.registry).STAGES}[name]
    res = Result(ctx.work, name)
    write_result(res.path, res.data)
    if ctx.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            res.skip("no CUDA: torch sees no GPU")
            return 0
    return stage.fn(ctx, res) or 0


if __name__ == "__main__":
    sys.exit(child(*sys.argv[1:3]))
