"""Views benchmark: ``python -m fastmveb.bench views [--short] [--device cpu|cuda] [--batch N]``.

Images per second through each op of fastmveb.views (beside the Kornia augmentation module it replaces), through
each Kornia functional op the views use or could use beside the same maths in own code (kinds "own" /
"kornia", timed in interleaved rounds; kornia_over_own below 1: Kornia is faster), and through the whole
recipe, two-view (2x224) and multi-crop (2x224 + 6x96), from a uint8 batch of decoded 256x256 images; beside
the released recipe's per-sample PIL transforms (fastmveb/bench/reference/released_transforms.py) on the same
images, in one process and in a pool of one process per core. Rows report images/s: for an op, samples through
that op for one view; for a recipe, source images turned into all their views.
"""
from __future__ import annotations

import math
import multiprocessing as mp
import os
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from fastmveb.bench.common import environment, markdown_table, pick_device, time_fn, write_results
from fastmveb.config import ViewsConfig
from fastmveb.views import (ViewMaker, blend_toward, blur_kernels, color_jitter, gaussian_blur,
                            resized_crop, sample_crop_boxes, shift_hue)

DECODE = 256


def add_args(parser) -> None:
    parser.add_argument("--batch", type=int, default=None, help="images per batch (default 64 CPU / 256 CUDA)")
    parser.add_argument("--no-pil", action="store_true", help="skip the PIL baseline")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(ViewMaker) (inductor)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's). On a shared, loaded box 1 thread measured 3x "
                             "faster than 2 (OpenMP under oversubscription); compare with the 1-process PIL row")


def _images(n: int, device) -> torch.Tensor:
    """Decoded-photo stand-in: smooth colour fields plus texture and noise (content does not change the
    cost of these ops, but hue/solarize branches see a realistic mix of values)."""
    g = torch.Generator().manual_seed(0)
    low = torch.rand(n, 3, 8, 8, generator=g)
    x = F.interpolate(low, size=(DECODE, DECODE), mode="bicubic", align_corners=False)
    x = x + 0.15 * torch.rand(n, 3, DECODE, DECODE, generator=g)
    return (x.clamp(0, 1) * 255).to(torch.uint8).to(device)


# ------------------------------------------------------------------------------------- alternatives
def _supersampled_crop(x, boxes, size, factor: int = 2):
    """Cheap antialias alternative: point-sample the crop at factor x size, then box-average."""
    return F.avg_pool2d(resized_crop(x, boxes, size * factor, "bilinear", antialias=False), factor)


def _shifted_sum_blur(x, kernels):
    n, c, h, w = x.shape
    k = kernels.shape[1]
    r = k // 2
    y = F.pad(x, (r, r, r, r), mode="replicate")
    acc = sum(kernels[:, i, None, None, None] * y[:, :, i:i + h, :] for i in range(k))
    return sum(kernels[:, i, None, None, None] * acc[:, :, :, i:i + w] for i in range(k))


def _kornia_ops(size, scale, blur_radius):
    import kornia.augmentation as K
    return {
        "crop (kornia RandomResizedCrop, resample)": K.RandomResizedCrop((size, size), scale=scale,
                                                                         cropping_mode="resample"),
        "jitter (kornia ColorJitter p=0.8)": K.ColorJitter(0.4, 0.4, 0.2, 0.1, p=0.8),
        "blur (kornia RandomGaussianBlur p=1)": K.RandomGaussianBlur(
            (2 * blur_radius + 1, 2 * blur_radius + 1), (0.1, 2.0), p=1.0),
    }


