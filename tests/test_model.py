"""Backbone compatibility with torchvision, projector layout, EMA target and momentum schedule."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet
from torch.utils._python_dispatch import TorchDispatchMode

from fastmveb.config import ModelConfig
from fastmveb.model import MVEBModel, Projector, build_backbone, ema_momentum, ema_update, make_target


def small_model() -> MVEBModel:
    torch.manual_seed(0)
    return MVEBModel.from_config(ModelConfig(arch="resnet10", proj_hidden=32, proj_out=16, proj_layers=3))


@pytest.mark.parametrize("arch,dim", [("resnet10", 512), ("resnet18", 512), ("resnet50", 2048)])
def test_backbone_is_torchvision_resnet(arch, dim):
    net, d = build_backbone(arch)
    assert d == dim and type(net) is ResNet and isinstance(net.fc, nn.Identity)
    ref = ResNet(BasicBlock, [1, 1, 1, 1]) if arch == "resnet10" else getattr(torchvision.models, arch)()
    missing, unexpected = ref.load_state_dict(net.state_dict(), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    # zero-init residual: the last BN of every residual branch starts at gamma = 0
    blocks = [m for m in net.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert blocks
    for b in blocks:
        last_bn = b.bn3 if isinstance(b, Bottleneck) else b.bn2
        assert torch.count_nonzero(last_bn.weight) == 0
        assert torch.count_nonzero(b.bn1.weight) == b.bn1.weight.numel()


def test_zero_init_residual_off_keeps_default_init():
    net, _ = build_backbone("resnet10", zero_init_residual=False)
    assert all(torch.count_nonzero(b.bn2.weight) > 0 for b in net.modules() if isinstance(b, BasicBlock))


def test_unknown_arch_lists_valid_names():
    with pytest.raises(ValueError) as e:
        build_backbone("resnet7")
    msg = str(e.value)
    assert "\n" not in msg and "resnet7" in msg and "resnet10" in msg and "resnet50" in msg
    assert "wide_resnet50_2" in msg and "resnext50_32x4d" in msg


def test_projector_layout_and_shapes():
    proj = Projector(64, hidden=32, out=16, layers=3)
    linears = [m for m in proj if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64, 32), (32, 32), (32, 16)]
    assert [m.bias is not None for m in linears] == [False, False, True]
    assert sum(isinstance(m, nn.BatchNorm1d) for m in proj) == 2 and sum(isinstance(m, nn.ReLU) for m in proj) == 2
    assert proj(torch.randn(4, 64)).shape == (4, 16)
    one = Projector(64, hidden=32, out=8, layers=1)
    assert len(one) == 1 and one(torch.randn(2, 64)).shape == (2, 8)


def test_model_forward_returns_features_and_projection():
    model = small_model()
    h, p = model(torch.randn(2, 3, 32, 32))
    assert h.shape == (2, 512) and p.shape == (2, 16)
    assert model.feat_dim == 512


def test_make_target_is_a_frozen_copy_in_the_same_mode():
    model = small_model()
    target = make_target(torch.compile(model))    # a wrapper must not leak into the target
    assert type(target) is MVEBModel and target.training
    assert not any(p.requires_grad for p in target.parameters())
    for (k, a), b in zip(model.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), k
        assert a.data_ptr() != b.data_ptr() or a.numel() == 0
    assert not make_target(small_model().eval()).training


def _perturb(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.is_floating_point():
                t.add_(torch.randn(t.shape, generator=gen))
            else:
                t.add_(7)


class NoHostSync(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            raise AssertionError("host sync")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("as_tensor", [False, True])
def test_ema_update_end_points_and_mix(as_tensor):
    online = small_model()
    target = make_target(online)
    _perturb(online, 1)
    m = (lambda v: torch.tensor(v)) if as_tensor else (lambda v: v)
    wrapped = torch.compile(online)

    before = {k: v.clone() for k, v in target.state_dict().items()}
    ema_update(target, wrapped, m(1.0))
    params = dict(target.named_parameters())
    for k, v in target.state_dict().items():
        ref = before[k] if k in params else online.state_dict()[k]   # buffers are always copied
        assert torch.equal(v, ref), k

    with NoHostSync():
        ema_update(target, wrapped, m(0.75))
    for (k, t), o in zip(target.named_parameters(), online.parameters()):
        torch.testing.assert_close(t, 0.75 * before[k] + 0.25 * o, msg=k)

    ema_update(target, wrapped, m(0.0))
    for (k, a), b in zip(target.state_dict().items(), online.state_dict().values()):
        if as_tensor:   # t + 1 * (o - t): o up to rounding (the schedule keeps m in [base, 1], where 1 is exact)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=k)
        else:
            assert torch.equal(a, b), k


def test_ema_update_rejects_a_different_architecture():
    with pytest.raises(ValueError):
        ema_update(small_model(), MVEBModel(nn.Linear(2, 2), nn.Identity()), 0.5)


def test_ema_momentum_schedule_end_points():
    assert ema_momentum(0, 1000) == pytest.approx(0.996)
    assert ema_momentum(500, 1000) == pytest.approx(0.998)
    assert ema_momentum(1000, 1000) == pytest.approx(1.0)
    assert ema_momentum(1500, 1000) == pytest.approx(1.0)
    assert ema_momentum(0, 1000, base=0.99) == pytest.approx(0.99)
    ms = [ema_momentum(s, 100) for s in range(101)]
    assert all(a <= b for a, b in zip(ms, ms[1:]))
