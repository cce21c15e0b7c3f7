"""LARS against a per-parameter restatement, skipped steps, parameter groups, and the lr schedule."""
from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastmveb.optim import LARS, lr_at, param_groups, peak_lr

ROOT = Path(__file__).resolve().parents[1]


class NoHostSync(TorchDispatchMode):
    """Fails on the ops that read device values back to the host (.item(), bool(), data-dependent shapes)."""

    SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
                torch.ops.aten.masked_select.default}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.SYNC_OPS:
            raise AssertionError(f"host sync: {func}")
        return func(*args, **(kwargs or {}))


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
                        nn.Linear(5, 3))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):     # non-trivial 1-D values so a wrong weight decay shows
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
        net[4].weight.zero_()                     # |p| = 0: trust ratio must fall back to 1
    return net


def reference_lars(params_excl, grads_seq, lr, wd, momentum, tc):
    """Plain per-parameter restatement of the update. params_excl: list of (tensor, excluded)."""
    params = [p.detach().clone() for p, _ in params_excl]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_seq:
        for i, ((_, excl), g) in enumerate(zip(params_excl, grads)):
            if g is None:
                continue
            p = params[i]
            if not excl:
                g = g + wd * p
                pn, gn = p.norm().item(), g.norm().item()
                q = tc * pn / gn if pn > 0 and gn > 0 else 1.0
                g = g * q
            bufs[i] = momentum * bufs[i] + g
            params[i] = p - lr * bufs[i]
    return params, bufs


