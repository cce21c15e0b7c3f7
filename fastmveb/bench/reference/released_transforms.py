"""The released MVEB recipe's per-sample PIL views, restated with torchvision.transforms (v1).

This is the baseline that fastmveb's FFCV loader and GPU views are benchmarked against: every view is
cut, jittered and blurred on the CPU, one PIL image at a time, inside DataLoader worker processes.
It follows the views table in docs/method.md (global 1 / global 2 / n_local local crops); written here from
that description, not copied from the released code.

    from fastmveb.bench.reference.released_transforms import released_transform, released_imagefolder_loader
    views = released_transform(n_local=6)(pil_image)        # list of 2 + 6 float tensors (C, H, W)
    loader = released_imagefolder_loader("tree/train", n_local=0, batch_size=64, num_workers=2)
    for views, labels in loader: ...                         # views: list of (B, C, H, W) tensors
"""
from __future__ import annotations

import random

import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import datasets, transforms as T

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

GLOBAL_SIZE, GLOBAL_SCALE = 224, (0.4, 1.0)
LOCAL_SIZE, LOCAL_SCALE = 96, (0.05, 0.4)
# (blur p, solarize p) per view kind, docs/method.md's views table.
GLOBAL1_P, GLOBAL2_P, LOCAL_P = (1.0, 0.0), (0.1, 0.2), (0.5, 0.0)


class PILGaussianBlur:
    """Blur with probability p and a sigma drawn per call from U(lo, hi); PIL's radius is the sigma."""

    def __init__(self, p: float, sigma: tuple[float, float] = (0.1, 2.0)):
        self.p, self.sigma = p, sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p <= 0 or random.random() >= self.p:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


class PILSolarize:
    """Invert pixels at or above 128 with probability p (the usual SSL solarisation)."""

    def __init__(self, p: float, threshold: int = 128):
        self.p, self.threshold = p, threshold

    def __call__(self, img: Image.Image) -> Image.Image:
        if self.p <= 0 or random.random() >= self.p:
            return img
        return ImageOps.solarize(img, threshold=self.threshold)


def _view(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> T.Compose:
    # Bicubic as in the common SSL recipes (BYOL/DINO-style code); PIL's resize also low-passes on the way down.
    return T.Compose([
        T.RandomResizedCrop(size, scale=scale, interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=0.5),
        T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        T.RandomGrayscale(p=0.2),
        PILGaussianBlur(blur_p),
        PILSolarize(solarize_p),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ])


class ReleasedViews:
    """Callable PIL image -> [global 1, global 2, local 1 .. local n_local] normalised float tensors, at any view
    sizes (the end-to-end baseline feeds the model the sizes of the fastmveb run it is compared with)."""

    def __init__(self, n_local: int = 6, global_size: int = GLOBAL_SIZE, local_size: int = LOCAL_SIZE,
                 global_scale=GLOBAL_SCALE, local_scale=LOCAL_SCALE):
        if n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {n_local}")
        self.n_local = n_local
        self.global1 = _view(global_size, tuple(global_scale), *GLOBAL1_P)
        self.global2 = _view(global_size, tuple(global_scale), *GLOBAL2_P)
        self.local = _view(local_size, tuple(local_scale), *LOCAL_P)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        img = img.convert("RGB")
        return [self.global1(img), self.global2(img)] + [self.local(img) for _ in range(self.n_local)]


def released_transform(n_local: int) -> ReleasedViews:
    """The released per-sample multi-view transform (n_local=0: the two-view recipe)."""
    return ReleasedViews(n_local)


def _seed_worker(worker_id: int) -> None:
    # torchvision v1 transforms draw from torch's RNG, the blur/solarize from Python's: seed both per worker.
    seed = torch.initial_seed() % 2**32
    random.seed(seed)


def released_imagefolder_loader(root, n_local: int, batch_size: int, num_workers: int, shuffle: bool = True,
                                drop_last: bool = True, persistent_workers: bool = False,
                                views: ReleasedViews | None = None) -> torch.utils.data.DataLoader:
    """torchvision ImageFolder + PIL decode + released views (``views``, default the recipe's sizes), batched by
    the default collate. Yields (views, labels): a list of 2 + n_local float tensors (B, 3, S, S), int64 (B,)."""
    ds = datasets.ImageFolder(str(root), transform=views or released_transform(n_local))
    return torch.utils.data.DataLoader(
        ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, drop_last=drop_last,
        pin_memory=torch.cuda.is_available(), worker_init_fn=_seed_worker,
        persistent_workers=persistent_workers and num_workers > 0)
