"""Checkpoint save cost of the released model (issue 22 item 6): what rank 0 spends writing a ResNet-50
checkpoint (weights, EMA target, LARS state, every rank's RNG) and so how long the other ranks wait for it at
the one barrier after the save (train.py save(): RNG states are gathered BEFORE the save, then rank 0 writes
while the others wait at accelerator.wait_for_everyone()).

    .venv/bin/python benchmarks/checkpoint_cost.py [--ranks 32] [--repeats 3] [--out-dir benchmarks/results]

Writes checkpoint-<device>-<date>.json/.md (fastmveb.bench.common.write_results): seconds to build the
state dicts, to save (torch.save + fsync + rename, checkpoint.save_checkpoint), and the file size.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from fastmveb import checkpoint as ckpt  # noqa: E402
from fastmveb.bench.common import environment, write_results  # noqa: E402
from fastmveb.config import Config, to_dict  # noqa: E402
from fastmveb.model import MVEBModel, make_target  # noqa: E402
from fastmveb.optim import LARS, param_groups  # noqa: E402
from fastmveb.rundir import git_revision  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=32, help="RNG states stored (the released run: 32 GPUs)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--dir", default=".", help="where the checkpoints are written (a run dir's filesystem)")
    args = parser.parse_args()
    cfg = Config()                                                # the released recipe: ResNet-50, 2048-d projector
    model = MVEBModel.from_config(cfg.model)
    target = make_target(model)
    opt = LARS(param_groups(model, cfg.optim.weight_decay), lr=0.1, momentum=cfg.optim.momentum)
    for p in model.parameters():                                  # LARS momentum buffers exist after one step
        p.grad = torch.zeros_like(p)
    opt.step()
    rows = []
    with tempfile.TemporaryDirectory(dir=args.dir, prefix=".ckcost-") as d:
        for i in range(args.repeats):
            t0 = time.perf_counter()
            state = {"model": model.state_dict(), "target": target.state_dict(), "optimizer": opt.state_dict(),
                     "step": i, "epoch": 0, "samples_in_epoch": 0, "shuffle": "torch",
                     "rng": [ckpt.capture_rng_state()] * args.ranks, "config": to_dict(cfg), "git": git_revision()}
            t1 = time.perf_counter()
            path = ckpt.checkpoint_path(d, i)
            assert ckpt.save_checkpoint(path, state)
            t2 = time.perf_counter()
            rows.append({"repeat": i, "state_s": round(t1 - t0, 3), "save_s": round(t2 - t1, 3),
                         "size_mib": round(path.stat().st_size / 2**20, 1),
                         "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)})
            print(rows[-1], flush=True)
            path.unlink()
    out = write_results("checkpoint", environment("cpu"), {"arch": cfg.model.arch, "ranks": args.ranks,
                                                           "repeats": args.repeats, "dir": args.dir}, rows, out_dir=args.out_dir)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
