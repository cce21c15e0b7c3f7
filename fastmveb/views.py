"""GPU multi-view augmentation: every MVEB view cut and augmented from a uint8 batch in batched tensor ops.

    vm = ViewMaker(cfg.views).to(device)
    v = vm(x, extent)                # decode once: x uint8 (N, 3, S, S) holds each WHOLE image resized to S x S
                                     # (aspect not kept), extent (N, 2) its own (H, W); every view is cut from it
    v = vm(x)                        # x is the image itself (no extent): crops are sampled on x's own H, W
    v = vm([x1, x2, l1, ...])        # per-view decode: uint8 (N, 3, size, size) per view, already cropped
    v, draws = vm(x, return_params=True)    # each view's ViewDraws (the per-sample draws), for tests and debugging
    view_sizes(cfg.views)            # [global, global, local x n_local]: the one home of the views' sizes

``v`` is [global 1, global 2, local 1 .. local n_local], each (N, 3, size, size), normalised with the ImageNet
mean/std, in ``cfg.dtype`` and channels_last when ``cfg.channels_last``. The recipe per view follows the
released MVEB views (docs/method.md), which are torchvision v1 transforms on PIL images:
random resized crop -> horizontal flip -> colour jitter (p) -> grayscale (p) -> Gaussian blur (p) ->
solarize (p) -> normalise. Every random draw is per sample, made with torch's RNG on x's device
(``torch.manual_seed`` or a ``torch.Generator`` on that device makes it reproducible), with no host sync and
no Python branch on a random value, so the whole module compiles as one graph.

How it is built: each augmentation is a ViewOp whose ``sample`` draws its own fields of a ViewDraws (a frozen
dataclass of typed per-sample tensors) and whose ``apply`` transforms the batch with them. ``ViewMaker.ROUNDS``
lists the ops in the apply order (normalising comes last) and in the draw order: a round draws view 1's
draws op by op, then view 2's, ... The draw order is the random stream: a seed gives the views it always
gave only while every draw keeps its place. To add an augmentation: write one ViewOp (sample + apply) and its
ViewDraws field(s), give it one config value (its probability or strength, in config.ViewsConfig), and append
it to ``ViewMaker.ROUNDS`` as a round of its own at the END: it then draws after every earlier draw of every
view, so today's streams stay put (tests/test_views_streams.py pins them), and applies after the recipe's ops.
It draws its own gate (RecipeGates holds the recipe's five gates as one block, the way they were drawn).

Kornia's functional ops (kornia.enhance, kornia.filters, kornia.color, kornia.geometry) do the work wherever
they compute the recipe's (torchvision's) maths with per-sample tensor parameters: grayscale, the fixed-order
brightness and saturation, Gaussian kernels and the separable blur, solarize, the per-view flip. Own code
remains where Kornia lacks the operation or measured slower (each with a one-line reason; numbers in the
views benchmark's own/kornia rows): the antialiased per-sample resized crop, the per-sample random jitter
order (one fused blend per stage), the fixed order's contrast, the hue shift, normalisation and the
per-sample crop sampler (the crop's two in fastmveb/crop.py).
Kornia's augmentation modules are not used: their RandomResizedCrop loops per sample or skips antialiasing,
p < 1 ops compute every sample anyway, ColorJitter uses one order per batch, containers break torch.compile
graphs and parameters are sampled on the CPU (numbers: ``python -m fastmveb.bench views``).

Semantics worth knowing:
- Crop (fastmveb/crop.py): torchvision's RandomResizedCrop rule exactly, vectorised over samples and tries, on
  each image's own extent (H, W): scale and ratio are relative to the whole image as in the released recipe.
  The box is then mapped to the canvas and resampled to the view's square by PIL's antialiased resize
  (BICUBIC by default, or BILINEAR; within ~1/255 of PIL, tested), which restores its aspect; the flip is
  folded into the resample. antialias=False uses grid_sample instead.
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

from fastmveb.config import ViewsConfig
from fastmveb.crop import rand, resized_crop, sample_crop_boxes, to_canvas

# ITU-R 601-2 luma, as PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)

# Op ids in a jitter permutation (torchvision's ColorJitter numbering).
_BRIGHT, _CONTRAST, _SAT, _HUE = 0, 1, 2, 3


@dataclass(frozen=True)
class ViewSpec:
    """What differs between views; everything else is shared (ViewsConfig). name: "global 1", "global 2", "local"."""
    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float
    name: str = "local"


def view_specs(cfg: ViewsConfig) -> list[ViewSpec]:
    """The views of the recipe, in order: two globals (their own blur and solarize rates), then n_local locals."""
    g = (cfg.global_size, tuple(cfg.global_scale))
    loc = ViewSpec(cfg.local_size, tuple(cfg.local_scale), cfg.blur_p[2], cfg.solarize_p[2])
    return [ViewSpec(*g, cfg.blur_p[0], cfg.solarize_p[0], "global 1"),
            ViewSpec(*g, cfg.blur_p[1], cfg.solarize_p[1], "global 2")] + [loc] * cfg.n_local


def view_sizes(cfg: ViewsConfig) -> list[int]:
    """Each view's square side, in view order (what per-view decoders, the plan and the benchmarks size by)."""
    return [s.size for s in view_specs(cfg)]


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


