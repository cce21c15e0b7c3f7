"""Backbone features for evaluation, and the evaluation loaders (a run's trained backbone comes from
fastmveb.checkpoint.load_run_backbone).

    train, val = eval_loaders(cfg, device)                                  # centre crops of cfg.eval, file order
    feats, labels = extract_features(backbone, val, device, PixelStats.of(cfg))   # L2-normalised, CPU

The loaders yield uint8 NCHW batches (already on the device); normalisation happens here, the same way the
views code does it for training (0-1 scale, then per-channel mean/std), so eval sees what training saw.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastmveb.collectives import all_gather_rows
from fastmveb.errors import RunError

# run_dir/HEAD_FILE: the linear probe head `python -m fastmveb.eval linear` keeps (its top-1 and settings beside the
# weights); `python -m fastmveb.export` uses it as the torchvision fc
HEAD_FILE = "linear_head.pt"


@dataclasses.dataclass(frozen=True)
class PixelStats:
    """The per-channel mean and std (of 0-1 pixels) the backbone's input is standardised with: the run's
    views.mean / views.std, one value wherever an evaluation normalises images."""
    mean: Sequence[float]
    std: Sequence[float]

    @classmethod
    def of(cls, cfg) -> PixelStats:
        return cls(tuple(cfg.views.mean), tuple(cfg.views.std))


def normalize_uint8(x: torch.Tensor, stats: PixelStats) -> torch.Tensor:
    """NCHW in 0-255 (uint8, or float crops) -> float32, (x/255 - mean) / std; never modifies x."""
    m = torch.as_tensor(stats.mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(stats.std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def eval_loaders(cfg, device, workers: int | None = None, distributed: bool = False,
                 betons: Sequence[str] = ("train", "val")) -> tuple:
    """The centre-crop loaders (eval.size, eval.crop_ratio; data.eval_batch_size) over the run's train beton
    (the kNN bank, the probe's training set) and val beton, or over those ``betons`` names; ``workers``: FFCV
    threads (default data.num_workers; capped at the cores either way). A bad beton or batch is one RunError."""
    from fastmveb.data import eval_loader
    paths = {"train": cfg.data.train_beton, "val": cfg.data.val_beton}
    workers = cfg.data.num_workers if workers is None else workers
    try:
        return tuple(eval_loader(paths[b], cfg.data.eval_batch_size, workers, device, size=cfg.eval.size,
                                 crop_ratio=cfg.eval.crop_ratio, distributed=distributed) for b in betons)
    except ValueError as e:
        raise RunError(str(e).splitlines()[0]) from None


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Eval mode for the duration, then the previous mode: train.py calls kNN between training steps."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _autocast(device: torch.device, amp_dtype):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@torch.no_grad()
def extract_features(backbone: nn.Module, loader, device, stats: PixelStats, max_samples: int | None = None,
                     amp_dtype: torch.dtype | None = None, normalize: bool = True,
                     gather: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``backbone`` (eval mode, no grad) over ``loader`` -> (feats float32 [N, D] on CPU, labels int64 [N]).

    feats are L2-normalised unless ``normalize=False`` (the linear probe standardises raw features itself).
    ``max_samples`` stops early (a fixed prefix of the loader's order: deterministic for sequential loaders).
    ``gather=True`` concatenates the features of all ranks (each rank iterating its own shard of a
    distributed loader; FFCV pads shards to equal length, so a few samples may appear twice).
    """
    device = torch.device(device)
    feats, labels, n = [], [], 0
    with eval_mode(backbone):
        for x, y in loader:
            if max_samples is not None and n >= max_samples:
                break
            x = x.to(device, non_blocking=True)
            if max_samples is not None and n + x.shape[0] > max_samples:
                x, y = x[: max_samples - n], y[: max_samples - n]
            with _autocast(device, amp_dtype):
                h = backbone(normalize_uint8(x, stats))
            h = h.float().flatten(1)
            if normalize:
                h = F.normalize(h, dim=1)
            feats.append(h.cpu())
            # FFCV reuses its output buffers: copy the labels before the next batch overwrites them.
            labels.append(y.reshape(-1).to("cpu", dtype=torch.int64, copy=True))
            n += x.shape[0]
    if not feats:
        raise RunError("the loader yielded no batches (empty dataset, or batch size larger than the dataset with drop_last)")
    feats, labels = torch.cat(feats), torch.cat(labels)
    if gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # NCCL only moves device tensors; gloo takes CPU ones.
        comm = device if dist.get_backend() == "nccl" else torch.device("cpu")
        feats, labels = all_gather_rows(feats.to(comm)).cpu(), all_gather_rows(labels.to(comm)).cpu()
    return feats, labels
