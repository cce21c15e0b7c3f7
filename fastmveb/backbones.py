"""The backbone registry: every family of encoder the trainer, evaluation, export and the plan can use, registered once.

    model.arch: resnet50                      # a torchvision ResNet (resnet18 ... resnet152, wide_resnet50_2,
                                              # resnext50_32x4d, ...) or resnet10 (one block per stage)
    model.arch: timm:vit_small_patch16_224    # any timm model by name (ViTs, ConvNeXts, ...), random init
    model.arch: timm:convnext_tiny

    bb = build(cfg.model)          # Backbone: net (features out), dim, family, channels_last, patch, formats
    check_model_config(cfg)        # ConfigError (one line) for an unknown arch or sizes a ViT cannot take

What a family decides, and why:
- the features: torchvision ResNets with ``fc`` replaced by Identity (global average pool); timm models with
  ``num_classes=0``, i.e. their own pooling up to the pre-logits: the class token after the final norm for a ViT,
  the global average pool (and head norm) for a convnet. ``net(x)`` gives (N, dim) either way.
- weight decay: tensors of rank <= 1 (biases, norms, layer scales) never take it (fastmveb/optim.py); a timm
  model adds what its ``no_weight_decay()`` names (position embeddings, class / register tokens), which are
  3-D and would otherwise be decayed and LARS-scaled.
- channels-last: helps convolutions (ResNet, ConvNeXt); a ViT's only convolution is its patch embedding, so its
  input stays contiguous.
- zero_init_residual (the last BN of each residual branch starts at 0): torchvision ResNets only.
- export formats: torchvision and detectron2 take ResNets, timm takes every timm model and the ResNets timm has.
- ViTs get ``dynamic_img_size=True``: the position embeddings are interpolated to each view's size, so the 224-px
  and 96-px views go through the same network; a size that is not a multiple of the patch is refused.
Nothing here reaches for a model hub: timm models are created with ``pretrained=False``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch
import torchvision
from torch import nn

FAMILIES = ("a torchvision ResNet (resnet18, resnet34, resnet50, resnet101, resnet152, wide_resnet50_2, resnext50_32x4d, "
            "..., or resnet10) or any timm model as timm:NAME (e.g. timm:vit_small_patch16_224, timm:convnext_tiny)")
TIMM = "timm:"
# The ModelConfig keys that shape a timm model (0 = the model's own value), passed to timm.create_model.
TIMM_SHAPE_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads")


@dataclasses.dataclass
class Backbone:
    net: nn.Module          # forward(x) -> (N, dim) features
    dim: int
    family: str             # "torchvision" | "timm"
    channels_last: bool     # whether channels-last memory helps it
    patch: int              # a ViT's patch side (view sizes must be multiples of it); 0 for convnets
    timm_name: str | None = None
    timm_kwargs: dict = dataclasses.field(default_factory=dict)   # what timm.create_model needs to rebuild it


def torchvision_archs() -> list[str]:
    tv = [n for n in torchvision.models.list_models(module=torchvision.models)
          if n.startswith(("resnet", "wide_resnet", "resnext"))]
    return sorted(set(tv) | {"resnet10"})


def torchvision_resnet(arch: str, **kwargs) -> nn.Module:
    """The torchvision model ``arch`` names (random init, its 1000-class fc); ValueError for an unknown name.

    "resnet10" is a resnet18 with one block per stage, ResNet(BasicBlock, [1, 1, 1, 1]): small enough for CPU
    tests and the demo, same code path as resnet50. An export of it loads into exactly this model.
    """
    from torchvision.models.resnet import BasicBlock, ResNet
    if arch == "resnet10":
        return ResNet(BasicBlock, [1, 1, 1, 1], **kwargs)
    if arch not in torchvision_archs():
        raise ValueError(f"unknown backbone arch {arch!r}; valid: {FAMILIES}")
    return torchvision.models.get_model(arch, weights=None, **kwargs)


def family(arch: str) -> str:
    """"torchvision" or "timm"; ValueError naming the families for anything else."""
    if arch.startswith(TIMM):
        import timm
        if not timm.is_model(arch[len(TIMM):]):
            raise ValueError(f"model.arch {arch!r}: timm has no model named {arch[len(TIMM):]!r} "
                             f"(timm.list_models('*vit*') lists them); use {FAMILIES}")
        return "timm"
    if arch in torchvision_archs():
        return "torchvision"
    raise ValueError(f"model.arch {arch!r} is not a known backbone; use {FAMILIES}")


def _shape_kwargs(cfg) -> dict:
    return {k: getattr(cfg, k, 0) for k in TIMM_SHAPE_KEYS if getattr(cfg, k, 0)}


def timm_kwargs(cfg) -> tuple[str, dict]:
    """(timm name, create_model kwargs) of a timm arch: the shape keys set, dynamic image size where the model
    takes it, stochastic depth. ValueError for a shape key the model does not take."""
    import timm
    name = cfg.arch[len(TIMM):]
    with torch.device("meta"):                                        # the class only: no memory, no init cost
        probe = timm.create_model(name, pretrained=False, num_classes=0)
    accepts = inspect.signature(type(probe).__init__).parameters
    kw = _shape_kwargs(cfg)
    bad = [k for k in kw if k not in accepts]
    if bad:
        raise ValueError(f"model.{bad[0]} does not apply to {cfg.arch} ({type(probe).__name__} takes no {bad[0]}); "
                         f"set it to 0")
    if "dynamic_img_size" in accepts:
        kw["dynamic_img_size"] = True
    if getattr(cfg, "drop_path", 0.0):
        if "drop_path_rate" not in accepts:
            raise ValueError(f"model.drop_path does not apply to {cfg.arch} (no stochastic depth); set it to 0")
        kw["drop_path_rate"] = cfg.drop_path
    return name, kw


def build(cfg, device=None) -> Backbone:
    """The randomly initialised backbone of a ``ModelConfig`` (features out), with what its family decides."""
    fam = family(cfg.arch)
    if fam == "torchvision":
        for k in ("drop_path", *TIMM_SHAPE_KEYS):
            if getattr(cfg, k, 0):
                raise ValueError(f"model.{k} applies to timm models only, not {cfg.arch}; set it to 0")
        with torch.device(device) if device is not None else contextlib.nullcontext():
            net = torchvision_resnet(cfg.arch, zero_init_residual=cfg.zero_init_residual)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return Backbone(net, dim, fam, channels_last=True, patch=0)
    import timm
    name, kw = timm_kwargs(cfg)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        net = timm.create_model(name, pretrained=False, num_classes=0, **kw)
    patch = _patch(net)
    # the kwargs that change the state_dict (not dynamic_img_size or drop_path_rate): what a loader needs
    keep = {k: v for k, v in kw.items() if k in TIMM_SHAPE_KEYS}
    return Backbone(net, int(net.num_features), fam, channels_last=patch == 0, patch=patch, timm_name=name,
                    timm_kwargs=keep)


def _patch(net: nn.Module) -> int:
    pe = getattr(net, "patch_embed", None)
    size = getattr(pe, "patch_size", None)
    if size is None:
        return 0
    size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
    return int(max(size))


def export_formats(arch: str) -> tuple[str, ...]:
    """The export formats (fastmveb/export.py) that apply to ``arch``: torchvision and detectron2 for ResNets,
    timm for every timm model and for the ResNets timm has under the same name (it has no resnet10)."""
    import timm
    if family(arch) == "timm":
        return ("timm",)
    return ("torchvision", "timm", "detectron2") if timm.is_model(arch) else ("torchvision", "detectron2")


def channels_last_helps(cfg) -> bool:
    """Whether the backbone of a ``ModelConfig`` runs faster channels-last (convnets yes, ViTs no)."""
    return build(cfg, device="meta").channels_last


def no_decay_params(model: nn.Module) -> set[int]:
    """ids of the parameters a timm model's ``no_weight_decay()`` names (position embeddings, class / register
    tokens), found wherever such a model sits inside ``model`` (wrappers and prefixes do not matter)."""
    out: set[int] = set()
    for mod in model.modules():
        names = getattr(mod, "no_weight_decay", None)
        if not callable(names):
            continue
        names = set(names())
        for n, p in mod.named_parameters():
            if n in names:
                out.add(id(p))
    return out


def without_stochastic_depth(model: nn.Module) -> nn.Module:
    """Turn stochastic depth and dropout off in ``model`` (in place): the EMA target, like DINO's teacher, runs
    the whole network in train mode (its BatchNorms use batch statistics) but drops nothing."""
    from timm.layers import DropPath
    for mod in model.modules():
        if isinstance(mod, DropPath):
            mod.drop_prob = 0.0
        elif isinstance(mod, nn.Dropout):
            mod.p = 0.0
    return model


def view_sizes(cfg) -> list[tuple[str, int]]:
    """(key, size) of every image size a network of ``cfg`` sees: each view size of the resolution schedule and
    the evaluation size."""
    from .resolution import schedule
    out = []
    for _, _, r in schedule(cfg):
        out.append(("views.global_size" if not cfg.views.res_start_size else "views.res_start_size ramp",
                    r.global_size))
        if cfg.views.n_local:
            out.append(("views.local_size", r.local_size))
    out.append(("eval.size", cfg.eval.size))
    return out


def check_model_config(cfg) -> None:
    """model.arch names a registered family, the shape keys apply to it, and (ViTs) every view size and the
    evaluation size are multiples of the patch. Raises ConfigError (one line)."""
    from .config import ConfigError
    try:
        bb = build(cfg.model, device="meta")                         # shapes only: milliseconds
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    if bb.patch:
        for key, size in view_sizes(cfg):
            if size % bb.patch:
                lo = size // bb.patch * bb.patch
                raise ConfigError(f"{key}={size} is not a multiple of {cfg.model.arch}'s patch size {bb.patch}; "
                                  f"use {lo or bb.patch} or {lo + bb.patch}")
