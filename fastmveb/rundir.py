"""The run directory's guards: one training at a time, and a resume only under the config that made it; and the
code revision a run records about itself.

    lock = lock_run_dir(run_dir)                  # before anything is written; held until the process exits
    check_resume(state["config"], to_dict(cfg), latest, allow=cfg.train.allow_config_change)
    git = git_revision()                          # meta.json and every checkpoint say which code made them

Lock: an OS lock (fcntl.flock) on run_dir/.lock, taken by the main process. The kernel drops it when the
process ends, however it ends (kill -9 included), so there is never a stale lock to delete by hand. The file
holds the pid of the holder, for the message the second run prints.

Resume: the checkpoint stores the resolved config it was trained with, and the identity of its data
(dataset_prep.integrity.beton_identity: sample count, size, the integrity record's SHA-256, a digest of the
beton's layout). A resume under a config that changes the trajectory (batch, model, views, loss, optimiser,
seed, training data, precision, compilation) would silently mix two runs: the lr jumps, the data position
means another sample, and the run no longer repeats any uninterrupted run. Such a resume stops with one line
naming the keys. Keys that only change what is logged, evaluated or saved (config fields marked harmless,
config.HARMLESS) may change; every other key counts as trajectory-changing. A key added to fastmveb after the
checkpoint was written is no change while it is at its default (a new option's default keeps the old
behaviour, so an upgrade never strands a run); a key removed or renamed since is a change. Other train data
(a beton replaced at the same path) stop the resume the same way (check_data); the same data moved to another
path are no change; other val data (read by the monitors only) are a note. A checkpoint written before data
identities were recorded resumes with a note saying so. ``train.allow_config_change=true`` resumes anyway: the
weights, optimiser state, step and position (a count of samples, so the same sample under any batch) come from
the checkpoint, the new values apply from there on, and the start-up output lists the changed keys and the
data change and their effect on the schedule.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
from pathlib import Path

from .config import HARMLESS, added_at_default, flatten   # HARMLESS: keys whose change cannot alter the weights
from fastmveb.errors import UserError

LOCK_FILE = ".lock"


class RunDirError(UserError):
    """The run directory cannot be used as asked; the message is one line with the way out."""


def lock_run_dir(run_dir: str | Path):
    """Create run_dir if needed and lock it; returns the open lock file (keep it referenced: closing it unlocks)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        f = open(run_dir / LOCK_FILE, "a+")
    except OSError as e:
        raise RunDirError(f"cannot create the run directory {run_dir}: {e.strerror or e}; set train.run_dir") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        pid = f.read().strip()
        f.close()
        who = f" (pid {pid})" if pid.isdigit() else ""
        raise RunDirError(f"run directory {run_dir} is in use by another training{who}; wait for it to finish, "
                          f"or give this run another train.name") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    return f


