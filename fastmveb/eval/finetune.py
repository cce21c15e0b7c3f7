"""Semi-supervised fine-tuning: the whole backbone and a linear head trained on a small labelled subset.

    idx = balanced_subset(labels, 0.01, seed=0)         # class-stratified, seeded: each class keeps 1% of its images
    idx = subset_from_list(files, names)                # or a published list of file names (SimCLR's 1% / 10%)
    r = finetune(backbone, train_loader, val_loader, device, mean, std, num_classes, epochs=60)
    r["top1"], r["top5"]

The protocol of the SSL literature, as SimCLR states it (Chen et al. 2020, "A Simple Framework for Contrastive
Learning of Visual Representations", appendix B.5) and BYOL (Grill et al. 2020, appendix C.2) reports on the same
subsets:
- 1% and 10% of ImageNet's training labels, class-balanced; SimCLR published the two file lists (--subset);
- the whole network is trained: the pretrained backbone (BatchNorm in training mode) plus a new linear head;
- SGD with Nesterov momentum 0.9, lr = 0.05 * batch / 256, no warm-up, no weight decay and no other
  regularisation;
- augmentation: RandomResizedCrop (224, scale 0.08-1) and horizontal flip only; val is centre-cropped;
- 60 epochs on the 1% subset, 30 on the 10% subset (SimCLR: batch 4096).
What differs here: the lr decays by a per-step cosine to 0 (a choice, so that the last epochs of a short run do not
end on a noisy step); the batch is --batch (default 256, the lr follows the same rule); BYOL tuned its
hyperparameters on held-out training data, here they are fixed defaults; one process (the subsets are small).
Crops are cut on the device from the decode-once loader's whole images (fastmveb.eval.linear.rrc_flip), as the
full linear protocol does.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastmveb.eval.features import _autocast, extract_features, normalize_uint8
from fastmveb.eval.linear import _evaluate, rrc_flip

BASE_LR = 0.05          # SimCLR B.5: lr = 0.05 * batch / 256
EPOCHS = {0.01: 60, 0.1: 30}


def default_epochs(fraction: float) -> int:
    """SimCLR's epochs for its two subsets; other fractions take the nearer one's."""
    return EPOCHS[0.01] if fraction <= 0.03 else EPOCHS[0.1]


def balanced_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sample indices (sorted): each class keeps round(fraction * its images), at least one, drawn with ``seed``.

    Balanced in the sense of ImageNet's published subsets: every class is represented in proportion to its size.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    keep = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        k = max(1, int(round(fraction * len(members))))
        keep.append(rng.choice(members, size=k, replace=False))
    return np.sort(np.concatenate(keep))


def subset_from_list(files: list[str], names: list[str], source: str = "the subset file") -> np.ndarray:
    """Indices of the samples whose source file matches a line of ``names`` (sorted).

    A line matches a file by its name (SimCLR's lists: 'n01440764_10026.JPEG') or, when it holds a '/', by the
    end of its path. Every line must match exactly one sample: a list that names files the beton lacks selects
    another subset than the one published, so that is a ValueError naming the first such line.
    """
    by_name: dict[str, list[int]] = {}
    for i, f in enumerate(files):
        by_name.setdefault(Path(f).name, []).append(i)
    keep = []
    for n, line in enumerate(names, 1):
        name = line.strip()
        if not name:
            continue
        hits = [i for i in by_name.get(Path(name).name, []) if "/" not in name or files[i].endswith("/" + name.lstrip("/"))]
        if not hits:
            raise ValueError(f"{source} line {n}: '{name}' is not among the beton's files")
        if len(hits) > 1:
            raise ValueError(f"{source} line {n}: '{name}' matches {len(hits)} files; give more of its path")
        keep.append(hits[0])
    if not keep:
        raise ValueError(f"{source} names no files")
    return np.unique(np.asarray(keep))


def finetune(backbone: nn.Module, train_loader, val_loader, device, mean, std, num_classes: int, epochs: int,
             base_lr: float = BASE_LR, momentum: float = 0.9, weight_decay: float = 0.0, crop_size: int = 224,
             crop_scale=(0.08, 1.0), amp_dtype=None, seed: int = 0, val_every: int = 0, log=None,
             set_epoch=None) -> dict:
    """Fine-tune ``backbone`` (in place) and a new Linear head on ``train_loader``'s labelled subset (uint8
    whole-image batches, (x, extent, y) or (x, y)); validate on ``val_loader``'s centre crops after the last
    epoch (and every ``val_every`` epochs). -> top1, top5 (final), history, head, batch, steps."""
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ValueError("the fine-tuning batch exceeds the labelled subset; lower the batch")
    total = epochs * steps_per_epoch
    head, opt, lr, batch, step, history = None, None, None, None, 0, []
    backbone.to(device)
    was_training = backbone.training
    try:
        for ep in range(epochs):
            if set_epoch is not None:
                set_epoch(ep)
            backbone.train()
            tot, nb = 0.0, 0
            for out in train_loader:
                x, y, extent = out[0], out[-1], (out[1] if len(out) == 3 else None)
                y = y.reshape(-1).to(device, dtype=torch.long, copy=True)
                with torch.no_grad():
                    crops = normalize_uint8(rrc_flip(x.to(device), crop_size, crop_scale, generator=g, extent=extent),
                                            mean, std)
                with _autocast(device, amp_dtype):
                    h = backbone(crops).flatten(1)
                if head is None:      # the head's width and the lr (batch rule) from the first batch
                    head = nn.Linear(h.shape[1], num_classes)
                    with torch.no_grad():
                        head.weight.normal_(0, 0.01, generator=g)
                        head.bias.zero_()
                    head.to(device)
                    batch = x.shape[0]
                    lr = base_lr * batch / 256
                    opt = torch.optim.SGD(list(backbone.parameters()) + list(head.parameters()), lr=lr,
                                          momentum=momentum, nesterov=True, weight_decay=weight_decay)
                for pg in opt.param_groups:
                    pg["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(head(h.float()), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                tot, nb, step = tot + float(loss.detach()), nb + 1, step + 1
            row = {"epoch": ep + 1, "loss": tot / max(nb, 1)}
            if ep + 1 == epochs or (val_every and (ep + 1) % val_every == 0):
                feats, val_y = extract_features(backbone, val_loader, device, mean, std, None, amp_dtype, normalize=False)
                with torch.no_grad():
                    row["top1"], row["top5"] = _evaluate(head, feats, val_y, device)
            history.append(row)
            if log is not None:
                acc = f" val top-1 {row['top1']:.2f} top-5 {row['top5']:.2f}" if "top1" in row else ""
                log(f"finetune epoch {ep + 1}/{epochs} loss {row['loss']:.4f}{acc}")
    finally:
        backbone.train(was_training)
    head_sd = {k: v.detach().float().cpu().clone() for k, v in head.state_dict().items()}
    return {"top1": history[-1]["top1"], "top5": history[-1]["top5"], "history": history, "head": head_sd,
            "batch": batch, "steps": step, "epochs": epochs}
