"""Linear probe on a frozen backbone (BatchNorm in eval mode): fast (cached features) and full (MVEB protocol).

    r = linear_fast(backbone, train_loader, val_loader, device, stats, LinearFastOptions(100, 256, 0.1))
    r = linear_full(backbone, train_loader, val_loader, device, stats, LinearFullOptions(90, 0.1, 224))
    r["top1"], r["top5"], r["head"]       # head: {"weight", "bias"} of a Linear on raw backbone features

full: the released evaluation protocol (docs/method.md, "Evaluation"): batch 4096; every step a fresh
  RandomResizedCrop(224, scale 0.08-1) + horizontal flip of the training images (cut here, batched, on the
  device, from the loader's uint8 batch), forward through the frozen backbone (in micro-batches when the
  device needs them: the head's step still sees the whole batch), a Linear trained with SGD momentum 0.9
  inside LARC (trust 0.001, no clipping, weight AND bias), lr 0.1 * batch / 256 = 1.6, weight decay 0,
  90 epochs with a per-epoch cosine. The val set is centre-cropped (resize 256 -> centre 224), so its
  features are fixed and extracted once; validation every 10 epochs: final AND best are reported.
fast: one centre-crop feature pass over train and val, then many cheap epochs of a Linear on the cached
  features. The features are standardised per dimension with train-set statistics first (a BatchNorm
  without affine parameters, frozen): that makes one learning rate work for any backbone, whatever its
  feature scale, so the default is plain SGD momentum 0.9, lr 0.1 * batch / 256 (``base_lr``), no LARS,
  cosine. Without the standardisation, post-ReLU ResNet features (mean >> std) need per-backbone lr tuning.
  The learned layer is folded back onto raw features, so ``head`` is directly a torchvision fc.
  A quick estimate, not the paper's protocol: without crop augmentation it slightly underestimates the full
  protocol on large sets and overfits sooner on small ones; use it for monitoring and comparisons, full mode
  for the headline number.
"""
from __future__ import annotations

import dataclasses
import math
import time

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from fastmveb.eval.features import PixelStats, _autocast, extract_features, normalize_uint8
from fastmveb.eval.knn import topk_accuracy


@dataclasses.dataclass(frozen=True)
class LinearFastOptions:
    """The fast probe's settings: epochs, batch and base lr (a run's eval.linear_epochs, eval.linear_batch_size,
    eval.linear_base_lr), the SGD that trains it, the seed of its init and order, and how many train / val images
    its feature passes read (None: all)."""
    epochs: int
    batch_size: int
    base_lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    seed: int = 0
    max_train: int | None = None
    max_val: int | None = None


@dataclasses.dataclass(frozen=True)
class LinearFullOptions:
    """The released linear protocol's settings (module docstring): epochs and base lr (eval.linear_epochs,
    eval.linear_base_lr), the crop side (eval.size), LARC's trust coefficient and SGD, the RandomResizedCrop
    scale, the seed of the init and the crops, images per backbone forward (``micro_batch``, None: the whole
    batch) and the validation period in epochs."""
    epochs: int
    base_lr: float
    crop_size: int
    trust_coef: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    seed: int = 0
    micro_batch: int | None = None
    val_every: int = 10


