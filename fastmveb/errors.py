"""One kind of user-facing error and one way every command reports it.

A problem with what the user gave (a config key, a flag, a file, a run directory, a checkpoint) is raised as a
``UserError`` (or a subclass: ConfigError, RunDirError, CheckpointError, BetonError, PrepError, ...) with a message
that names the problem and the fix. Every entry point runs its ``main`` through ``run_cli``, which turns such an
error into one line ``error: ...`` on stderr (printed once, by rank 0, in a multi-process run) and the error's
exit status (2: bad input; 1: the program could not finish, e.g. a full disk). Ctrl-C is one line too
(``error: interrupted ...``, exit status 130). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import os
import sys
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


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """main(argv) with a UserError as one line and its exit status instead of a traceback; Ctrl-C likewise."""
    try:
        return main(argv)
    except UserError as e:
        print_error(str(e))
        return e.exit_code
    except KeyboardInterrupt as e:
        # Python's own KeyboardInterrupt says nothing; a command with more to say raises Interrupted(message).
        print_error(str(e) or "interrupted (Ctrl-C)")
        return INTERRUPTED_EXIT


class Interrupted(KeyboardInterrupt):
    """Ctrl-C with a message of its own (what was or was not saved): run_cli prints it as the one line."""


class RunError(UserError):
    """Bad input to a command that reads a run (no run directory, no metrics, no usable checkpoint)."""