def _own_vs_kornia(v, p, radius):
    """(op, own code, Kornia functional op) computing the same thing on a batch of 224-px views (per-sample
    parameters from the recipe's sampler; tests/test_views.py pins each to torchvision's maths)."""
    import kornia.color as KC
    import kornia.enhance as KE
    import kornia.filters as KF
    n = v.shape[0]
    one, zero = torch.ones(n, device=v.device), torch.zeros(n, device=v.device)
    b, c, s_, h = p.brightness, p.contrast, p.saturation, p.hue
    kern = blur_kernels(p.sigma, torch.ones_like(p.blur), radius)
    mean = torch.tensor([0.485, 0.456, 0.406], device=v.device)
    std = torch.tensor([0.229, 0.224, 0.225], device=v.device)
    inv, shift = (1 / std).view(1, 3, 1, 1), (-mean / std).view(1, 3, 1, 1)
    thr = torch.where(torch.arange(n, device=v.device) % 2 == 0, 0.5, 2.0)
    luma = (0.299, 0.587, 0.114)

    def own_blur(x):             # grouped conv on a (1, N*C, H, W) view, as views.py had before Kornia
        nn_, cc, hh, ww = x.shape
        kk = kern.shape[1]
        wgt = kern.repeat_interleave(cc, dim=0)
        y = F.pad(x.reshape(1, nn_ * cc, hh, ww), (radius,) * 4, mode="replicate")
        y = F.conv2d(y, wgt.view(nn_ * cc, 1, kk, 1), groups=nn_ * cc)
        return F.conv2d(y, wgt.view(nn_ * cc, 1, 1, kk), groups=nn_ * cc).view(nn_, cc, hh, ww)

    return [
        ("brightness (torchvision: clamp(f x))", lambda: blend_toward(v, b, zero, zero),
         lambda: KE.adjust_contrast(v, b)),
        ("contrast (blend with mean gray)", lambda: blend_toward(v, c, zero, one),
         lambda: KE.adjust_contrast_with_mean_subtraction(v, c)),
        ("saturation (blend with gray)", lambda: blend_toward(v, s_, one, zero),
         lambda: KE.adjust_saturation_with_gray_subtraction(v, s_)),
        ("hue shift", lambda: shift_hue(v, h), lambda: KE.adjust_hue(v, h * (2 * math.pi))),
        ("grayscale", lambda: luma[0] * v[:, 0:1] + luma[1] * v[:, 1:2] + luma[2] * v[:, 2:3],
         lambda: KC.rgb_to_grayscale(v)),
        (f"blur {2 * radius + 1} taps per-sample sigma", lambda: own_blur(v),
         lambda: KF.filter2d_separable(v, kern, kern, border_type="replicate")),
        ("solarize per-sample", lambda: torch.where((thr < 1)[:, None, None, None] & (v >= 0.5), 1.0 - v, v),
         lambda: KE.solarize(v, thr)),
        ("normalise", lambda: torch.addcmul(shift, v, inv), lambda: KE.normalize(v, mean, std)),
    ]


# ------------------------------------------------------------------------------------------- PIL baseline
def _pil_worker(args):
    from PIL import Image
    from fastmveb.bench.reference.released_transforms import released_transform
    arr, n_local, seed = args
    torch.manual_seed(seed)
    torch.set_num_threads(1)
    tf = released_transform(n_local)
    imgs = [Image.fromarray(a) for a in arr]
    t0 = time.perf_counter()
    for im in imgs:
        tf(im)
    return len(imgs), time.perf_counter() - t0


def _pil_rate(x_cpu: torch.Tensor, n_local: int, procs: int) -> float:
    """Images/s of the released per-sample transform; with procs > 1, one process per core, each timing
    its own share (the PIL -> image conversion is outside the timed region)."""
    arr = x_cpu.permute(0, 2, 3, 1).contiguous().numpy()
    if procs == 1:
        n, dt = _pil_worker((arr, n_local, 0))
        return n / dt
    chunks = [(arr[i::procs], n_local, i) for i in range(procs)]
    with mp.get_context("spawn").Pool(procs) as pool:
        pool.map(_pil_worker, [(c[0][:2], n_local, 0) for c in chunks])   # warm the workers' imports
        t0 = time.perf_counter()
        pool.map(_pil_worker, chunks)
        wall = time.perf_counter() - t0
    return len(arr) / wall


# ------------------------------------------------------------------------------------------------ main
class _Rows:
    """The rows of one run; ``add`` times ``fn`` (images through it per call) and prints its rate."""

    def __init__(self, device, iters: int):
        self.device, self.iters, self.rows = device, iters, []

    def add(self, name, fn, per_call_images, kind):
        t = time_fn(fn, self.device, warmup=1, iters=self.iters)
        self.rows.append({"what": name, "kind": kind, "images_per_s": per_call_images / t, "ms_per_call": 1e3 * t})
        print(f"{name:58s} {per_call_images / t:10,.0f} img/s")


