"""fastmveb.views: a fixed seed gives the views and draws it gave before the views became typed ops.

The expected digests were computed with the dict-based view maker (each view's draws a 13-key dict) on the
same cases: any change to the draw order, a draw's shape or an op's maths changes them. An op appended as a
round of its own (the documented way to add an augmentation) leaves them alone.
"""
from __future__ import annotations

import hashlib

import pytest
import torch

from fastmveb.config import ViewsConfig
from fastmveb.views import ViewMaker, ViewOp

CASES = {
    # name: (ViewsConfig overrides, input mode)
    "decode_once_extent": (dict(global_size=24, local_size=12, n_local=2), "extent"),
    "canvas_fixed_order": (dict(global_size=24, local_size=12, n_local=1, jitter_order="fixed"), "canvas"),
    "per_view": (dict(global_size=24, local_size=12, n_local=2), "per_view"),
    "bf16_bilinear_no_antialias": (dict(global_size=20, local_size=10, n_local=1, dtype="bfloat16",
                                        interpolation="bilinear", antialias=False), "extent"),
}
# (digest of the views, digest of every draw, the generator's next number), seed 1234.
EXPECTED = {
    'decode_once_extent': ('3a3320a16593a5f66621', '4051c27daaf7114cc75f', 0.9002716541290283),
    'canvas_fixed_order': ('4a665ca0ff1eb2ca93ef', '8b851d33e74629195b0e', 0.6429013609886169),
    'per_view': ('6a6bcbddefcb396d67cf', '6c4edeaad67fd63833ff', 0.9826397895812988),
    'bf16_bilinear_no_antialias': ('ecfacb69ebc381c62de3', '69aa5e0f38082ca66697', 0.6429013609886169),
}
# Every draw, in the order the dict-based maker listed them (the digest reads them by name).
FIELDS = ("box", "image_box", "flip", "jitter", "brightness", "contrast", "saturation", "hue", "order", "gray",
          "blur", "sigma", "solarize")


def _bytes(t):
    t = t.detach().cpu().contiguous()
    return (t.to(torch.uint8) if t.dtype == torch.bool else t).view(torch.uint8).numpy().tobytes()


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(_bytes(t))
    return h.hexdigest()[:20]


def _images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def run_case(name, maker=ViewMaker):
    """(digest of the views, digest of every draw, the generator's next number) of one case."""
    kw, mode = CASES[name]
    vm = maker(ViewsConfig(**kw))
    g = torch.Generator().manual_seed(1234)
    if mode == "per_view":
        x = [_images(6, 24, 1), _images(6, 24, 2), _images(6, 12, 3), _images(6, 12, 4)]
        v, draws = vm(x, generator=g, return_params=True)
    elif mode == "extent":
        extent = torch.tensor([[30, 50], [50, 30], [40, 40], [375, 500], [500, 333], [10, 90]])
        v, draws = vm(_images(6, 40, 5), extent, generator=g, return_params=True)
    else:
        v, draws = vm(_images(6, 40, 6), generator=g, return_params=True)
    fields = [getattr(d, k) for d in draws for k in FIELDS]
    return _digest(v), _digest(fields), torch.rand(1, generator=g).item()


@pytest.fixture
def one_thread():
    # The digests were taken on one thread (two gave the same); pin it so a matmul's blocking cannot vary.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("name", sorted(CASES))
def test_seeded_views_and_draws_are_unchanged(name, one_thread):
    assert run_case(name) == EXPECTED[name]


class _DrawsThree(ViewOp):
    """A stand-in for a new augmentation: three draws per sample, no pixel change."""

    def sample(self, c, drawn):
        c.rand((c.n, 3))
        return {}


class _WithNewOp(ViewMaker):
    ROUNDS = ViewMaker.ROUNDS + ((_DrawsThree,),)


@pytest.mark.parametrize("name", ["decode_once_extent", "per_view"])
def test_an_op_added_as_a_last_round_keeps_every_earlier_draw(name, one_thread):
    views, draws, after = run_case(name, _WithNewOp)
    assert (views, draws) == EXPECTED[name][:2]
    assert after != EXPECTED[name][2]            # it did draw: after every view's recipe draws
