"""Semi-supervised fine-tuning: the whole backbone and a linear head trained on a small labelled subset.

    idx = balanced_subset(labels, 0.01, seed=0)         # class-stratified, seeded: each class keeps 1% of its images
    idx = subset_from_list(files, names)                # or a published list of file names (SimCLR's 1% / 10%)
    r = finetune(backbone, train_loader, val_loader, device, stats, num_classes, FinetuneOptions(60, 224))
    r["top1"], r["top5"], r["n_val"]                    # over the whole val set, once per sample, on every rank

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
hyperparameters on held-out training data, here they are fixed defaults. BatchNorm uses each process's own batch
(no cross-process sync) when several processes share the work (torchrun --nproc_per_node N -m fastmveb.eval finetune).
Crops are cut on the device from the decode-once loader's whole images (fastmveb.eval.linear.rrc_flip), as the
full linear protocol does.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastmveb.eval.features import PixelStats, _autocast, eval_mode, extract_features, normalize_uint8
from fastmveb.eval.linear import rrc_flip

BASE_LR = 0.05          # SimCLR B.5: lr = 0.05 * batch / 256
BATCH = 256             # the global fine-tuning batch (capped at the subset size)
# --optimizer adamw (ViTs; the fine-tuning recipe of BEiT / MAE, not the semi-supervised literature's): base lr 5e-4
# per 256 images, weight decay 0.05, layer-wise lr decay 0.75 (MAE fine-tunes ViT-B with 0.65 and ViT-L with 0.75).
ADAMW_BASE_LR, ADAMW_WEIGHT_DECAY, LAYER_DECAY = 5e-4, 0.05, 0.75
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


@dataclasses.dataclass(frozen=True)
class FinetuneOptions:
    """How to fine-tune: epochs, the crop side (a run's eval.size), base lr (scaled by batch / 256), SGD's momentum,
    weight decay, the RandomResizedCrop scale, the seed of the crops and the head, the validation period in epochs
    (0: after the last only), the optimizer ("sgd": the semi-supervised protocol; "adamw") and AdamW's layer-wise
    lr decay (1: off)."""
    epochs: int
    crop_size: int
    base_lr: float = BASE_LR
    momentum: float = 0.9
    weight_decay: float = 0.0
    crop_scale: tuple[float, float] = (0.08, 1.0)
    seed: int = 0
    val_every: int = 0
    optimizer: str = "sgd"
    layer_decay: float = 1.0


def finetune(backbone: nn.Module, train_loader, val_loader, device, stats: PixelStats, num_classes: int,
             opts: FinetuneOptions, amp_dtype=None, log=None, accelerator=None) -> dict:
    """Fine-tune ``backbone`` (in place) and a new Linear head on ``train_loader``'s labelled subset (uint8
    whole-image batches, (x, extent, y) or (x, y), an FFCV loader of fastmveb.data whose epoch is set before each
    epoch); validate on ``val_loader``'s centre crops after the last epoch (and every ``opts.val_every`` epochs).
    -> top1, top5 (final), n_val, history, head, batch, steps.

    Several processes (``accelerator`` from a torchrun / accelerate launch start): both loaders are made with
    distributed=True and the same seed, so every rank reads its share of one seeded order of the subset; the
    batch is the global batch (per-rank batch x processes, the lr follows it); DDP averages the gradients; with
    the loader's torch-generated order (``shuffle = "torch"``, fastmveb.data) step k consumes the same samples
    whatever the number of processes; val counts every sample once. BatchNorm normalises each rank's own batch
    (no sync), as DDP fine-tuning usually does.
    """
    from fastmveb.data import set_epoch
    device = torch.device(device)
    rank, world = _rank_world()
    b = train_loader.batch_size
    # A step takes b samples on each of the world ranks; the distributed sampler pads the order with up to
    # world - 1 repeats, which can complete one more batch on every rank: read it, do not train on it.
    steps_per_epoch = len(train_loader.indices) // (b * world)
    if steps_per_epoch == 0:
        raise ValueError("the fine-tuning batch exceeds the labelled subset; lower the batch")
    epochs = opts.epochs
    total, batch = epochs * steps_per_epoch, b * world
    lr = opts.base_lr * batch / 256
    g = torch.Generator().manual_seed(opts.seed + rank * 1_000_003)     # each rank its own crops; rank 0 = 1 process
    backbone.to(device)
    net, opt = _classifier(backbone, num_classes, opts, lr, device, amp_dtype)
    model = accelerator.prepare_model(net, device_placement=False) if accelerator is not None else net
    backward = accelerator.backward if accelerator is not None else (lambda loss: loss.backward())
    step, history = 0, []
    was_training = backbone.training
    try:
        for ep in range(epochs):
            set_epoch(train_loader, ep)
            model.train()
            tot, nb = torch.zeros((), dtype=torch.float64), 0
            for i, out in enumerate(train_loader):
                if i >= steps_per_epoch:
                    continue
                x, y, extent = out[0], out[-1], (out[1] if len(out) == 3 else None)
                y = y.reshape(-1).to(device, dtype=torch.long, copy=True)
                with torch.no_grad():
                    crops = normalize_uint8(rrc_flip(x.to(device), opts.crop_size, opts.crop_scale, generator=g,
                                                     extent=extent), stats)
                for pg in opt.param_groups:                             # lr_scale: layer-wise decay (AdamW)
                    pg["lr"] = pg.get("lr_scale", 1.0) * lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
                loss = F.cross_entropy(model(crops), y)
                opt.zero_grad(set_to_none=True)
                backward(loss)
                opt.step()
                tot, nb, step = tot + loss.detach().double().cpu(), nb + 1, step + 1
            row = {"epoch": ep + 1, "loss": float(_mean_over_ranks(tot, device)) / max(nb, 1)}
            if ep + 1 == epochs or (opts.val_every and (ep + 1) % opts.val_every == 0):
                _broadcast_buffers(backbone)        # BN running stats: rank 0's, as DDP's next forward would make them
                row["top1"], row["top5"], row["n_val"] = evaluate(backbone, net.head, val_loader, device, stats,
                                                                  amp_dtype)
            history.append(row)
            if log is not None:
                acc = f" val top-1 {row['top1']:.2f} top-5 {row['top5']:.2f}" if "top1" in row else ""
                log(f"finetune epoch {ep + 1}/{epochs} loss {row['loss']:.4f}{acc}")
    finally:
        backbone.train(was_training)
    head_sd = {k: v.detach().float().cpu().clone() for k, v in net.head.state_dict().items()}
    return {"top1": history[-1]["top1"], "top5": history[-1]["top5"], "n_val": history[-1]["n_val"],
            "history": history, "head": head_sd, "batch": batch, "steps": step, "epochs": epochs, "processes": world}


def _classifier(backbone: nn.Module, num_classes: int, opts: FinetuneOptions, lr: float, device, amp_dtype):
    """(backbone + a new Linear head as one module, its optimizer at ``lr``); the head's init is the same on every
    rank (seeded with ``opts.seed``)."""
    with torch.no_grad(), eval_mode(backbone):                          # the head's width
        width = backbone(torch.zeros(1, 3, opts.crop_size, opts.crop_size, device=device)).flatten(1).shape[1]
    head = nn.Linear(width, num_classes)
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=torch.Generator().manual_seed(opts.seed))
        head.bias.zero_()
    net = _Classifier(backbone, head.to(device), device, amp_dtype)
    if opts.optimizer == "adamw":
        opt = torch.optim.AdamW(adamw_groups(backbone, head, opts.weight_decay, opts.layer_decay), lr=lr)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=opts.momentum, nesterov=True,
                              weight_decay=opts.weight_decay)
    return net, opt


def adamw_groups(backbone: nn.Module, head: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW's parameter groups for fine-tuning a ViT the usual way (BEiT, MAE): layer-wise lr decay, each block's lr
    scaled by layer_decay ** (blocks between it and the last block; the embeddings one further), no weight decay on norms, biases, position
    embeddings and class tokens (timm's param_groups_layer_decay, which reads the model's own layer grouping);
    the new head gets the full lr. ``layer_decay`` 1 (or a backbone without timm's grouping): one scale for all."""
    if layer_decay != 1.0 and hasattr(backbone, "group_matcher"):
        from timm.optim import param_groups_layer_decay
        groups = param_groups_layer_decay(backbone, weight_decay=weight_decay, layer_decay=layer_decay,
                                          no_weight_decay_list=getattr(backbone, "no_weight_decay", set)())
    else:
        from fastmveb.optim import param_groups
        groups = [{"params": g["params"], "weight_decay": g["weight_decay"]}
                  for g in param_groups(backbone, weight_decay)]
    return groups + [{"params": [head.weight], "weight_decay": weight_decay, "lr_scale": 1.0},
                     {"params": [head.bias], "weight_decay": 0.0, "lr_scale": 1.0}]


