"""Host syncs: the dispatch-level detector catches each kind of sync, and the REAL train_step, on the code path
CUDA takes (fastmveb.hostsync.device_path), runs several steps without one."""
import dataclasses

import pytest
import torch
from torch import nn

from fastmveb.batchnorm import convert_batchnorm
from fastmveb.hostsync import HostSyncDetector, device_path, sync_free


@pytest.mark.parametrize("make_sync", [
    lambda t: t.sum().item(),
    lambda t: bool(t.sum() > 0),
    lambda t: t[t > 0],                                # boolean-mask index (torch's SyncBatchNorm does this)
    lambda t: torch.nonzero(t),
    lambda t: t.masked_select(t > 0),
    lambda t: t.new_tensor(0.5),                       # a blocking upload on CUDA
    lambda t: torch.tensor([1.0, 2.0]),
    lambda t: torch.unique(t),
])
def test_detector_catches_each_kind(make_sync):
    t = torch.randn(8)
    with HostSyncDetector() as det:
        make_sync(t)
    assert det.syncs, "not detected"
    with pytest.raises(AssertionError, match="host sync"):
        with HostSyncDetector(strict=True):
            make_sync(t)


def test_detector_passes_sync_free_code():
    t = torch.randn(8, 4)
    idx = torch.tensor([0, 2])
    bn = convert_batchnorm(nn.BatchNorm1d(4))     # construction makes tensors from Python data: not a step
    with HostSyncDetector() as det:
        torch.where(t > 0, t, torch.zeros_like(t)).sum(0)
        t[idx], t[1:3], t[2]                      # integer indexing: no sync
        bn(t).sum().backward()
    assert not det.syncs, det.report()


def test_torch_syncbatchnorm_would_be_caught():
    # What the converter replaces: SyncBatchNorm's forward indexes with a boolean mask (needs a process group
    # to run, so the pattern itself is checked).
    counts = torch.tensor([4.0, 0.0, 4.0])
    with HostSyncDetector() as det:
        counts[counts > 0]
    assert any("boolean" in why for why, _ in det.syncs)


def test_device_path_switch():
    t = torch.zeros(1)
    assert not sync_free(t)
    with device_path():
        assert sync_free(t)
    assert not sync_free(t)


def test_train_step_has_no_host_sync_on_the_device_path():
    from fastmveb.bench.common import build, make_accelerator
    from fastmveb.config import load_config
    from fastmveb.model import ema_momentum_table
    from fastmveb.step import step_parts, train_step
    torch.set_num_threads(1)
    # group 4: the batched grouped estimator with a remainder group (10 = 4 + 4 + 2); locals included;
    # the online probe on; the model with per-view BatchNorm.
    cfg = load_config(None, ["data.global_batch_size=10", "data.decode_size=40", "views.global_size=32",
                             "views.n_local=2", "views.local_size=16", "model.arch=resnet10",
                             "model.proj_hidden=32", "model.proj_out=32", "loss.group=4",
                             "train.mixed_precision=no", "train.compile=false"])
    device = torch.device("cpu")
    acc = make_accelerator(cfg, device)
    b = build(cfg, device, acc)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (10, 3, 40, 40), dtype=torch.uint8, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 4, (10,), generator=g)
    m_table = ema_momentum_table(8, cfg.model.ema_momentum, device)
    parts = step_parts(b["training"], acc, cfg, b["views_c"])
    with device_path():
        train_step(parts, x, y, 0.1, m_table[0])                          # state
        with HostSyncDetector() as det:
            for step in range(1, 4):
                stats, skip, z0 = train_step(dataclasses.replace(parts, micro_batch=5 if step == 3 else None), x, y,
                                             0.1, m_table[step])          # 3: 2 micro-batches
    assert not det.syncs, det.report()
    assert torch.isfinite(stats["loss"]) and not bool(skip)
    # The same steps off the device path do sync (the CPU's cheap Cholesky status read): the detector sees it.
    with HostSyncDetector() as det:
        train_step(parts, x, y, 0.1, m_table[4])
    assert det.syncs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_train_step_has_no_cuda_sync():
    # The device itself: any device-to-host sync inside train_step raises (bf16 autocast, per-view BN, LARS
    # skip select, EMA, the entropy's sync-free branch).
    from fastmveb.bench.common import build, make_accelerator
    from fastmveb.config import load_config
    from fastmveb.model import ema_momentum_table
    from fastmveb.step import step_parts, train_step
    cfg = load_config(None, ["data.global_batch_size=16", "data.decode_size=64", "views.global_size=48",
                             "views.n_local=2", "views.local_size=24", "model.arch=resnet18",
                             "model.proj_hidden=256", "model.proj_out=256", "loss.group=8",
                             "train.mixed_precision=bf16", "train.compile=false"])
    device = torch.device("cuda")
    acc = make_accelerator(cfg, device)
    b = build(cfg, device, acc)
    x = torch.randint(0, 256, (16, 3, 64, 64), dtype=torch.uint8, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (16,), device=device)
    m_table = ema_momentum_table(8, cfg.model.ema_momentum, device)
    args = (step_parts(b["training"], acc, cfg, b["views_c"]), x, y, 0.1)
    train_step(*args, m_table[0])                                         # state creation, cudnn autotune
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            stats, skip, _ = train_step(*args, m_table[step])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(stats["loss"]).item() and not skip.item()
