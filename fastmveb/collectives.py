"""Row all-gather over torch.distributed ranks: the one copy that the entropy estimator's global batch, the
evaluation features and the distributed kNN monitor share.

    z_all = all_gather_rows(z, dim=-2, same_shape=True)   # inside the training step: no host read
    feats = all_gather_rows(feats)                         # ranks may hold different row counts
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_rows(t: torch.Tensor, dim: int = 0, same_shape: bool = False) -> torch.Tensor:
    """Every rank's ``t`` concatenated along ``dim`` in rank order, on ``t``'s device; no autograd.

    ``same_shape=True``: every rank holds the same shape (drop_last batches; torch.distributed rejects anything
    else): one all_gather and nothing read back to the host, so it may run inside the training step.
    Otherwise the ranks' lengths along ``dim`` may differ: they are exchanged first (one small host read, outside
    any step), the shorter parts padded to the longest and the padding dropped after. ``t`` must live where the
    backend moves data (NCCL: CUDA tensors; gloo: CPU ones).
    """
    world = dist.get_world_size()
    t = t.contiguous()
    if same_shape:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t)
        return torch.cat(parts, dim)
    n = torch.tensor([t.shape[dim]], device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    sizes = [int(s) for s in sizes]
    pad_shape = list(t.shape)
    pad_shape[dim] = max(sizes) - t.shape[dim]
    padded = torch.cat([t, t.new_zeros(pad_shape)], dim)
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o.narrow(dim, 0, s) for o, s in zip(out, sizes)], dim)
