"""fastmveb.views: contract, per-sample randomness rates, pixel effects, fidelity to PIL/torchvision."""
from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

from fastmveb.config import ViewsConfig
from fastmveb.views import (ViewMaker, blur_kernels, color_jitter, gaussian_blur, resized_crop,
                            sample_crop_boxes, shift_hue, view_sizes)

SMALL = dict(global_size=24, local_size=12)
IN = 32


def small_cfg(**kw) -> ViewsConfig:
    return ViewsConfig(**{**SMALL, **kw})


def quiet_cfg(**kw) -> ViewsConfig:
    """Every random effect off unless switched back on."""
    base = dict(flip_p=0.0, jitter_p=0.0, gray_p=0.0, blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0))
    return small_cfg(**{**base, **kw})


def images(n=4, size=IN, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


def unnormalise(v, cfg):
    mean = torch.tensor(cfg.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std).view(1, 3, 1, 1)
    return v.float() * std + mean


def within_binomial(hits: torch.Tensor, p: float, sigmas: float = 5.0) -> bool:
    n = hits.numel()
    rate = hits.float().mean().item()
    return abs(rate - p) <= sigmas * math.sqrt(max(p * (1 - p), 1e-12) / n) + 1e-9


# ------------------------------------------------------------------------------------------------ contract
def test_shapes_dtype_memory_format():
    cfg = small_cfg()
    vm = ViewMaker(cfg)
    v = vm(images())
    assert vm.n_views == len(v) == 2 + cfg.n_local
    assert [tuple(t.shape) for t in v] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * cfg.n_local
    assert view_sizes(cfg) == [t.shape[-1] for t in v]            # the one home of the sizes says the same
    for t in v:
        assert t.dtype == torch.float32
        assert t.is_contiguous(memory_format=torch.channels_last)
        assert torch.isfinite(t).all()


def test_two_view_config_bf16_and_contiguous():
    cfg = small_cfg(n_local=0, dtype="bfloat16", channels_last=False)
    vm = ViewMaker(cfg)
    v = vm(images())
    assert vm.n_views == len(v) == 2
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in v)


def test_bad_inputs_raise():
    vm = ViewMaker(small_cfg(n_local=1))
    with pytest.raises(TypeError):
        vm(images().float())
    with pytest.raises(ValueError):
        vm([images(size=24)] * 2)                      # 3 views need 3 batches
    with pytest.raises(ValueError):
        vm([images(size=24)] * 3)                      # the local batch must be 12 px


def test_per_view_mode():
    cfg = small_cfg(n_local=2)
    vm = ViewMaker(cfg)
    xs = [images(size=24, seed=1), images(size=24, seed=2), images(size=12, seed=3), images(size=12, seed=4)]
    v, params = vm(xs, return_params=True)
    assert [tuple(t.shape) for t in v] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)] * 2
    assert torch.equal(params[0].box[0], torch.tensor([0.0, 0.0, 24.0, 24.0]))
    # No crop in this mode: with every effect off a view is the input, normalised (flip aside).
    q = ViewMaker(quiet_cfg(n_local=2))
    out = q(xs)
    assert torch.allclose(unnormalise(out[2], q.cfg), xs[2].float() / 255, atol=1e-5)


