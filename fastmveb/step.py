"""One optimisation step of MVEB pretraining: views, forward, loss, backward, optimizer and EMA steps.

    parts = step_parts(t, accelerator, cfg, view_maker, plan.micro_batch)   # once (a view maker per view size)
    stats, skip, z0 = train_step(parts, x, y, lr, m, extent, wd)            # every step, no host sync

The step takes what it uses: the training objects (``StepParts``) and the objective, mveb_loss bound ONCE to the
run's loss keys (``objective``), so the step never reads the config. fastmveb/train.py runs it in its loop; the
benchmarks time the same function.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastmveb.batchnorm import views
from fastmveb.entropy import bandwidth_rule, parse_group
from fastmveb.loss import mveb_loss
from fastmveb.model import ema_update, unwrap
from fastmveb.optim import all_finite, clip_grad_norm_, where_


def objective(loss) -> Callable:
    """mveb_loss bound to a LossConfig: (z views, t views) -> (loss, stats). The group is parsed and the bandwidth
    rule (loss.bandwidth) chosen here, once per run, not in every micro-step."""
    return functools.partial(mveb_loss, lam=loss.lam, group=parse_group(loss.group), eta=loss.eta,
                             bandwidth=bandwidth_rule(loss.bandwidth, min_tau=loss.min_tau, tau=loss.tau))


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What train_step runs. ``net`` / ``target``: the callables of the multi-view network (DDP inside when
    world > 1) and of the EMA target, compiled or not (build.Training's net_c / target_c)."""
    net: Callable
    target: Callable
    view_maker: Callable | None        # x (uint8), extent -> V views, globals first (None until an epoch sets it)
    optimizer: Any                     # optim.LARS or optim.AdamW
    accelerator: Any
    objective: Callable                # (z views, t views) -> (loss, stats): objective(cfg.loss)
    clip_grad: float = 0.0             # optim.clip_grad: the global gradient norm's cap (0: off)
    micro_batch: int | None = None     # rows per micro-batch (None: the whole batch at once)


def step_parts(t, accelerator, cfg, view_maker: Callable | None = None, micro_batch: int | None = None) -> StepParts:
    """The StepParts of the build.Training ``t`` under ``cfg`` (its loss keys bound once, optim.clip_grad)."""
    return StepParts(net=t.net_c, target=t.target_c, view_maker=view_maker, optimizer=t.optimizer,
                     accelerator=accelerator, objective=objective(cfg.loss), clip_grad=cfg.optim.clip_grad,
                     micro_batch=micro_batch)
