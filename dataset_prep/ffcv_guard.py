"""What dataset_prep changes in ffcv 1.0.2's DatasetWriter while it writes a beton, and why.

``ffcv_guarded``: a writer process that dies (disk full, killed) stops the write with one line instead of hanging it
forever, and the progress bar follows --quiet. ``free_shared_memory``: the /dev/shm block a failed write leaves
behind. Nothing here changes the bytes ffcv writes; ffcv.writer's module attributes are swapped only while a write
runs.
"""
from __future__ import annotations

import contextlib
import functools
import multiprocessing as mp
import multiprocessing.queues
import os
import queue
import time
from pathlib import Path


class WriterDied(Exception):
    """An ffcv writer process ended before its work was done (disk full, killed, out of memory)."""


@contextlib.contextmanager
def ffcv_guarded(enabled: bool, fail_dir: str):
    """Run ffcv 1.0.2's DatasetWriter so that a dead writer process stops the write instead of hanging it.

    ffcv's main process polls a shared counter until every sample is done, then blocks on a queue for each
    worker's allocation table; it never looks at the workers. A worker that dies (ENOSPC in its page flush,
    OOM kill) therefore hangs the write forever. The hooks below (module attributes ffcv.writer looks up at
    call time): the polling sleep and the blocking queue read check the workers and raise WriterDied; each
    worker runs inside a wrapper that records its error in ``fail_dir`` and exits without a traceback. Also
    swaps ffcv's progress bar for a disabled one when ``enabled`` is False (--quiet, tests).
    """
    import ffcv.writer as fw
    from tqdm import tqdm
    main_pid, procs = os.getpid(), []

    def check_workers():
        if os.getpid() != main_pid:
            return
        dead = [p for p in procs if p.exitcode not in (None, 0)]
        if dead:
            raise WriterDied(f"exit code {dead[0].exitcode}")

    def process(*args, **kw):
        p = mp.Process(*args, **kw)
        procs.append(p)
        return p

    def sleep(seconds):
        check_workers()
        time_sleep(seconds)

    class WatchedQueue(multiprocessing.queues.Queue):
        def __init__(self):
            super().__init__(ctx=mp.get_context())

        def get(self, block=True, timeout=None):
            if not block or timeout is not None or os.getpid() != main_pid:
                return super().get(block, timeout)
            while True:
                try:
                    return super().get(timeout=0.2)
                except queue.Empty:
                    check_workers()

    job = fw.worker_job_indexed_dataset

    def quiet_job(*args):
        try:
            job(*args)
        except BaseException as e:   # noqa: BLE001 -- reported by the main process in one line
            Path(fail_dir, "writer").write_text(f"{type(e).__name__}: {e}".splitlines()[0])
            os._exit(1)

    time_sleep = time.sleep
    hooks = {"tqdm": tqdm if enabled else functools.partial(tqdm, disable=True), "Process": process,
             "sleep": sleep, "Queue": WatchedQueue, "worker_job_indexed_dataset": quiet_job}
    saved = {k: getattr(fw, k) for k in hooks}
    for k, v in hooks.items():
        setattr(fw, k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(fw, k, v)
        for p in procs:                # after a failure the others wait forever for their turn to write
            if p.is_alive():
                p.terminate()
            p.join(timeout=5)


def free_shared_memory(writer) -> None:
    """ffcv unlinks its metadata block in /dev/shm only after a successful write."""
    sm = getattr(writer, "metadata_sm", None)
    if sm is not None and hasattr(sm, "unlink"):
        with contextlib.suppress(OSError):
            sm.close()
            sm.unlink()