# --------------------------------------------------------------------------------------------- randomness
def test_rates_match_probabilities():
    cfg = small_cfg(n_local=2)
    n = 4000
    torch.manual_seed(0)
    params = ViewMaker(cfg).sample_params(n, (IN, IN), torch.device("cpu"))
    blur_p = [cfg.blur_p[0], cfg.blur_p[1], cfg.blur_p[2], cfg.blur_p[2]]
    sol_p = [cfg.solarize_p[0], cfg.solarize_p[1], cfg.solarize_p[2], cfg.solarize_p[2]]
    for i, p in enumerate(params):
        assert within_binomial(p.flip, cfg.flip_p), i
        assert within_binomial(p.jitter, cfg.jitter_p), i
        assert within_binomial(p.gray, cfg.gray_p), i
        assert within_binomial(p.blur, blur_p[i]), i
        assert within_binomial(p.solarize, sol_p[i]), i
        j = p.jitter
        assert (p.brightness[~j] == 1).all() and (p.hue[~j] == 0).all()
        b, c, s, h = p.brightness[j], p.contrast[j], p.saturation[j], p.hue[j]
        assert b.min() >= 1 - cfg.brightness and b.max() <= 1 + cfg.brightness
        assert c.min() >= 1 - cfg.contrast and c.max() <= 1 + cfg.contrast
        assert s.min() >= 1 - cfg.saturation and s.max() <= 1 + cfg.saturation
        assert h.abs().max() <= cfg.hue and h.abs().max() > 0.9 * cfg.hue
        assert abs(b.mean().item() - 1) < 0.02
        assert torch.equal(p.order.sort(1).values, torch.arange(4).expand(n, 4))
        assert len({tuple(r) for r in p.order.tolist()}) == 24           # every permutation occurs
        sig = p.sigma
        assert sig.min() >= cfg.blur_sigma[0] and sig.max() <= cfg.blur_sigma[1]
    # Draws are independent across views of the same image.
    assert not torch.equal(params[0].flip, params[1].flip)


def test_crop_boxes_in_range_and_like_torchvision():
    n, h, w = 3000, 64, 48
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    torch.manual_seed(1)
    b = sample_crop_boxes(n, h, w, scale, ratio, torch.device("cpu"))
    top, left, bh, bw = b.unbind(1)
    assert torch.equal(b, b.round())
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    area = bh * bw / (h * w)
    ar = bw / bh
    # Rounding to whole pixels widens the ranges a little; the fallback (whole image) is in range too.
    assert area.min() >= scale[0] * 0.8 and area.max() <= scale[1]
    assert ar.min() >= ratio[0] * 0.9 and ar.max() <= ratio[1] * 1.1
    # Same distribution as torchvision's sequential rule (means of area, ratio, centre).
    import torchvision.transforms as T
    img = torch.zeros(1, h, w)
    ref = torch.tensor([T.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(3000)],
                       dtype=torch.float32)
    ref_area = ref[:, 2] * ref[:, 3] / (h * w)
    assert abs(area.mean() - ref_area.mean()) < 0.03
    assert abs(ar.mean() - (ref[:, 3] / ref[:, 2]).mean()) < 0.03
    assert abs((left + bw / 2).mean() - (ref[:, 1] + ref[:, 3] / 2).mean()) < 1.0


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    grid = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, grid, right=True) / len(a)
    cdf_b = torch.searchsorted(b, grid, right=True) / len(b)
    return (cdf_a - cdf_b).abs().max().item()


@pytest.mark.parametrize("hw", [(375, 500), (500, 333)])
@pytest.mark.parametrize("scale", [(0.4, 1.0), (0.05, 0.4)])
def test_crop_scale_relative_to_whole_image_matches_torchvision(hw, scale):
    """Decode once: boxes drawn on each image's true extent (not the canvas) follow torchvision's
    RandomResizedCrop.get_params on an image of that size, in area, aspect and position (KS, n = 4000)."""
    import torchvision.transforms as T
    n, (h, w) = 4000, hw
    cfg = small_cfg(n_local=1, global_scale=scale, local_scale=scale)
    torch.manual_seed(0)
    extent = torch.tensor([h, w], dtype=torch.int32).expand(n, 2)
    p = ViewMaker(cfg).sample_params(n, (IN, IN), torch.device("cpu"), extent=extent)[0]
    top, left, bh, bw = p.image_box.unbind(1)
    img = torch.zeros(1, h, w)
    ref = torch.tensor([T.RandomResizedCrop.get_params(img, list(scale), list(cfg.ratio)) for _ in range(n)],
                       dtype=torch.float32)
    rt, rl, rh, rw = ref.unbind(1)
    # 5% KS critical value for n = m = 4000 is 0.030; 0.045 is below 0.1% (seeded: the test is deterministic).
    assert _ks(bh * bw / (h * w), rh * rw / (h * w)) < 0.045
    assert _ks(bw / bh, rw / rh) < 0.045
    assert _ks((left + bw / 2) / w, (rl + rw / 2) / w) < 0.045
    assert _ks((top + bh / 2) / h, (rt + rh / 2) / h) < 0.045
    # The canvas box is the same box, scaled per axis to the canvas.
    assert torch.allclose(p.box, p.image_box * torch.tensor([IN / h, IN / w, IN / h, IN / w]))


