"""Baseline for the optimizer benchmark: LARS written the way released SSL code writes it, one parameter at
a time in a Python loop (several small kernels per parameter). Same update as fastmveb.optim.LARS:

    p.ndim > 1:  g <- g + wd*p;  g <- g * (trust_coef*|p|/|g| if |p| > 0 and |g| > 0 else 1)
    p.ndim == 1: g unchanged (no weight decay, no trust scaling)
    buf <- momentum*buf + g;  p <- p - lr*buf

Exclusion is decided per tensor by rank inside the loop, as the released code does, so it accepts either
plain ``model.parameters()`` or the groups of ``fastmveb.optim.param_groups`` (whose 1-D group has wd 0).
No skip support: the released code checks for NaN on the host before stepping.
"""
from __future__ import annotations

import torch


class ReleasedLARS(torch.optim.Optimizer):
    def __init__(self, params, lr: float, weight_decay: float = 1e-6, momentum: float = 0.9,
                 trust_coef: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coef=trust_coef))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.ndim > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.norm(p), torch.norm(g)
                    one = torch.ones_like(p_norm)
                    q = torch.where(p_norm > 0, torch.where(g_norm > 0, group["trust_coef"] * p_norm / g_norm, one), one)
                    g = g.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(g)
                p.add_(mu, alpha=-group["lr"])
        return loss
