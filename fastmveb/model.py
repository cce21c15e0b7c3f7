"""The MVEB encoder: a backbone (fastmveb/backbones.py), an MLP projector, and the EMA target built from them.

    model = MVEBModel.from_config(cfg.model)      # online encoder: forward(x) -> (h, p)
    target = make_target(model)                   # frozen deepcopy, updated only by ema_update
    ema_update(target, model, ema_momentum(step, total_steps, cfg.model.ema_momentum))

The backbone stays the library's own module (a plain ``torchvision.models.ResNet`` with ``fc`` replaced by
Identity, or a timm model without classifier) so that its state_dict loads strictly into the library's model of
the same name; the released code kept it inside an nn.Sequential and lost that property. Normalising p, SyncBN, channels-last and
compilation are the trainer's business: this module only defines the architecture.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from .backbones import build, torchvision_archs, without_stochastic_depth
from .backbones import torchvision_resnet  # noqa: F401 -- export and tests import it from here


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrappers, in any nesting."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), nn.Module):
            module = module._orig_mod
        else:
            return module


def valid_archs() -> list[str]:
    """The torchvision ResNet names (and resnet10); timm models are named timm:NAME (fastmveb/backbones.py)."""
    return torchvision_archs()


def build_backbone(cfg, zero_init_residual: bool = True) -> tuple[nn.Module, int]:
    """A randomly initialised backbone that outputs features, and their dimension, from a ``ModelConfig`` (or an
    arch name with the other keys at their defaults). ValueError for an unknown arch (fastmveb/backbones.py)."""
    if isinstance(cfg, str):
        from .config import ModelConfig
        cfg = ModelConfig(arch=cfg, zero_init_residual=zero_init_residual)
    bb = build(cfg)
    return bb.net, bb.dim


def identify_backbone(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The arch (of ``valid_archs``) whose backbone has exactly these tensor names and shapes (``fc.*``
    ignored), or None. The candidates are built on the meta device: shapes only, no memory, no init cost."""
    want = {k: tuple(v.shape) for k, v in state_dict.items() if not k.startswith("fc.")}
    for arch in valid_archs():
        with torch.device("meta"):
            net = torchvision_resnet(arch)
        have = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.startswith("fc.")}
        if have == want:
            return arch
    return None


class Projector(nn.Sequential):
    """(Linear(no bias)-BN-ReLU) x (layers-1), then Linear(with bias).

    The hidden Linears carry no bias because the BN right after them would cancel it.
    """

    def __init__(self, in_dim: int, hidden: int = 2048, out: int = 2048, layers: int = 3):
        if layers < 1:
            raise ValueError(f"projector needs at least 1 layer, got layers={layers}")
        mods: list[nn.Module] = []
        d = in_dim
        for _ in range(layers - 1):
            mods += [nn.Linear(d, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True)]
            d = hidden
        mods.append(nn.Linear(d, out, bias=True))
        super().__init__(*mods)


class MVEBModel(nn.Module):
    """Backbone + projector. ``forward(x) -> (h, p)``: h the backbone features, p the raw projection."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, feat_dim: int | None = None):
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.feat_dim = feat_dim
        self.channels_last_helps = True      # from_config: what the backbone's family says (fastmveb/backbones.py)

    @classmethod
    def from_config(cls, cfg) -> "MVEBModel":
        """Build from a ``fastmveb.config.ModelConfig``."""
        bb = build(cfg)
        projector = Projector(bb.dim, cfg.proj_hidden, cfg.proj_out, cfg.proj_layers)
        model = cls(backbone=bb.net, projector=projector, feat_dim=bb.dim)
        model.channels_last_helps = bb.channels_last
        return model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.backbone(x)
        return h, self.projector(h)


def make_target(model: nn.Module) -> nn.Module:
    """A frozen deepcopy of the (unwrapped) online model for the EMA target.

    It keeps the online model's train/eval mode: BYOL-style targets normalise with batch statistics, and
    their running stats are copied from the online model by ``ema_update`` rather than learnt. No parameter
    requires grad, so the target never enters the optimizer or the autograd graph.
    """
    online = unwrap(model)
    target = without_stochastic_depth(copy.deepcopy(online))      # the whole network, as DINO's teacher
    for p in target.parameters():
        p.requires_grad_(False)
    target.train(online.training)
    return target


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: torch.Tensor | float) -> None:
    """target <- m * target + (1 - m) * online for parameters; buffers (BN running stats) are copied.

    ``momentum`` may be a 0-d tensor so a compiled step sees one graph for every step and nothing is read
    back to the host. Wrappers (DDP, torch.compile) are stripped so both sides list the same parameters in
    the same order.
    """
    target, online = unwrap(target), unwrap(online)
    tp, op = list(target.parameters()), list(online.parameters())
    if len(tp) != len(op):
        raise ValueError(f"target has {len(tp)} parameters, online has {len(op)}: not the same architecture")
    if tp:
        if isinstance(momentum, torch.Tensor):
            weight = (1 - momentum).to(device=tp[0].device, dtype=tp[0].dtype)
            # lerp as t + w (o - t) (lerp's own formula for w < 0.5): _foreach_lerp_ has no single 0-d
            # Tensor weight, and its list-of-0-d-weights overload runs one kernel per tensor on CUDA; these
            # three foreach calls are fused multi-tensor kernels (for one temporary the size of the params).
            diff = torch._foreach_sub(op, tp)
            torch._foreach_mul_(diff, weight)
            torch._foreach_add_(tp, diff)
        else:
            torch._foreach_lerp_(tp, op, 1.0 - float(momentum))
    tb, ob = list(target.buffers()), list(online.buffers())
    if len(tb) != len(ob):
        raise ValueError(f"target has {len(tb)} buffers, online has {len(ob)}: not the same architecture")
    if tb:
        torch._foreach_copy_(tb, ob)


def ema_momentum_table(total_steps: int, base: float, device) -> torch.Tensor:
    """``ema_momentum`` at every step 0..total_steps as one float32 device tensor, made once.

    ``table[step]`` (a Python int index: a view) gives the step's 0-d momentum on the device with no
    host-to-device copy; making a new 0-d tensor from a Python float each step is a blocking upload on CUDA.
    """
    return torch.tensor([ema_momentum(s, total_steps, base) for s in range(total_steps + 1)], device=device)


def ema_momentum(step: int, total_steps: int, base: float = 0.996) -> float:
    """Cosine ramp of the EMA momentum from ``base`` at step 0 to 1.0 at ``total_steps`` (and after)."""
    if total_steps <= 0:
        return 1.0
    frac = min(max(step, 0), total_steps) / total_steps
    return 1.0 - (1.0 - base) * (math.cos(math.pi * frac) + 1.0) / 2.0