def train_step(parts: StepParts, x, y, lr: float, m: torch.Tensor, extent: torch.Tensor | None = None,
               wd: float | None = None):
    """One optimisation step over this process's batch, no host sync: returns detached stats (batch means),
    the skip flag and z of global view 1 (first micro-batch).

    Gradient accumulation: the batch runs as micro-batches of ``parts.micro_batch`` rows (None: one), each with its
    own views, forward, loss (entropy groups within it) and backward. Their gradients add up in .grad, each
    loss weighted by its share of the rows, so .grad is the whole batch's mean gradient; DDP all-reduces only
    on the last backward (no_sync before it). Then ONE optimizer step and ONE EMA step, skipped if any
    micro-step's loss or the summed gradient is non-finite. BatchNorm sees each micro-batch on its own.
    The networks inside are compiled; the step itself stays eager because the entropy solve (Cholesky,
    float64) and the optimizer's skip logic gain nothing from compilation.
    """
    net, optimizer, micro_batch = parts.net, parts.optimizer, parts.micro_batch
    online = unwrap(net).model
    # A skipped step must leave no trace, but its forward already moved the BN running statistics (maybe to
    # NaN): keep a copy to put back. BN buffers are ~0.1% of the parameters, so this is cheap.
    buffers = list(online.buffers())
    saved = torch._foreach_mul(buffers, 1) if buffers else []      # the copy, batched (foreach) on CUDA
    n = y.shape[0]
    ext = [] if extent is None else [extent]                       # each image's (H, W) travels with its rows
    micro = list(zip(*(t.split(micro_batch or n) for t in (x if isinstance(x, (list, tuple)) else [x])),
                     *(e.split(micro_batch or n) for e in ext),
                     y.split(micro_batch or n)))                     # [(x_1 .. or x, [extent], y) per micro-batch]
    stats, finite, z0 = {}, None, None
    for k, (*xk, yk) in enumerate(micro):
        share = yk.shape[0] / n
        ek = xk.pop() if ext else None
        with contextlib.nullcontext() if k == len(micro) - 1 else parts.accelerator.no_sync(net):
            loss, stats_k, z = _micro_step(parts, xk if len(xk) > 1 else xk[0], yk, share, ek)
        stats = {key: stats.get(key, 0) + share * val for key, val in stats_k.items()}
        finite = torch.isfinite(loss) if finite is None else finite & torch.isfinite(loss)
        z0 = z if z0 is None else z0

    with phase("optimizer"):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        skip = ~(finite & torch.isfinite(grad_norm))                   # grads are all-reduced: every rank agrees
        if parts.clip_grad:
            clip_grad_norm_(grads, grad_norm, parts.clip_grad)         # on the device; grad_norm logs the unclipped
        for g in optimizer.param_groups:
            g["lr"] = lr
            if wd is not None and not g.get("lars_exclude"):            # the no-decay group stays at 0
                g["weight_decay"] = wd
        optimizer.step(skip=skip)
        skip = optimizer.skipped                                       # also: an update that was not finite
        optimizer.zero_grad(set_to_none=True)
        # Also held back: BN statistics a finite step overflowed (huge activations); buffers only, so this
        # rank-local verdict never reaches the shared weights. where_: a few launches, not one per buffer.
        where_(skip | ~all_finite([b for b in buffers if b.is_floating_point()]), buffers, saved)
    with phase("ema"):
        ema_update(parts.target, online, torch.where(skip, torch.ones_like(m), m))   # skipped: the target stays
    stats = dict(stats, grad_norm=grad_norm.detach())
    return stats, skip, z0


def _micro_step(parts: StepParts, x, y, share: float, extent=None):
    """Views, forward, loss and backward of one micro-batch; the loss is weighted by its share of the batch."""
    with phase("views"), torch.no_grad():
        v = parts.view_maker(x, extent)                                # V views, globals first
    with parts.accelerator.autocast():
        with phase("forward"):
            _, p_views, probe_out = parts.net(v, y)
        with phase("target"), torch.no_grad(), views(2):
            _, t_p = parts.target(torch.cat(v[:2]))                    # (2N, d): targets of the two globals
    with phase("loss"):
        z = [F.normalize(p.float(), dim=1) for p in p_views]
        t = [F.normalize(tp.float(), dim=1) for tp in t_p.chunk(2)]
        loss, stats = parts.objective(z, t)
        total = loss
        if probe_out is not None:
            total = loss + probe_out[0]                                # the probe sees detached features
            stats = dict(stats, probe_loss=probe_out[0].detach(), probe_top1=probe_out[1].detach())
    with phase("backward"):
        parts.accelerator.backward(total * share if share != 1 else total)
    return loss, dict(stats, loss=loss.detach()), z[0].detach()


class phase(torch.profiler.record_function):
    """A named profiler range around one phase of the step (a few microseconds; records only under a profiler).
    ``phase.current`` names the phase running (bench profile's launch counter reads it)."""
    current = "other"

    def __init__(self, name: str):
        super().__init__("fastmveb/" + name)
        self.phase = name

    def __enter__(self):
        self.prev, phase.current = phase.current, self.phase
        return super().__enter__()

    def __exit__(self, *exc):
        phase.current = self.prev
        return super().__exit__(*exc)
