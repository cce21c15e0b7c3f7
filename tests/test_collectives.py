"""all_gather_rows, the one row all-gather (entropy's global batch, eval features, distributed kNN), on 2 gloo ranks."""
from __future__ import annotations

import os
import tempfile

import torch
import torch.multiprocessing as mp


def _rows(rank: int) -> torch.Tensor:
    return torch.arange(10 * (rank + 1) * 3, dtype=torch.float32).reshape(rank + 1, 10, 3) + 100 * rank


def _rank(rank: int, world: int, init_file: str, out_dir: str):
    import torch.distributed as dist
    from fastmveb.collectives import all_gather_rows
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        ragged = torch.arange(3 + 2 * rank, dtype=torch.int64) + 10 * rank          # 3 rows on rank 0, 5 on rank 1
        same = torch.full((2, 4, 3), float(rank))                                     # (V, N, d), N gathered
        out = {"ragged": all_gather_rows(ragged), "same": all_gather_rows(same, dim=-2, same_shape=True),
               "ragged_mid": all_gather_rows(_rows(rank).transpose(0, 1), dim=1)}      # (10, rank + 1, 3)
        torch.save(out, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_all_gather_rows_two_ranks_ragged_and_same_shape():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_rank, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        out = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    ragged = torch.cat([torch.arange(3), torch.arange(5) + 10])
    same = torch.cat([torch.zeros(2, 4, 3), torch.ones(2, 4, 3)], dim=1)
    mid = torch.cat([_rows(0).transpose(0, 1), _rows(1).transpose(0, 1)], dim=1)
    for r in range(2):                                                     # every rank gets all rows, in rank order
        assert torch.equal(out[r]["ragged"], ragged)
        assert torch.equal(out[r]["same"], same)
        assert torch.equal(out[r]["ragged_mid"], mid)
