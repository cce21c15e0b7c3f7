"""The released MVEB score estimator's algorithm, restated from docs/method.md (not copied) as the baseline of
``python -m fastmveb.bench entropy``: the N x N x d kernel-gradient tensor, a top-k median and an explicit
inverse, in float32 (the released code ran parts of it in fp16 under autocast; float32 is kinder to it).

Memory: two N x N x d float32 temporaries at once (the product, then its division by tau): 4 GiB at N = 512,
d = 2048; 256 GiB at N = 4096.
"""
from __future__ import annotations

import torch


def released_score(z: torch.Tensor, eta: float = 0.01, min_tau: float = 0.1) -> torch.Tensor:
    z = z.detach().float()
    N = z.shape[0]
    S = z @ z.T
    tau = torch.topk((1 - S).flatten(), N * N // 2).values[-1].clamp_min(min_tau)
    K = torch.exp(S / tau)
    grad_K = (K[:, :, None] * z[:, None, :] / tau).sum(1)        # (N, N, d) summed over the second index
    K_inv = torch.inverse(K + eta * torch.eye(N, dtype=z.dtype, device=z.device))
    return -K_inv @ grad_K


def estimated_bytes(N: int, d: int) -> int:
    """Peak of the tensors it allocates: two N x N x d temporaries, a few N x N and N x d ones (float32)."""
    return 4 * (2 * N * N * d + 5 * N * N + 3 * N * d)
