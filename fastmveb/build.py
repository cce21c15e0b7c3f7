"""The training objects of a run, built from its config: the accelerator, the multi-view network, EMA target,
LARS optimizer and their compiled callables. fastmveb/train.py and the benchmarks share this, so a benchmark times
what training runs.

    accelerator = make_accelerator(cfg)                    # DDP / gloo, precision, collective timeout, backend flags
    set_seed(cfg.train.seed)
    t = build_training(cfg, accelerator, lr_peak)          # Training: model, target, probe, net, optimizer, net_c, ...
    views_c = t.view_maker(cfg.views)                      # compiled when training compiles

Per-view (and cross-process) BatchNorm, channels-last, DDP (accelerator.prepare) and torch.compile are applied here;
the architecture itself is fastmveb/model.py's.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
from typing import Callable

import torch
from torch import nn

from .batchnorm import convert_batchnorm, views
from .model import MVEBModel, make_target
from .optim import LARS, make_optimizer, param_groups
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


def set_backend_flags() -> None:
    """TF32 convolutions and matmuls, cuDNN autotuning: for training and every benchmark alike (the entropy
    estimator turns TF32 off where it needs float32: fastmveb/entropy.py)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True


def use_deterministic_algorithms() -> None:
    """torch.use_deterministic_algorithms(True), with the cuBLAS setting it requires on CUDA.

    Deterministic cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 (or :16:8) in the environment before cuBLAS
    starts; unset, it is set here (call this before any CUDA work), any other value raises ConfigError.
    """
    from fastmveb.config import ConfigError
    cur = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if cur is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    elif cur not in (":4096:8", ":16:8"):
        raise ConfigError(f"train.deterministic=true needs CUBLAS_WORKSPACE_CONFIG=:4096:8 or :16:8, the environment "
                         f"has {cur!r}; unset it or set one of those")
    torch.use_deterministic_algorithms(True)


def make_accelerator(cfg, cpu: bool | None = None):
    """The run's Accelerator (cpu: None = no CUDA here), with the backend flags set.

    Deterministic algorithms go first (before CUDA and cuBLAS start). cpu=True is what makes torchrun-started
    CPU processes join one gloo group (docs/notes.md). With synchronised BatchNorm every rank computes the same
    running statistics from the same gathered numbers, so DDP's per-forward broadcast of buffers from rank 0
    would only cost a collective. Under torchrun the group is joined first with a per-attempt store prefix
    (fastmveb/elastic.py); Accelerate then finds it initialised.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    from .elastic import init_elastic_process_group
    if cfg.train.deterministic:
        use_deterministic_algorithms()
    timeout_s = cfg.train.collective_timeout_s
    init_elastic_process_group(timeout_s)
    accelerator = Accelerator(
        mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available() if cpu is None else cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=not cfg.model.sync_bn),
                         InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=timeout_s))])
    set_backend_flags()
    return accelerator


@dataclasses.dataclass
class Training:
    """What a step needs. ``model`` is the online MVEBModel, ``net`` the multi-view wrapper (DDP when world > 1)
    that also runs the online probe; ``*_c`` are the callables the step runs (compiled or the modules)."""
    model: nn.Module
    target: nn.Module
    probe: nn.Module | None
    net: nn.Module
    optimizer: "LARS"                  # or optim.AdamW (optim.name)
    net_c: Callable
    target_c: Callable
    use_compile: bool
    memory_format: torch.memory_format
    compile: Callable
    device: torch.device

    def view_maker(self, views_cfg) -> Callable:
        """A view maker for these view sizes on the device, compiled when training compiles (fastmveb.resolution's
        ViewSwitch makes one per size of a progressive-resolution schedule)."""
        return self.compile(ViewMaker(views_cfg).to(self.device))


def build_training(cfg, accelerator, lr_peak: float, num_classes: int | None = None) -> Training:
    """Everything a step needs, on accelerator.device (seed torch first: the weights come from its RNG).
    num_classes: size of the online linear probe (cfg.eval.online_linear), None for no probe."""
    device = accelerator.device
    model = convert_batchnorm(MVEBModel.from_config(cfg.model), sync=cfg.model.sync_bn)   # per-view BN
    # channels-last where the backbone's family says it helps (convnets; a ViT's input stays contiguous)
    memory_format = torch.channels_last if cfg.model.channels_last and model.channels_last_helps \
        else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    target = make_target(model)
    probe = None
    if num_classes is not None:
        from .eval.online import OnlineLinearProbe
        probe = convert_batchnorm(OnlineLinearProbe(model.feat_dim, num_classes), sync=cfg.model.sync_bn).to(device)
    net = MultiView(model, probe)
    optimizer = make_optimizer(cfg, param_groups(net, cfg.optim.weight_decay), lr_peak)   # LARS or AdamW
    net = accelerator.prepare(net)                                    # DDP when world > 1; FFCV shards itself
    use_compile = uses_compile(cfg, device)
    # dynamic=False: one specialised graph per input size; progressive resolution has a handful of sizes, each
    # compiled once (fastmveb/resolution.py says why not dynamo's symbolic shapes)
    compile_fn = (lambda m: torch.compile(m, backend=cfg.train.compile_backend, dynamic=False)) if use_compile \
        else (lambda m: m)
    return Training(model=model, target=target, probe=probe, net=net, optimizer=optimizer, net_c=compile_fn(net),
                    target_c=compile_fn(target), use_compile=use_compile, memory_format=memory_format,
                    compile=compile_fn, device=device)
