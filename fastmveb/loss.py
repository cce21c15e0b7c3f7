"""The MVEB objective (docs/method.md) as a pure function of tensors.

    loss, stats = mveb_loss([z1, z2, *z_local], [t1, t2], lam=0.01, group=128)
    loss.backward()

loss = -(1/V) * align - lam * (1/V) * sum_v H_sur(z_v), with align the sum over pairs of mean dot products:
(z1, t2), (z2, t1) and (z_local, (t1 + t2) / 2) for every local view (the target mean is not re-normalised,
as released). Nothing is normalised here: the trainer passes L2-normalised z and t. The loss and stats are
computed in float32 whatever the input dtype; stats are detached 0-d tensors (no .item(), no host sync).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from fastmveb.entropy import entropy_surrogate, upper_median_tau


def mveb_loss(z_views: list[torch.Tensor], t_views: list[torch.Tensor], lam: float | torch.Tensor = 0.01,
              group: int | str = 128, eta: float = 0.01,
              bandwidth: Callable = upper_median_tau) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """z_views: V >= 2 online embeddings (N, d), the two global views first; t_views: the 2 target embeddings
    of the global views (treated as constants). group / eta / bandwidth (the kernel bandwidth rule): see
    fastmveb.entropy.entropy_surrogate.

    Returns (loss 0-d float32, stats) with stats: align (sum of the pair means), entropy (mean surrogate
    per view, a trend only), tau (mean bandwidth), cos_global (mean cosine of the two global online views),
    chol_fallback (fraction of entropy groups whose Cholesky needed jitter).
    """
    V = len(z_views)
    if V < 2 or len(t_views) != 2:
        raise ValueError(f"mveb_loss needs >= 2 online views and exactly 2 target views, got {V} and {len(t_views)}")
    z = [zv.float() for zv in z_views]
    t1, t2 = (tv.detach().float() for tv in t_views)
    t_mean = (t1 + t2) / 2
    pairs = [(z[0], t2), (z[1], t1)] + [(zv, t_mean) for zv in z[2:]]
    align = sum((zv * tv).sum(-1).mean() for zv, tv in pairs)

    # One batched estimate for every view (each view still gets its own groups and bandwidths); alignment
    # has already required every view to be (N, d) like the targets.
    H, est = entropy_surrogate(torch.stack(list(z_views)), group=group, eta=eta, bandwidth=bandwidth)   # H: (V,)
    loss = -(align + lam * H.sum()) / V
    stats = {
        "align": align.detach(),
        "entropy": H.detach().mean(),
        "tau": est["tau"],
        "cos_global": F.cosine_similarity(z[0].detach(), z[1].detach(), dim=-1).mean(),
        "chol_fallback": est["chol_fallback"],
    }
    return loss, stats
