"""The MVEB objective: alignment pairs, entropy weighting, gradients, stats."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fastmveb.entropy import entropy_surrogate, vmf_score
from fastmveb.loss import mveb_loss


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=1)


def hand_built():
    """Target views orthogonal, so every wrong pairing changes the alignment."""
    e = torch.eye(4)
    t1 = e[[0, 0, 0]]                              # (N=3, d=4)
    t2 = e[[1, 1, 1]]
    z1 = unit([0.0, 1, 0, 0], [0.6, 0.8, 0, 0], [0, 0.8, 0.6, 0])     # vs t2: 1, 0.8, 0.8
    z2 = unit([1.0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1])             # vs t1: 1, 1, 0
    zl = unit([1.0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0])             # vs (t1+t2)/2: 1/sqrt2, 1/2, 0
    return [z1, z2, zl], [t1, t2]


def expected_align():
    return (1 + 0.8 + 0.8) / 3 + (1 + 1 + 0) / 3 + (1 / math.sqrt(2) + 0.5 + 0) / 3


def test_alignment_pairs_and_pure_alignment_at_lam_zero():
    z, t = hand_built()
    loss, stats = mveb_loss(z, t, lam=0.0, group="local")
    assert stats["align"].item() == pytest.approx(expected_align(), rel=1e-6)
    assert loss.item() == pytest.approx(-expected_align() / 3, rel=1e-6)
    # two views: only the crossed global pairs
    loss2, stats2 = mveb_loss(z[:2], t, lam=0.0, group="local")
    assert stats2["align"].item() == pytest.approx((2.6 + 2) / 3, rel=1e-6)
    assert loss2.item() == pytest.approx(-(2.6 + 2) / 3 / 2, rel=1e-6)


def test_entropy_term_weighting():
    g = torch.Generator().manual_seed(0)
    z = [F.normalize(torch.randn(16, 8, generator=g), dim=1) for _ in range(4)]
    t = [F.normalize(torch.randn(16, 8, generator=g), dim=1) for _ in range(2)]
    lam = 0.3
    loss, stats = mveb_loss(z, t, lam=lam, group=8)
    H = [entropy_surrogate(zv, group=8)[0] for zv in z]
    align0 = mveb_loss(z, t, lam=0.0, group=8)[1]["align"]
    assert loss.item() == pytest.approx((-align0 - lam * sum(H)).item() / 4, rel=1e-5)
    assert stats["entropy"].item() == pytest.approx(sum(H).item() / 4, rel=1e-5)


def test_gradient_reaches_z_never_t():
    g = torch.Generator().manual_seed(1)
    N, d, V, lam = 12, 6, 3, 0.5
    z = [F.normalize(torch.randn(N, d, generator=g), dim=1).requires_grad_(True) for _ in range(V)]
    t = [F.normalize(torch.randn(N, d, generator=g), dim=1).requires_grad_(True) for _ in range(2)]
    loss, _ = mveb_loss(z, t, lam=lam, group="local")
    loss.backward()
    assert t[0].grad is None and t[1].grad is None
    partner = [t[1], t[0], (t[0] + t[1]) / 2]
    for v in range(V):
        s, _ = vmf_score(z[v])
        # d/dz [-(1/V) mean <z, t> - (lam/V) * (-(1/N) <sg(s), z>)]
        expect = -partner[v].detach() / (V * N) + lam * s / (V * N)
        assert torch.allclose(z[v].grad, expect, rtol=1e-4, atol=1e-7)


def test_stats_are_detached_scalars_and_dtypes():
    z, t = hand_built()
    z = [zv.to(torch.bfloat16).requires_grad_(True) for zv in z]
    loss, stats = mveb_loss(z, [tv.to(torch.bfloat16) for tv in t], group="local")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert set(stats) == {"align", "entropy", "tau", "cos_global", "chol_fallback"}
    for v in stats.values():
        assert v.shape == () and not v.requires_grad and v.dtype == torch.float32
    cos = F.cosine_similarity(z[0].float(), z[1].float(), dim=-1).mean()
    assert stats["cos_global"].item() == pytest.approx(cos.item(), rel=1e-6)
    loss.backward()
    assert z[0].grad is not None and z[0].grad.dtype == torch.bfloat16


def test_bad_arguments():
    z, t = hand_built()
    with pytest.raises(ValueError):
        mveb_loss(z[:1], t)
    with pytest.raises(ValueError):
        mveb_loss(z, t[:1])


def test_compiles_as_one_graph():
    # The trainer compiles its step; the estimator must not break the graph (no host reads of Cholesky status).
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(2)
    z = [F.normalize(torch.randn(16, 8, generator=g), dim=1).requires_grad_(True) for _ in range(3)]
    t = [F.normalize(torch.randn(16, 8, generator=g), dim=1) for _ in range(2)]
    compiled = torch.compile(mveb_loss, backend="aot_eager", fullgraph=True)
    loss, stats = compiled(z, t, lam=0.01, group=8)
    loss.backward()
    grads = [zv.grad.clone() for zv in z]
    for zv in z:
        zv.grad = None
    ref, ref_stats = mveb_loss(z, t, lam=0.01, group=8)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    assert stats["chol_fallback"].item() == 0.0
    for a, zv in zip(grads, z):
        assert torch.allclose(a, zv.grad, rtol=1e-5, atol=1e-8)