class LARC(torch.optim.Optimizer):
    """SGD with momentum inside LARC in its scaling mode (no clipping), as the released linear evaluation wraps it.

    For EVERY tensor, weight and bias alike: d = grad + wd * w, then d *= trust_coef * ||w|| / (||grad|| +
    wd * ||w|| + 1e-8) when both norms are non-zero (a zero-initialised bias takes its first step unscaled).
    Then torch's SGD momentum: buf = d on the first step, buf = momentum * buf + d after; w -= lr * buf.
    trust_coef = 0 turns it into plain SGD with momentum.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, trust_coef: float = 0.001,
                 eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coef=trust_coef,
                                      eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad.add(p, alpha=g["weight_decay"]) if g["weight_decay"] else p.grad
                if g["trust_coef"] > 0:
                    pn, gn = p.norm(), p.grad.norm()
                    q = g["trust_coef"] * pn / (gn + g["weight_decay"] * pn + g["eps"])
                    d = d * torch.where((pn > 0) & (gn > 0), q, torch.ones_like(q))
                st = self.state[p]
                if "mu" not in st:
                    st["mu"] = d.clone()
                else:
                    st["mu"].mul_(g["momentum"]).add_(d)
                p.add_(st["mu"], alpha=-g["lr"])


def cosine_lr(base: float, step: int, total: int) -> float:
    return base * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _head_step(head: nn.Module, opt: torch.optim.Optimizer, feats: torch.Tensor, y: torch.Tensor,
               lr: float) -> torch.Tensor:
    """One optimizer step of the linear head at learning rate lr; returns the detached loss."""
    for pg in opt.param_groups:
        pg["lr"] = lr
    loss = F.cross_entropy(head(feats), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach()


# ---------------------------------------------------------------------------------------------------------
# Batched RandomResizedCrop + flip on the device.

def rrc_flip(x: torch.Tensor, size: int = 224, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5,
             generator: torch.Generator | None = None, extent: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 NCHW -> float NCHW (0-255) crops of ``size``: RandomResizedCrop + horizontal flip, one batched op.

    extent: (N, 2) each image's true (H, W) when x holds whole images resized to a canvas (the train loader's
    decode-once batches): crops are drawn on the true extent (scale and ratio mean what they mean for the
    full image) and mapped onto the canvas. None: x is the image itself.
    roi_align with adaptive sampling averages ceil(box/size) points per output pixel in each direction, so
    large crops are low-passed before downsampling (plain grid_sample would alias).
    """
    # Training's own RandomResizedCrop rule draws the boxes (on the CPU: ``generator`` is a CPU one). Imported
    # here: fastmveb.views loads kornia, which the fast probe, kNN and export never need.
    from fastmveb.views import sample_crop_boxes, to_canvas
    n, _, height, width = x.shape
    cpu = torch.device("cpu")
    if extent is None:
        tlhw = sample_crop_boxes(n, height, width, scale, ratio, cpu, generator)
    else:
        ext = extent.detach().to("cpu", torch.float32)
        tlhw = to_canvas(sample_crop_boxes(n, ext[:, 0], ext[:, 1], scale, ratio, cpu, generator), ext, (height, width))
    top, left, h, w = tlhw.unbind(1)
    boxes = torch.stack([left, top, left + w, top + h], dim=1).to(x.device)     # roi_align's (x1, y1, x2, y2)
    rois = torch.cat([torch.arange(n, device=x.device, dtype=boxes.dtype)[:, None], boxes], dim=1)
    out = roi_align(x.float(), rois, output_size=size, spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    flip = (torch.rand(n, generator=generator) < flip_p).to(x.device)
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


# ---------------------------------------------------------------------------------------------------------

def _evaluate(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, device, batch: int = 8192):
    with torch.no_grad():
        scores = torch.cat([head(feats[i:i + batch].to(device)).float().cpu() for i in range(0, feats.shape[0], batch)])
    return topk_accuracy(scores, labels, (1, 5))


def train_linear_on_features(train_feats: torch.Tensor, train_labels: torch.Tensor, val_feats: torch.Tensor,
                             val_labels: torch.Tensor, opts: LinearFastOptions, num_classes: int | None = None,
                             device="cpu", log=None) -> dict:
    """Linear classifier on fixed features: SGD momentum, lr = base_lr * batch / 256, per-step cosine
    (``opts``; its image limits are the feature passes', not read here).

    Returns {"top1", "top5", "train_top1", "head": {"weight", "bias"} on the raw (unstandardised) features}.
    """
    device = torch.device(device)
    if num_classes is None:
        num_classes = int(max(train_labels.max().item(), val_labels.max().item())) + 1
    d = train_feats.shape[1]
    mu = train_feats.mean(0)
    sd = train_feats.std(0).clamp_min(1e-6)  # dead ReLU units have std 0
    epochs, batch_size = opts.epochs, opts.batch_size
    g = torch.Generator().manual_seed(opts.seed)
    head = nn.Linear(d, num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    head.to(device)
    # Whole feature matrix on the device when it is small next to device memory (cheap random batches);
    # otherwise batches are gathered on the host and copied.
    on_dev = device.type != "cuda" or train_feats.numel() * 4 < 0.25 * torch.cuda.get_device_properties(device).total_memory
    xs = ((train_feats - mu) / sd).to(device if on_dev else "cpu")
    ys = train_labels.reshape(-1).long().to(xs.device)
    n = xs.shape[0]
    steps_per_epoch = max(1, n // batch_size)  # drop the ragged last batch: a tiny batch is a noisy step
    total = epochs * steps_per_epoch
    lr = opts.base_lr * batch_size / 256
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=opts.momentum, weight_decay=opts.weight_decay)
    step = 0
    for ep in range(epochs):
        perm = torch.randperm(n, generator=g).to(xs.device)
        tot = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size:(i + 1) * batch_size]
            xb, yb = xs[idx].to(device, non_blocking=True), ys[idx].to(device, non_blocking=True)
            tot += _head_step(head, opt, xb, yb, cosine_lr(lr, step, total))
            step += 1
        if log is not None and (ep + 1 == epochs or (ep + 1) % max(1, epochs // 10) == 0):
            log(f"linear fast epoch {ep + 1}/{epochs} loss {float(tot) / steps_per_epoch:.4f}")
    folded = fold_standardisation(head.weight, head.bias, mu, sd)
    raw = nn.Linear(d, num_classes).to(device)
    raw.load_state_dict({k: v.to(device) for k, v in folded.items()})
    top1, top5 = _evaluate(raw, val_feats, val_labels, device)
    train_top1, _ = _evaluate(raw, train_feats, train_labels, device)
    return {"top1": top1, "top5": top5, "train_top1": train_top1, "head": folded}


@torch.no_grad()
def fold_standardisation(weight: torch.Tensor, bias: torch.Tensor, mu: torch.Tensor, sd: torch.Tensor) -> dict:
    """A Linear on standardised features (h - mu) / sd -> the same function of raw h, as float32 CPU tensors:
    W' = W / sd, b' = b - W' mu. The fast probe's standardisation and the online probe's BatchNorm (eval mode:
    sd = sqrt(running_var + eps)) both fold through here, so a saved head is a plain torchvision fc."""
    w = weight.detach().float().cpu() / sd.float().cpu()[None, :]
    b = bias.detach().float().cpu() - w @ mu.float().cpu()
    return {"weight": w.contiguous(), "bias": b.contiguous()}


def linear_fast(backbone, train_loader, val_loader, device, stats: PixelStats, opts: LinearFastOptions,
                amp_dtype=None, log=None) -> dict:
    """Fast linear probe: centre-crop features extracted once (deterministic loaders), then a Linear on them."""
    t0 = time.perf_counter()
    tr, trl = extract_features(backbone, train_loader, device, stats, opts.max_train, amp_dtype, normalize=False)
    va, val = extract_features(backbone, val_loader, device, stats, opts.max_val, amp_dtype, normalize=False)
    if log is not None:
        log(f"features: train {tuple(tr.shape)} val {tuple(va.shape)} in {time.perf_counter() - t0:.1f}s")
    r = train_linear_on_features(tr, trl, va, val, opts, device=device, log=log)
    r.update(mode="fast", epochs=opts.epochs, n_train=tr.shape[0], n_val=va.shape[0])
    return r


def linear_full(backbone, train_loader, val_loader, device, stats: PixelStats, opts: LinearFullOptions,
                num_classes: int | None = None, amp_dtype=None, log=None, set_epoch=None) -> dict:
    """The released linear protocol on a frozen backbone (module docstring). ``train_loader`` yields shuffled
    uint8 batches of whole training images; its batch is the protocol's batch (released: 4096), read from the
    first batch, and sets lr = base_lr * batch / 256. ``micro_batch``: the backbone sees the batch in chunks of
    this many images (the device's limit); the head still takes ONE step on the whole batch's features, so the
    result equals an undivided batch. Validation every ``val_every`` epochs and after the last; returns the
    final top-1/5 and the best of those validations (``best_top1``, ``best_top5``, ``best_epoch``), plus a
    per-epoch ``history`` (lr, loss, and top-1/5 where validated). ``set_epoch(e)`` is called before epoch e."""
    device = torch.device(device)
    epochs = opts.epochs
    va, val = extract_features(backbone, val_loader, device, stats, None, amp_dtype, normalize=False)
    if num_classes is None:
        num_classes = int(val.max().item()) + 1
    g = torch.Generator().manual_seed(opts.seed)
    head = nn.Linear(va.shape[1], num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=g)
        head.bias.zero_()
    head.to(device)
    opt, lr, history, batch = None, None, [], None
    was_training = backbone.training
    backbone.eval()  # frozen: BatchNorm uses its running statistics
    try:
        for ep in range(epochs):
            if set_epoch is not None:
                set_epoch(ep)
            tot, nb = 0.0, 0
            for out in train_loader:
                # (x, y), or (x, extent, y) from a decode-once loader of whole images on a canvas
                x, y, extent = out[0], out[-1], (out[1] if len(out) == 3 else None)
                if opt is None:  # lr scales with the batch the loader actually delivers
                    batch = x.shape[0]
                    lr = opts.base_lr * batch / 256
                    opt = LARC(head.parameters(), lr=lr, momentum=opts.momentum, weight_decay=opts.weight_decay,
                               trust_coef=opts.trust_coef)
                y = y.reshape(-1).to(device, dtype=torch.long, copy=True)
                if int(y.max()) >= num_classes:
                    raise ValueError(f"train label {int(y.max())} >= {num_classes} classes seen in the val set")
                h = _frozen_features(backbone, x.to(device, non_blocking=True), extent, stats, opts, g, amp_dtype)
                tot += _head_step(head, opt, h, y, lr * 0.5 * (1.0 + math.cos(math.pi * ep / epochs)))  # per epoch
                nb += 1
            row = {"epoch": ep + 1, "lr": opt.param_groups[0]["lr"] if opt else None, "loss": float(tot) / max(nb, 1)}
            if (ep + 1) % opts.val_every == 0 or ep + 1 == epochs:
                row["top1"], row["top5"] = _evaluate(head, va, val, device)
            history.append(row)
            if log is not None:
                acc = f" val top-1 {row['top1']:.2f} top-5 {row['top5']:.2f}" if "top1" in row else ""
                log(f"linear full epoch {ep + 1}/{epochs} lr {row['lr']:.4g} loss {row['loss']:.4f}{acc}")
    finally:
        backbone.train(was_training)
    validated = [r for r in history if "top1" in r]
    best = max(validated, key=lambda r: r["top1"])           # the earliest of equal tops
    head_sd = {k: v.detach().float().cpu().clone() for k, v in head.state_dict().items()}
    return {"top1": history[-1]["top1"], "top5": history[-1]["top5"], "best_top1": best["top1"],
            "best_top5": best["top5"], "best_epoch": best["epoch"], "val_epochs": [r["epoch"] for r in validated],
            "head": head_sd, "mode": "full", "epochs": epochs, "batch": batch,
            "micro_batch": opts.micro_batch or batch, "n_val": va.shape[0], "history": history}


@torch.no_grad()
def _frozen_features(backbone, x, extent, stats: PixelStats, opts: LinearFullOptions, g, amp_dtype) -> torch.Tensor:
    """The frozen backbone's float32 features of one batch's RandomResizedCrop + flip crops, ``opts.micro_batch``
    images per forward."""
    with _autocast(x.device, amp_dtype):
        crops = rrc_flip(x, opts.crop_size, opts.crop_scale, generator=g, extent=extent)
        return torch.cat([backbone(normalize_uint8(c, stats)).float().flatten(1)
                          for c in crops.split(opts.micro_batch or crops.shape[0])])
