"""One BatchNorm for the whole job: per-view statistics, optionally synchronised over processes.

    model = convert_batchnorm(model, sync=cfg.model.sync_bn)     # every BatchNorm1d/2d -> ViewBatchNorm
    with views(2):                                               # the batch is 2 equal chunks (2 views of N)
        h, p = model(torch.cat([v1, v2]))

Why. The released code runs every crop through the network in its own forward call, so each view is
normalised with its own batch statistics and moves the running statistics once (docs/method.md). The trainer
batches equal-size views into one call (DDP allows one forward per backward, and one big call is faster);
``views(k)`` tells every ViewBatchNorm that its input is k equal chunks, and each chunk gets its own mean
and variance, exactly as k separate calls would. With ``sync=True`` and several processes the statistics of
chunk i are those of chunk i on ALL processes (SyncBatchNorm semantics, per view): one differentiable
all-gather of the per-process (mean, var) per layer, combined with Chan's formula (equal counts: the train
loader drops the last partial batch), so gradients flow through the reduction as they do in SyncBatchNorm.

No host sync, no graph break: torch.nn.SyncBatchNorm indexes with a boolean mask (a device-to-host read
per layer per forward, and a dynamo graph break); this module uses only dense ops and a functional
collective (torch.distributed._functional_collectives, traced by dynamo; NCCL and gloo alike).

Running statistics: the k chunks update them one after the other, as k calls would (the view order is the
call order), i.e. r <- (1 - m)^k r + sum_i m (1 - m)^(k - i) s_i, with s_i chunk i's mean and unbiased
variance (the unbiasing count is the chunk's size over all synchronised processes); num_batches_tracked
grows by k. With sync on, every process computes the same statistics from the same gathered numbers, so the
buffers stay equal on every rank by construction (DDP need not broadcast them).

State dict keys are those of torch's BatchNorm (weight, bias, running_mean, running_var,
num_batches_tracked), so checkpoints and exports load strictly into torchvision models.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastmveb.compat import all_gather_autograd


class _Views:
    """How many equal chunks (views) the next forward's batch holds; set by ``views(k)``. A plain global
    object: dynamo guards on its value, so each k compiles once and nothing is read from the device."""

    def __init__(self):
        self.k = 1      # an instance attribute from the start: a class default would fail dynamo's first guard


_VIEWS = _Views()


class views:
    """``with views(k):`` the batches seen by ViewBatchNorm layers are k equal chunks, normalised apart.

    Written as a class with __enter__/__exit__ (not contextlib) so dynamo inlines it inside a compiled region.
    """

    def __init__(self, k: int):
        if k < 1:
            raise ValueError(f"views(k) needs k >= 1, got {k}")
        self.k = k

    def __enter__(self):
        self.prev = _VIEWS.k
        _VIEWS.k = self.k
        return self

    def __exit__(self, *exc):
        _VIEWS.k = self.prev
        return False


class ViewBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over (N, C) or (N, C, ...) input with per-view (and, with ``world > 1``, cross-process)
    statistics in training mode; plain BatchNorm with running statistics in eval mode. See the module doc.

    ``world``: the number of processes to synchronise over (1 = local statistics); ``group``: their process
    group (None = the default group).
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True,
                 track_running_stats: bool = True, world: int = 1, group=None, device=None, dtype=None):
        if momentum is None:
            raise ValueError("ViewBatchNorm needs a float momentum (cumulative averaging is not supported)")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype)
        self.world = world
        self.group = group

    def _check_input_dim(self, x):
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input (N, C, ...), got {x.dim()}-D")

    def extra_repr(self) -> str:
        return super().extra_repr() + f", world={self.world}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training and self.track_running_stats:        # eval: running statistics, one native kernel
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        k = _VIEWS.k
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} does not split into {k} equal views")
        n = x.shape[0] // k
        xv = x.unflatten(0, (k, n))                                 # (k, n, C, ...): a view, any memory format
        dims = [1] + list(range(3, xv.dim()))
        # Statistics in float32 whatever the autocast dtype (as cuDNN's BatchNorm does).
        var, mean = torch.var_mean(xv.float(), dim=dims, correction=0)   # (k, C) each, biased
        count = n
        for d in dims[1:]:
            count *= xv.shape[d]
        if self.world > 1:
            # One differentiable all-gather of (mean, var) per layer; backward is a reduce-scatter, so every
            # process gets the gradient of all processes' losses w.r.t. its inputs (as SyncBatchNorm does).
            group = self.group if self.group is not None else dist.group.WORLD
            both = all_gather_autograd(torch.stack([mean, var]), 0, group)          # (world*2, k, C)
            both = both.unflatten(0, (self.world, 2))
            means, vars_ = both[:, 0], both[:, 1]                                  # (world, k, C)
            mean = means.mean(0)
            var = (vars_ + (means - mean) ** 2).mean(0)         # Chan: equal counts per process
            count *= self.world
        if self.training and self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), k, count)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        shape = (k, 1, -1) + (1,) * (xv.dim() - 3)
        y = xv * scale.view(shape).to(x.dtype) + shift.view(shape).to(x.dtype)
        return y.flatten(0, 1)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, k: int, count: int) -> None:
        # One update per chunk, in view order, as k separate calls make them (Python-float factors: nothing
        # crosses from the host to the device).
        m = self.momentum
        unbiased = var * (count / max(count - 1, 1))
        for i in range(k):
            self.running_mean.mul_(1 - m).add_(mean[i].to(self.running_mean.dtype), alpha=m)
            self.running_var.mul_(1 - m).add_(unbiased[i].to(self.running_var.dtype), alpha=m)
        self.num_batches_tracked.add_(k)


def convert_batchnorm(module: nn.Module, sync: bool = False, group=None) -> nn.Module:
    """Replace every BatchNorm1d/2d/3d (and SyncBatchNorm) in ``module`` by a ViewBatchNorm with the same
    parameters and buffers (in place where possible; returns the module, which is new if ``module`` itself
    was a BatchNorm). ``sync``: synchronise statistics over the processes of ``group`` (default: all) when
    torch.distributed is initialised with more than one process; otherwise statistics are local."""
    world = 1
    if sync and dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(group)
    return _convert(module, world, group)


def _convert(module: nn.Module, world: int, group) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, ViewBatchNorm):
        new = ViewBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats, world=world, group=group)
        with torch.no_grad():
            if module.affine:
                new.weight = module.weight
                new.bias = module.bias
            if module.track_running_stats:
                new.running_mean = module.running_mean
                new.running_var = module.running_var
                new.num_batches_tracked = module.num_batches_tracked
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new = _convert(child, world, group)
        if new is not child:
            setattr(module, name, new)
    return module