def random_grads(params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    seq = []
    for s in range(steps):
        grads = []
        for i, p in enumerate(params):
            if i == 1:
                grads.append(None)                # a parameter that never gets a gradient
            elif i == 2 and s % 2 == 0:
                grads.append(torch.zeros_like(p))  # zero gradient: trust ratio falls back to 1
            else:
                grads.append(torch.randn(p.shape, generator=gen))
        seq.append(grads)
    return seq


@pytest.mark.parametrize("lr_as_tensor", [False, True])
def test_lars_matches_per_parameter_reference(lr_as_tensor):
    net = tiny_net()
    groups = param_groups(net, weight_decay=0.05)
    params = [p for g in groups for p in g["params"]]
    excl = [g["lars_exclude"] for g in groups for _ in g["params"]]
    lr, mom, tc = 0.1, 0.9, 0.02
    seq = random_grads(params, steps=4)
    ref_p, ref_b = reference_lars(list(zip(params, excl)), seq, lr, 0.05, mom, tc)

    opt = LARS(groups, lr=torch.tensor(lr) if lr_as_tensor else lr, weight_decay=0.05, momentum=mom, trust_coef=tc)
    for grads in seq:
        for p, g in zip(params, grads):
            p.grad = None if g is None else g.clone()
        opt.step()
    for i, (p, rp, rb) in enumerate(zip(params, ref_p, ref_b)):
        torch.testing.assert_close(p.detach(), rp, rtol=1e-5, atol=1e-6, msg=f"param {i}")
        if seq[0][i] is None:
            assert p not in opt.state
        else:
            torch.testing.assert_close(opt.state[p]["momentum_buffer"], rb, rtol=1e-5, atol=1e-6)


def test_released_baseline_has_the_same_semantics():
    from fastmveb.bench.reference import released_lars as mod
    a, b = tiny_net(), tiny_net()
    opt_a = LARS(param_groups(a, 0.05), lr=0.1, weight_decay=0.05, trust_coef=0.02)
    opt_b = mod.ReleasedLARS(param_groups(b, 0.05), lr=0.1, weight_decay=0.05, trust_coef=0.02)
    pa, pb = list(a.parameters()), list(b.parameters())
    for grads in random_grads(pa, steps=3):
        for x, y, g in zip(pa, pb, grads):
            x.grad = None if g is None else g.clone()
            y.grad = None if g is None else g.clone()
        opt_a.step()
        opt_b.step()
    for x, y in zip(pa, pb):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().view(torch.int32)


def test_skip_leaves_params_and_buffers_bitwise_unchanged_without_host_sync():
    net = tiny_net()
    params = list(net.parameters())
    with torch.no_grad():
        params[0].view(-1)[0] = -0.0              # the sign of a zero must survive a skipped step too
    twin = copy.deepcopy(net)                     # the same run with the bad step left out
    opt = LARS(param_groups(net, 0.05), lr=torch.tensor(0.1), weight_decay=0.05, trust_coef=0.02)
    twin_opt = LARS(param_groups(twin, 0.05), lr=0.1, weight_decay=0.05, trust_coef=0.02)

    def set_grads(make):
        for p, q in zip(net.parameters(), twin.parameters()):
            p.grad = make(p)
            q.grad = p.grad.clone()

    set_grads(torch.randn_like)
    opt.step(skip=torch.tensor(False))            # creates momentum buffers with real contents
    twin_opt.step()
    before_p = [_bits(p) for p in params]
    before_b = [_bits(opt.state[p]["momentum_buffer"]) for p in params]
    for i, p in enumerate(params):
        g = torch.randn_like(p)
        g.view(-1)[0] = float("nan") if i % 2 else float("inf")
        p.grad = g
    with NoHostSync():
        opt.step(skip=torch.tensor(True))
    for i, p in enumerate(params):
        assert torch.equal(_bits(p), before_p[i]), f"param {i} changed"
        assert torch.equal(_bits(opt.state[p]["momentum_buffer"]), before_b[i]), f"buffer {i} changed"

    # skip=False takes the step and agrees with the plain in-place path
    set_grads(torch.ones_like)
    with NoHostSync():
        opt.step(skip=torch.tensor(False))
    twin_opt.step()
    assert not torch.equal(_bits(params[0]), before_p[0])
    for p, q in zip(net.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_no_host_sync_detector_can_fail():
    with pytest.raises(AssertionError, match="host sync"):
        with NoHostSync():
            torch.tensor(1.0).item()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_skip_step_has_no_cuda_sync():
    net = tiny_net().cuda()
    opt = LARS(param_groups(net, 1e-6), lr=torch.tensor(0.1, device="cuda"))
    for p in net.parameters():
        p.grad = torch.full_like(p, float("nan"))
    skip = torch.tensor(True, device="cuda")
    opt.step(skip=skip)                           # warm-up: state creation
    before = [p.detach().clone() for p in net.parameters()]
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step(skip=skip)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_param_groups_by_rank_not_name():
    net = tiny_net()
    net[3].weight.requires_grad_(False)
    groups = param_groups(net, weight_decay=1e-4)
    by_flag = {g["lars_exclude"]: g for g in groups}
    decay_ids = {id(p) for p in by_flag[False]["params"]}
    plain_ids = {id(p) for p in by_flag[True]["params"]}
    assert by_flag[False]["weight_decay"] == 1e-4 and by_flag[True]["weight_decay"] == 0.0
    assert decay_ids == {id(net[0].weight), id(net[4].weight)}
    assert plain_ids == {id(net[1].weight), id(net[1].bias), id(net[3].bias), id(net[4].bias)}
    assert id(net[3].weight) not in decay_ids | plain_ids


def test_peak_lr_linear_scaling():
    assert peak_lr(0.3, 4096) == pytest.approx(4.8)
    assert peak_lr(0.3, 256) == pytest.approx(0.3)


def released_lr(t: int, total: int, warm: int, peak: float) -> float:
    """Restatement of the released schedule: linear warm-up from 1e-3 x peak, then a cosine whose phase is
    (t - W) / T over the TOTAL step count T, blended between peak and 1e-3 x peak."""
    start, end = 1e-3 * peak, 1e-3 * peak
    if t < warm:
        return start + (peak - start) * t / warm
    q = 0.5 * (1 + math.cos(math.pi * (t - warm) / total))
    return peak * q + end * (1 - q)


def test_lr_schedule_end_points():
    peak, total, warm = 4.8, 1000, 100
    assert lr_at(0, total, warm, peak) == pytest.approx(1e-3 * peak)
    assert lr_at(warm // 2, total, warm, peak) == pytest.approx((1e-3 * peak + peak) / 2)
    assert lr_at(warm, total, warm, peak) == pytest.approx(peak)
    # the cosine's phase runs over T = total, not T - W: halfway through the phase is step W + T/2
    assert lr_at(warm + total // 2, total, warm, peak) == pytest.approx((peak + 1e-3 * peak) / 2)
    end = 1e-3 * peak + (peak - 1e-3 * peak) * 0.5 * (1 + math.cos(math.pi * (total - warm) / total))
    assert lr_at(total, total, warm, peak) == pytest.approx(end) and end > 1e-3 * peak
    assert lr_at(total + 50, total, warm, peak) == pytest.approx(end)
    assert lr_at(0, total, 0, peak) == pytest.approx(peak)
    assert lr_at(0, total, warm, peak, start_ratio=0.0) == 0.0
    assert lr_at(total, total, 0, peak, final_ratio=0.0) == pytest.approx(0.0, abs=1e-12)
    lrs = [lr_at(s, total, warm, peak) for s in range(total + 1)]
    assert all(a <= b for a, b in zip(lrs[:warm], lrs[1:warm + 1]))
    assert all(a >= b for a, b in zip(lrs[warm:], lrs[warm + 1:]))
    assert max(lrs) == pytest.approx(peak) and not any(math.isnan(x) for x in lrs)


def test_lr_schedule_matches_the_released_cosine():
    # The released recipe: 800 epochs, 10 warm-up, any steps per epoch (here 312 = 1,281,167 // 4096).
    spe = 312
    total, warm, peak = 800 * spe, 10 * spe, 4.8
    for t in (0, warm // 3, warm, warm + (total - warm) // 2, warm + total // 2, total - 1, total):
        assert lr_at(t, total, warm, peak) == pytest.approx(released_lr(t, total, warm, peak), rel=1e-12), t
    assert lr_at(total, total, warm, peak) / peak == pytest.approx(1.385e-3, abs=1e-6)   # "near 1.4e-3 x peak"
    assert lr_at(warm + total // 2, total, warm, peak) == pytest.approx(peak * (1 + 1e-3) / 2)


@pytest.mark.parametrize("cond", [True, False])
def test_where_matches_per_tensor_where(cond):
    from fastmveb.optim import where_
    g = torch.Generator().manual_seed(0)
    dst = [torch.randn(4, 3, 2, 2, generator=g).contiguous(memory_format=torch.channels_last),
           torch.randn(5, generator=g), torch.randint(0, 9, (3,), generator=g), torch.randn(2, 3, generator=g),
           torch.randn(70_000, generator=g)]                  # above optim.SMALL: its own where
    src = [torch.full_like(d, float("nan")) if d.is_floating_point() else d + 1 for d in dst]
    src[0] = src[0].contiguous()                         # a different layout from its destination
    want = [torch.where(torch.tensor(cond), s, d) for d, s in zip(dst, src)]
    ptrs = [d.data_ptr() for d in dst]
    where_(torch.tensor(cond), dst, src)
    for d, w, p in zip(dst, want, ptrs):
        assert d.data_ptr() == p and torch.equal(d.nan_to_num(7.0), w.nan_to_num(7.0))
    assert dst[0].is_contiguous(memory_format=torch.channels_last)