def color_jitter(x, d: ViewDraws, order: str):
    """d's factors brightness, contrast, saturation, hue (N,), already the identity (1, 1, 1, 0) where jitter
    is off, and its op permutation d.order (N, 4); any object with those attributes will do."""
    one = torch.ones_like(d.brightness)
    zero = torch.zeros_like(one)
    if order == "fixed":
        # torchvision's brightness is clamp(f * x): Kornia calls that multiplicative scale adjust_contrast
        # (its adjust_brightness adds); torchvision's contrast and saturation are Kornia's *_with_*_subtraction.
        x = KE.adjust_contrast(x, d.brightness)
        # Own blend: Kornia's adjust_contrast_with_mean_subtraction is the same maths; 1.36x / 0.88x our time in
        # two runs (bench views, own/kornia rows): no clear win, so the measured own code stays.
        x = blend_toward(x, d.contrast, zero, one)
        x = KE.adjust_saturation_with_gray_subtraction(x, d.saturation)
        return shift_hue(x, d.hue)
    # Per-sample order, exactly, with one hue pass instead of four: hue sits at position q of the
    # sample's permutation, so run the three blends in the sample's order, those before q in a first sweep
    # and those after q in a second, with one hue shift for everyone in between (a blend with factor 1 is
    # the identity). Six cheap blends + one hue: the hue shift costs ~9 blends on CPU (benchmark).
    perm = d.order
    pos = torch.arange(4, device=perm.device).expand_as(perm)
    rank = torch.where(perm == _HUE, torch.full_like(pos, 4), pos)
    blends = perm.gather(1, torch.argsort(rank, dim=1)[:, :3])        # (N, 3) the blend ops in order
    q = torch.argmax((perm == _HUE).to(torch.uint8), dim=1)           # (N,) hue's position
    factors = torch.stack([d.brightness, d.contrast, d.saturation], dim=1)   # (N, 3)
    for sweep in (0, 1):
        if sweep == 1:
            x = shift_hue(x, d.hue)
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


# ----------------------------------------------------------------------------------------- draws and ops
@dataclass(frozen=True, eq=False)
class ViewDraws:
    """One view's random draws, a row per sample (tensors on x's device, first dim N). eq=False: tensors."""
    box: torch.Tensor          # (N, 4) top, left, h, w in canvas pixels (per-view mode: the whole view)
    image_box: torch.Tensor    # (N, 4) the same box in the image's own pixels
    flip: torch.Tensor         # (N,) bool, like every gate below
    jitter: torch.Tensor
    gray: torch.Tensor
    blur: torch.Tensor
    solarize: torch.Tensor
    brightness: torch.Tensor   # (N,) effective jitter factors: the identity (1, 1, 1, 0) where jitter is off
    contrast: torch.Tensor
    saturation: torch.Tensor
    hue: torch.Tensor          # turns
    order: torch.Tensor        # (N, 4) the jitter op permutation (0 b, 1 c, 2 s, 3 h)
    sigma: torch.Tensor        # (N,) blur sigma in output pixels, drawn even where blur is off


@dataclass(frozen=True)
class DrawContext:
    """What an op's sample reads besides the config: the batch, the view, the random source."""
    n: int
    device: torch.device
    generator: torch.Generator | None
    spec: ViewSpec
    in_hw: tuple[int, int] | None      # the decoded canvas (H, W); None in per-view mode (no crop to draw)
    extent: torch.Tensor | None        # (n, 2) float32 each image's own (H, W); None: the canvas is the image

    def rand(self, shape) -> torch.Tensor:
        return rand(shape, self.device, self.generator)


