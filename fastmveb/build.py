"""The training objects of a run, built from its config: the multi-view network, EMA target, view maker,
LARS optimizer and their compiled callables. fastmveb/train.py and the step benchmarks share this, so a
benchmark times what training runs.

    set_seed(cfg.train.seed)
    parts = build_training(cfg, accelerator, lr_peak)     # dict: model, target, probe, net, view_maker,
                                                           # optimizer, net_c, target_c, views_c, use_compile
Per-view (and cross-process) BatchNorm, channels-last, DDP (accelerator.prepare) and torch.compile are applied here; the architecture
itself is fastmveb/model.py's.
"""
from __future__ import annotations

import torch
from torch import nn

from .batchnorm import convert_batchnorm, views
from .model import MVEBModel, make_target
from .optim import LARS, param_groups
from .views import ViewMaker


class MultiView(nn.Module):
    """All views in ONE forward call: DDP allows one forward per backward, and views of equal size
    (the two globals, then the locals) share a backbone call; ``views(k)`` makes every BatchNorm normalise
    each view's chunk with its own statistics, as the released per-crop calls do (fastmveb/batchnorm.py)."""

    def __init__(self, model: nn.Module, probe: nn.Module | None = None):
        super().__init__()
        self.model, self.probe = model, probe

    def forward(self, v: list[torch.Tensor], y: torch.Tensor | None = None):
        h_views, p_views, i = [], [], 0
        while i < len(v):
            j = i
            while j < len(v) and v[j].shape[-1] == v[i].shape[-1]:
                j += 1
            with views(j - i):
                h, p = self.model(torch.cat(v[i:j]))                  # (k*N, ...) -> k chunks of N
            h_views += h.chunk(j - i)
            p_views += p.chunk(j - i)
            i = j
        probe_out = self.probe(h_views[0], y) if self.probe is not None else None
        return h_views, p_views, probe_out


def uses_compile(cfg, device: torch.device) -> bool:
    return cfg.train.compile == "true" or (cfg.train.compile == "auto" and device.type == "cuda")


def build_training(cfg, accelerator, lr_peak: float, num_classes: int | None = None) -> dict:
    """Everything a step needs, on accelerator.device (seed torch first: the weights come from its RNG).
    num_classes: size of the online linear probe (cfg.eval.online_linear), None for no probe."""
    device = accelerator.device
    model = convert_batchnorm(MVEBModel.from_config(cfg.model), sync=cfg.model.sync_bn)   # per-view BN
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    target = make_target(model)
    probe = None
    if num_classes is not None:
        from .eval.online import OnlineLinearProbe
        probe = convert_batchnorm(OnlineLinearProbe(model.feat_dim, num_classes), sync=cfg.model.sync_bn).to(device)
    net = MultiView(model, probe)
    view_maker = ViewMaker(cfg.views).to(device)
    optimizer = LARS(param_groups(net, cfg.optim.weight_decay), lr=lr_peak, weight_decay=cfg.optim.weight_decay,
                     momentum=cfg.optim.momentum, trust_coef=cfg.optim.trust_coef)
    net = accelerator.prepare(net)                                    # DDP when world > 1; FFCV shards itself
    use_compile = uses_compile(cfg, device)
    # dynamic=False: one specialised graph per input size; progressive resolution has a handful of sizes, each
    # compiled once (fastmveb/resolution.py says why not dynamo's symbolic shapes)
    compile_fn = (lambda m: torch.compile(m, backend=cfg.train.compile_backend, dynamic=False)) if use_compile \
        else (lambda m: m)
    net_c, target_c, views_c = compile_fn(net), compile_fn(target), compile_fn(view_maker)
    return {"model": model, "target": target, "probe": probe, "net": net, "view_maker": view_maker,
            "optimizer": optimizer, "net_c": net_c, "target_c": target_c, "views_c": views_c,
            "use_compile": use_compile, "memory_format": memory_format, "compile": compile_fn}