def git_revision() -> str:
    """The code revision a run or a result came from (`git describe --always --dirty`), or "unknown"."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def open_run_dir(run_dir: str | Path, cfg, main_proc: bool, device, world: int = 1, data: dict | None = None):
    """Lock (main process), clear temp files of killed saves, and pick the checkpoint to resume.

    -> (lock file or None, newest readable checkpoint path or None, its state or None). Raises RunDirError
    when the directory is in use, the checkpoint's config differs in a trajectory key or its train data is
    another (``data``: this run's data_identities, compared by check_data); with ``world`` > 1 on every rank
    alike (a collective), so no rank is left waiting for one that stopped.
    """
    result, problem = None, None
    try:
        result = _open_run_dir(run_dir, cfg, main_proc, device, data)
    except RunDirError as e:
        problem = str(e)
    if world > 1:
        from accelerate.utils import gather_object
        problem = next((p for p in gather_object([problem]) if p), None)
    if problem:
        raise RunDirError(problem)
    return result


def _open_run_dir(run_dir, cfg, main_proc, device, data):
    from fastmveb import checkpoint as ckpt
    from fastmveb.config import to_dict
    lock = None
    if main_proc:
        lock = lock_run_dir(run_dir)
        ckpt.remove_temp_files(run_dir)
    latest, state = None, None
    if cfg.train.resume:
        where = device if device.type != "cpu" else "cpu"   # not "cpu:0": the RNG states must stay on plain cpu
        latest, state = ckpt.load_latest(run_dir, map_location=where, warn=None if main_proc else (lambda m: None))
    if state is not None:
        recorded = state.get("data")
        moved = (data is not None and isinstance(recorded, dict)      # the same train data at another path
                 and data_changes(recorded, data)[0] is None)
        check_resume(state.get("config"), to_dict(cfg), latest, cfg.train.allow_config_change,
                     same_keys=("data.train_beton",) if moved else ())
        if data is not None:
            check_data(state.get("data"), data, latest, cfg.train.allow_config_change)
    return lock, latest, state


def config_changes(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(trajectory-changing keys, harmless keys) whose values differ between two to_dict() configs. A key the old
    config lacks (added since it was written) at its default now is no change (config.added_at_default); one
    the new config lacks (removed or renamed since) is a change."""
    a, b = flatten(old), flatten(new)
    changed = sorted(k for k in a.keys() | b.keys()
                     if a.get(k, _ABSENT) != b.get(k, _ABSENT) and not added_at_default(k, b.get(k, _ABSENT), a))
    harmless = [k for k in changed if k in HARMLESS]
    return [k for k in changed if k not in HARMLESS], harmless


class _Absent:
    """A key one of two configs does not have (its version had no such key)."""
    def __repr__(self):
        return "<absent>"


_ABSENT = _Absent()


def describe_changes(old: dict, new: dict, keys: list[str]) -> list[str]:
    """"key old -> new" of each key, <absent> where a config has no such key."""
    a, b = flatten(old), flatten(new)
    return [f"{k} {a.get(k, _ABSENT)!r} -> {b.get(k, _ABSENT)!r}" for k in keys]


def check_resume(old: dict | None, new: dict, checkpoint: str | Path, allow: bool = False,
                 same_keys: tuple[str, ...] = ()) -> list[str]:
    """Raise RunDirError when a trajectory key changed (unless ``allow``); returns the changed keys. ``same_keys``:
    keys whose new value is known to mean the same (data.train_beton of a moved beton with the same identity)."""
    if not isinstance(old, dict):
        return []
    trajectory, harmless = config_changes(old, new)
    trajectory = [k for k in trajectory if k not in same_keys]
    if trajectory and not allow:
        shown = ", ".join(describe_changes(old, new, trajectory[:4]))
        more = f" (+{len(trajectory) - 4} more)" if len(trajectory) > 4 else ""
        raise RunDirError(f"resuming {checkpoint} with a changed config: {shown}{more}; these change the training "
                          f"trajectory. Give the new config another train.name (a fresh run), or pass "
                          f"train.allow_config_change=true to continue these weights under the new values")
    return trajectory + harmless


def data_changes(old: dict | None, new: dict) -> tuple[str | None, list[str]]:
    """(the train data's change "old -> new", or None; note lines) between the data identities a checkpoint
    recorded (``old``; None: written before they were recorded) and this run's (``new``: {"train": identity,
    "val": identity or None}, dataset_prep.integrity.beton_identity).

    Train data decide the trajectory (the position in the epoch counts its samples, the schedule its length):
    a change is returned for check_data to stop on. Val data only feed the kNN monitors, which move no weight
    (data.val_beton is a harmless key): a change is a note, since the monitors' figures before and after the
    resume then come from different val sets."""
    from dataset_prep.integrity import describe_identity, same_beton
    if not isinstance(old, dict) or not isinstance(old.get("train"), dict):
        return None, [f"the checkpoint records no identity of its data (written before fastmveb recorded it): "
                      f"{new['train']['path']} is taken to be the data it trained on; checkpoints from here on "
                      f"record it"]
    train = None
    if not same_beton(old["train"], new["train"]):
        train = f"{describe_identity(old['train'])} -> {describe_identity(new['train'])}"
    notes = []
    if isinstance(old.get("val"), dict) and new.get("val") and not same_beton(old["val"], new["val"]):
        notes.append(f"val data changed: {describe_identity(old['val'])} -> {describe_identity(new['val'])}; the kNN "
                     f"figures in metrics.jsonl before and after this resume are over different val sets")
    return train, notes


def check_data(old: dict | None, new: dict, checkpoint: str | Path, allow: bool = False) -> None:
    """Raise RunDirError when the train data differ from those the checkpoint trained on (unless ``allow``)."""
    train, _ = data_changes(old, new)
    if train and not allow:
        raise RunDirError(f"resuming {checkpoint} on other train data: {train}; the checkpoint's position in the "
                          f"epoch and its schedule count the old data. Put the old beton back, give this run another "
                          f"train.name (a fresh run), or pass train.allow_config_change=true to continue these "
                          f"weights on the new data")
