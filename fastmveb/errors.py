"""One kind of user-facing error and one way every command reports it.

A problem with what the user gave (a config key, a flag, a file, a run directory, a checkpoint) is raised as a
``UserError`` (or a subclass: ConfigError, RunDirError, CheckpointError, BetonError, PrepError, ...) with a message
that names the problem and the fix. Every entry point runs its ``main`` through ``run_cli``, which turns such an
error into one line ``error: ...`` on stderr (printed once, by rank 0, in a multi-process run) and the error's
exit status (2: bad input; 1: the program could not finish, e.g. a full disk). Ctrl-C is one line too
(``error: interrupted ...``, exit status 130). Anything else is a bug and keeps its traceback.

A command run as its own process (a console script, ``python -m``, ``accelerate launch``: ``cli()`` without an
argv) also ends here, the same way whichever of those started it: see end_command.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable


# Exit status of a command stopped by Ctrl-C (SIGINT): 128 + 2, what a shell reports for a process SIGINT ended.
INTERRUPTED_EXIT = 130


class UserError(Exception):
    """Bad input or an environment problem the user can fix; the message says what and how (one line)."""
    exit_code = 2


def print_error(message: str, all_ranks: bool = False) -> None:
    """``error: message`` on stderr, once per run (rank 0) unless every rank has something of its own to say."""
    if all_ranks or os.environ.get("RANK", "0") == "0":
        print(f"error: {message}", file=sys.stderr, flush=True)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None, *,
            end: Callable[[int], int] | None = None) -> int:
    """main(argv) with a UserError as one line and its exit status instead of a traceback; Ctrl-C likewise.

    ``end(status)`` comes next (compat.end_process for a command that may have run collectives). ``argv`` None means
    main reads this process's own command line, i.e. the command is the process: end_command ends it. A caller
    that passes an argv list (a test, another command) gets the status back.
    """
    try:
        status = main(argv)
    except UserError as e:
        print_error(str(e))
        status = e.exit_code
    except KeyboardInterrupt as e:
        # Python's own KeyboardInterrupt says nothing; a command with more to say raises Interrupted(message).
        print_error(str(e) or "interrupted (Ctrl-C)")
        status = INTERRUPTED_EXIT
    if end is not None:
        status = end(status)
    return end_command(status) if argv is None else status


# ---- numba's finalizer noise ---------------------------------------------------------------------------------
# numba's dispatcher finalizer raises a harmless KeyError whenever FFCV's compiled pipelines are garbage collected
# (docs/notes.md): mid-run it reaches sys.unraisablehook, at interpreter exit it prints tracebacks after the
# command's last line. Only that exact case is dropped; every other unraisable exception still prints.
def _is_numba_finalizer_noise(unraisable) -> bool:
    return unraisable.exc_type is KeyError and "numba" in "".join(traceback.format_tb(unraisable.exc_traceback))


def quiet_numba_finalizers() -> None:
    """Drop numba's finalizer KeyError from sys.unraisablehook (the module that loads FFCV calls this once)."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_numba_noise", False):
        return

    def hook(unraisable):
        if not _is_numba_finalizer_noise(unraisable):
            previous(unraisable)
    hook.drops_numba_noise = True
    sys.unraisablehook = hook


def end_command(status: int) -> int:
    """The end of a command that is its process: with numba loaded, every file closed and ``status`` known, the
    process ends at once (compat.exit_now: flush, os._exit) rather than have the interpreter's teardown bury the
    result line under numba's finalizer tracebacks; else ``status`` back for sys.exit."""
    if "numba" in sys.modules and isinstance(status, int):
        from fastmveb.compat import exit_now
        exit_now(status)
    return status


class Interrupted(KeyboardInterrupt):
    """Ctrl-C with a message of its own (what was or was not saved): run_cli prints it as the one line."""


class RunError(UserError):
    """Bad input to a command that reads a run (no run directory, no metrics, no usable checkpoint)."""
