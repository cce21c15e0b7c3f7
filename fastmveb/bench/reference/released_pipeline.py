"""The released MVEB training pipeline, re-implemented end to end as the baseline of ``python -m fastmveb.bench train``.

Written from the description in docs/method.md (not copied from the released code). One training step is:
  1. a torch DataLoader (worker processes) reads JPEGs with PIL and makes every view on the CPU, per sample
     (fastmveb/bench/reference/released_transforms.py: crop, flip, jitter, grayscale, blur, solarize, normalise);
  2. the views are copied to the device;
  3. the model (the same backbone + projector as fastmveb) runs eagerly, contiguous (NCHW) memory format, under
     fp16 autocast with a GradScaler on CUDA; the target (EMA copy) sees the two global views;
  4. the MVEB loss with the released estimator (fastmveb/bench/reference/released_entropy.py: N x N x d
     kernel-gradient tensor, explicit inverse) on each view's whole per-process batch;
  5. a host read of the loss for the NaN check and logging (the released code does this every step);
  6. backward, per-parameter LARS (fastmveb/bench/reference/released_lars.py), per-parameter EMA update.

    loader = released_loader("data/synthetic/jpeg/train", global_size=224, local_size=96, n_local=6,
                             batch_size=128, num_workers=12)
    step = ReleasedStep(model, target, device, precision="fp16", hyper=ReleasedHyper(lr=0.3, ...))
    for views, _ in loader:
        loss = step(views)            # a Python float (the per-step host sync of the released loop)

Precision: "fp16" (released) is autocast float16 + GradScaler on CUDA. A CPU has no fast fp16 path, so the
benchmark compares on CPU at the precision fastmveb itself runs there ("no" = fp32, or "bf16"); the results
say which.
"""
from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from fastmveb.bench.reference.released_entropy import released_score
from fastmveb.bench.reference.released_lars import ReleasedLARS
from fastmveb.bench.reference.released_transforms import (GLOBAL_SCALE, LOCAL_SCALE, ReleasedViews,
                                                          released_imagefolder_loader)


def released_loader(root, global_size: int, local_size: int, n_local: int, batch_size: int, num_workers: int,
                    global_scale=GLOBAL_SCALE, local_scale=LOCAL_SCALE) -> torch.utils.data.DataLoader:
    """ImageFolder + PIL decode + released views at these sizes in DataLoader worker processes; (views, labels)."""
    return released_imagefolder_loader(root, n_local, batch_size, num_workers, persistent_workers=True,
                                       views=ReleasedViews(n_local, global_size, local_size, global_scale, local_scale))


def released_loss(z_views: list[torch.Tensor], t_views: list[torch.Tensor], lam: float = 0.01, eta: float = 0.01,
                  min_tau: float = 0.1) -> torch.Tensor:
    """-(1/V) align - lam (1/V) sum_v H_sur(z_v), each view's score estimated on its whole batch by the released
    algorithm; align pairs (z1, t2), (z2, t1) and every local view with (t1 + t2) / 2 (docs/method.md)."""
    z = [zv.float() for zv in z_views]
    t1, t2 = (tv.detach().float() for tv in t_views)
    pairs = [(z[0], t2), (z[1], t1)] + [(zv, (t1 + t2) / 2) for zv in z[2:]]
    align = sum((zv * tv).sum(-1).mean() for zv, tv in pairs)
    H = sum(-(released_score(zv, eta=eta, min_tau=min_tau) * zv).sum(-1).mean() for zv in z)
    return -(align + lam * H) / len(z)


@dataclasses.dataclass(frozen=True)
class ReleasedHyper:
    """The hyperparameters of one released-style step: LARS (lr ... trust_coef), the EMA target's momentum and the
    loss's (lam, eta, min_tau)."""
    lr: float = 0.3
    weight_decay: float = 1e-6
    momentum: float = 0.9
    trust_coef: float = 0.001
    ema_momentum: float = 0.996
    lam: float = 0.01
    eta: float = 0.01
    min_tau: float = 0.1


class ReleasedStep:
    """One released-style optimisation step on a list of CPU views; returns the loss as a Python float."""

    def __init__(self, model: torch.nn.Module, target: torch.nn.Module, device, precision: str = "fp16",
                 hyper: ReleasedHyper = ReleasedHyper()):
        if precision not in ("fp16", "bf16", "no"):
            raise ValueError(f"precision must be fp16, bf16 or no, got {precision!r}")
        self.model, self.target, self.device = model, target, torch.device(device)
        self.dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": None}[precision]
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" and self.device.type == "cuda" \
            else None
        h = hyper
        self.opt = ReleasedLARS(model.parameters(), lr=h.lr, weight_decay=h.weight_decay, momentum=h.momentum,
                                trust_coef=h.trust_coef)
        self.m, self.lam, self.eta, self.min_tau = h.ema_momentum, h.lam, h.eta, h.min_tau

    def _forward(self, v: list[torch.Tensor]):
        # Views of one size share a backbone call (DINO-style multi-crop wrapper).
        p_views, i = [], 0
        while i < len(v):
            j = i
            while j < len(v) and v[j].shape[-1] == v[i].shape[-1]:
                j += 1
            p_views += self.model(torch.cat(v[i:j]))[1].chunk(j - i)
            i = j
        with torch.no_grad():
            t = self.target(torch.cat(v[:2]))[1].chunk(2)
        return p_views, t

    def __call__(self, views: list[torch.Tensor]) -> float:
        v = [x.to(self.device, non_blocking=True) for x in views]
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            p_views, t = self._forward(v)
        z = [F.normalize(p.float(), dim=1) for p in p_views]
        t = [F.normalize(x.float(), dim=1) for x in t]
        loss = released_loss(z, t, self.lam, self.eta, self.min_tau)
        value = loss.item()                                  # the released loop's per-step host sync
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value}")
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        with torch.no_grad():                                # EMA one parameter at a time
            for pt, po in zip(self.target.parameters(), self.model.parameters()):
                pt.mul_(self.m).add_(po.detach(), alpha=1 - self.m)
        return value
