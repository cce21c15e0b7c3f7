"""Checkpoints: atomic saves that never replace a good file with a broken model, exact-resume RNG state,
the helpers the trainer needs to find and prune them, and the reading of a run's trained backbone back out
(evaluation, export, the report).

    state = {"model": unwrap(model).state_dict(), "target": target.state_dict(),
             "optimizer": opt.state_dict(), "step": step, "epoch": epoch, "samples_in_epoch": s,
             "shuffle": "torch", "rng": [capture_rng_state()], "config": to_dict(cfg), "git": rev,
             "data": {"train": beton_identity(train_beton), "val": ...}}   # integrity.beton_identity
    if save_checkpoint(checkpoint_path(run_dir, step), state):
        prune_checkpoints(run_dir, cfg.train.keep_last)
    ...
    path = latest_checkpoint(run_dir)
    state = load_checkpoint(path)             # torch.load(weights_only=True): no pickled code runs
    restore_rng_state(state["rng"][rank])
    samples, shuffle = data_position(state)   # where in the epoch, in samples of the global order
    ...
    backbone, info = load_run_backbone("runs/tiny")   # the newest readable checkpoint's backbone, loaded strictly

The position in the epoch is a count of samples of the epoch's global order (fastmveb.data.ResumableLoader):
it means the same sample under any world size or batch, where a batch index would not. ``batch_in_epoch``
(samples // global batch) is still written for readers that know only it.

Everything stored must be weights_only-safe (tensors, numbers, str, None, lists, tuples, dicts), which is
why the Python and numpy RNG states are converted to tensors and plain lists here.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from fastmveb.errors import RunError, UserError
from fastmveb.fileio import atomic_path

log = logging.getLogger(__name__)

_CKPT_RE = re.compile(r"^step_(\d+)\.pt$")
_TMP_RE = re.compile(r"^\.step_\d+\.pt\.\d+\.tmp$")


class CheckpointError(UserError):
    """A checkpoint cannot be written or does not fit this run; the message is one line with the way out."""


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint could not be written (full disk, I/O error); the previous ones are intact."""
    exit_code = 1                                                     # the input was fine: the run could not finish


def checkpoint_path(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}.pt"


def _checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first. Temp files never match the name pattern."""
    d = Path(run_dir) / "checkpoints"
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _CKPT_RE.match(p.name)
        if m and p.is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    found = _checkpoints(run_dir)
    return found[-1][1] if found else None


def remove_temp_files(run_dir: str | Path) -> list[Path]:
    """Delete the temp files of saves a kill interrupted (``.step_N.pt.PID.tmp``: tens of MB to GBs each).

    Call it only while holding the run directory's lock (fastmveb.rundir): then no save is in flight.
    """
    d = Path(run_dir) / "checkpoints"
    gone = [p for p in d.iterdir() if _TMP_RE.match(p.name)] if d.is_dir() else []
    for p in gone:
        p.unlink(missing_ok=True)
    return gone


def load_latest(run_dir: str | Path, map_location="cpu", warn=None) -> tuple[Path | None, dict | None]:
    """(path, state) of the newest checkpoint that loads, or (None, None). An unreadable newer one (cut by a
    full disk, damaged on storage) is skipped with a warning naming it; it is left in place for inspection."""
    warn = warn or (lambda msg: print(f"warning: {msg}", file=sys.stderr))
    for _, path in reversed(_checkpoints(run_dir)):
        try:
            state = load_checkpoint(path, map_location=map_location)
            if not isinstance(state, dict) or "model" not in state or "step" not in state:
                raise ValueError("not a training checkpoint")
            return path, state
        except Exception as e:  # noqa: BLE001 -- any failure to read means "try the previous one"
            reason = str(e).splitlines()[0] if str(e) else ""
            warn(f"checkpoint {path} is unreadable ({type(e).__name__}{': ' + reason[:120] if reason else ''}); "
                 f"trying the previous one")
    return None, None


def load_module_state(module: nn.Module, state_dict: dict, what: str, path: str | Path) -> None:
    """module.load_state_dict(strict=True) with a one-line CheckpointError instead of the key/shape listing."""
    try:
        module.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).split())[:200]
        raise CheckpointError(f"{path} holds a different {what} than this config builds ({first}...); resume it "
                              f"with the config it was trained with, or give this config another train.name") from None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` checkpoints (``keep_last <= 0`` keeps all); returns the deleted."""
    if keep_last <= 0:
        return []
    old = [p for _, p in _checkpoints(run_dir)[:-keep_last]]
    for p in old:
        p.unlink(missing_ok=True)
    return old


