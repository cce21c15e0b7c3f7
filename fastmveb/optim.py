"""LARS with multi-tensor (foreach) kernels, parameter groups by tensor rank, and the lr schedule.

    opt = LARS(param_groups(model, cfg.optim.weight_decay), lr=peak_lr(cfg.optim.base_lr, global_batch),
               weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum, trust_coef=cfg.optim.trust_coef)
    for g in opt.param_groups:
        g["lr"] = lr_at(step, total, warmup, peak)           # or a 0-d tensor, filled in place
    opt.step(skip=~torch.isfinite(loss))                     # no host sync; skipped steps change nothing

LARS update per parameter p with gradient g (the SimCLR / BYOL / Barlow Twins variant):
    not excluded:  g <- g + wd * p;  q = trust_coef * |p| / |g| if |p| > 0 and |g| > 0 else 1;  g <- q * g
    excluded (1-D: biases, BN): g unchanged, no weight decay
    buf <- momentum * buf + g;  p <- p - lr * buf
"""
from __future__ import annotations

import math

import torch
from torch import nn

from fastmveb.compat import foreach_clone


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups by tensor rank: ndim >= 2 get weight decay and LARS scaling, 1-D tensors get neither; nor do
    the tensors a timm backbone's ``no_weight_decay()`` names (position embeddings, class tokens: 3-D).

    Rank rather than names: names change with wrappers and architectures, rank does not; the backbone
    registry (fastmveb/backbones.py) adds the few higher-rank tensors a model declares. Frozen
    parameters are left out; empty groups are dropped.
    """
    from .backbones import no_decay_params
    declared = no_decay_params(model)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or id(p) in declared else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
        {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True},
    ]
    return [g for g in groups if g["params"]]


def _closure_loss(closure):
    """The optimizer-step closure's loss (None without one), evaluated with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def _params_with_grads(group: dict, name: str) -> list[torch.Tensor]:
    """The group's parameters that have a gradient; sparse gradients are refused."""
    params = [p for p in group["params"] if p.grad is not None]
    if any(p.grad.is_sparse for p in params):
        raise RuntimeError(f"{name} does not support sparse gradients")
    return params


class LARS(torch.optim.Optimizer):
    """LARS (see the module docstring) over whole parameter groups with torch._foreach_* kernels.

    Groups carry ``lars_exclude`` (default False) as produced by ``param_groups``. ``lr`` may be a Python
    float or a 0-d tensor (so a schedule can update it in place without recompiling a compiled step).

    ``step(skip=t)`` with a 0-d bool tensor ``t``: where ``t`` is True, parameters and momentum buffers stay
    bitwise unchanged, decided on the device without reading ``t`` back. The step is also skipped when the
    updated parameters would not be finite; ``self.skipped`` (0-d bool) holds the verdict either way. The update is computed out of
    place and selected per tensor with ``torch.where(skip, old, new)``. A select, unlike blending with a 0/1
    factor, needs no NaN sanitising (a NaN in the unselected branch never reaches the result) and keeps the
    sign of zeros, so "unchanged" holds bit for bit. Without ``skip`` the update runs fully in place.
    """

    def __init__(self, params, lr: float | torch.Tensor, weight_decay: float = 1e-6, momentum: float = 0.9,
                 trust_coef: float = 0.001):
        if not isinstance(lr, torch.Tensor) and lr < 0:
            raise ValueError(f"LARS lr must be >= 0, got {lr}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coef=trust_coef,
                        lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None, skip: torch.Tensor | None = None):
        loss = _closure_loss(closure)
        pending = []   # skip path: (old tensors, new tensors, new params) per group, selected after the last group
        for group in self.param_groups:
            params = _params_with_grads(group, "LARS")
            if not params:
                continue
            device = params[0].device
            grads = [p.grad for p in params]
            bufs = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(state["momentum_buffer"])

            # d: the direction added to the momentum buffer; never aliases p.grad (grads stay as computed).
            wd = group["weight_decay"]
            if group["lars_exclude"]:
                d = grads
            else:
                d = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else foreach_clone(grads)
                p_norm = torch.stack(torch._foreach_norm(params))
                d_norm = torch.stack(torch._foreach_norm(d))
                # Computed for every tensor, selected by where: the 0/0 of an untouched tensor is discarded.
                q = torch.where((p_norm > 0) & (d_norm > 0), group["trust_coef"] * p_norm / d_norm,
                                torch.ones_like(p_norm))
                torch._foreach_mul_(d, list(q.unbind(0)))

            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                lr = lr.to(device=device, non_blocking=True)
            momentum = group["momentum"]

            if skip is None:
                torch._foreach_mul_(bufs, momentum)
                torch._foreach_add_(bufs, d)
                if isinstance(lr, torch.Tensor):
                    torch._foreach_sub_(params, torch._foreach_mul(bufs, lr))
                else:
                    torch._foreach_add_(params, bufs, alpha=-lr)
                continue

            new_bufs = torch._foreach_add(d, bufs, alpha=momentum)
            if isinstance(lr, torch.Tensor):
                new_params = torch._foreach_sub(params, torch._foreach_mul(new_bufs, lr))
            else:
                new_params = torch._foreach_add(params, new_bufs, alpha=-lr)
            pending.append((bufs + params, new_bufs + new_params, new_params))
        self.skipped = None
        if skip is not None and pending:
            # Finite gradients can still step the weights to inf/NaN (an lr far too high): such an update is
            # skipped as well, decided on the device.
            new_params = [t for _, _, new_p in pending for t in new_p]
            skip_dev = skip.to(device=new_params[0].device, non_blocking=True) | ~all_finite(new_params)
            where_(~skip_dev, [t for olds, _, _ in pending for t in olds], [t for _, news, _ in pending for t in news])
            self.skipped = skip_dev   # the step's verdict: the given skip, or an update that was not finite
        return loss


