"""The one way fastmveb writes a file that something else reads: to a temporary name beside it, then a rename.

A reader (a resuming run, ``latest_checkpoint``, the README generator, a second process polling a summary) sees
either the previous file or the complete new one, never a prefix: a kill, a full disk or an exception half-way leaves
the old file under its name and no temporary behind. The temporary sits in the same directory, so the rename is a
same-file-system ``os.replace``; it is dot-prefixed and carries the writer's pid, so globs for results or
checkpoints never match it and two processes never share one.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temporary_name(path: str | Path, suffix: str = "") -> Path:
    """``DIR/.NAME.PID.tmpSUFFIX`` beside ``path``; ``suffix`` keeps an extension a writer reads its format from
    (matplotlib's ``savefig`` picks PNG from ``.png``)."""
    path = Path(path)
    return path.parent / f".{path.name}.{os.getpid()}.tmp{suffix}"


@contextmanager
def atomic_path(path: str | Path, *, sync: bool = False, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on a clean exit it is renamed over ``path``, on any exception removed.

    ``sync`` flushes the temporary's bytes to the disk before the rename (checkpoints: after a power loss the name
    points at a whole file, not at an empty one the rename reached before its data did).
    """
    path = Path(path)
    tmp = temporary_name(path, suffix)
    try:
        yield tmp
        if sync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str, *, sync: bool = False) -> None:
    """``path``'s text replaced whole, or left as it was."""
    with atomic_path(path, sync=sync) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj, *, indent: int | None = 2, sort_keys: bool = False, default=None) -> None:
    """``obj`` as JSON (ending in a newline) replacing ``path`` whole, or left as it was."""
    write_text(path, json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n")