class ViewOp:
    """One augmentation: ``sample`` returns its ViewDraws fields (``drawn``: the earlier ops' fields),
    ``apply`` transforms float x in [0, 1] with them. The base class draws nothing and changes nothing."""

    def __init__(self, cfg: ViewsConfig):
        self.cfg = cfg

    def sample(self, c: DrawContext, drawn: dict) -> dict:
        return {}

    def apply(self, x, d: ViewDraws, spec: ViewSpec, crop: bool):
        return x


class ResizedCropFlip(ViewOp):
    """torchvision's RandomResizedCrop on each image's extent, mapped to the canvas; the flip rides along."""

    def sample(self, c, drawn):
        if c.in_hw is None:                 # per-view mode: the loader already cut the view
            z = torch.zeros(c.n, device=c.device)
            box = torch.stack([z, z, z + c.spec.size, z + c.spec.size], dim=1)
            return {"box": box, "image_box": box}
        if c.extent is None:
            box = sample_crop_boxes(c.n, c.in_hw[0], c.in_hw[1], c.spec.scale, self.cfg.ratio, c.device,
                                    c.generator)
            return {"box": box, "image_box": box}
        image_box = sample_crop_boxes(c.n, c.extent[:, 0], c.extent[:, 1], c.spec.scale, self.cfg.ratio, c.device,
                                      c.generator)
        return {"box": to_canvas(image_box, c.extent, c.in_hw), "image_box": image_box}

    def apply(self, x, d, spec, crop):
        if crop:
            # Own code: Kornia has no antialiased per-sample resized crop (its crops point-sample); the flip is
            # folded into the resample matrix (free).
            return resized_crop(x, d.box, spec.size, self.cfg.interpolation, self.cfg.antialias, d.flip)
        return torch.where(d.flip[:, None, None, None], KT.hflip(x), x)


class RecipeGates(ViewOp):
    """Draws only: the recipe's five per-sample coin flips as ONE (N, 5) block right after the crop, the layout
    the seeds of every earlier run were drawn with (five separate draws would change every view of a seed).
    The ops that own the gates apply them; an op added later draws its own gate in its own sample."""

    def sample(self, c, drawn):
        u = c.rand((c.n, 5))
        cfg, s = self.cfg, c.spec
        return {"flip": u[:, 0] < cfg.flip_p, "jitter": u[:, 1] < cfg.jitter_p, "gray": u[:, 2] < cfg.gray_p,
                "blur": u[:, 3] < s.blur_p, "solarize": u[:, 4] < s.solarize_p}


class ColorJitter(ViewOp):
    """torchvision's ColorJitter factors and op order, per sample (gate: RecipeGates' jitter)."""

    def sample(self, c, drawn):
        cfg, on = self.cfg, drawn["jitter"]
        fac = c.rand((c.n, 4))
        b = (1 - cfg.brightness) + 2 * cfg.brightness * fac[:, 0]
        ct = (1 - cfg.contrast) + 2 * cfg.contrast * fac[:, 1]
        s = (1 - cfg.saturation) + 2 * cfg.saturation * fac[:, 2]
        h = cfg.hue * (2 * fac[:, 3] - 1)
        one = torch.ones_like(b)
        order = torch.argsort(c.rand((c.n, 4)), dim=1)
        return {"brightness": torch.where(on, b.clamp_min(0), one), "contrast": torch.where(on, ct.clamp_min(0), one),
                "saturation": torch.where(on, s.clamp_min(0), one), "hue": torch.where(on, h, torch.zeros_like(h)),
                "order": order}

    def apply(self, x, d, spec, crop):
        return color_jitter(x, d, self.cfg.jitter_order) if self.cfg.jitter_p > 0 else x


class Grayscale(ViewOp):
    def apply(self, x, d, spec, crop):
        if self.cfg.gray_p <= 0:
            return x
        return torch.where(d.gray[:, None, None, None], _gray(x).expand_as(x), x)


class GaussianBlur(ViewOp):
    def __init__(self, cfg: ViewsConfig):
        super().__init__(cfg)
        self.radius = int(math.ceil(3.0 * cfg.blur_sigma[1]))

    def sample(self, c, drawn):
        lo, hi = self.cfg.blur_sigma
        return {"sigma": lo + (hi - lo) * c.rand((c.n,))}

    def apply(self, x, d, spec, crop):
        if spec.blur_p <= 0:   # a static config value: views that never blur skip the pass entirely
            return x
        return gaussian_blur(x, blur_kernels(d.sigma, d.blur, self.radius))