def _crop_rows(out: _Rows, xf, n: int, cfg: ViewsConfig, radius: int) -> None:
    """Per-op rows: one view's worth of work, ours beside the alternatives measured for each choice."""
    for size, scale in ((cfg.global_size, cfg.global_scale), (cfg.local_size, cfg.local_scale)):
        boxes = sample_crop_boxes(n, DECODE, DECODE, scale, cfg.ratio, out.device)
        tag = f"@{size}"
        out.add(f"crop{tag} ours separable bilinear+AA (PIL BILINEAR)",
                lambda: resized_crop(xf, boxes, size, "bilinear", True), n, "op")
        out.add(f"crop{tag} ours separable bicubic+AA (PIL BICUBIC)",
                lambda: resized_crop(xf, boxes, size, "bicubic", True), n, "op")
        out.add(f"crop{tag} ours antialias=False (grid_sample bilinear)",
                lambda: resized_crop(xf, boxes, size, "bilinear", False), n, "op")
        out.add(f"crop{tag} grid_sample 2x supersample + avgpool",
                lambda: _supersampled_crop(xf, boxes, size), n, "alt")
        ops = _kornia_ops(size, scale, radius)
        crop_k = ops.pop("crop (kornia RandomResizedCrop, resample)")
        out.add(f"crop{tag} kornia RandomResizedCrop resample, no AA", lambda: crop_k(xf), n, "kornia")


def _jitter_blur_rows(out: _Rows, v, p: dict, n: int, cfg: ViewsConfig, radius: int) -> None:
    out.add("jitter@224 ours, per-sample random order", lambda: color_jitter(v, p, "random"), n, "op")
    out.add("jitter@224 ours, fixed order", lambda: color_jitter(v, p, "fixed"), n, "op")
    out.add("  of which one blend (b/c/s)", lambda: blend_toward(v, p.contrast, p.contrast * 0,
                                                                 p.contrast * 0 + 1), n, "op")
    out.add("  of which one hue shift", lambda: shift_hue(v, p.hue), n, "op")
    ops = _kornia_ops(224, cfg.global_scale, radius)
    jit_k, blur_k = ops["jitter (kornia ColorJitter p=0.8)"], ops["blur (kornia RandomGaussianBlur p=1)"]
    out.add("jitter@224 kornia ColorJitter p=0.8 (batch order)", lambda: jit_k(v), n, "kornia")
    kern = blur_kernels(p.sigma, torch.ones_like(p.blur), radius)
    out.add(f"blur@224 ours grouped conv ({2 * radius + 1} taps, per-sample sigma)",
            lambda: gaussian_blur(v, kern), n, "op")
    out.add("blur@224 shifted multiply-adds", lambda: _shifted_sum_blur(v, kern), n, "alt")
    out.add("blur@224 kornia RandomGaussianBlur p=1", lambda: blur_k(v), n, "kornia")


def _own_vs_kornia_rows(out: _Rows, v, p: dict, n: int, radius: int) -> None:
    """Own code vs Kornia's functional op, same maths: interleaved rounds, median of each."""
    for op, own, kor in _own_vs_kornia(v, p, radius):
        t_own, t_kor = [], []
        for _ in range(3):
            t_own.append(time_fn(own, out.device, warmup=1, iters=out.iters))
            t_kor.append(time_fn(kor, out.device, warmup=1, iters=out.iters))
        t_own, t_kor = sorted(t_own)[1], sorted(t_kor)[1]
        out.rows.append({"what": f"{op}@224 own code", "kind": "own", "images_per_s": n / t_own,
                         "ms_per_call": 1e3 * t_own})
        out.rows.append({"what": f"{op}@224 kornia functional", "kind": "kornia", "images_per_s": n / t_kor,
                         "ms_per_call": 1e3 * t_kor, "kornia_over_own": t_kor / t_own})
        print(f"{op:40s} own {1e3 * t_own:8.2f} ms  kornia {1e3 * t_kor:8.2f} ms  ratio {t_kor / t_own:.2f}")


