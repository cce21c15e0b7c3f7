"""Processes that come and go: preemption signals, joining a restarted group, and a lost peer as one line.

    preempt = Preemption()                       # SIGTERM / SIGUSR1 / SIGINT (Ctrl-C) -> a flag
    ... if sig := preempt.agree(device, world): save, exit stop_status(sig) (75; Ctrl-C: 130)
    init_elastic_process_group(timeout_s)        # under torchrun: a per-attempt store prefix (before Accelerate)
    except Exception as e: line = lost_peer(e)   # a collective failed because another process died or hung

README "Many nodes, lost processes, preemption" says how runs use this; tests/test_elastic.py pins it.
"""
from __future__ import annotations

import datetime
import os
import signal

import torch

from fastmveb.errors import INTERRUPTED_EXIT, Interrupted


# Exit status of a run stopped by SIGTERM / SIGUSR1 after writing its checkpoint: EX_TEMPFAIL (sysexits.h),
# "try again later". Rerunning the same command resumes from that checkpoint exactly.
PREEMPTED_EXIT = 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)    # what SLURM (--signal) and Kubernetes send before a kill
# Ctrl-C stops a run the same way (checkpoint at the agreed step), with the shell's status for it (130).
STOP_SIGNALS = (*PREEMPT_SIGNALS, signal.SIGINT)


def stop_status(signum: int) -> int:
    """The exit status of a run stopped by ``signum`` after writing its checkpoint."""
    return INTERRUPTED_EXIT if signum == signal.SIGINT else PREEMPTED_EXIT


class Preemption:
    """SIGTERM / SIGUSR1 / SIGINT -> a flag, nothing else: the step in flight finishes, and a first signal that
    lands during a checkpoint save cannot cut it (the save is atomic anyway: checkpoint.save_checkpoint). The ranks
    agree on the flag at the logging interval only (``agree``: one all_reduce of one integer, next to that
    interval's host sync), so the step itself never syncs; the stop comes at most train.log_every steps after the
    signal. A Ctrl-C while a stop is already pending means "now" (as a second Ctrl-C does everywhere): it raises
    Interrupted at once, without the checkpoint."""

    def __init__(self):
        self.signum = 0
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self.signum:
            raise Interrupted("stopped at once by a second Ctrl-C")
        self.signum = self.signum or signum

    def ignore(self) -> None:
        """Ignore further stop signals: once the stop is agreed and saved, a repeated one has nothing left to
        protect. Ignored rather than handled because the interpreter's shutdown puts Python-handled signals back
        to their default (death), not ignored ones."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def agree(self, device, world: int) -> int:
        """The signal any rank received (0: none); every rank returns the same value."""
        if world == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


def init_elastic_process_group(timeout_s: int) -> None:
    """Under torchrun, join the process group through the launcher's store with a per-attempt key prefix.

    torchrun's default (static) rendezvous keeps ONE store for all restarts of the group, and the workers'
    default init adds no per-attempt prefix, so a restarted group can read the dead attempt's keys: we
    traced a restart failing that way in gloo ("connectFullMesh failed ... Connection refused", torch 2.14.1).
    It did not recur in tests/test_elastic.py's restart test on the CPU box (which passes with or without
    this); keys under "fastmveb/attempt<TORCHELASTIC_RESTART_COUNT>/" rule it out, with any rendezvous backend.
    Accelerate then finds the group initialised and uses it (accelerate.state checks is_initialized()). Outside torchrun (or when the launcher hosts no store) Accelerate initialises as usual.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (world <= 1 or torch.distributed.is_initialized() or "TORCHELASTIC_RESTART_COUNT" not in os.environ
            or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"):
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                       is_master=False, timeout=timeout)
    store = torch.distributed.PrefixStore(f"fastmveb/attempt{os.environ['TORCHELASTIC_RESTART_COUNT']}/", store)
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    torch.distributed.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world,
                                         timeout=timeout)


def lost_peer(e: BaseException) -> str | None:
    """One line for a collective that failed because another process died or hung, else None."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = " ".join(str(e).split())
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if not isinstance(e, dist_error) and not (isinstance(e, RuntimeError) and any(
            k in text.lower() for k in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))):
        return None
    return (f"error: rank {torch.distributed.get_rank()} of {torch.distributed.get_world_size()}: a collective "
            f"failed, another process died or hung (train.collective_timeout_s bounds the wait): {text[:160]}; "
            f"rerun to resume from the newest checkpoint")
