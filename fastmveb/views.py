"""GPU multi-view augmentation: every MVEB view cut and augmented from a uint8 batch in batched tensor ops.

    vm = ViewMaker(cfg.views).to(device)
    v = vm(x, extent)                # decode once: x uint8 (N, 3, S, S) holds each WHOLE image resized to S x S
                                     # (aspect not kept), extent (N, 2) its own (H, W); every view is cut from it
    v = vm(x)                        # x is the image itself (no extent): crops are sampled on x's own H, W
    v = vm([x1, x2, l1, ...])        # per-view decode: uint8 (N, 3, size, size) per view, already cropped
    v, params = vm(x, return_params=True)   # the per-sample draws, for tests and debugging

``v`` is [global 1, global 2, local 1 .. local n_local], each (N, 3, size, size), normalised with the ImageNet
mean/std, in ``cfg.dtype`` and channels_last when ``cfg.channels_last``. The recipe per view follows the
released MVEB views (docs/method.md), which are torchvision v1 transforms on PIL images:
random resized crop -> horizontal flip -> colour jitter (p) -> grayscale (p) -> Gaussian blur (p) ->
solarize (p) -> normalise. Every random draw is per sample, made with torch's RNG on x's device
(``torch.manual_seed`` or a ``torch.Generator`` on that device makes it reproducible), with no host sync and
no Python branch on a random value, so the whole module compiles as one graph.

Kornia's functional ops (kornia.enhance, kornia.filters, kornia.color, kornia.geometry) do the work wherever
they compute the recipe's (torchvision's) maths with per-sample tensor parameters: grayscale, the fixed-order
brightness and saturation, Gaussian kernels and the separable blur, solarize, the per-view flip. Own code
remains where Kornia lacks the operation or measured slower (each with a one-line reason; numbers in the
views benchmark's own/kornia rows): the antialiased per-sample resized crop, the per-sample random jitter
order (one fused blend per stage), the fixed order's contrast, the hue shift, normalisation and the
per-sample crop sampler.
Kornia's augmentation modules are not used: their RandomResizedCrop loops per sample or skips antialiasing,
p < 1 ops compute every sample anyway, ColorJitter uses one order per batch, containers break torch.compile
graphs and parameters are sampled on the CPU (numbers: ``python -m fastmveb.bench views``).

Semantics worth knowing:
- Crop: torchvision's RandomResizedCrop rule exactly (10 tries of area/log-ratio, integer box, centre-crop
  fallback), vectorised over samples and tries, on each image's own extent (H, W): scale and ratio are
  relative to the whole image as in the released recipe. The box is then mapped to the canvas (a fractional
  box when the canvas squeezed the image) and resampled to the view's square, which restores its aspect. Resampling is PIL's: a separable filter whose support widens
  with the downscale factor (antialiasing; PIL's BICUBIC by default, or BILINEAR), taps limited to the crop
  box as when PIL crops and then resizes; within ~1/255 of PIL (tested). Applied as one batched matmul per
  axis; the flip is folded into the column matrix (free). antialias=False uses grid_sample instead.
- Colour jitter: torchvision's ColorJitter factors (brightness/contrast/saturation ~ U(1-a, 1+a), hue ~
  U(-h, h) turns) in a per-sample random order like torchvision's (``jitter_order="random"``), or in the
  fixed order brightness, contrast, saturation, hue (``"fixed"``, cheaper). Clamped to [0, 1] after each op.
- Blur: sigma ~ U(blur_sigma) in output pixels at every view size (PIL's GaussianBlur radius is a sigma in
  pixels, and the released recipe uses the same range for 224 and 96 px views); kernel truncated at
  3 sigma_max (13 taps for sigma <= 2), edge pixels replicated; samples not blurred get an identity kernel.
- Solarize: x -> 1 - x where x >= threshold (PIL's solarize at 128/255 ~ 0.5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import kornia.color as KC
import kornia.enhance as KE
import kornia.filters as KF
import kornia.geometry.transform as KT
import torch
import torch.nn.functional as F

from fastmveb.config import ViewsConfig

# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
_RRC_TRIES = 10  # torchvision's RandomResizedCrop attempts before its centre-crop fallback

# Op ids in a jitter permutation (torchvision's ColorJitter numbering).
_BRIGHT, _CONTRAST, _SAT, _HUE = 0, 1, 2, 3


@dataclass(frozen=True)
class ViewSpec:
    """What differs between views; everything else is shared (ViewsConfig)."""
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float


def view_specs(cfg: ViewsConfig) -> list[ViewSpec]:
    g = (cfg.global_size, tuple(cfg.global_scale))
    loc = ViewSpec(cfg.local_size, tuple(cfg.local_scale), cfg.blur_p[2], cfg.solarize_p[2])
    return [ViewSpec(*g, cfg.blur_p[0], cfg.solarize_p[0]), ViewSpec(*g, cfg.blur_p[1], cfg.solarize_p[1])] + \
        [loc] * cfg.n_local


# ---------------------------------------------------------------------------------------------- sampling
def _rand(shape, device, generator):
    # No generator=None passed explicitly: inside compiled code that fails on a dynamic-shape recompile (a
    # partial last batch: "SymIntArrayRef expected to contain only concrete integers"; docs/notes.md).
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, device=device, generator=generator)


def _uniform(lo: float, hi: float, shape, device, generator):
    return lo + (hi - lo) * _rand(shape, device, generator)


def _per_sample(v, n: int, device) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.to(device=device, dtype=torch.float32).expand(n)
    return torch.full((n,), float(v), device=device)    # a fill kernel: no host-to-device copy (a sync on CUDA)


def sample_crop_boxes(n: int, height, width, scale, ratio, device, generator=None) -> torch.Tensor:
    """(n, 4) float boxes (top, left, h, w) in image pixels, integer-valued, by torchvision's RRC rule.

    height, width: ints (every sample the same size) or (n,) tensors (each sample's own size). All 10 tries
    are drawn for every sample at once and the first valid one kept, so the result has the distribution of
    torchvision's sequential loop without a per-sample Python loop or a host sync.
    """
    hgt, wid = _per_sample(height, n, device), _per_sample(width, n, device)
    log_r = (math.log(ratio[0]), math.log(ratio[1]))
    target = (hgt * wid)[:, None] * _uniform(scale[0], scale[1], (n, _RRC_TRIES), device, generator)
    aspect = torch.exp(_uniform(log_r[0], log_r[1], (n, _RRC_TRIES), device, generator))
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= wid[:, None]) & (h > 0) & (h <= hgt[:, None])
    first = torch.argmax(ok.to(torch.uint8), dim=1, keepdim=True)     # first valid try (0 if none)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)
    found = ok.any(dim=1)
    # torchvision's centre-crop fallback, per sample: clip the whole image to the ratio range.
    in_ratio = wid / hgt
    tall, wide = in_ratio < min(ratio), in_ratio > max(ratio)
    fw = torch.where(wide, torch.round(hgt * max(ratio)), wid)
    fh = torch.where(tall, torch.round(wid / min(ratio)), hgt)
    w = torch.where(found, w, fw)
    h = torch.where(found, h, fh)
    u = _rand((n, 2), device, generator)
    top = torch.minimum(torch.floor(u[:, 0] * (hgt - h + 1)), hgt - h)
    left = torch.minimum(torch.floor(u[:, 1] * (wid - w + 1)), wid - w)
    top = torch.where(found, top, torch.floor((hgt - fh) / 2))
    left = torch.where(found, left, torch.floor((wid - fw) / 2))
    return torch.stack([top, left, h, w], dim=1)


def to_canvas(boxes: torch.Tensor, extent: torch.Tensor, canvas_hw: tuple[int, int]) -> torch.Tensor:
    """Boxes in each image's own pixels -> canvas pixels, for a canvas that holds the whole image resized
    to canvas_hw (aspect not kept). extent: (n, 2) the images' (H, W). The boxes become fractional; the
    resample to a square view then restores the aspect the box has in the image."""
    ext = extent.to(boxes.dtype)
    sy = canvas_hw[0] / ext[:, 0]
    sx = canvas_hw[1] / ext[:, 1]
    return boxes * torch.stack([sy, sx, sy, sx], dim=1)


# ------------------------------------------------------------------------------------- crop + resample
def _filter(name: str):
    if name == "bilinear":
        return 1.0, lambda t: (1.0 - t.abs()).clamp_min(0.0)
    if name == "bicubic":
        a = -0.5  # PIL's bicubic

        def cubic(t):
            t = t.abs()
            near = ((a + 2) * t - (a + 3)) * t * t + 1
            far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
            return torch.where(t < 1, near, torch.where(t < 2, far, torch.zeros_like(t)))
        return 2.0, cubic
    raise ValueError(f"interpolation must be 'bilinear' or 'bicubic', got {name!r}")


def resample_matrix(start, length, in_size: int, out_size: int, interpolation: str, antialias: bool,
                    flip=None):
    """(N, out, in) per-sample matrices that resize [start, start+length) to out_size pixels as PIL's
    resize of that crop: filter support widened by the downscale factor when antialiasing, taps outside
    the crop dropped, each row normalised to 1. flip (N,) bool mirrors the output.

    Dense rather than a list of taps: applying it is a batched matmul, which measured 2.5-4x faster on CPU
    than gathering the taps (torch.gather per tap), and is the cheapest form on a GPU too.
    """
    support, kernel = _filter(interpolation)
    scale = length / out_size                                         # input pixels per output pixel
    fscale = scale.clamp_min(1.0) if antialias else torch.ones_like(scale)
    dt = start.dtype
    centre = start[:, None] + (torch.arange(out_size, device=start.device, dtype=dt) + 0.5) * scale[:, None]
    src = torch.arange(in_size, device=start.device, dtype=dt) + 0.5  # input pixel centres
    w = kernel((src[None, None, :] - centre[..., None]) / fscale[:, None, None])   # (N, out, in)
    inside = (src >= start[:, None]) & (src < (start + length)[:, None])          # (N, in)
    w = w * inside[:, None, :]
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-12)
    if flip is not None:
        w = torch.where(flip[:, None, None], w.flip(1), w)
    return w


def _grid_crop(x, boxes, size: int, interpolation: str, flip=None):
    """The antialias=False path: one batched affine grid + grid_sample (a point sample of the crop)."""
    n, _, h, w = x.shape
    top, left, bh, bw = boxes.unbind(1)
    sx = bw / w
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack([torch.stack([sx, zero, (2 * left + bw) / w - 1], 1),
                         torch.stack([zero, bh / h, (2 * top + bh) / h - 1], 1)], 1)   # (N, 2, 3)
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    out = F.grid_sample(x, grid, mode=interpolation, padding_mode="border", align_corners=False)
    return out.clamp(0.0, 1.0) if interpolation == "bicubic" else out


def resized_crop(x, boxes, size: int, interpolation: str = "bilinear", antialias: bool = True, flip=None):
    """Crop every sample's box (N, 4: top, left, h, w) from float x (N, C, H, W) and resize to (size, size).

    antialias=True: PIL's resize of the crop (within ~1/255 of PIL, tested), as two batched matmuls.
    antialias=False: grid_sample, ~5-13x cheaper on CPU (benchmark) but aliases on downscaling (local
    crops shrink up to ~2x from a 256 px decode; global crops barely shrink, up to 256/224).
    """
    if not antialias:
        return _grid_crop(x, boxes, size, interpolation, flip)
    _, _, h, w = x.shape
    ry = resample_matrix(boxes[:, 0], boxes[:, 2], h, size, interpolation, True).to(x.dtype)
    rx = resample_matrix(boxes[:, 1], boxes[:, 3], w, size, interpolation, True, flip).to(x.dtype)
    # Columns first. For bicubic the order matters: PIL clips the first pass's overshoot (uint8), and
    # Pillow runs first the pass with the smaller intermediate, columns first only when size*h <= w*size
    # (measured). Where it goes rows first, results differ at strong edges (up to ~15/255 on noise);
    # matching it per sample would cost a second pair of matmuls, for no training benefit.
    cols = torch.matmul(x, rx.transpose(1, 2).unsqueeze(1))           # (N, C, H, size)
    if interpolation == "bicubic":
        cols = cols.clamp(0.0, 1.0)
    out = torch.matmul(ry.unsqueeze(1), cols)                         # (N, C, size, size)
    return out.clamp(0.0, 1.0) if interpolation == "bicubic" else out


# --------------------------------------------------------------------------------------------- colour
def _gray(x):
    return KC.rgb_to_grayscale(x)          # ITU-R 601-2 luma (_LUMA), as PIL's convert("L") and torchvision


def blend_toward(x, factor, w_gray, w_mean):
    """clamp(f * x + (1 - f) * ref): ref = 0 (brightness), the image's mean gray (contrast) or the
    pixel's gray (saturation), chosen per sample by w_gray / w_mean in {0, 1}. One kernel covers all three
    so that a per-sample op order costs one pass per stage. Own code: Kornia applies one op to every sample
    (and its ColorJitter one order per batch), so a per-sample order would cost every op at every position."""
    g = _gray(x)
    ref = w_gray[:, None, None, None] * g + w_mean[:, None, None, None] * g.mean(dim=(2, 3), keepdim=True)
    # lerp(ref, x, f) = f * x + (1 - f) * ref in one pass (these are memory-bound passes; fewer is faster).
    return torch.lerp(ref, x, factor[:, None, None, None]).clamp_(0.0, 1.0)


def shift_hue(x, shift):
    """Rotate the HSV hue of (N, 3, H, W) in [0, 1] by shift (N,) turns, as torchvision's adjust_hue.

    Written directly (max, min, sextant; then the closed form hsv->rgb channel = max - delta * f(k)) rather
    than a full rgb->hsv->rgb conversion: V and S are never formed, saving several full-size passes. Own code:
    kornia.enhance.adjust_hue computes the same (within 2e-6) but measured 1.2-3x slower in every run (bench views).
    """
    r, g, b = x.unbind(1)
    maxc = x.amax(1)
    minc = x.amin(1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))   # sextants
    h = h + 6.0 * shift[:, None, None]
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)   # 5, 3, 1: r, g, b
    k = torch.remainder(n + h.unsqueeze(1), 6.0)
    f = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    return maxc.unsqueeze(1) - delta.unsqueeze(1) * f


def color_jitter(x, p: dict, order: str):
    """p: factors b, c, s, h (N,) already set to identity (1, 1, 1, 0) where jitter is off; perm (N, 4)."""
    one = torch.ones_like(p["brightness"])
    zero = torch.zeros_like(one)
    if order == "fixed":
        # torchvision's brightness is clamp(f * x): Kornia calls that multiplicative scale adjust_contrast
        # (its adjust_brightness adds); torchvision's contrast and saturation are Kornia's *_with_*_subtraction.
        x = KE.adjust_contrast(x, p["brightness"])
        # Own blend: Kornia's adjust_contrast_with_mean_subtraction is the same maths; 1.36x / 0.88x our time in
        # two runs (bench views, own/kornia rows): no clear win, so the measured own code stays.
        x = blend_toward(x, p["contrast"], zero, one)
        x = KE.adjust_saturation_with_gray_subtraction(x, p["saturation"])
        return shift_hue(x, p["hue"])
    # Per-sample order, exactly, with one hue pass instead of four: hue sits at position q of the
    # sample's permutation, so run the three blends in the sample's order, those before q in a first sweep
    # and those after q in a second, with one hue shift for everyone in between (a blend with factor 1 is
    # the identity). Six cheap blends + one hue: the hue shift costs ~9 blends on CPU (benchmark).
    order = p["order"]
    pos = torch.arange(4, device=order.device).expand_as(order)
    rank = torch.where(order == _HUE, torch.full_like(pos, 4), pos)
    blends = order.gather(1, torch.argsort(rank, dim=1)[:, :3])       # (N, 3) the blend ops in order
    q = torch.argmax((order == _HUE).to(torch.uint8), dim=1)          # (N,) hue's position
    factors = torch.stack([p["brightness"], p["contrast"], p["saturation"]], dim=1)   # (N, 3)
    for sweep in (0, 1):
        if sweep == 1:
            x = shift_hue(x, p["hue"])
        for j in range(3):
            op = blends[:, j]
            active = (j < q) if sweep == 0 else (j >= q)
            f = torch.where(active, factors.gather(1, op[:, None]).squeeze(1), one)
            x = blend_toward(x, f, (op == _SAT).to(x.dtype), (op == _CONTRAST).to(x.dtype))
    return x


# ----------------------------------------------------------------------------------------------- blur
def blur_kernels(sigma, blur, radius: int):
    """(N, 2r+1) normalised Gaussian taps per sample (Kornia's); the identity (a delta) where blur is False."""
    k = KF.get_gaussian_kernel1d(2 * radius + 1, sigma[:, None])
    delta = (torch.arange(-radius, radius + 1, device=sigma.device) == 0).to(k.dtype).expand_as(k)
    return torch.where(blur[:, None], k, delta)


def gaussian_blur(x, kernels):
    """Separable per-sample blur (Kornia's filter2d_separable: grouped convs), edges replicated."""
    return KF.filter2d_separable(x, kernels.to(x.dtype), kernels.to(x.dtype), border_type="replicate")


# ------------------------------------------------------------------------------------------- the module
class ViewMaker(torch.nn.Module):
    """All MVEB views of a batch. See the module docstring for the contract.

    interpolation ("bilinear" | "bicubic") and jitter_order ("random" | "fixed") come from the config
    (views.interpolation, views.jitter_order). Defaults: bicubic (the released recipe's RandomResizedCrop
    interpolation; same cost as bilinear here, both are one dense matmul per axis) and random (torchvision's
    per-sample op order, exact, at ~the cost of the fixed order).
    """

    def __init__(self, cfg: ViewsConfig):
        super().__init__()
        self.cfg = cfg
        self.specs = view_specs(cfg)
        # interpolation, jitter_order and dtype are the config's Literal choices: config.validate checks them.
        self.interpolation = cfg.interpolation
        self.jitter_order = cfg.jitter_order
        self.out_dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
        self.blur_radius = int(math.ceil(3.0 * cfg.blur_sigma[1]))
        std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("inv_std", 1.0 / std, persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    @property
    def n_views(self) -> int:
        return len(self.specs)

    # -- parameters ---------------------------------------------------------------------------------------
    def sample_params(self, n: int, in_hw: tuple[int, int] | None, device, generator=None,
                      extent: torch.Tensor | None = None) -> list[dict]:
        """Per-view dicts of per-sample draws (all tensors on device, first dim n).

        in_hw: the decoded canvas (H, W) in decode-once mode; None in per-view mode (the crop box is then the
        whole view). extent: (n, 2) each image's own (H, W) when the canvas holds the whole image resized to
        in_hw (data.py's decode-once); None when the canvas is the image. Crops are sampled on the extent by
        torchvision's rule, so scale and ratio are relative to the whole image, then mapped to the canvas.
        Keys: box (n, 4) top/left/h/w in canvas pixels; image_box (n, 4) the same box in the image's own
        pixels; flip, jitter, gray, blur, solarize (n,) bool; brightness,
        contrast, saturation, hue (n,) effective factors (identity where jitter is off); order (n, 4) the
        jitter op permutation (0 b, 1 c, 2 s, 3 h); sigma (n,) blur sigma (drawn even where blur is off).
        Draw order is fixed, so a seed gives the same parameters on the same device.
        """
        cfg = self.cfg
        out = []
        for spec in self.specs:
            if in_hw is None:
                z = torch.zeros(n, device=device)
                box = image_box = torch.stack([z, z, z + spec.size, z + spec.size], dim=1)
            elif extent is None:
                box = image_box = sample_crop_boxes(n, in_hw[0], in_hw[1], spec.scale, cfg.ratio, device,
                                                    generator)
            else:
                ext = extent.to(device=device, dtype=torch.float32)
                image_box = sample_crop_boxes(n, ext[:, 0], ext[:, 1], spec.scale, cfg.ratio, device, generator)
                box = to_canvas(image_box, ext, in_hw)
            u = _rand((n, 5), device, generator)          # flip, jitter, gray, blur, solarize gates
            jitter = u[:, 1] < cfg.jitter_p
            fac = _rand((n, 4), device, generator)
            b = (1 - cfg.brightness) + 2 * cfg.brightness * fac[:, 0]
            c = (1 - cfg.contrast) + 2 * cfg.contrast * fac[:, 1]
            s = (1 - cfg.saturation) + 2 * cfg.saturation * fac[:, 2]
            h = cfg.hue * (2 * fac[:, 3] - 1)
            one = torch.ones_like(b)
            order = torch.argsort(_rand((n, 4), device, generator), dim=1)
            sigma = _uniform(cfg.blur_sigma[0], cfg.blur_sigma[1], (n,), device, generator)
            out.append({
                "box": box,
                "image_box": image_box,
                "flip": u[:, 0] < cfg.flip_p,
                "jitter": jitter,
                "brightness": torch.where(jitter, b.clamp_min(0), one),
                "contrast": torch.where(jitter, c.clamp_min(0), one),
                "saturation": torch.where(jitter, s.clamp_min(0), one),
                "hue": torch.where(jitter, h, torch.zeros_like(h)),
                "order": order,
                "gray": u[:, 2] < cfg.gray_p,
                "blur": u[:, 3] < spec.blur_p,
                "sigma": sigma,
                "solarize": u[:, 4] < spec.solarize_p,
            })
        return out

    # -- rendering ----------------------------------------------------------------------------------------
    def render_view(self, x, spec: ViewSpec, p: dict, crop: bool):
        """One view from float x in [0, 1]: (N, 3, H, W) with crop=True, else (N, 3, size, size)."""
        if crop:
            # Own code: Kornia has no antialiased per-sample resized crop (its crops point-sample); the flip is
            # folded into the resample matrix (free).
            x = resized_crop(x, p["box"], spec.size, self.interpolation, self.cfg.antialias, p["flip"])
        else:
            x = torch.where(p["flip"][:, None, None, None], KT.hflip(x), x)
        if self.cfg.jitter_p > 0:
            x = color_jitter(x, p, self.jitter_order)
        if self.cfg.gray_p > 0:
            x = torch.where(p["gray"][:, None, None, None], _gray(x).expand_as(x), x)
        if spec.blur_p > 0:   # a static config value: views that never blur skip the pass entirely
            x = gaussian_blur(x, blur_kernels(p["sigma"], p["blur"], self.blur_radius))
        if spec.solarize_p > 0:
            # Per-sample thresholds; 2.0 (above every pixel) where the sample is not solarized.
            thr = torch.where(p["solarize"], self.cfg.solarize_threshold, 2.0).to(x.dtype)
            x = KE.solarize(x, thr)
        # Own multiply-add, (x - mean) / std = x * (1/std) - mean/std: kornia.enhance.normalize took 34x / 0.5x its
        # time in two runs on a loaded box; no clear win, so the one fused pass stays.
        x = torch.addcmul(self.shift, x, self.inv_std)
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        return x.to(dtype=self.out_dtype, memory_format=fmt)

    def render(self, x, params: list[dict]) -> list[torch.Tensor]:
        """Views from given parameters (sample_params' format): forward without the randomness."""
        if isinstance(x, (list, tuple)):
            self._check_per_view(x)
            return [self.render_view(self._to_float(xv), s, p, crop=False)
                    for xv, s, p in zip(x, self.specs, params)]
        self._check_uint8(x)
        xf = self._to_float(x)                    # converted once, shared by every view
        return [self.render_view(xf, s, p, crop=True) for s, p in zip(self.specs, params)]

    def forward(self, x, extent: torch.Tensor | None = None, generator: torch.Generator | None = None,
                return_params: bool = False):
        if isinstance(x, (list, tuple)):
            self._check_per_view(x)
            if extent is not None:
                raise ValueError("extent applies to a decoded canvas, not to per-view batches")
            n, dev, in_hw = x[0].shape[0], x[0].device, None
        else:
            self._check_uint8(x)
            n, dev, in_hw = x.shape[0], x.device, (x.shape[2], x.shape[3])
            if extent is not None and tuple(extent.shape) != (n, 2):
                raise ValueError(f"extent must be (N, 2) = each image's (H, W), got {tuple(extent.shape)}")
        params = self.sample_params(n, in_hw, dev, generator, extent)
        views = self.render(x, params)
        return (views, params) if return_params else views

    # -- helpers ------------------------------------------------------------------------------------------
    @staticmethod
    def _to_float(x):
        return x.float().mul_(1.0 / 255.0)

    @staticmethod
    def _check_uint8(x):
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise TypeError(f"views expect a uint8 (N, 3, H, W) batch, got {x.dtype} {tuple(x.shape)}")

    def _check_per_view(self, xs):
        if len(xs) != self.n_views:
            raise ValueError(f"per-view input needs {self.n_views} batches (one per view), got {len(xs)}")
        for i, (xv, s) in enumerate(zip(xs, self.specs)):
            self._check_uint8(xv)
            if tuple(xv.shape[2:]) != (s.size, s.size) or xv.shape[0] != xs[0].shape[0]:
                raise ValueError(f"per-view input {i} must be (N, 3, {s.size}, {s.size}) with the same N "
                                 f"as view 0, got {tuple(xv.shape)}")