def test_crops_reach_the_four_edges_of_the_true_extent():
    n = 2000
    extent = torch.tensor([[40, 90], [90, 40]], dtype=torch.int32).repeat(n // 2, 1)
    torch.manual_seed(0)
    p = ViewMaker(small_cfg(n_local=0)).sample_params(n, (IN, IN), torch.device("cpu"), extent=extent)[0]
    for k in (0, 1):
        top, left, bh, bw = p.image_box[k::2].unbind(1)
        h, w = extent[k].tolist()
        assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
        assert (top == 0).any() and (left == 0).any() and (top + bh == h).any() and (left + bw == w).any()
        c = p.box[k::2]
        assert c[:, 0].min() == 0 and c[:, 1].min() == 0
        assert torch.isclose((c[:, 0] + c[:, 2]).max(), torch.tensor(float(IN)))
        assert torch.isclose((c[:, 1] + c[:, 3]).max(), torch.tensor(float(IN)))


def test_views_from_the_squeezed_canvas_match_crops_of_the_full_image():
    """A canvas holding the whole image at S x S plus the extent gives the view a crop of the full-resolution
    image gives (the box is mapped, the aspect restored), up to the canvas' resampling loss."""
    torch.manual_seed(0)
    h, w, s = 60, 100, 48
    full = F.interpolate(torch.rand(4, 3, 6, 10), size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)
    canvas = F.interpolate(full, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
    x = (canvas * 255).round().to(torch.uint8)
    vm = ViewMaker(quiet_cfg(n_local=1))
    extent = torch.tensor([[h, w]] * 4)
    v, params = vm(x, extent, return_params=True)
    for view, p, size in zip(v, params, (24, 24, 12)):
        ref = resized_crop(full, p.image_box, size)
        got = unnormalise(view, vm.cfg)
        assert (got - ref).abs().mean() < 0.01
        # Treating the canvas as the image (no extent) would cut another region of the photo.
        wrong = resized_crop(full, p.box, size)
        assert (got - wrong).abs().mean() > 3 * (got - ref).abs().mean()
    with pytest.raises(ValueError):
        vm(x, extent[:3])


def test_crop_fallback_is_centred_and_valid():
    # A 4 x 64 strip with a near-full area: no try fits, so torchvision's centre-crop fallback applies.
    b = sample_crop_boxes(50, 4, 64, (0.9, 1.0), (3 / 4, 4 / 3), torch.device("cpu"))
    assert torch.equal(b, torch.tensor([0.0, 29.0, 4.0, 5.0]).expand(50, 4))


def test_seed_reproducible_and_samples_differ():
    vm = ViewMaker(small_cfg(n_local=2))
    x = images(8)
    torch.manual_seed(123)
    a = vm(x)
    torch.manual_seed(123)
    b = vm(x)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    c, pc = vm(x, generator=g1, return_params=True)
    d = vm(x, generator=g2)
    assert all(torch.equal(u, v) for u, v in zip(c, d))
    assert not torch.equal(a[0], c[0])
    assert not torch.equal(a[0], a[1])                        # the two global views differ
    boxes = pc[0].box
    assert len({tuple(r) for r in boxes.tolist()}) > 1        # samples get their own crops
    assert pc[0].hue.unique().numel() > 1


# ------------------------------------------------------------------------------------------- pixel effects
def test_flip_mirrors():
    cfg = quiet_cfg(n_local=0)
    vm = ViewMaker(cfg)
    x = images(3)
    params = vm.sample_params(3, (IN, IN), torch.device("cpu"))
    plain = vm.render(x, params)
    flipped = vm.render(x, [replace(p, flip=torch.ones(3, dtype=torch.bool)) for p in params])
    assert torch.allclose(flipped[0], plain[0].flip(3), atol=1e-5)
    # And in per-view mode.
    xs = [images(3, 24), images(3, 24, seed=1)]
    pv = vm.sample_params(3, None, torch.device("cpu"))
    on = vm.render(xs, [replace(p, flip=torch.tensor([True, False, True])) for p in pv])
    off = vm.render(xs, [replace(p, flip=torch.zeros(3, dtype=torch.bool)) for p in pv])
    assert torch.allclose(on[1][0], off[1][0].flip(2)) and torch.allclose(on[1][1], off[1][1])


def test_grayscale_equal_channels_and_solarize_inverts():
    cfg = quiet_cfg(n_local=0, gray_p=0.5, solarize_p=(0.0, 1.0, 0.0))
    vm = ViewMaker(cfg)
    x = images(64)
    torch.manual_seed(0)
    v, params = vm(x, return_params=True)
    u = unnormalise(v[0], cfg)
    gray = params[0].gray
    assert 0 < gray.sum() < 64
    spread = (u.amax(1) - u.amin(1)).flatten(1).amax(1)
    assert (spread[gray] < 1e-5).all() and (spread[~gray] > 0.1).all()
    # View 2 always solarizes: compare with the same parameters, solarize off.
    off = vm.render(x, [params[0], replace(params[1], solarize=torch.zeros(64, dtype=torch.bool))])
    a, b = unnormalise(v[1], cfg), unnormalise(off[1], cfg)
    hi = b >= cfg.solarize_threshold
    assert hi.any() and (~hi).any()
    assert torch.allclose(a[hi], 1 - b[hi], atol=1e-5) and torch.allclose(a[~hi], b[~hi], atol=1e-5)


@pytest.mark.parametrize("interp,pil", [("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)])
def test_crop_matches_pil_resized_crop(interp, pil):
    x = images(12, 48, seed=3)
    boxes = sample_crop_boxes(12, 48, 48, (0.05, 1.0), (3 / 4, 4 / 3), torch.device("cpu"),
                              torch.Generator().manual_seed(0))
    for size in (20, 40, 64):                                 # down- and up-sampling
        out = resized_crop(x.float() / 255, boxes, size, interp, antialias=True)
        for i in range(12):
            t, l, h, w = (int(a) for a in boxes[i])
            if interp == "bicubic" and h > w:
                continue    # Pillow resizes rows first here; its mid-pass clip then differs (views.py)
            im = Image.fromarray(x[i].permute(1, 2, 0).numpy()).crop((l, t, l + w, t + h))
            ref = torch.from_numpy(np.array(im.resize((size, size), pil))).permute(2, 0, 1).float() / 255
            # PIL rounds to uint8 (after each pass): 1/255 plus float slack.
            assert (out[i] - ref).abs().max() <= 1.2 / 255, (size, i)


def test_crop_without_antialias_is_point_sampled():
    x = images(4, 32).float() / 255
    boxes = torch.tensor([[0.0, 0.0, 32.0, 32.0]]).expand(4, 4)
    # Same size, whole image: both paths are the identity.
    assert torch.allclose(resized_crop(x, boxes, 32, "bilinear", antialias=False), x, atol=1e-5)
    assert torch.allclose(resized_crop(x, boxes, 32, "bilinear", antialias=True), x, atol=1e-5)
    # Halving: antialiasing averages 4 pixels per output; point sampling does not low-pass noise.
    aa = resized_crop(x, boxes, 16, "bilinear", antialias=True)
    pt = resized_crop(x, boxes, 16, "bilinear", antialias=False)
    assert aa.std() < 0.75 * pt.std()


@pytest.mark.parametrize("order", ["random", "fixed"])
def test_jitter_matches_torchvision(order):
    torch.manual_seed(0)
    n = 24
    x = torch.rand(n, 3, 8, 8)
    p = SimpleNamespace(brightness=0.6 + 0.8 * torch.rand(n), contrast=0.6 + 0.8 * torch.rand(n),
                        saturation=0.8 + 0.4 * torch.rand(n), hue=0.2 * torch.rand(n) - 0.1,
                        order=torch.argsort(torch.rand(n, 4), 1))
    out = color_jitter(x, p, order)
    fns = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    keys = ["brightness", "contrast", "saturation", "hue"]
    for i in range(n):
        y = x[i]
        for op in (p.order[i].tolist() if order == "random" else range(4)):
            y = fns[op](y, getattr(p, keys[op])[i].item())
        assert torch.allclose(out[i], y, atol=1e-4), i


def test_hue_shift_matches_torchvision_and_is_identity_at_zero():
    x = torch.rand(5, 3, 16, 16)
    s = torch.tensor([0.0, 0.1, -0.1, 0.5, -0.37])
    ref = torch.stack([TF.adjust_hue(x[i], s[i].item()) for i in range(5)])
    assert torch.allclose(shift_hue(x, s), ref, atol=1e-5)
    assert torch.allclose(shift_hue(x, torch.zeros(5)), x, atol=1e-6)


def test_blur_per_sample_sigma_and_identity():
    torch.manual_seed(0)
    x = torch.rand(3, 3, 40, 40)
    sigma = torch.tensor([0.5, 2.0, 2.0])
    blur = torch.tensor([True, True, False])
    y = gaussian_blur(x, blur_kernels(sigma, blur, radius=6))
    assert torch.equal(y[2], x[2])                            # not blurred: exactly unchanged
    assert y[1].std() < y[0].std() < x[0].std()               # wider sigma, smoother
    # Interior matches torchvision's Gaussian blur of the same sigma (padding differs only at the edges).
    ref = TF.gaussian_blur(x[1], [13, 13], [2.0, 2.0])
    assert torch.allclose(y[1][:, 6:-6, 6:-6], ref[:, 6:-6, 6:-6], atol=1e-5)


# ------------------------------------------------------------------------------------------------ compile
@pytest.mark.parametrize("order", ["random", "fixed"])
def test_torch_compile_aot_eager_same_result(order):
    # One graph (fullgraph) with Kornia's ops inside (the fixed order adds Kornia's brightness and saturation).
    vm = ViewMaker(small_cfg(n_local=1, jitter_order=order))
    compiled = torch.compile(vm, backend="aot_eager", fullgraph=True)
    x = images(4)
    torch.manual_seed(5)
    a = compiled(x, return_params=True)[0]     # every draw used: the graph drops none (the fixed order's permutation)
    torch.manual_seed(5)
    b = vm(x)
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(a, b))


def _compiled_views_at_two_batch_sizes(backend: str):
    """A partial last batch (drop_last=false) makes dynamo recompile with a dynamic batch size; an explicit
    torch.rand(..., generator=None) then failed ("SymIntArrayRef expected to contain only concrete integers")."""
    vm = ViewMaker(quiet_cfg(n_local=0))        # the smallest graph that draws crop boxes and gates
    compiled = torch.compile(vm, backend=backend)
    for n in (4, 3, 5):                          # 3: the recompile with a symbolic batch size; 5: reuses it
        x = images(n)
        v = compiled(x, torch.tensor([[30, 50]] * n), return_params=True)[0]
        assert [tuple(t.shape) for t in v] == [(n, 3, 24, 24)] * 2 and all(torch.isfinite(t).all() for t in v)
    # aot_eager draws as eager does once every draw is used (returned): same views, crop maths included.
    # (Without return_params the graph drops draws whose effect is off here, which shifts later draws.)
    torch.manual_seed(3)
    a = compiled(images(3), torch.tensor([[30, 50]] * 3), return_params=True)[0]
    torch.manual_seed(3)
    b = vm(images(3), torch.tensor([[30, 50]] * 3))
    return a, b


def test_compiled_views_survive_a_batch_size_change():
    a, b = _compiled_views_at_two_batch_sizes("aot_eager")
    assert all(torch.allclose(u, v, atol=1e-5) for u, v in zip(a, b))


@pytest.mark.slow
def test_compiled_views_survive_a_batch_size_change_inductor():
    # Inductor on CPU: ~4 minutes of C++ compilation on a loaded 2-core box, hence slow.
    _compiled_views_at_two_batch_sizes("inductor")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_contract_and_no_host_sync():
    vm = ViewMaker(small_cfg()).cuda()
    x = images(8).cuda()
    torch.cuda.set_sync_debug_mode("error")                   # any device->host sync raises
    try:
        v = vm(x)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(t.is_cuda and t.is_contiguous(memory_format=torch.channels_last) for t in v)
