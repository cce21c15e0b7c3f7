"""The kNN monitor split over 2 gloo ranks gives one process's top-1 (whole sets and capped subsets; shards
padded by FFCV's sampler are de-duplicated)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_ranks_equal_one_process(small_betons, tmp_path):
    out = tmp_path / "knn.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(32500 + os.getpid() % 1000), str(ROOT / "tests" / "knn_worker.py"), str(small_betons),
                        str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = json.loads(out.read_text())
    for case, res in rank0.items():
        assert res["dist_fp32"] == res["single"], case                  # float32 features: the same numbers
        assert rank1[case]["dist_fp32"] == res["single"], case           # on every rank
        assert abs(res["dist_bf16"]["top1"] - res["single"]["top1"]) <= 100 / 29 + 1e-9, case   # <= 1 query
