"""The torch APIs that moved within the supported range (torch 2.11 to the pinned 2.14.1): one name each here,
bound once at import to this torch's own function where it has it, else to an equivalent. On the pinned torch
every name below is torch's own function, so nothing changes there; the fallbacks only run on older torch.

    all_gather_autograd(x, gather_dim, group)   differentiable all-gather (functional collective, traced by dynamo)
    foreach_clone(tensors)                      a copy of each tensor (torch._foreach_clone)

And the end of a multi-process command (hold_process_group, end_process, exit_now): see below.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def clone_each(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """torch._foreach_clone's result (same values bit for bit, same strides, new storage), one clone per tensor:
    the fallback for torch without it (2.11). Under torch.compile the clones fuse like the foreach call does."""
    return [t.clone() for t in tensors]


foreach_clone = getattr(torch, "_foreach_clone", None) or clone_each

# Newest name first: torch 2.14 deprecates all_gather_tensor_autograd (a FutureWarning on every eager call) in
# favour of all_gather_single_autograd, which torch 2.11 does not have yet. Same arguments, same result.
ALL_GATHER_NAMES = ("all_gather_single_autograd", "all_gather_tensor_autograd")


def _first(module, names):
    for name in names:
        fn = getattr(module, name, None)
        if fn is not None:
            return fn
    raise ImportError(f"torch {torch.__version__} has none of {', '.join(names)} in {module.__name__}: "
                      f"install a supported torch (see pyproject.toml)")


if dist.is_available():
    from torch.distributed import _functional_collectives as _fc

    all_gather_autograd = _first(_fc, ALL_GATHER_NAMES)
else:                                           # a torch built without torch.distributed: only world == 1 runs
    def all_gather_autograd(x, gather_dim, group):
        raise RuntimeError(f"torch {torch.__version__} was built without torch.distributed")


# ---- ending a process that ran collectives -------------------------------------------------------------------
# torch 2.11's gloo process group can deadlock when it is freed: its destructor joins gloo's worker threads while
# holding the GIL, and a worker thread that is just dropping a finished collective's tensors waits for the GIL.
# Measured: 2 of 5 two-process CPU trainings hung for good after their last line (gdb: ~ProcessGroupGloo joining
# its run loop, reached from ~Reducer when main() returned and freed the DDP model). So a command that ran
# collectives keeps its process group alive and ends with os._exit once its results are written: the group is
# never freed, and the launcher sees the same exit status.
_HELD: list = []


def hold_process_group() -> None:
    """Keep this process's default process group (if one is initialised) alive until the process ends, so that
    neither freeing the DDP model nor destroy_process_group frees it; end_process then ends the process."""
    if dist.is_available() and dist.is_initialized():
        _HELD.append(dist.group.WORLD)


def exit_now(status: int):
    """End the process with ``status`` after flushing stdout and stderr, skipping the interpreter's teardown
    (object destructors, atexit hooks). Only once every file the process writes is closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


# A loader stopped mid-epoch (an evaluation ended between two batches by a stop signal) can leave native decoding
# threads behind whose destructors abort the interpreter's teardown: measured under torch 2.11, the end-of-run kNN
# stopped by SIGTERM printed its line and then died of SIGABRT ("terminate called without an active exception")
# instead of exiting 75. Such a process ends with os._exit too, once everything it writes is closed.
_SKIP_TEARDOWN: list = []


def skip_teardown() -> None:
    """Make end_process end this process at once (os._exit with its status) even without a held process group."""
    _SKIP_TEARDOWN.append(True)


def end_process(status: int) -> int:
    """The end of a command: exit_now(status) when hold_process_group holds a group or skip_teardown was asked,
    else ``status`` back."""
    if _HELD or _SKIP_TEARDOWN:
        exit_now(status)
    return status
