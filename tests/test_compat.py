"""The torch compat names (fastmveb/compat.py): torch's own function where this torch has it, and a fallback that
gives the same result bit for bit, both run here whatever torch is installed. The 2-rank all-gather check of both
names runs in tests/sync_bn_worker.py (test_batchnorm); `make test-torch TORCH=2.11.0` runs all of it on the oldest
supported torch, where only the fallbacks exist."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.distributed._functional_collectives as fc

from fastmveb import compat, optim
from fastmveb.optim import LARS, param_groups
from test_optim import random_grads, reference_lars, tiny_net

ROOT = Path(__file__).resolve().parents[1]
# make's own lines ("make: ***", "make[1]: ***" when the suite itself runs under make test-torch)
MAKE_LINE = re.compile(r"^make(\[\d+\])?: ")
# Without the caller's make variables (under make test-torch TORCH=... they are in the environment): a TORCH or
# PYTEST_ARGS from there would turn the refusal below into a recursive run of the suite.
MAKE_ENV = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "TORCH", "TORCH_PY",
                                                              "PYVER", "PYTEST_ARGS", "TEST_WORKERS")}


def test_the_installed_torch_gets_its_own_functions():
    # No behaviour change where torch has the API: the compat name IS torch's function.
    if hasattr(torch, "_foreach_clone"):
        assert compat.foreach_clone is torch._foreach_clone
    else:
        assert compat.foreach_clone is compat.clone_each
    newest = next(getattr(fc, n) for n in compat.ALL_GATHER_NAMES if hasattr(fc, n))
    assert compat.all_gather_autograd is newest


def test_the_newest_name_wins_and_a_torch_with_none_says_so():
    old = types.ModuleType("fc_2_11")
    old.all_gather_tensor_autograd = fc.all_gather_tensor_autograd          # what torch 2.11 has
    assert compat._first(old, compat.ALL_GATHER_NAMES) is old.all_gather_tensor_autograd
    new = types.ModuleType("fc_2_14")
    new.all_gather_tensor_autograd, new.all_gather_single_autograd = print, len
    assert compat._first(new, compat.ALL_GATHER_NAMES) is len
    with pytest.raises(ImportError, match="all_gather_single_autograd, all_gather_tensor_autograd"):
        compat._first(types.ModuleType("none"), compat.ALL_GATHER_NAMES)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)           # NaN payloads and the sign of zero included


def test_clone_each_equals_foreach_clone_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    ts = [torch.randn(3, 4, 5, 5, generator=g).to(memory_format=torch.channels_last), torch.randn(7, generator=g),
          torch.randn(6, 4, generator=g).t(), torch.tensor([-0.0, float("inf"), float("nan")]),
          torch.randn(5, generator=g, dtype=torch.float64), torch.randn(4, generator=g).bfloat16()]
    copies = {"fallback": compat.clone_each(ts), "installed": compat.foreach_clone(ts)}
    if hasattr(torch, "_foreach_clone"):
        copies["torch"] = torch._foreach_clone(ts)
    for name, out in copies.items():
        assert len(out) == len(ts), name
        for t, c in zip(ts, out):
            assert c.dtype == t.dtype and c.shape == t.shape and c.stride() == t.stride(), (name, t.shape)
            assert c.data_ptr() != t.data_ptr(), name                           # a copy, never an alias
            assert torch.equal(_bits(c), _bits(t)), (name, t.shape)


def _lars_without_weight_decay(monkeypatch, clone) -> list[torch.Tensor]:
    """Four LARS steps with optim.weight_decay = 0 (the path that copies the gradients) using ``clone``."""
    monkeypatch.setattr(optim, "foreach_clone", clone)
    net = tiny_net()
    groups = param_groups(net, weight_decay=0.0)
    params = [p for gr in groups for p in gr["params"]]
    opt = LARS(groups, lr=0.1, weight_decay=0.0, momentum=0.9, trust_coef=0.02)
    for grads in random_grads(params, steps=4):
        for p, gr in zip(params, grads):
            p.grad = None if gr is None else gr.clone()
        given = [None if p.grad is None else p.grad.clone() for p in params]
        opt.step()
        for p, gr in zip(params, given):                                      # the gradients stay as computed
            assert (p.grad is None) == (gr is None) and (gr is None or torch.equal(p.grad, gr))
    return [p.detach().clone() for p in params] + [s["momentum_buffer"].clone() for s in opt.state.values()]


def test_lars_without_weight_decay_is_the_same_on_both_paths(monkeypatch):
    # optim.weight_decay = 0 is a valid config: torch 2.11 (no _foreach_clone) failed at the first step.
    fallback = _lars_without_weight_decay(monkeypatch, compat.clone_each)
    installed = _lars_without_weight_decay(monkeypatch, compat.foreach_clone)
    assert all(torch.equal(a, b) for a, b in zip(fallback, installed))
    # and it is LARS: the per-parameter restatement at wd = 0
    net = tiny_net()
    groups = param_groups(net, weight_decay=0.0)
    params = [p for gr in groups for p in gr["params"]]
    excl = [gr["lars_exclude"] for gr in groups for _ in gr["params"]]
    ref_p, _ = reference_lars(list(zip(params, excl)), random_grads(params, steps=4), 0.1, 0.0, 0.9, 0.02)
    for got, want in zip(fallback, ref_p):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_make_test_torch_refuses_an_unknown_torch_in_one_line():
    for bad in (["TORCH=9.9"], ["TORCH="]):
        r = subprocess.run(["make", "--no-print-directory", "-s", "test-torch", *bad], cwd=ROOT, env=MAKE_ENV,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r
        ours = [ln for ln in r.stderr.splitlines() if not MAKE_LINE.match(ln)]     # make adds its own "Error 2"
        assert len(ours) == 1 and ours[0].startswith("error: TORCH="), r.stderr
        assert "2.11.0" in ours[0] and "2.14.1" in ours[0], ours[0]                  # names the supported ones
        assert not (ROOT / ".venv-torch9.9").exists() and r.stdout == ""


def test_make_test_torch_pairs_torch_with_its_torchvision():
    # -B: the whole recipe even where that venv is already built
    r = subprocess.run(["make", "-n", "-B", "--no-print-directory", "test-torch", "TORCH=2.11.0"], cwd=ROOT,
                       env=MAKE_ENV, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "torch===2.11.0 torchvision===0.26.0" in r.stdout
    assert "-m pytest -q -m \"not slow and not gpu\"" in r.stdout and ".venv-torch2.11.0/bin/python" in r.stdout
    # TORCH_PY: the interpreter the venv is made with; none found for PYVER: one line
    r = subprocess.run(["make", "-n", "-B", "--no-print-directory", "test-torch", "TORCH=2.12.1",
                        "TORCH_PY=/opt/py/bin/python3"], cwd=ROOT, env=MAKE_ENV, capture_output=True, text=True,
                       timeout=60)
    assert "/opt/py/bin/python3 -m venv .venv-torch2.12.1" in r.stdout and "torchvision===0.27.1" in r.stdout, r.stdout
    r = subprocess.run(["make", "-s", "--no-print-directory", "test-torch", "TORCH=2.11.0", "PYVER=3.99", "TORCH_PY="],
                       cwd=ROOT, env=MAKE_ENV, capture_output=True, text=True, timeout=60)
    ours = [ln for ln in r.stderr.splitlines() if not MAKE_LINE.match(ln)]
    assert r.returncode == 2 and len(ours) == 1 and ours[0].startswith("error: no Python 3.99 found"), r.stderr


def test_both_all_gather_names_agree_on_two_gloo_ranks(tmp_path):
    out = tmp_path / "gather.json"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(32500 + os.getpid() % 1000), str(ROOT / "tests" / "sync_bn_worker.py"), str(out), "gather"],
                       cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2 and set(res["errors"]) == {"gather"}
    have = [n for n in compat.ALL_GATHER_NAMES if hasattr(fc, n)]
    assert have and compat.all_gather_autograd is getattr(fc, have[0])
    for per_name in res["errors"]["gather"]:                                # one dict per rank
        assert sorted(per_name) == sorted(have)                             # every name this torch has, ran
        for name, err in per_name.items():
            assert err == {"out": 0.0, "grad": 0.0}, (name, err)


def test_a_process_holding_its_group_ends_with_its_output_and_status_but_no_teardown(tmp_path):
    # The multi-process commands (fastmveb.train, fastmveb.eval finetune) hold their process group and end through
    # end_process: same exit status, everything printed flushed, no destructor or atexit hook run.
    code = ("import atexit, os, sys\nimport torch.distributed as dist\n"
            "from fastmveb.compat import end_process, hold_process_group\n"
            "atexit.register(print, 'teardown')\n"
            "if sys.argv[1] == 'group':\n"
            "    dist.init_process_group('gloo', init_method='file://' + sys.argv[2], rank=0, world_size=1)\n"
            "hold_process_group()\nprint('result')\nsys.exit(end_process(3))\n")
    for mode, printed in (("group", ["result"]), ("no group", ["result", "teardown"])):
        r = subprocess.run([sys.executable, "-c", code, mode, str(tmp_path / mode.replace(" ", "_"))], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 3 and r.stdout.split() == printed, (mode, r)