RECIPES = (("two-view 2x224", 0), ("multi-crop 2x224+6x96", 6))


def _recipe_rows(out: _Rows, x8, n: int, compile_: bool) -> None:
    """The whole recipe, uint8 batch in, every view out."""
    for name, n_local in RECIPES:
        rcfg = ViewsConfig(n_local=n_local)
        for order in ("random", "fixed"):
            vm = ViewMaker(ViewsConfig(n_local=n_local, jitter_order=order)).to(out.device)
            out.add(f"recipe {name} ours (jitter {order})", lambda: vm(x8), n, "recipe")
        vmb = ViewMaker(ViewsConfig(n_local=n_local, dtype="bfloat16", interpolation="bicubic")).to(out.device)
        out.add(f"recipe {name} ours (bicubic, bf16 out)", lambda: vmb(x8), n, "recipe")
        if compile_:
            vmc = torch.compile(ViewMaker(rcfg).to(out.device))
            out.add(f"recipe {name} ours compiled (inductor)", lambda: vmc(x8), n, "recipe")


def _pil_rows(out: _Rows, x8, n: int, short: bool) -> None:
    """The released per-sample PIL transforms on the same images, in one process and one process per core."""
    x_cpu = x8.cpu()
    pil_n = min(n, 8 if short else 48)
    procs = os.cpu_count() or 1
    for name, n_local in RECIPES:
        r1 = _pil_rate(x_cpu[:pil_n], n_local, 1)
        out.rows.append({"what": f"recipe {name} released PIL, 1 process", "kind": "pil-cpu",
                         "images_per_s": r1, "ms_per_call": None})
        print(f"recipe {name} released PIL, 1 process: {r1:,.1f} img/s")
        if procs > 1:
            rp = _pil_rate(x_cpu[:max(pil_n, 2 * procs)], n_local, procs)
            out.rows.append({"what": f"recipe {name} released PIL, {procs} processes", "kind": "pil-cpu",
                             "images_per_s": rp, "ms_per_call": None})
            print(f"recipe {name} released PIL, {procs} processes: {rp:,.1f} img/s")


def main(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    n = args.batch or (256 if cuda else (16 if args.short else 64))
    iters = 2 if args.short else 5
    x8 = _images(n, device)
    xf = x8.float() / 255
    out = _Rows(device, iters)

    torch.manual_seed(0)
    cfg = ViewsConfig()
    radius = int(math.ceil(3 * cfg.blur_sigma[1]))
    with torch.no_grad():
        _crop_rows(out, xf, n, cfg, radius)
        v = resized_crop(xf, sample_crop_boxes(n, DECODE, DECODE, cfg.global_scale, cfg.ratio, device), 224)
        vm = ViewMaker(cfg).to(device)
        p = vm.sample_params(n, (DECODE, DECODE), device)[0]
        p = replace(p, jitter=torch.ones_like(p.jitter))
        _jitter_blur_rows(out, v, p, n, cfg, radius)
        _own_vs_kornia_rows(out, v, p, n, radius)
        tail = ViewMaker(ViewsConfig(jitter_p=0.0, blur_p=(0.0, 0.0, 0.0))).to(device)
        out.add("flip+gray+solarize+normalise+cast@224 ours", lambda: tail.render_view(
            v, tail.specs[1], p, crop=False), n, "op")
        _recipe_rows(out, x8, n, args.compile)
    if not args.no_pil:
        _pil_rows(out, x8, n, args.short)
    env = environment(device)
    settings = {"batch": n, "decode": DECODE, "iters": iters, "short": bool(args.short),
                "threads": torch.get_num_threads(), "device": str(device),
                # The CPU box is shared: a load above the core count makes every CPU number pessimistic.
                "loadavg_1min_at_end": round(os.getloadavg()[0], 2)}
    columns = ["what", "kind", "images_per_s", "ms_per_call", "kornia_over_own"]
    path = write_results("views", env, settings, out.rows, columns, out_dir=args.out_dir)
    print(markdown_table(out.rows, columns))
    print(f"wrote {path}")
