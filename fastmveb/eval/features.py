"""Backbone features for evaluation (a run's trained backbone comes from fastmveb.checkpoint.load_run_backbone).

    feats, labels = extract_features(backbone, loader, device, mean, std)     # L2-normalised, CPU

The loaders yield uint8 NCHW batches (already on the device); normalisation happens here, the same way the
views code does it for training (0-1 scale, then per-channel mean/std), so eval sees what training saw.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fastmveb.collectives import all_gather_rows
from fastmveb.errors import RunError

# run_dir/HEAD_FILE: the linear probe head `python -m fastmveb.eval linear` keeps (its top-1 and settings beside the
# weights); `python -m fastmveb.export` uses it as the torchvision fc
HEAD_FILE = "linear_head.pt"


def normalize_uint8(x: torch.Tensor, mean, std) -> torch.Tensor:
    """NCHW in 0-255 (uint8, or float crops) -> float32, (x/255 - mean) / std; never modifies x."""
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


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
def extract_features(backbone: nn.Module, loader, device, mean, std, max_samples: int | None = None,
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
                h = backbone(normalize_uint8(x, mean, std))
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
