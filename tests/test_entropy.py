"""The vMF Stein score estimator against a naive float64 restatement of the released algorithm."""
from __future__ import annotations

import math
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from fastmveb.entropy import (_score64, bandwidth_rule, entropy_surrogate, group_bounds, parse_group,
                              upper_median_tau, vmf_score)


def naive_score(z: torch.Tensor, eta: float = 0.01, min_tau: float = 0.1, fixed_tau: float | None = None):
    """The released algorithm, written out as plainly as possible in float64: top-k median over all N^2
    distances (or the bandwidth ``fixed_tau``), the N x N x d kernel-gradient tensor, an explicit inverse.
    Returns (score, tau, cond)."""
    z = z.detach().to(torch.float64)
    N = z.shape[0]
    S = z @ z.T
    tau = fixed_tau or max(min_tau, torch.topk((1 - S).flatten(), N * N // 2).values[-1].item())
    K = torch.exp(S / tau)
    # grad_K[i, j] = d k(z_i, z_j) / d z_j = K_ij z_i / tau  (vMF kernel k(x, y) = exp(x.y / tau))
    grad_K = K[:, :, None] * z[:, None, :] / tau
    A = K + eta * torch.eye(N, dtype=torch.float64)
    return -torch.inverse(A) @ grad_K.sum(1), tau, torch.linalg.cond(A).item()


def cluster(N: int, d: int, spread: float, seed: int = 0) -> torch.Tensor:
    """N unit vectors around one random direction; small spread = near collapse (tau on its floor)."""
    g = torch.Generator().manual_seed(seed)
    mu = F.normalize(torch.randn(1, d, generator=g), dim=1)
    return F.normalize(mu + spread * F.normalize(torch.randn(N, d, generator=g), dim=1), dim=1)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_naive_reference_kernel_gradient_matches_autograd():
    # Guards the reference itself: its N x N x d tensor is the Stein <grad, K> of the vMF kernel.
    z = cluster(5, 4, 1.0, seed=1).double()
    tau = 0.7
    grad = torch.zeros(5, 4, dtype=torch.float64)
    for i in range(5):
        for j in range(5):
            y = z[j].clone().requires_grad_(True)
            torch.exp(z[i] @ y / tau).backward()
            grad[i] += y.grad
    K = torch.exp(z @ z.T / tau)
    assert torch.allclose((K[:, :, None] * z[:, None, :] / tau).sum(1), grad)


@pytest.mark.parametrize("N,d,spread", [(2, 8, 2.0), (3, 8, 2.0), (17, 5, 2.0), (64, 16, 2.0), (128, 256, 0.5),
                                        (128, 256, 0.1), (100, 64, 0.03), (64, 2048, 0.05), (128, 32, 0.003)])
def test_matches_naive_float64(N, d, spread):
    z = cluster(N, d, spread, seed=N + d)
    score, tau = vmf_score(z)
    ref, ref_tau, cond = naive_score(z)
    assert score.dtype == torch.float32 and score.shape == (N, d) and tau.shape == ()
    assert tau.item() == pytest.approx(ref_tau, rel=1e-6)
    # float32 output rounding is the only expected difference
    assert rel_err(score, ref) < 1e-5, cond


@pytest.mark.parametrize("spread,min_cond", [(0.01, 1e5), (0.003, 1e6), (0.001, 1e7)])
def test_accurate_near_collapse(spread, min_cond):
    z = cluster(128, 512, spread, seed=3).double()
    score, tau = vmf_score(z)
    ref, ref_tau, cond = naive_score(z)
    assert ref_tau == 0.1 and tau.item() == 0.1          # the bandwidth sits on its floor
    assert cond > min_cond                                # the case is as ill-conditioned as claimed
    assert rel_err(score, ref) < 1e-3 * max(1.0, cond / 1e6)


def test_upper_median_not_lower():
    # N = 2: 1 - S = [[0, 1-c], [1-c, 0]]; upper median (2nd largest of 4) is 1 - c, the lower one 0.
    c = 0.3
    z = torch.tensor([[1.0, 0.0], [c, (1 - c * c) ** 0.5]])
    assert vmf_score(z, bandwidth=bandwidth_rule(min_tau=0.01))[1].item() == pytest.approx(1 - c, rel=1e-6)
    assert vmf_score(z, bandwidth=bandwidth_rule(min_tau=0.9))[1].item() == pytest.approx(0.9)


def test_upper_median_exact_beyond_quantile_limit():
    N = 4100                                             # N^2 > 2^24, torch.quantile's limit
    z = F.normalize(torch.randn(N, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64), dim=1)
    S = z @ z.T
    k = N * N // 2
    d = (1 - S).flatten().numpy()
    expect = np.partition(d, d.size - k)[d.size - k]     # k-th largest
    assert upper_median_tau(S, 0.0).item() == expect


def test_gradient_of_surrogate_is_minus_score_over_n():
    z = cluster(48, 16, 0.5, seed=4).double().requires_grad_(True)
    value, stats = entropy_surrogate(z, group="local")
    value.backward()
    score, tau = vmf_score(z)
    assert torch.allclose(z.grad, (-score / 48).float().double(), rtol=1e-5, atol=1e-9)
    assert stats["tau"].item() == pytest.approx(tau.item(), rel=1e-6)
    assert not stats["tau"].requires_grad


def test_rotation_equivariance():
    z = cluster(40, 12, 0.6, seed=5).double()
    Q, _ = torch.linalg.qr(torch.randn(12, 12, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    s, tau = vmf_score(z)
    sq, tauq = vmf_score(z @ Q)
    assert torch.allclose(sq, s @ Q, rtol=1e-8, atol=1e-10)
    assert tauq.item() == pytest.approx(tau.item(), rel=1e-10)


@pytest.mark.parametrize("eta", [0.01, 0.0])
def test_finite_on_collapse_duplicates_and_pairs(eta):
    v = F.normalize(torch.randn(1, 32), dim=1)
    identical = v.repeat(16, 1)
    dup = cluster(8, 32, 0.5, seed=7).repeat(2, 1)
    pair = v.repeat(2, 1)
    for z in (identical, dup, pair):
        score, tau = vmf_score(z, eta=eta)
        assert torch.isfinite(score).all() and torch.isfinite(tau)
    if eta == 0.0:
        # K of identical rows is rank one: only the jitter makes it factorisable, and stats report it.
        _, _, fallback = _score64(identical, eta, upper_median_tau)
        assert bool(fallback)
        _, stats = entropy_surrogate(torch.stack([identical, cluster(16, 32, 1.0)]), group="local", eta=eta)
        assert stats["chol_fallback"].item() == 0.5
    else:
        ref, _, _ = naive_score(dup)
        assert rel_err(vmf_score(dup)[0], ref) < 1e-5


def test_errors():
    with pytest.raises(ValueError):
        vmf_score(torch.ones(1, 4))
    with pytest.raises(ValueError):
        vmf_score(cluster(4, 4, 1.0), bandwidth=bandwidth_rule("median", min_tau=0.0))
    with pytest.raises(ValueError):
        parse_group(1)
    with pytest.raises(ValueError):
        parse_group("batch")
    assert parse_group("128") == 128 and parse_group("global") == "global"


def test_non_finite_input_gives_non_finite_output():
    z = cluster(8, 4, 1.0)
    z[3, 1] = float("nan")
    assert not torch.isfinite(vmf_score(z)[0]).all()


def test_bf16_input_and_autocast():
    z = cluster(64, 32, 0.3, seed=8).to(torch.bfloat16)
    score, tau = vmf_score(z)
    assert score.dtype == torch.bfloat16 and tau.dtype == torch.float32
    ref, _, _ = naive_score(z)
    assert rel_err(score, ref) < 1e-2                    # bf16 output rounding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        score_ac, _ = vmf_score(z.float())
    assert score_ac.dtype == torch.float32
    assert rel_err(score_ac, ref) < 1e-5
    value, _ = entropy_surrogate(z.clone().requires_grad_(True), group=32)
    assert value.dtype == torch.float32 and torch.isfinite(value)


def test_group_bounds_rule():
    assert group_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]    # remainder of 2: own group
    assert group_bounds(9, 4) == [(0, 4), (4, 9)]              # remainder of 1: joins the last group
    assert group_bounds(3, 4) == [(0, 3)]
    assert group_bounds(8, 4) == [(0, 4), (4, 8)]
    with pytest.raises(ValueError):
        group_bounds(1, 4)


@pytest.mark.parametrize("N,size", [(12, 4), (10, 4), (9, 4), (3, 4)])
def test_fixed_groups_equal_slices_estimated_alone(N, size):
    z = cluster(N, 6, 0.7, seed=N).double().requires_grad_(True)
    value, stats = entropy_surrogate(z, group=size)
    value.backward()
    expect_grad, expect_value, taus = [], 0.0, []
    for a, b in group_bounds(N, size):
        s, t = vmf_score(z[a:b])
        expect_grad.append(-s / N)
        expect_value += -(s * z[a:b].detach()).sum().item() / N
        taus.append(t.item())
    assert torch.allclose(z.grad, torch.cat(expect_grad), rtol=1e-5, atol=1e-8)
    assert value.item() == pytest.approx(expect_value, rel=1e-5)
    assert stats["tau"].item() == pytest.approx(float(np.mean(taus)), rel=1e-6)
    # grouping changes the estimate (the test would not notice a silently ignored group size otherwise)
    if N > size:
        assert not torch.allclose(vmf_score(z)[0] / N, -z.grad, rtol=1e-3)


def test_views_batched_like_one_by_one():
    zs = torch.stack([cluster(20, 8, 0.5, seed=s) for s in range(3)])   # (V, N, d)
    value, _ = entropy_surrogate(zs, group=8)
    assert value.shape == (3,)
    for v in range(3):
        assert value[v].item() == pytest.approx(entropy_surrogate(zs[v], group=8)[0].item(), rel=1e-6)


def test_global_without_process_group_is_local():
    z = cluster(30, 8, 0.5)
    assert entropy_surrogate(z, group="global")[0].item() == entropy_surrogate(z, group="local")[0].item()


def _global_rank(rank: int, world: int, init_file: str, out_dir: str):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        full = torch.cat([cluster(24, 10, 0.4, seed=11), cluster(24, 10, 0.4, seed=12)])   # (2 * 24, 10)
        z = full[rank * 24:(rank + 1) * 24].clone().requires_grad_(True)
        value, stats = entropy_surrogate(z, group="global")
        value.backward()
        torch.save({"value": value.detach(), "grad": z.grad, "tau": stats["tau"]}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_global_mode_two_ranks_equals_concatenated_batch():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_global_rank, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        out = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(2)]
    full = torch.cat([cluster(24, 10, 0.4, seed=11), cluster(24, 10, 0.4, seed=12)])
    score, tau = vmf_score(full.double())
    for r in range(2):
        s, z = score[r * 24:(r + 1) * 24], full[r * 24:(r + 1) * 24].double()
        assert torch.allclose(out[r]["grad"].double(), -s / 24, rtol=1e-5, atol=1e-8)
        assert out[r]["value"].item() == pytest.approx(-(s * z).sum().item() / 24, rel=1e-5)
        assert out[r]["tau"].item() == pytest.approx(tau.item(), rel=1e-6)
    # the global estimate differs from each rank's local one
    local = vmf_score(full[:24].double())[0]
    assert not torch.allclose(local, score[:24], rtol=1e-3)


def test_sync_free_fallback_path_under_compile():
    # The CUDA / compiled path never reads the Cholesky status on the host; it must still repair a singular
    # K (eta = 0, identical rows) and leave healthy groups untouched.
    torch._dynamo.reset()
    zs = torch.stack([F.normalize(torch.randn(1, 16), dim=1).repeat(12, 1), cluster(12, 16, 1.0, seed=9)])
    compiled = torch.compile(lambda z: _score64(z, 0.0, upper_median_tau), backend="aot_eager", fullgraph=True)
    score, tau, fallback = compiled(zs)
    eager, _, eager_fallback = _score64(zs, 0.0, upper_median_tau)
    assert fallback.tolist() == [True, False] == eager_fallback.tolist()
    assert torch.isfinite(score).all()
    assert torch.allclose(score[1], eager[1], rtol=1e-10)
    assert rel_err(score[0], eager[0]) < 1e-6             # both paths repair with the same jitter


@pytest.mark.parametrize("N,eta,tol", [(2, 0.01, 1e-5), (128, 0.01, 1e-5), (128, 0.0, 1e-2)])
def test_identical_rows_closed_form(N, eta, tol):
    # Collapse: K = a 11^T with a = exp(1 / tau), tau = min_tau, B = (N a / tau) 1 v^T, so every row of the
    # score is -(N a / tau) v / (N a + eta): the estimate must be accurate there, not merely finite.
    v = F.normalize(torch.randn(1, 16, generator=torch.Generator().manual_seed(N), dtype=torch.float64), dim=1)
    score, tau = vmf_score(v.repeat(N, 1), eta=eta)
    a = math.exp(1 / 0.1)
    assert tau.item() == 0.1
    assert rel_err(score, (-(N * a / 0.1) / (N * a + eta) * v).expand(N, -1)) < tol


def test_fixed_bandwidth_is_the_estimator_at_that_tau():
    # loss.bandwidth=fixed: every group's kernel at the given tau, whatever its cosines (here the upper median
    # would be ~1: random directions); the score is the direct float64 computation at that tau.
    z = F.normalize(torch.randn(24, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64), dim=1)
    rule = bandwidth_rule("fixed", tau=0.5)
    score, tau = vmf_score(z, bandwidth=rule)
    ref, _, _ = naive_score(z, fixed_tau=0.5)
    assert tau.item() == 0.5 and rel_err(score, ref) < 1e-10
    assert vmf_score(z)[1].item() != 0.5                          # the default rule is the paper's median
    value, stats = entropy_surrogate(z, group=8, bandwidth=rule)    # 3 groups, each at 0.5
    expect = sum(-(naive_score(z[a:a + 8], fixed_tau=0.5)[0] * z[a:a + 8]).sum() for a in (0, 8, 16)) / 24
    assert stats["tau"].item() == 0.5 and value.item() == pytest.approx(expect.item(), rel=1e-6)
    with pytest.raises(ValueError, match="must be > 0"):
        bandwidth_rule("fixed", tau=0.0)
    with pytest.raises(ValueError, match="unknown bandwidth rule"):
        bandwidth_rule("mean")
