"""ViewBatchNorm: a batched forward of k views equals k per-view forwards of torch's BatchNorm (outputs,
running statistics, gradients), compiled as one graph, and synchronised over 2 gloo ranks it equals one
process that sees the union batch."""
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from fastmveb.batchnorm import ViewBatchNorm, convert_batchnorm, views
from fastmveb.config import ModelConfig
from fastmveb.model import MVEBModel

ROOT = Path(__file__).resolve().parents[1]


def small_model() -> MVEBModel:
    torch.manual_seed(0)
    m = MVEBModel.from_config(ModelConfig(arch="resnet10", proj_hidden=32, proj_out=16))
    with torch.no_grad():                      # non-trivial affine parameters and running statistics
        for mod in m.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
                mod.running_mean.uniform_(-0.2, 0.2)
    return m


def per_view_and_batched(ref: nn.Module, x: list[torch.Tensor], w: list[torch.Tensor], fwd=None):
    """(reference outputs and grads from one call per view, the same from one batched call under views(k))."""
    new = convert_batchnorm(copy.deepcopy(ref))
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in new.modules())
    outs = [ref(xi)[1] for xi in x]
    sum((o * wi).sum() for o, wi in zip(outs, w)).backward()

    def batched(xb):
        with views(len(x)):
            return new(xb)[1]
    out = (fwd or batched)(torch.cat(x)) if fwd is None else fwd(new, torch.cat(x))
    (out * torch.cat(w)).sum().backward()
    return ref, torch.cat(outs), new, out


def assert_same(ref, out_ref, new, out, tol=2e-5):
    torch.testing.assert_close(out, out_ref, rtol=tol, atol=tol)
    for (name, a), b in zip(ref.named_parameters(), new.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=tol, atol=tol * a.grad.abs().max().item(), msg=name)
    for (name, a), b in zip(ref.named_buffers(), new.buffers()):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=name)


def test_batched_views_equal_per_view_forwards():
    ref = small_model().train()
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(6, 3, 32, 32, generator=g) * (1 + i) + i for i in range(3)]     # views differ in stats
    w = [torch.randn(6, 16, generator=g) for _ in range(3)]
    ref, out_ref, new, out = per_view_and_batched(ref, x, w)
    assert_same(ref, out_ref, new, out)
    bn = new.backbone.bn1
    assert bn.num_batches_tracked.item() == 3                # one update per view, as three calls make
    # A joint normalisation (the old behaviour) would not match: the views' statistics really differ.
    joint = small_model().train()
    assert (joint(torch.cat(x))[1] - out_ref).abs().max() > 1e-2


def test_channels_last_and_bf16_autocast():
    ref = small_model().train().to(memory_format=torch.channels_last)
    g = torch.Generator().manual_seed(2)
    x = [torch.randn(4, 3, 32, 32, generator=g).contiguous(memory_format=torch.channels_last) for _ in range(2)]
    new = convert_batchnorm(copy.deepcopy(ref))
    exact = torch.cat([copy.deepcopy(ref)(xi)[1] for xi in x])              # float32 per-view reference
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = torch.cat([ref(xi)[1] for xi in x])
        with views(2):
            out = new(torch.cat(x))[1]
            y = ViewBatchNorm(64)(torch.randn(8, 64, 8, 8, generator=g, dtype=torch.bfloat16)
                                  .contiguous(memory_format=torch.channels_last))
    assert out.dtype == outs.dtype and y.dtype == torch.bfloat16
    assert y.is_contiguous(memory_format=torch.channels_last)
    # bf16 through ten layers is ~13% off float32 either way; ours must be no worse than torch's BatchNorm.
    err, err_torch = ((o.float() - exact).norm() / exact.norm() for o in (out, outs))
    assert err < 1.25 * err_torch + 0.01, (err, err_torch)
    for a, b in zip(ref.buffers(), new.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-2)


def test_eval_mode_and_state_dict_are_torchvision_batchnorm():
    ref = small_model()
    new = convert_batchnorm(copy.deepcopy(ref))
    assert list(new.state_dict()) == list(ref.state_dict())
    x = torch.randn(4, 3, 32, 32)
    ref.eval(), new.eval()
    with views(2):                                            # eval uses running statistics: k is irrelevant
        torch.testing.assert_close(new(x)[1], ref(x)[1], rtol=0, atol=0)
    tv = torchvision.models.resnet18()                        # checkpoints/exports load strictly into torchvision
    tv.load_state_dict(convert_batchnorm(copy.deepcopy(tv)).state_dict(), strict=True)
    with pytest.raises(ValueError, match="equal views"):
        with views(3):
            new.train()(x)


def test_compiled_one_graph_equals_eager():
    ref = small_model().train()
    g = torch.Generator().manual_seed(3)
    x = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    w = [torch.randn(4, 16, generator=g) for _ in range(2)]

    def fwd(model, xb):
        with views(2):
            return model(xb)[1]
    torch._dynamo.reset()
    compiled = torch.compile(fwd, backend="aot_eager", fullgraph=True)     # fullgraph: a break would raise
    ref, out_ref, new, out = per_view_and_batched(ref, x, w, fwd=compiled)
    # aot_eager reorders float32 reductions: gradients agree to ~3e-5 of their largest entry on this box's CPU
    assert_same(ref, out_ref, new, out, tol=1e-4)


def test_converter_keeps_parameters_and_mode():
    bn = nn.BatchNorm1d(5).eval()
    new = convert_batchnorm(bn)
    assert isinstance(new, ViewBatchNorm) and new.weight is bn.weight and new.running_var is bn.running_var
    assert not new.training and new.world == 1
    assert convert_batchnorm(nn.BatchNorm2d(3), sync=True).world == 1      # no process group: local stats


def test_two_gloo_ranks_sync_equals_union_batch(tmp_path):
    out = tmp_path / "bn.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(31500 + os.getpid() % 1000), str(ROOT / "tests" / "sync_bn_worker.py"), str(out),
                        "eager", "aot_eager"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2 and set(res["errors"]) == {"eager", "aot_eager"}
    for backend, per_rank in res["errors"].items():
        for err in per_rank:
            assert err["out"] < 1e-5 and err["grad_x"] < 1e-5 and err["grad_params"] < 1e-5, (backend, err)
            assert err["buffers"] < 1e-6, (backend, err)