SMALL = 1 << 16     # elements: below this a tensor's launch costs more than copying it (~4 us vs 256 KiB at 3 TB/s)


def _flat(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """x as 1-D in ``like``'s memory order (a view when x is laid out like ``like``: channels-last weights)."""
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(-1)
    return x.reshape(-1)


def _unflat(piece: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
        n, c, h, w = like.shape
        return piece.view(n, h, w, c).permute(0, 3, 1, 2)
    return piece.view(like.shape)


@torch.no_grad()
def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """0-d bool on the device: every element of every (floating) tensor is finite. From each tensor's largest
    |value|: a max, unlike a sum or an L2 norm, cannot overflow on finite values, and it propagates NaN."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors, ord=float("inf"))).amax())


def where_(cond: torch.Tensor, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """dst[i] <- where(cond, src[i], dst[i]) for every i, with a 0-d bool ``cond`` read only on the device.

    torch has no foreach where, and one where per tensor is one kernel launch per tensor (~500 per step for
    the optimizer and the BN buffers of a ResNet-50). The small tensors (most of them: biases, BN parameters
    and buffers) go together, per dtype two concatenations, one where and one foreach copy; a large tensor
    keeps its own where, since copying it through flat temporaries costs more memory traffic than a launch.
    A select (not a 0/1 blend) keeps dst bitwise when cond is False, even where src holds NaN.
    """
    groups: dict[torch.dtype, tuple[list, list]] = {}
    for d, s_ in zip(dst, src):
        if d.numel() > SMALL:
            torch.where(cond, s_, d, out=d)     # safe in place: each element is read before it is written
            continue
        g = groups.setdefault(d.dtype, ([], []))
        g[0].append(d)
        g[1].append(s_)
    for ds, ss in groups.values():
        d_flat = torch.cat([_flat(d, d) for d in ds])
        s_flat = torch.cat([_flat(s_, d) for s_, d in zip(ss, ds)])
        out = torch.where(cond, s_flat, d_flat)
        torch._foreach_copy_(ds, [_unflat(p, d) for p, d in zip(out.split([d.numel() for d in ds]), ds)])


def peak_lr(base_lr: float, global_batch: int) -> float:
    """Linear scaling rule: base_lr is the lr at a global batch of 256."""
    return base_lr * global_batch / 256


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float, start_ratio: float = 1e-3,
          final_ratio: float = 1e-3) -> float:
    """Linear warm-up from start_ratio*peak (step 0) to peak (step W = warmup_steps), then the released per-step
    cosine from peak towards final_ratio*peak with phase (t - W) / T, T = total_steps (not T - W, as released):
    the phase ends at 1 - W/T, so the last lr stays a little above final_ratio*peak (1.385e-3 x peak for the
    recipe's 10 of 800 epochs). Held at its step-T value after total_steps."""
    if step < warmup_steps:
        start = start_ratio * peak
        return start + (peak - start) * step / warmup_steps
    frac = 1.0 if total_steps <= 0 else (min(step, total_steps) - warmup_steps) / total_steps
    final = final_ratio * peak
    return final + (peak - final) * 0.5 * (1.0 + math.cos(math.pi * frac))


def wd_at(step: int, total_steps: int, start: float, end: float) -> float:
    """Weight decay of optimizer step ``step``: a cosine from ``start`` (step 0) to ``end`` (step total_steps and
    after), DINO's schedule for ViTs; ``end`` = -1 (optim.weight_decay_end's default) holds ``start`` throughout."""
    if end < 0 or total_steps <= 0:
        return start
    if step >= total_steps:
        return end
    frac = max(step, 0) / total_steps
    return start + (end - start) * 0.5 * (1.0 - math.cos(math.pi * frac))    # exactly start at step 0


@torch.no_grad()
def clip_grad_norm_(grads: list[torch.Tensor], norm: torch.Tensor, max_norm: float) -> None:
    """Scale ``grads`` in place so that their global norm ``norm`` (0-d, already computed) is at most ``max_norm``,
    on the device (no host sync). A non-finite norm gives non-finite gradients: that step is skipped anyway."""
    if grads:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0).to(grads[0].dtype))


class AdamW(torch.optim.Optimizer):
    """AdamW (decoupled weight decay, torch.optim.AdamW's update) with torch._foreach_* kernels and LARS's
    ``step(skip=t)``: where the 0-d bool ``t`` is True, or the updated parameters would not be finite, the
    parameters, both moments and the step count stay bitwise unchanged, decided on the device (see LARS).

    Per parameter p with gradient g, at step count t (counted per tensor, a 0-d float tensor in its state):
        p <- p * (1 - lr * wd);  m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    ``lr`` and a group's ``weight_decay`` may change every step (the schedules); ``lr`` may be a 0-d tensor.
    Groups from ``param_groups`` carry weight_decay 0 for the no-decay tensors; ``lars_exclude`` is ignored.
    """

    def __init__(self, params, lr: float | torch.Tensor, weight_decay: float = 0.04,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        if not isinstance(lr, torch.Tensor) and lr < 0:
            raise ValueError(f"AdamW lr must be >= 0, got {lr}")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=tuple(betas), eps=eps))

    @torch.no_grad()
    def step(self, closure=None, skip: torch.Tensor | None = None):
        loss = _closure_loss(closure)
        olds, news, new_params = [], [], []
        for group in self.param_groups:
            params = _params_with_grads(group, "AdamW")
            if not params:
                continue
            grads = [p.grad for p in params]
            m, v, t = [], [], []
            for p in params:
                state = self.state[p]
                if "exp_avg" not in state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                elif state["step"].device != p.device:
                    # torch's load_state_dict leaves "step" where the checkpoint was loaded (the CPU): once, to the
                    # parameter's device, so the bias corrections never mix devices or read back to the host
                    state["step"] = state["step"].to(p.device)
                m.append(state["exp_avg"])
                v.append(state["exp_avg_sq"])
                t.append(state["step"])
            b1, b2 = group["betas"]
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            if isinstance(lr, torch.Tensor):
                lr = lr.to(device=params[0].device, non_blocking=True)
            # Everything out of place: the skip path selects old or new per tensor; without skip the new
            # values are copied in (one foreach copy per list).
            t_new = torch._foreach_add(t, 1.0)
            m_new = torch._foreach_lerp(m, grads, 1 - b1)                  # b1 m + (1 - b1) g
            v_new = torch._foreach_mul(v, b2)
            torch._foreach_addcmul_(v_new, grads, grads, value=1 - b2)
            tt = torch.stack(t_new)
            bc1 = 1 - torch.pow(b1, tt)                                    # on the device: no host sync
            bc2_sqrt = torch.sqrt(1 - torch.pow(b2, tt))
            denom = torch._foreach_sqrt(v_new)
            torch._foreach_div_(denom, list(bc2_sqrt.unbind(0)))
            torch._foreach_add_(denom, eps)
            step_size = list((-lr / bc1).unbind(0))
            upd = torch._foreach_div(m_new, denom)
            torch._foreach_mul_(upd, step_size)
            p_new = torch._foreach_mul(params, 1 - lr * wd) if wd != 0 else torch._foreach_mul(params, 1.0)
            torch._foreach_add_(p_new, upd)
            if skip is None:
                torch._foreach_copy_(params + m + v + t, p_new + m_new + v_new + t_new)
                continue
            olds += params + m + v + t
            news += p_new + m_new + v_new + t_new
            new_params += p_new
        self.skipped = None
        if skip is not None and olds:
            skip_dev = skip.to(device=new_params[0].device, non_blocking=True) | ~all_finite(new_params)
            where_(~skip_dev, olds, news)
            self.skipped = skip_dev
        return loss


def make_optimizer(cfg, params: list[dict], lr: float):
    """The optimizer optim.name names, over ``param_groups``' groups, at ``lr`` (the schedule sets it per step)."""
    o = cfg.optim
    if o.name == "adamw":
        return AdamW(params, lr=lr, weight_decay=o.weight_decay, betas=o.betas)
    return LARS(params, lr=lr, weight_decay=o.weight_decay, momentum=o.momentum, trust_coef=o.trust_coef)
