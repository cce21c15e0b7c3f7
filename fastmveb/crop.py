"""The crop of every view: torchvision's RandomResizedCrop rule vectorised over samples, and PIL's resize of
the box as batched matmuls (fastmveb.views cuts every view with it; eval's linear protocol draws its boxes here).

    boxes = sample_crop_boxes(n, height, width, scale, ratio, device, generator)   # (n, 4) top, left, h, w
    boxes = to_canvas(boxes, extent, (S, S))         # image pixels -> pixels of a canvas holding the whole image
    v = resized_crop(x, boxes, size, "bicubic", antialias=True, flip=flip)        # (N, C, size, size)

Semantics (the views module docstring says how the views use them):
- The box: torchvision's rule exactly (10 tries of area/log-ratio, integer box, centre-crop fallback), on each
  image's own extent (H, W): scale and ratio are relative to the whole image as in the released recipe. On a
  canvas that squeezed the image the box becomes fractional; resampling it to a square restores its aspect.
- The resample: PIL's separable filter whose support widens with the downscale factor (antialiasing; PIL's
  BICUBIC or BILINEAR), taps limited to the crop box as when PIL crops and then resizes; within ~1/255 of PIL
  (tested). One batched matmul per axis; the flip is folded into the column matrix (free). antialias=False
  uses grid_sample instead.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

_RRC_TRIES = 10  # torchvision's RandomResizedCrop attempts before its centre-crop fallback


# ---------------------------------------------------------------------------------------------- sampling
def rand(shape, device, generator=None):
    # No generator=None passed explicitly: inside compiled code that fails on a dynamic-shape recompile (a
    # partial last batch: "SymIntArrayRef expected to contain only concrete integers"; docs/notes.md).
    if generator is None:
        return torch.rand(shape, device=device)
    return torch.rand(shape, device=device, generator=generator)


def _uniform(lo: float, hi: float, shape, device, generator):
    return lo + (hi - lo) * rand(shape, device, generator)


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
    u = rand((n, 2), device, generator)
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