class _Classifier(nn.Module):
    """backbone -> flatten -> head, the backbone under autocast: one module for DDP to wrap."""

    def __init__(self, backbone: nn.Module, head: nn.Module, device: torch.device, amp_dtype):
        super().__init__()
        self.backbone, self.head, self.device, self.amp_dtype = backbone, head, device, amp_dtype

    def forward(self, x):
        with _autocast(self.device, self.amp_dtype):
            h = self.backbone(x).flatten(1)
        return self.head(h.float())


@torch.no_grad()
def evaluate(backbone: nn.Module, head: nn.Module, val_loader, device, stats: PixelStats, amp_dtype=None):
    """(top-1, top-5, n) of backbone + head on ``val_loader``'s centre crops, over every val sample exactly once.

    A distributed loader gives rank r samples r, r + world, ... padded with repeats to equal shards: each rank
    scores its shard, and the per-sample hits are gathered with the sample indices, repeats counted once.
    """
    from fastmveb.data import epoch_indices
    feats, y = extract_features(backbone, val_loader, device, stats, None, amp_dtype, normalize=False)
    scores = torch.cat([head(feats[i:i + 8192].to(device)).float().cpu() for i in range(0, feats.shape[0], 8192)])
    kmax = min(5, scores.shape[1])
    hit = scores.topk(kmax, dim=1).indices.eq(y[:, None])
    hits = torch.stack([hit[:, 0], hit.any(dim=1)], dim=1)                # [n, 2]: top-1, top-5 hit
    rank, world = _rank_world()
    if world > 1:
        idx = torch.as_tensor(epoch_indices(val_loader, 0)[: y.shape[0]], dtype=torch.int64)
        idx, hits = _gather_equal(idx, device), _gather_equal(hits, device)
        _, first = np.unique(idx.numpy(), return_index=True)           # the first copy of each sample
        hits = hits[torch.from_numpy(first)]
    n = hits.shape[0]
    top1, top5 = (100.0 * hits.sum(dim=0).double() / max(n, 1)).tolist()
    return top1, top5, n


def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _comm_device(device) -> torch.device:
    """gloo moves CPU tensors, NCCL device ones."""
    import torch.distributed as dist
    return torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")


def _gather_equal(t: torch.Tensor, device) -> torch.Tensor:
    """Rows of ``t`` from every rank in rank order (the same row count on every rank: padded shards); CPU."""
    import torch.distributed as dist
    t = t.to(_comm_device(device))
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return torch.cat(out).cpu()


def _mean_over_ranks(t: torch.Tensor, device) -> torch.Tensor:
    import torch.distributed as dist
    if _rank_world()[1] == 1:
        return t
    t = t.to(_comm_device(device))
    dist.all_reduce(t)
    return t.cpu() / dist.get_world_size()


def _broadcast_buffers(module: nn.Module) -> None:
    import torch.distributed as dist
    if _rank_world()[1] == 1:
        return
    for buf in module.buffers():
        dist.broadcast(buf, 0)
