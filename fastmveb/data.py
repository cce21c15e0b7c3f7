"""FFCV loaders: uint8 train batches (decode once, or one FFCV crop per view) and centre-crop eval batches.

    loader = train_loader("data/synthetic/train.beton", 128, num_workers=8, device=torch.device("cuda"),
                          options=TrainLoaderOptions(decode="once", decode_size=256, seed=0))
    for epoch in range(start_epoch, epochs):
        set_epoch(loader, epoch, skip_batches=resume_step_in_epoch if epoch == start_epoch else 0)
        set_output_sizes(loader, [size])           # optional: a new canvas side from the next epoch on
        for batch in loader:
            x, extent, y = unpack_train_batch(batch)
            v = view_maker(x, extent)              # views.ViewMaker: every view cut on the GPU

What comes out
- Train, decode="once": (x, extent, y). x uint8 (N, 3, S, S), S = decode_size: each WHOLE stored image,
  resized to S x S (aspect not kept: every canvas pixel is image, none is padding); extent int32 (N, 2) the
  image's stored (H, W), read from the beton's metadata. The views code samples every RandomResizedCrop on
  (H, W) with torchvision's rule (scale and ratio relative to the whole image, as the released recipe) and
  maps the box to the canvas; resampling the box to a square view restores its aspect.
  Why this rather than a letterboxed canvas (image fitted, aspect kept, padded): at the same S, the
  squeezed canvas keeps at least as many pixels per image pixel on both axes (S/H and S/W against
  S/max(H, W)), wastes none on padding, and needs no custom resize code (FFCV's own crop-and-resize with
  the crop = the whole image).
- Train, decode="center" (the previous decode-once, kept for the loader benchmark): (x, y), the largest
  centred square of each image resized to S. A non-square image's edges never appear in a crop and crop
  scale is relative to the square.
- Train, decode="per_view": (x_1, ..., x_V, y): one uint8 tensor per view, decoded and cut separately by
  FFCV's RandomResizedCropRGBImageDecoder at that view's size, scale and ratio (views.ViewsConfig: 2 global +
  n_local local). Every view decodes the JPEG again; this mode exists for fidelity comparisons.
  unpack_train_batch gives (x, None, y) for "center" and (the list of views, None, y) for "per_view".
- Eval: (x, y) with x uint8 (N, 3, size, size): centre crop of side crop_ratio * short side, resized to size
  (224 of 256 by default), sequential order, no batch dropped.
- y is int64 (N,). Images are NCHW in shape and channels_last in memory (a free view of FFCV's NHWC buffer);
  pass channels_last=False for contiguous NCHW at the cost of one copy.
- All outputs are views of a small ring of buffers that FFCV reuses a few batches later: clone anything
  kept past the next iteration (e.g. a fixed batch for visualisation).

Order, epochs, resume. FFCV's order for an epoch is a pure function of (seed, epoch): RANDOM draws
numpy's default_rng(seed + epoch); distributed RANDOM uses torch's DistributedSampler(seed, epoch) over
the whole set and gives rank r every world-th index (padded with repeats to equal length). So the same seed
must be used on every rank, and the loader created after the process group exists. ``set_epoch(loader, e,
skip_batches=k)`` makes the next iteration epoch e minus its first k batches, i.e. exactly the batches the
uninterrupted run would still have yielded (on every rank, since each rank drops its own first k batches).
Per-view crops come from numba's unseeded RNG: the order is reproducible, the per_view crops are not.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

import dataset_prep  # noqa: F401, I001 -- first: it makes ffcv's import 3 s faster (dataset_prep/numba_cache.py)
from ffcv.fields.basics import IntDecoder
from ffcv.fields.rgb_image import (CenterCropRGBImageDecoder, RandomResizedCropRGBImageDecoder,
                                   ResizedCropRGBImageDecoder)
from ffcv.loader import Loader, OrderOption
from ffcv.pipeline import PipelineSpec
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.traversal_order import Random
from ffcv.transforms import Squeeze, ToDevice, ToTensor, ToTorchImage

from dataset_prep.integrity import check_beton
from .config import ViewsConfig
from fastmveb.errors import quiet_numba_finalizers

ORDERS = {"random": OrderOption.RANDOM, "quasi_random": OrderOption.QUASI_RANDOM,
          "sequential": OrderOption.SEQUENTIAL}


quiet_numba_finalizers()          # a pipeline garbage-collected mid-run: no KeyError traceback (fastmveb/errors.py)


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


class ResumableLoader(Loader):
    """An ffcv Loader whose next epoch can be chosen, and started part-way through at a SAMPLE position
    (see set_epoch), with the same global order whatever the number of processes.

    The global order of an epoch is a permutation of the whole set drawn by one of two generators
    (``shuffle``): "numpy" (what ffcv gives one process: numpy's default_rng(seed + epoch)) or "torch" (what
    ffcv gives several: torch's DistributedSampler(seed, epoch), padded with repeats to a multiple of the
    world size). Rank r of W reads positions r, r + W, r + 2W, ... of it, so optimizer step k (batch k on every
    rank, B rows each) consumes exactly positions [k*B*W, (k+1)*B*W): the steps cut the global order into
    consecutive blocks of the global batch. Hence a position kept as a count of samples s means the same
    thing for any world size and any batch: the rest of the epoch is the global order from s on, dealt out
    to the ranks in the same round-robin way. A fresh loader uses ffcv's own generator for its world size (so
    existing trajectories are unchanged); a resume keeps the generator of the run it resumes (train.py).
    """

    _skip_samples = 0   # class defaults: the constructor already calls next_traversal_order()
    shuffle: str | None = None   # None: ffcv's own order for this loader (numpy alone, torch distributed)

    def set_epoch(self, epoch: int, skip_batches: int = 0, skip_samples: int = 0) -> None:
        """The next iteration is epoch ``epoch`` without its first ``skip_samples`` samples of the global
        order (or ``skip_batches`` batches of this loader on every rank: skip_batches x batch x world)."""
        if epoch < 0 or skip_batches < 0 or skip_samples < 0:
            raise ValueError(f"epoch and skips must be >= 0, got {epoch}, {skip_batches}, {skip_samples}")
        if skip_batches > len(self):
            raise ValueError(f"skip_batches={skip_batches} exceeds the {len(self)} batches of an epoch")
        world = self.rank_world()[1]
        skip_samples += skip_batches * self.batch_size * world
        if skip_samples > len(self.indices) + world:   # (+ world: the padding's repeats)
            raise ValueError(f"skip_samples={skip_samples} exceeds the {len(self.indices)} samples "
                             f"of an epoch")
        self.next_epoch = epoch
        self._skip_samples = skip_samples

    def rank_world(self) -> tuple[int, int]:
        if not self.distributed:
            return 0, 1
        import torch.distributed as dist               # what ffcv's DistributedSampler reads too
        return dist.get_rank(), dist.get_world_size()

    def global_order(self, epoch: int) -> np.ndarray:
        """The epoch's permutation of the whole set (before padding and sharding) under ``self.shuffle``."""
        shuffle = self.shuffle or ("torch" if self.distributed else "numpy")
        indices = self.indices
        if not isinstance(self.traversal_order, Random):
            if self.distributed:
                raise ValueError("only order=random can be resumed on several processes")
            return np.asarray(self.traversal_order.sample_order(epoch))
        if shuffle == "numpy":                         # ffcv's Random, one process
            return np.random.default_rng(self.seed + epoch).permutation(indices)
        if shuffle == "torch":                         # ffcv's Random, distributed: DistributedSampler's draw
            from torch.utils.data import DistributedSampler
            sampler = DistributedSampler(indices, num_replicas=1, rank=0, shuffle=True, seed=self.seed, drop_last=False)
            sampler.set_epoch(epoch)
            return indices[np.array(list(sampler))]
        raise ValueError(f"shuffle must be 'numpy' or 'torch', got {shuffle!r}")

    def rank_order(self, epoch: int, skip_samples: int = 0) -> np.ndarray:
        """The sample indices this rank reads in ``epoch`` from global position ``skip_samples`` on, cut
        to whole batches (drop_last) or to the epoch's batches; every rank gets the same number of batches."""
        rank, world = self.rank_world()
        order = self.global_order(epoch)
        if world > 1 and len(order) % world:           # DistributedSampler's padding: repeat the head
            order = np.concatenate([order, order[:world - len(order) % world]])
        order = order[:len(self) * self.batch_size * world]       # the epoch as ffcv cuts it (drop_last)
        order = order[skip_samples:]
        if len(order) % world:                         # a position set under another world size: pad the
            order = np.concatenate([order, order[:world - len(order) % world]])   # rest alike
        mine = order[rank::world]
        if self.drop_last:
            mine = mine[:len(mine) // self.batch_size * self.batch_size]
        return mine

    def batches_left(self) -> int:
        """Batches the next iteration yields (the same on every rank)."""
        n = len(self.rank_order(self.next_epoch, self._skip_samples))
        return -(-n // self.batch_size)

    def next_traversal_order(self):
        if self.shuffle is None and not self._skip_samples:
            return super().next_traversal_order()      # ffcv's own order: unchanged behaviour for fresh runs
        order = self.rank_order(self.next_epoch, self._skip_samples)
        self._skip_samples = 0                         # only this epoch
        return order


def set_epoch(loader: ResumableLoader, epoch: int, skip_batches: int = 0, skip_samples: int = 0) -> None:
    """The next ``iter(loader)`` yields epoch ``epoch`` from batch ``skip_batches`` (of this loader) or from
    sample ``skip_samples`` of the global order on (0 = the whole epoch)."""
    loader.set_epoch(epoch, skip_batches, skip_samples)


def set_output_sizes(loader: ResumableLoader, sizes: list[int]) -> None:
    """Square sides of the image decoders' outputs from the next epoch on (progressive resolution,
    fastmveb/resolution.py): one size in decode "once" mode, one per view in "per_view" mode. FFCV sizes its
    buffers from the decoders when it generates the pipeline code (~2 ms), so nothing else needs rebuilding."""
    decoders = [s.decoder for s in loader.pipeline_specs.values() if hasattr(s.decoder, "output_size")]
    if len(decoders) != len(sizes):
        raise ValueError(f"{len(sizes)} sizes given for the loader's {len(decoders)} image decoders")
    for dec, size in zip(decoders, sizes):
        dec.output_size = (size, size)
    loader.generate_code()


def _whole_image(height, width, _scale, _ratio):
    return 0, 0, height, width


class WholeImageDecoder(ResizedCropRGBImageDecoder):
    """FFCV decoder: the whole stored image resized to output_size (aspect not kept), by FFCV's own
    crop-and-resize with the crop = the whole image. set_output_sizes changes its output size between epochs."""

    def __init__(self, size: int):
        super().__init__((size, size))
        self.scale, self.ratio = None, 1.0    # unused by _whole_image; the base class passes them through

    @property
    def get_crop_generator(self):
        return _whole_image


class ImageExtent(Operation):
    """FFCV decoder for a second pipeline on the image field: (N, 2) int32 = each image's stored (height,
    width), from the field's metadata; no image data is read."""

    def declare_state_and_memory(self, previous_state):
        dtype = np.dtype("<i4")
        return replace(previous_state, jit_mode=True, shape=(2,), dtype=dtype), AllocationQuery((2,), dtype)

    def generate_code(self):
        my_range = Compiler.get_iterator()

        def extent(batch_indices, destination, metadata, storage_state):
            for i in my_range(len(batch_indices)):
                field = metadata[batch_indices[i]]
                destination[i, 0] = field["height"]
                destination[i, 1] = field["width"]
            return destination[:len(batch_indices)]

        extent.is_parallel = True
        return extent


def _image_out(device: torch.device, channels_last: bool) -> list:
    # ToDevice copies into its own buffer (also on CPU), after which the NHWC -> NCHW permute is free.
    return [ToTensor(), ToDevice(device, non_blocking=True), ToTorchImage(channels_last=channels_last)]


def _label_pipeline(device: torch.device) -> list:
    return [IntDecoder(), ToTensor(), Squeeze(1), ToDevice(device, non_blocking=True)]


def _check(beton, batch_size: int, num_workers: int) -> int:
    if not Path(beton).is_file():
        raise FileNotFoundError(f"beton {beton} not found (make beton writes data/synthetic/*.beton)")
    check_beton(beton)   # header, size and integrity record: a truncated or foreign file stops here, in one line
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # Workers are numba threads; more than the cores only adds contention (and fails on some setups).
    return max(1, min(num_workers, available_cores()))


@dataclasses.dataclass(frozen=True)
class TrainLoaderOptions:
    """How the train loader reads, besides the beton, the batch, the workers and the device (train_loader).
    train_loader_from_config builds it from a run config; eval and the benchmarks build their own."""
    decode: str = "once"                   # "once" | "center" | "per_view" (module doc)
    decode_size: int = 256                 # the canvas side S ("once", "center")
    views: ViewsConfig | None = None       # "per_view": the views to cut (None: ViewsConfig())
    seed: int = 0                          # the order's seed, the same on every rank
    distributed: bool = False
    order: str = "random"                  # a key of ORDERS
    os_cache: bool = True
    drop_last: bool = True
    channels_last: bool = True
    batches_ahead: int = 3


def train_loader(beton, batch_size: int, num_workers: int, device,
                 options: TrainLoaderOptions = TrainLoaderOptions(), indices=None) -> ResumableLoader:
    """FFCV train loader yielding (x, extent, y) ("once"), (x, y) ("center") or (x_1, ..., x_V, y)
    ("per_view"); see the module doc. unpack_train_batch turns any of them into (x, extent or None, y).
    ``indices``: read only these samples (a labelled subset: fastmveb.eval finetune)."""
    o = options
    num_workers = _check(beton, batch_size, num_workers)
    device = torch.device(device)
    if o.order not in ORDERS:
        raise ValueError(f"order must be one of {', '.join(ORDERS)}, got {o.order!r}")
    if o.distributed and o.order == "quasi_random":
        raise ValueError("order='quasi_random' does not work with distributed=True in ffcv 1.0.2; use 'random'")
    return ResumableLoader(str(beton), batch_size=batch_size, num_workers=num_workers, os_cache=o.os_cache,
                           order=ORDERS[o.order], distributed=o.distributed, seed=o.seed,
                           pipelines=_train_pipelines(o, device), drop_last=o.drop_last,
                           batches_ahead=o.batches_ahead, indices=None if indices is None else np.asarray(indices))


def _train_pipelines(o: TrainLoaderOptions, device: torch.device) -> dict:
    """The FFCV pipelines of one decode mode (ValueError for an unknown one)."""
    if o.decode == "once":
        # The extent is a second pipeline on the same field; the label moves last (as "target") so that
        # the outputs come as (x, extent, y).
        return {
            "image": [WholeImageDecoder(o.decode_size)] + _image_out(device, o.channels_last),
            "extent": PipelineSpec("image", decoder=ImageExtent(),
                                   transforms=[ToTensor(), ToDevice(device, non_blocking=True)]),
            "label": None,
            "target": PipelineSpec("label", decoder=IntDecoder(), transforms=_label_pipeline(device)[1:]),
        }
    if o.decode == "center":
        return {"image": [CenterCropRGBImageDecoder((o.decode_size, o.decode_size), ratio=1.0)]
                         + _image_out(device, o.channels_last), "label": _label_pipeline(device)}
    if o.decode != "per_view":
        raise ValueError(f"decode must be 'once', 'center' or 'per_view', got {o.decode!r}")
    from .views import view_specs     # (kornia: only this mode needs it)
    views = ViewsConfig() if o.views is None else o.views
    # One PipelineSpec per view, all reading the 'image' field; view 0 keeps the name 'image' so that
    # outputs come in view order and the label, registered last under another name, comes after them.
    pipelines = {}
    for v, spec in enumerate(view_specs(views)):
        dec = RandomResizedCropRGBImageDecoder((spec.size, spec.size), scale=spec.scale, ratio=tuple(views.ratio))
        pipelines["image" if v == 0 else f"view{v}"] = PipelineSpec(
            "image", decoder=dec, transforms=_image_out(device, o.channels_last))
    pipelines["label"] = None
    pipelines["target"] = PipelineSpec("label", decoder=IntDecoder(), transforms=_label_pipeline(device)[1:])
    return pipelines


def train_loader_from_config(cfg, batch_size: int, device, distributed: bool = False) -> ResumableLoader:
    """The train loader of a run config (data.*, views.*, train.seed), ``batch_size`` rows per process: the one
    call training and the end-to-end benchmark share, so the benchmark reads what training reads."""
    d = cfg.data
    options = TrainLoaderOptions(decode=d.decode, decode_size=d.decode_size, views=cfg.views, seed=cfg.train.seed,
                                 distributed=distributed, order=d.order, os_cache=d.os_cache, drop_last=d.drop_last)
    return train_loader(d.train_beton, batch_size, d.num_workers, device, options)


def labels(beton) -> np.ndarray:
    """Every sample's label (int64, sample order) from the beton's metadata table; no image is decoded."""
    from ffcv.reader import Reader
    reader = Reader(str(beton))
    names = list(reader.handlers)
    if "label" not in names:
        raise ValueError(f"{beton} has no 'label' field (fields: {', '.join(names)})")
    return np.asarray(reader.metadata[f"f{names.index('label')}"]).reshape(-1).astype(np.int64)


def num_classes(beton) -> int:
    """Max label + 1 of a beton's 'label' field, read from the file's metadata table (no image is decoded);
    0 for an unlabeled beton (``dataset_prep folder``: every label -1, loaders then yield y = -1)."""
    y = labels(beton)
    if len(y) and y.min() < 0:
        if y.max() >= 0:
            raise ValueError(f"{beton} mixes unlabeled samples (-1) with labelled ones; rewrite it with dataset_prep")
        return 0
    return int(y.max()) + 1 if len(y) else 0


def unpack_train_batch(batch) -> tuple:
    """(x, extent, y). decode="once": x the uint8 canvases, extent (N, 2) each image's (H, W);
    "center": extent None; "per_view": x the list of per-view uint8 tensors, extent None."""
    if len(batch) == 2:
        return batch[0], None, batch[1]
    if batch[1].dim() == 2:             # (N, 2) extent after a 4-D canvas; per-view outputs are all 4-D
        return batch[0], batch[1], batch[2]
    return list(batch[:-1]), None, batch[-1]


def eval_loader(beton, batch_size: int, num_workers: int, device, size: int = 224, crop_ratio: float = 0.875,
                distributed: bool = False, os_cache: bool = True, channels_last: bool = True) -> ResumableLoader:
    """Centre crops (uint8 NCHW) and int64 labels in file order, last partial batch kept.

    Distributed: rank r gets samples r, r + world, ...; the sampler pads with up to world-1 repeated samples
    so every rank has the same number of batches (de-duplicate by index when exact counts matter).
    """
    num_workers = _check(beton, batch_size, num_workers)
    device = torch.device(device)
    pipelines = {
        "image": [CenterCropRGBImageDecoder((size, size), ratio=crop_ratio)] + _image_out(device, channels_last),
        "label": _label_pipeline(device),
    }
    return ResumableLoader(str(beton), batch_size=batch_size, num_workers=num_workers, os_cache=os_cache,
                           order=OrderOption.SEQUENTIAL, distributed=distributed, seed=0, pipelines=pipelines,
                           drop_last=False)


def epoch_indices(loader: ResumableLoader, epoch: int) -> np.ndarray:
    """The sample indices this rank reads in ``epoch``, in order (for tests and debugging)."""
    if loader.shuffle is None:
        order = np.asarray(loader.traversal_order.sample_order(epoch))
        return order[:len(loader) * loader.batch_size]
    return loader.rank_order(epoch)
