"""The vMF Stein score estimator and the entropy surrogate of MVEB (docs/method.md), as pure tensor functions.

    score, tau = vmf_score(z)                       # z: (N, d) unit rows -> score (N, d), tau ()
    value, stats = entropy_surrogate(z, group=128)  # -(1/N) sum_i <sg(score_i), z_i>, per group of 128 rows
    rule = bandwidth_rule("fixed", tau=0.5)         # loss.bandwidth: the kernel bandwidth as an argument
    score, tau = vmf_score(z, bandwidth=rule)       # (default: upper_median_tau, the paper's rule)

Numerics (why it is done this way):
- Everything after the input cast runs in float64, outside autocast. Near collapse tau sits on its floor,
  K = exp(S / tau) spans e^-10..e^10 and cond(K + eta I) reaches N e^10 / eta (~3e8 at N = 128); float32
  cannot even factor that, and a float32 Gram perturbs K by ~1e-5 relative, which the solve amplifies by
  the condition number. float64 keeps the estimate at float64 accuracy there (tests: cond 1e7), makes TF32
  irrelevant (it never applies to float64), and on the 2-core CPU costs < 2x float32 (measured: N = 512,
  d = 2048: Gram 38 vs 28 ms, solve 80 vs 52 ms). A100/H100 have fast float64 (tensor cores).
  Measured with only the Gram in float32 (N = 128, d = 2048, tighter and tighter clusters): relative error
  1e-3 at cond 2.5e4, 1e-1 at cond 2.4e6, and the float64 Cholesky of the perturbed K fails beyond that.
- Memory is O(N^2 + N d): the Gram matrix is turned into K and then K + eta I in place, <grad, K> is the
  closed form rowsum(K) z / tau, and the solve is Cholesky (never an explicit inverse, never N x N x d).
- The bandwidth rule is an argument (``bandwidth``: S (..., N, N) -> tau (...)); bandwidth_rule makes the ones
  loss.bandwidth names. The paper's, the default (upper_median_tau): tau is the exact upper median by
  torch.kthvalue on the flattened N^2 Gram entries (exact for any N that fits in memory; no 2^24 limit as in
  torch.quantile; a copy of N^2 values is its only extra cost), floored at min_tau.
- Cholesky failure (possible only when eta is ~0 or the input is not normalised) is repaired by adding a
  jitter to the diagonal. On CPU, where reading the factorisation's status costs nothing, a growing jitter
  is retried only for the failing groups. On CUDA (and under torch.compile, so that the estimator stays one
  graph, and under fastmveb.hostsync.device_path() so that CPU tests run this branch) the status is never
  read on the host: one extra batched
  Cholesky with a jitter large enough to make float64 factorisation succeed is always computed and selected
  per group with torch.where (one more N^3/3 per group: ~1% at N = 128, d = 2048). stats["chol_fallback"]
  counts the groups that needed it, as a tensor.
- eta is the estimator's ridge and should stay > 0: with eta = 0 a collapsed group has a singular K, and the
  jittered answer is finite but only as good as float64 rounding allows (tests: 1e-3 off at N = 128; at N = 2
  the factorisation "succeeds" on rounding noise and the score is meaningless).
- The solve is two triangular solves (L y = B, L^T x = y), not torch.cholesky_solve: on CUDA the batched
  cholesky_solve goes to MAGMA, which allocates, synchronises the stream and frees on every call; triangular
  solves are cuBLAS and sync-free, and on the CPU they gave bit-identical scores.
- Non-finite input gives non-finite output (the trainer counts such steps as bad); finite unit-norm input
  always gives finite output, including identical rows, duplicates and N = 2.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.distributed as dist

from fastmveb.collectives import all_gather_rows
from fastmveb.hostsync import sync_free

_EPS64 = torch.finfo(torch.float64).eps


def upper_median_tau(S: torch.Tensor, min_tau: float = 0.1) -> torch.Tensor:
    """max(min_tau, (M//2)-th largest of 1 - S over all M = N^2 entries); S: (..., N, N) -> (...).

    (M//2)-th largest of 1 - S is 1 - (M//2)-th smallest of S, so no 1 - S copy is made. For even M this is the
    upper median; for odd M (odd N) the (M-1)/2-th largest, as a top-k with k = M // 2 gives.
    """
    M = S.shape[-1] * S.shape[-2]
    k = M // 2
    if k < 1:
        raise ValueError("the vMF bandwidth needs a group of at least 2 embeddings")
    kth = torch.kthvalue(S.flatten(-2), k, dim=-1).values
    return (1.0 - kth).clamp_min(min_tau)


def fixed_tau(S: torch.Tensor, tau: float) -> torch.Tensor:
    """The same bandwidth ``tau`` for every group, whatever its cosines; S: (..., N, N) -> (...)."""
    return S.new_full(S.shape[:-2], tau)


def bandwidth_rule(name: str = "median", min_tau: float = 0.1,
                   tau: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The bandwidth rule loss.bandwidth names, bound to its value: "median" -> upper_median_tau floored at
    ``min_tau`` (the paper's), "fixed" -> fixed_tau at ``tau``. A new rule is one function here (and its branch
    below) and one choice of loss.bandwidth (fastmveb/config.py)."""
    if name == "median":
        if not min_tau > 0:
            raise ValueError(f"min_tau must be > 0 (it keeps exp(S / tau) finite on collapsed input), got {min_tau}")
        return functools.partial(upper_median_tau, min_tau=min_tau)
    if name == "fixed":
        if not tau > 0:
            raise ValueError(f"the fixed bandwidth tau must be > 0, got {tau}")
        return functools.partial(fixed_tau, tau=tau)
    raise ValueError(f"unknown bandwidth rule {name!r} (median or fixed)")


def _cholesky_jittered(A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cholesky factor of the SPD batch A (..., N, N), float64, with diagonal jitter where it fails.

    Returns (L, fallback) with fallback a bool tensor (...) marking the groups that were jittered.
    """
    L, info = torch.linalg.cholesky_ex(A)
    N = A.shape[-1]
    diag_max = A.diagonal(dim1=-2, dim2=-1).amax(-1)
    # Backward-stability bound of float64 Cholesky: it succeeds once lambda_min > ~N eps ||A||, and
    # ||A||_2 <= trace <= N max diag. `safe` clears that with margin; it is still tiny against eta = 0.01
    # relative to e^10 diagonals (N = 8192: ~1e-3), so a jittered score stays a faithful estimate.
    safe = (4.0 * N * N * _EPS64) * diag_max
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    if sync_free(A):                                 # CUDA / compiled: no data-dependent branch, one graph
        L_safe, info_safe = torch.linalg.cholesky_ex(A + safe[..., None, None] * eye)
        bad = info > 0
        L = torch.where(bad[..., None, None], L_safe, L)
        # Only non-finite input can still fail; let it surface as NaN, never as a silently wrong factor.
        L = torch.where((bad & (info_safe > 0))[..., None, None], torch.full_like(L, float("nan")), L)
        return L, bad
    bad = info > 0
    if not bool(bad.any()):
        return L, bad
    finite = torch.isfinite(A).flatten(-2).all(-1)
    L = torch.where((bad & ~finite)[..., None, None], torch.full_like(L, float("nan")), L)  # NaN in, NaN out
    todo = bad & finite
    # Growing jitter from the CUDA path's value, only on the failing groups, at most 5 steps (so no input can
    # make it loop). Starting lower would let a factorisation "succeed" on rounding noise: measured on
    # identical rows with eta = 0, a jitter of N eps max(diag) gave an 8% wrong score, `safe` the exact one.
    jitter = safe.clone()
    while bool(todo.any()):
        if bool((jitter[todo] > 1e4 * safe[todo]).any()):
            raise RuntimeError("vmf_score: Cholesky of K + eta I failed even with jitter; are the rows of z "
                               "L2-normalised (|S| <= 1)?")
        L_try, info_try = torch.linalg.cholesky_ex(A[todo] + jitter[todo][..., None, None] * eye)
        L[todo] = L_try
        still = torch.zeros_like(todo)
        still[todo] = info_try > 0
        todo = still
        jitter = jitter * 10.0
    return L, bad


def _score64(z: torch.Tensor, eta: float, bandwidth: Callable = upper_median_tau):
    """Core estimator on a batch of groups z (..., N, d) -> (score float64 (..., N, d), tau (...), fallback (...)).
    ``bandwidth``: the rule S (..., N, N) -> tau (...)."""
    if z.dim() < 2:
        raise ValueError(f"vmf_score expects (..., N, d) embeddings, got shape {tuple(z.shape)}")
    if z.shape[-2] < 2:
        raise ValueError(f"vmf_score needs at least 2 embeddings per group, got {z.shape[-2]}")
    # Both contexts, so that neither a CPU nor a CUDA autocast region reaches the kernel matrix (plain `with`
    # rather than an ExitStack: dynamo traces it).
    with torch.autocast("cpu", enabled=False), torch.autocast(z.device.type, enabled=False), torch.no_grad():
        z64 = z.detach().to(torch.float64)
        S = z64 @ z64.mT                                   # (..., N, N) cosines
        tau = bandwidth(S)                                 # (...)
        K = S.div_(tau[..., None, None]).exp_()            # vMF kernel, in place of S
        # <grad, K>_i = sum_j d k(z_i, z_j) / d z_j = sum_j K_ij z_i / tau, negated here (score = -A^-1 B)
        # so that no pass over the N x d result is spent on it.
        minus_B = z64 * (K.sum(-1) / -tau[..., None])[..., None]   # (..., N, d)
        A = K
        A.diagonal(dim1=-2, dim2=-1).add_(eta)
        L, fallback = _cholesky_jittered(A)
        del A, K, S
        y = torch.linalg.solve_triangular(L, minus_B, upper=False)
        score = torch.linalg.solve_triangular(L.mT, y, upper=True)
    return score, tau, fallback


def vmf_score(z: torch.Tensor, eta: float = 0.01,
              bandwidth: Callable = upper_median_tau) -> tuple[torch.Tensor, torch.Tensor]:
    """Stein estimate of grad_z log p(z) with a vMF kernel; z: (N, d) unit rows (or a batch (..., N, d) of groups).
    ``bandwidth``: the rule S (..., N, N) -> tau (...) (bandwidth_rule); default the paper's, floored at 0.1.

    Returns (score, tau): score like z (same shape and dtype), tau the bandwidth with shape z.shape[:-2]
    (0-d for one group), float64 for float64 input and float32 otherwise. z is treated as detached.
    """
    score, tau, _ = _score64(z, eta, bandwidth)
    return score.to(z.dtype), tau.to(torch.promote_types(z.dtype, torch.float32))


def parse_group(group) -> int | str:
    """128 | "128" -> 128; "local" | "global" unchanged (LossConfig.group is a string)."""
    if isinstance(group, str) and group in ("local", "global"):
        return group
    try:
        size = int(group)
    except (TypeError, ValueError):
        raise ValueError(f"group must be an int >= 2, 'local' or 'global', got {group!r}") from None
    if isinstance(group, bool) or size < 2 or str(size) != str(group).strip():
        raise ValueError(f"group must be an int >= 2, 'local' or 'global', got {group!r}")
    return size


def group_bounds(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) row ranges of consecutive groups of `size` rows over n rows.

    A remainder of >= 2 rows is its own (smaller) group; a remainder of 1 row joins the last group, since a
    1-row group has no bandwidth. n < size gives one group of n rows.
    """
    if n < 2:
        raise ValueError(f"the entropy estimate needs at least 2 embeddings, got {n}")
    full, rem = divmod(n, size)
    if full == 0:
        return [(0, n)]
    bounds = [(i * size, (i + 1) * size) for i in range(full)]
    if rem == 1:
        bounds[-1] = (bounds[-1][0], n)
    elif rem >= 2:
        bounds.append((full * size, n))
    return bounds


def _grouped_score64(z: torch.Tensor, size: int, eta: float, bandwidth: Callable):
    """Score of z (..., N, d) estimated on each group of group_bounds(N, size) alone; equal groups run batched."""
    N = z.shape[-2]
    bounds = group_bounds(N, size)
    n_even = sum(1 for a, b in bounds if b - a == size)   # the leading groups of exactly `size` rows
    scores, taus, falls = [], [], []
    if n_even:
        zg = z[..., : n_even * size, :].unflatten(-2, (n_even, size))   # (..., G, size, d)
        s, t, f = _score64(zg, eta, bandwidth)
        scores.append(s.flatten(-3, -2))
        taus.append(t)
        falls.append(f)
    for a, b in bounds[n_even:]:
        s, t, f = _score64(z[..., a:b, :], eta, bandwidth)
        scores.append(s)
        taus.append(t.reshape(*t.shape, 1))
        falls.append(f.reshape(*f.shape, 1))
    return torch.cat(scores, -2), torch.cat(taus, -1), torch.cat(falls, -1)


def entropy_surrogate(z: torch.Tensor, group: int | str = 128, eta: float = 0.01,
                      bandwidth: Callable = upper_median_tau) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """H_sur(z) = -(1/N) sum_i <sg(score_i), z_i>: its gradient w.r.t. z is -score / N, that of the entropy.

    z: (N, d) unit rows of one view, or (V, N, d) for V views estimated independently (value has shape (V,)).
    group: int size -> each run of `size` consecutive rows is its own estimate (group_bounds for the
    remainder; the released recipe is 128 per GPU); "local" -> the whole local batch; "global" -> the batch
    of all torch.distributed ranks (detached all_gather, this rank's rows kept; "local" when not distributed).
    bandwidth: the kernel bandwidth rule, S (..., N, N) -> tau (...) (bandwidth_rule; default: the paper's).
    Returns (value float32 with shape z.shape[:-2], stats) with stats detached float32 0-d tensors:
    tau (mean over groups and views) and chol_fallback (fraction of groups whose Cholesky needed jitter).
    The value itself means nothing; only its gradient does (docs/method.md).
    """
    group = parse_group(group)
    N = z.shape[-2]
    zd = z.detach()
    if group == "global" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # all ranks' rows along N; no autograd needed: the score is detached anyway
        score, tau, fallback = _score64(all_gather_rows(zd, dim=-2, same_shape=True), eta, bandwidth)
        start = dist.get_rank() * N
        score = score[..., start:start + N, :]
    elif group in ("global", "local"):
        score, tau, fallback = _score64(zd, eta, bandwidth)
    else:
        score, tau, fallback = _grouped_score64(zd, group, eta, bandwidth)
    value = -(score.to(torch.float32) * z.to(torch.float32)).sum((-2, -1)) / N
    stats = {"tau": tau.mean().to(torch.float32), "chol_fallback": fallback.to(torch.float32).mean()}
    return value, stats
