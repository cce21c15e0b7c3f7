"""Backbone features for evaluation, and loading a trained backbone back out of a run directory.

    feats, labels = extract_features(backbone, loader, device, mean, std)     # L2-normalised, CPU
    backbone, info = load_run_backbone("runs/tiny")                           # latest checkpoint

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


# ---------------------------------------------------------------------------------------------------------
# Loading a backbone from a run directory (shared by `python -m fastmveb.eval` and `python -m fastmveb.export`).

def open_checkpoint(run: str | Path | None, ckpt: str | Path | None) -> tuple[Path | None, Path, dict]:
    """(run_dir or None, checkpoint path, its contents): ``ckpt`` when given, else the run's newest checkpoint
    that reads. A newer one that does not (cut by a full disk, damaged on storage) is skipped with one warning
    line naming it, as training's resume skips it (checkpoint.load_latest); ``--ckpt`` names one explicitly."""
    run_dir = Path(run) if run is not None else None
    if run_dir is not None and not run_dir.is_dir():
        raise RunError(f"run directory '{run_dir}' not found")
    if ckpt is not None:
        path = Path(ckpt)
        if not path.is_file():
            raise RunError(f"checkpoint '{path}' not found")
        return run_dir, path, read_checkpoint(path)
    if run_dir is None:
        raise RunError("give --run DIR (newest checkpoint) or --ckpt PATH")
    from fastmveb.checkpoint import latest_checkpoint, load_latest
    path, ck = load_latest(run_dir)
    if path is None:
        where = run_dir / "checkpoints"
        if latest_checkpoint(run_dir) is None:
            raise RunError(f"no checkpoint in '{where}' (has the run saved one yet?)")
        raise RunError(f"no readable checkpoint in '{where}' (each one is named above); pass --ckpt PATH to "
                       "another checkpoint of this run")
    return run_dir, path, ck


def read_checkpoint(path: Path) -> dict:
    from fastmveb.checkpoint import load_checkpoint
    try:
        ck = load_checkpoint(path)
    except Exception as e:  # a truncated / foreign file: say which file, not a pickle traceback
        raise RunError(f"cannot read checkpoint '{path}': {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    if not isinstance(ck, dict) or "model" not in ck:
        raise RunError(f"'{path}' is not a fastmveb checkpoint (no 'model' entry)")
    return ck


def config_source(run_dir: Path | None) -> str:
    """Where run_config read the config from, for messages."""
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        return str(run_dir / "config.yaml")
    return "the config inside the checkpoint"


def run_config(run_dir: Path | None, ck: dict):
    """The resolved Config: the run's config.yaml when there is one, else the copy inside the checkpoint."""
    from fastmveb.config import ConfigError, from_dict, load_config
    try:
        if run_dir is not None and (run_dir / "config.yaml").is_file():
            return load_config(run_dir / "config.yaml")
        if isinstance(ck.get("config"), dict):
            return from_dict(ck["config"], "checkpoint config")
    except ConfigError as e:
        raise RunError(str(e)) from None
    raise RunError("no config.yaml in the run directory and no config inside the checkpoint")


def backbone_state(ck: dict, which: str = "online") -> dict[str, torch.Tensor]:
    """The backbone's state_dict (keys without the 'backbone.' prefix) of the online model or the EMA target."""
    from fastmveb.checkpoint import backbone_state_dict
    if which not in ("online", "target"):
        raise RunError(f"--which must be online or target, got {which!r}")
    entry = ck.get("model" if which == "online" else "target")
    if not isinstance(entry, dict):
        raise RunError(f"the checkpoint has no '{'model' if which == 'online' else 'target'}' state")
    sd = backbone_state_dict(entry)
    if not sd:
        raise RunError("the checkpoint's model state has no 'backbone.*' entries")
    return sd


def arch_mismatch(sd: dict[str, torch.Tensor], arch: str, path: Path, config_from: str) -> str | None:
    """The one-line error for a backbone state that is not ``arch``'s, naming the arch it is (None when it is
    ``arch``'s after all). torch's load_state_dict error lists keys and shapes and names no architecture."""
    from fastmveb.model import identify_backbone
    found = identify_backbone(sd)
    if found == arch:
        return None
    what = f"a {found} backbone" if found else "a backbone of no known arch"
    if config_from.endswith("config.yaml"):
        fix = (f"pass the --run directory that trained it, or set model.arch: {found} in {config_from}" if found
               else "evaluate it with the run directory that trained it")
    else:
        fix = "its weights and its config disagree: the file is damaged or was not written by fastmveb"
    return f"checkpoint {path} holds {what} ({len(sd)} tensors) but the run's config ({config_from}) says {arch}; {fix}"


def load_run_backbone(run: str | Path | None = None, ckpt: str | Path | None = None, which: str = "online"):
    """-> (backbone nn.Module with trained weights, info dict: cfg, run_dir, ckpt_path, ckpt (the raw dict)).

    The backbone is built with fastmveb.model.build_backbone from the run's config and loaded strictly.
    """
    run_dir, path, ck = open_checkpoint(run, ckpt)
    cfg = run_config(run_dir, ck)
    from fastmveb.model import build_backbone
    backbone, feat_dim = build_backbone(cfg.model)
    sd = backbone_state(ck, which)
    try:
        backbone.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise RunError(arch_mismatch(sd, cfg.model.arch, path, config_source(run_dir))
                       or f"checkpoint backbone does not match {cfg.model.arch}: {str(e).splitlines()[0]}") from None
    return backbone, {"cfg": cfg, "run_dir": run_dir, "ckpt_path": path, "ckpt": ck, "feat_dim": feat_dim}