def _nonfinite_keys(state: dict) -> list[str]:
    tensors = []
    for part in ("model", "target"):
        sd = state.get(part)
        if sd is None:
            continue
        for k, v in sd.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                tensors.append((f"{part}.{k}", v))
    if not tensors:
        return []
    # One device->host read for the whole model instead of one per tensor.
    ok = torch.stack([torch.isfinite(v).all() for _, v in tensors]).cpu()
    return [k for (k, _), good in zip(tensors, ok.tolist()) if not good]


def save_checkpoint(path: str | Path, state: dict) -> bool:
    """Write ``state`` to ``path`` atomically; returns False (and logs a warning) when it refuses.

    It refuses when a floating tensor in ``state["model"]`` or ``state["target"]`` is NaN/inf: the previous
    checkpoint is then the newest good one and stays in place. Refusal returns rather than raises so a
    trainer that has already decided how to handle bad steps keeps running. The bytes go to a temp file in
    the same directory (so os.replace is a same-filesystem rename), are fsynced, then renamed over ``path``;
    a crash at any point leaves either the old file or the new one, never a truncated one under the name.
    """
    path = Path(path)
    bad = _nonfinite_keys(state)
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        log.warning("not saving %s: non-finite values in %s%s", path, ", ".join(bad[:3]), more)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary (fileio: dot-prefixed, .tmp-suffixed) never matches latest_checkpoint's name pattern; a plain
    # open (not mkstemp) gives the file the umask's permissions, not 0600.
    try:
        with atomic_path(path, sync=True) as tmp, open(tmp, "wb") as f:
            torch.save(state, f)
    except (OSError, RuntimeError) as e:
        # torch.save reports a full disk as a RuntimeError from its zip writer ("unexpected pos ..."): the space
        # left once the partial file is gone (atomic_path removed it) tells whether that is what happened.
        free, need = shutil.disk_usage(path.parent).free, _state_bytes(state)
        if isinstance(e, RuntimeError) and free >= need:
            raise
        why = "no space left on device" if free < need else (e.strerror or str(e).splitlines()[0])
        raise CheckpointWriteError(f"cannot write checkpoint {path}: {why} (it needs about {need / 2**20:,.1f} MiB, "
                              f"{free / 2**20:,.1f} MiB free in {path.parent}); the previous checkpoints are "
                              f"intact: free space, then rerun to resume") from None
    # Persist the rename itself; without this a power cut can forget the directory entry.
    try:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass
    return True


def _state_bytes(obj) -> int:
    """Bytes of the tensors in a (nested) state: what torch.save needs, give or take the pickle framing."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    return 0


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    return torch.load(path, map_location=map_location, weights_only=True)


def data_position(state: dict) -> tuple[int, str]:
    """(samples of the epoch's global order already consumed, the generator of that order) of a checkpoint.

    Checkpoints written before the position was kept in samples store only ``batch_in_epoch``, a batch index
    under their own global batch: that index x their config's data.global_batch_size is the same position.
    Their order's generator follows from their process count (one RNG state per rank): ffcv draws the order
    with numpy for one process and with torch's DistributedSampler for several."""
    if "samples_in_epoch" in state:
        samples = int(state["samples_in_epoch"])
    else:
        batch = ((state.get("config") or {}).get("data") or {}).get("global_batch_size")
        if batch is None:
            raise CheckpointError("the checkpoint has neither samples_in_epoch nor the global batch of its "
                                  "batch_in_epoch; it cannot be resumed at the right sample")
        samples = int(state.get("batch_in_epoch", 0)) * int(batch)
    shuffle = state.get("shuffle") or ("numpy" if len(state.get("rng") or [None]) == 1 else "torch")
    return samples, shuffle


def capture_rng_state() -> dict:
    """Python, numpy (global) and torch CPU/CUDA generator states, in weights_only-safe types."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": [py_version, torch.tensor(py_state, dtype=torch.int64), py_gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of ``capture_rng_state``; accepts a state loaded with any map_location. CUDA states are
    restored for as many devices as both sides have."""
    py_version, py_state, py_gauss = state["python"]
    random.setstate((int(py_version), tuple(int(x) for x in py_state.tolist()), py_gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.cpu().numpy().astype(np.uint32), int(np_pos), int(np_has_gauss),
                         float(np_gauss)))
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        if n != len(cuda) or n != torch.cuda.device_count():
            log.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d; restoring %d",
                        len(cuda), torch.cuda.device_count(), n)
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i].cpu().to(torch.uint8), i)