class Solarize(ViewOp):
    def apply(self, x, d, spec, crop):
        if spec.solarize_p <= 0:
            return x
        # Per-sample thresholds; 2.0 (above every pixel) where the sample is not solarized.
        thr = torch.where(d.solarize, self.cfg.solarize_threshold, 2.0).to(x.dtype)
        return KE.solarize(x, thr)


# ------------------------------------------------------------------------------------------- the module
class ViewMaker(torch.nn.Module):
    """All MVEB views of a batch. See the module docstring for the contract.

    interpolation ("bilinear" | "bicubic") and jitter_order ("random" | "fixed") come from the config
    (views.interpolation, views.jitter_order). Defaults: bicubic (the released recipe's RandomResizedCrop
    interpolation; same cost as bilinear here, both are one dense matmul per axis) and random (torchvision's
    per-sample op order, exact, at ~the cost of the fixed order).
    """

    # The ops in draw rounds: a round draws view after view (view 1's draws in op order, then view 2's, ...);
    # ops apply in the order listed. The recipe is one round, drawn as every earlier seed was; an op added later
    # is a round of its own at the end, so every earlier draw of every view keeps its place (module docstring).
    ROUNDS = ((ResizedCropFlip, RecipeGates, ColorJitter, Grayscale, GaussianBlur, Solarize),)

    def __init__(self, cfg: ViewsConfig):
        super().__init__()
        self.cfg = cfg
        self.specs = view_specs(cfg)
        # interpolation, jitter_order and dtype are the config's Literal choices: config.validate checks them.
        self.out_dtype = torch.float32 if cfg.dtype == "float32" else torch.bfloat16
        self.rounds = tuple(tuple(op(cfg) for op in r) for r in self.ROUNDS)
        self.ops = tuple(op for r in self.rounds for op in r)       # the apply order
        std = torch.tensor(cfg.std, dtype=torch.float32).view(1, 3, 1, 1)
        mean = torch.tensor(cfg.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("inv_std", 1.0 / std, persistent=False)
        self.register_buffer("shift", -mean / std, persistent=False)

    @property
    def n_views(self) -> int:
        return len(self.specs)

    # -- draws --------------------------------------------------------------------------------------------
    def sample_params(self, n: int, in_hw: tuple[int, int] | None, device, generator=None,
                      extent: torch.Tensor | None = None) -> list[ViewDraws]:
        """Every view's ViewDraws, drawn round after round (ROUNDS), view after view within a round.

        in_hw: the decoded canvas (H, W) in decode-once mode; None in per-view mode (the crop box is then the
        whole view). extent: (n, 2) each image's own (H, W) when the canvas holds the whole image resized to
        in_hw (data.py's decode-once); None when the canvas is the image. Crops are sampled on the extent by
        torchvision's rule, so scale and ratio are relative to the whole image, then mapped to the canvas.
        The draw order is fixed, so a seed gives the same draws on the same device.
        """
        ext = None if extent is None else extent.to(device=device, dtype=torch.float32)
        ctx = [DrawContext(n, device, generator, spec, in_hw, ext) for spec in self.specs]
        drawn: list[dict] = [{} for _ in self.specs]
        for ops in self.rounds:
            for c, fields in zip(ctx, drawn):
                for op in ops:
                    fields.update(op.sample(c, fields))
        return [ViewDraws(**fields) for fields in drawn]

    # -- rendering ----------------------------------------------------------------------------------------
    def render_view(self, x, spec: ViewSpec, d: ViewDraws, crop: bool):
        """One view from float x in [0, 1]: (N, 3, H, W) with crop=True, else (N, 3, size, size)."""
        for op in self.ops:
            x = op.apply(x, d, spec, crop)
        # Own multiply-add, (x - mean) / std = x * (1/std) - mean/std: kornia.enhance.normalize took 34x / 0.5x its
        # time in two runs on a loaded box; no clear win, so the one fused pass stays.
        x = torch.addcmul(self.shift, x, self.inv_std)
        fmt = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        return x.to(dtype=self.out_dtype, memory_format=fmt)

    def render(self, x, params: list[ViewDraws]) -> list[torch.Tensor]:
        """Views from given draws (sample_params' format): forward without the randomness."""
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
