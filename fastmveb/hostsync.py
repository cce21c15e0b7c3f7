"""Host syncs: a detector that finds them on any device, and the switch that runs the CUDA code paths on the CPU.

    with HostSyncDetector() as det:           # records every op that makes the host wait for the device
        train_step(...)
    assert not det.syncs, det.report()

    with device_path():                        # CUDA-only branches (sync-free repairs) run on the CPU too
        ...

A host sync stalls the CPU until the device has finished all queued work, so the next kernels are not queued
in time and the GPU idles: one per step costs the step's launch lead; one per layer costs much more. On CUDA,
torch.cuda.set_sync_debug_mode("error") finds them, but only where a GPU is. The detector works at the
dispatcher (TorchDispatchMode) on any device: it records the ops that read device values on the host or
whose output shape depends on device values, and tensors created from Python data (an upload from pageable
memory, which synchronises on CUDA):

    aten._local_scalar_dense      .item(), bool(t), float(t), int(t), `if t:`
    aten.nonzero, masked_select   data-dependent output size (boolean-mask indexing goes through them)
    aten.index / index_put_ with a boolean index, unique, repeat_interleave without output_size
    aten.lift_fresh               torch.tensor(data) / tensor.new_tensor(data): a host-to-device copy on CUDA
    copies between the CPU and another device (.cpu(), .to("cuda") of a CPU tensor)

What it cannot see on a CPU-only machine: .tolist() and .numpy() of CPU tensors (no dispatch); those read
device memory only through .cpu(), which it records when a device is present.
"""
from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_aten = torch.ops.aten
SYNC_OPS = {
    _aten._local_scalar_dense.default, _aten.nonzero.default, _aten.nonzero_static.default,
    _aten.masked_select.default, _aten.lift_fresh.default, _aten._unique2.default, _aten.unique_dim.default,
    _aten.unique_consecutive.default, _aten.item.default,
}
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
_COPY_OPS = {_aten._to_copy.default, _aten.copy_.default}

_FORCE_DEVICE_PATH = False


def sync_free(t: torch.Tensor) -> bool:
    """Take the sync-free branch for this tensor: on CUDA, under torch.compile, or inside ``device_path()``."""
    return t.is_cuda or _FORCE_DEVICE_PATH or torch.compiler.is_compiling()


class device_path:
    """``with device_path():`` code that branches on the device takes its CUDA (sync-free) branch everywhere."""

    def __enter__(self):
        global _FORCE_DEVICE_PATH
        self.prev, _FORCE_DEVICE_PATH = _FORCE_DEVICE_PATH, True
        return self

    def __exit__(self, *exc):
        global _FORCE_DEVICE_PATH
        _FORCE_DEVICE_PATH = self.prev
        return False


def _devices(x) -> set[str]:
    if isinstance(x, torch.Tensor):
        return {x.device.type}
    if isinstance(x, (list, tuple)):
        return set().union(*(_devices(a) for a in x)) if x else set()
    return set()


def _why(func, args, kwargs) -> str | None:
    if func in SYNC_OPS:
        return str(func)
    if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
        return "repeat_interleave without output_size"
    if func in _INDEX_OPS:
        idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (idx or ())):
            return f"{func} with a boolean mask"
    if func in _COPY_OPS:
        src_devices = _devices(args)
        dst = kwargs.get("device")
        if dst is not None:
            src_devices.add(torch.device(dst).type)
        if "cpu" in src_devices and len(src_devices) > 1 and "meta" not in src_devices:
            return f"{func} between the CPU and a device"
    return None


class HostSyncDetector(TorchDispatchMode):
    """Records (op, where) for every host-syncing op run inside it; ``strict=True`` raises at the first one."""

    def __init__(self, strict: bool = False):
        super().__init__()
        self.strict = strict
        self.syncs: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = _why(func, args, kwargs)
        if why is not None:
            where = "".join(traceback.format_list([f for f in traceback.extract_stack()[:-2]
                                                    if "fastmveb" in f.filename][-3:]))
            self.syncs.append((why, where))
            if self.strict:
                raise AssertionError(f"host sync: {why}\n{where}")
        return func(*args, **kwargs)

    def report(self) -> str:
        return "\n".join(f"{why} at\n{where}" for why, where in self.syncs) or "no host sync"