def backbone_state_dict(model_state: dict, prefix: str = "backbone.") -> dict:
    """The backbone part of an MVEBModel state_dict, keyed as torchvision's ResNet (load with strict=False
    or after dropping ``fc``: the backbone has no fc). Evaluation and export read it through this one helper."""
    sd = {}
    for k, v in model_state.items():
        # Wrappers (torch.compile, DDP) prefix names; the contract is unwrapped modules, but tolerate them.
        for pre in ("_orig_mod.", "module."):
            while k.startswith(pre):
                k = k[len(pre):]
        if k.startswith(prefix):
            sd[k[len(prefix):]] = v
    return sd


# ----------------------------------------------------------------------------- reading a run's backbone back
# (`python -m fastmveb.eval`, `python -m fastmveb.export`, the report): bad input is one RunError line.

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
    path, ck = load_latest(run_dir)
    if path is None:
        where = run_dir / "checkpoints"
        if latest_checkpoint(run_dir) is None:
            raise RunError(f"no checkpoint in '{where}' (has the run saved one yet?)")
        raise RunError(f"no readable checkpoint in '{where}' (each one is named above); pass --ckpt PATH to "
                       "another checkpoint of this run")
    return run_dir, path, ck


def read_checkpoint(path: Path) -> dict:
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


# ----------------------------------------------------------------------------- the trainer's save and resume
@dataclasses.dataclass
class Position:
    """Where a run stands: optimizer steps done, and the next sample of the epoch's global order to read."""
    step: int = 0
    epoch: int = 0
    samples_in_epoch: int = 0


@dataclasses.dataclass(frozen=True)
class SaveOptions:
    """Where a run's checkpoints go and what each records beside the training state (save_training)."""
    run_dir: str | Path
    shuffle: str                       # the generator of the data order (data.ResumableLoader)
    global_batch: int
    config: dict                       # the resolved config tree (config.to_dict)
    git: str
    keep_last: int                     # checkpoints kept (train.keep_last)
    data: dict | None = None           # the betons' identities (train.check_data)


def save_training(opts: SaveOptions, pos: Position, t, accelerator, epoch_done: bool = False) -> None:
    """Every rank: its RNG states to the main process, which writes the checkpoint of ``pos`` (``t``: the
    build.Training) atomically into ``opts.run_dir`` and prunes old ones; then all ranks wait for the write, so none
    runs ahead of a checkpoint a restart would need. ``epoch_done``: the epoch's last batch is read, the position is
    the next epoch's start. ``opts.data``: the identities of the betons the run reads (train.check_data), which a
    resume compares (fastmveb.rundir.check_data). A non-finite model is not saved (save_checkpoint); a failed write
    raises CheckpointWriteError."""
    from accelerate.utils import gather_object
    epoch, samples = (pos.epoch + 1, 0) if epoch_done else (pos.epoch, pos.samples_in_epoch)
    rngs = gather_object([capture_rng_state()])                       # one entry per rank
    if accelerator.is_main_process:
        # batch_in_epoch: for readers that know only the batch index (same global batch only)
        state = {"model": t.model.state_dict(), "target": t.target.state_dict(), "optimizer": t.optimizer.state_dict(),
                 "step": pos.step, "epoch": epoch, "samples_in_epoch": samples,
                 "batch_in_epoch": samples // opts.global_batch, "shuffle": opts.shuffle, "rng": rngs,
                 "config": opts.config, "data": opts.data, "git": opts.git}
        if t.probe is not None:
            state["probe"] = t.probe.state_dict()
        if save_checkpoint(checkpoint_path(opts.run_dir, pos.step), state):
            prune_checkpoints(opts.run_dir, opts.keep_last)
    accelerator.wait_for_everyone()


def restore_training(state: dict, path: str | Path, t) -> tuple[Position, str]:
    """Load a checkpoint's weights, EMA target, probe and optimizer into ``t`` (build.Training): -> (its position,
    the generator of its data order). A checkpoint of another architecture is one CheckpointError line."""
    load_module_state(t.model, state["model"], "model", path)
    load_module_state(t.target, state["target"], "model", path)
    if t.probe is not None and "probe" in state:
        load_module_state(t.probe, state["probe"], "online probe", path)
    try:
        t.optimizer.load_state_dict(state["optimizer"])
    except ValueError as e:                                            # another parameter layout
        raise CheckpointError(f"{path}: its optimizer state does not fit this model ({e}); resume it with the "
                              "config it was trained with, or give this config another train.name") from None
    samples, shuffle = data_position(state)
    return Position(state["step"], state["epoch"], samples), shuffle
