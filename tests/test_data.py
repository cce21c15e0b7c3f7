"""fastmveb.data: the real FFCV loaders on a tiny synthetic beton (shapes, order, resume, sharding)."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dataset_prep.options import BetonOptions
from dataset_prep.synthetic import make_synthetic
from fastmveb.config import ViewsConfig
from fastmveb.data import (TrainLoaderOptions, epoch_indices, eval_loader, set_epoch, set_output_sizes,
                           train_loader, unpack_train_batch)

ROOT = Path(__file__).resolve().parents[1]

# numba's finalizers raise harmless KeyErrors when ffcv's compiled pipelines are collected (docs/notes.md).
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

N_TRAIN, N_VAL, S = 40, 20, 64   # 4 classes x 10 / 5 images; small decode side keeps numba+decode fast


@pytest.fixture(scope="module")
def betons(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn")
    make_synthetic(out, BetonOptions(max_side=None, seed=0, num_workers=2, progress=False), classes=4,
                   train_per_class=N_TRAIN // 4, val_per_class=N_VAL // 4, keep_jpeg=False)
    return out / "train.beton", out / "val.beton"


@pytest.fixture(scope="module")
def reference(betons):
    """Every train image in file order, decoded exactly as decode-once does (the whole image at S x S), + labels."""
    loader = train_loader(betons[0], 16, 2, "cpu",
                          TrainLoaderOptions(decode_size=S, order="sequential", drop_last=False))
    xs, es, ys = zip(*run_epoch3(loader))
    return torch.cat(xs), torch.cat(ys), torch.cat(es)


def run_epoch3(loader):
    out = []
    for b in loader:
        x, e, y = unpack_train_batch(b)
        out.append((x.clone(), None if e is None else e.clone(), y.clone()))
    return out


def run_epoch(loader):
    return [(x, y) for x, _, y in run_epoch3(loader)]


def test_train_batches_are_the_seeded_order_of_the_file(betons, reference):
    from ffcv.reader import Reader
    ref_x, ref_y, ref_e = reference
    meta = Reader(str(betons[0])).metadata["f0"]
    assert torch.equal(ref_e, torch.from_numpy(np.stack([meta["height"], meta["width"]], 1).astype(np.int32)))
    assert (ref_e[:, 0] != ref_e[:, 1]).any()                # the synthetic images are not square
    loader = train_loader(betons[0], 8, 2, "cpu", TrainLoaderOptions(decode_size=S, seed=3))
    assert len(loader) == N_TRAIN // 8
    for epoch in (0, 1):
        set_epoch(loader, epoch)
        batches = run_epoch3(loader)
        idx = torch.from_numpy(epoch_indices(loader, epoch).astype(np.int64))
        x, e, y = (torch.cat([b[i] for b in batches]) for i in range(3))
        assert x.dtype == torch.uint8 and x.shape == (N_TRAIN, 3, S, S) and x.device.type == "cpu"
        assert e.dtype == torch.int32 and e.shape == (N_TRAIN, 2)
        assert y.dtype == torch.int64 and y.shape == (N_TRAIN,)
        assert torch.equal(x, ref_x[idx]) and torch.equal(y, ref_y[idx]) and torch.equal(e, ref_e[idx])
        assert sorted(idx.tolist()) == list(range(N_TRAIN))
        if epoch == 0:
            first = idx.clone()
    assert not torch.equal(first, idx)                     # a new permutation each epoch
    other = train_loader(betons[0], 8, 2, "cpu", TrainLoaderOptions(decode_size=S, seed=4))
    assert not np.array_equal(epoch_indices(other, 0), first.numpy())   # and per seed


def test_drop_last(betons):
    kept = train_loader(betons[0], 16, 2, "cpu", TrainLoaderOptions(decode_size=S, drop_last=False))
    batches = run_epoch(kept)
    assert [len(y) for _, y in batches] == [16, 16, 8]
    dropped = train_loader(betons[0], 16, 2, "cpu", TrainLoaderOptions(decode_size=S, drop_last=True))
    assert [len(y) for _, y in run_epoch(dropped)] == [16, 16]


@pytest.mark.parametrize("drop_last", [True, False])
def test_set_epoch_skip_reproduces_the_tail(betons, reference, drop_last):
    loader = train_loader(betons[0], 6, 2, "cpu", TrainLoaderOptions(decode_size=S, seed=1, drop_last=drop_last))
    set_epoch(loader, 2)
    full = run_epoch(loader)
    assert len(full) == (6 if drop_last else 7)
    set_epoch(loader, 2, skip_batches=4)
    tail = run_epoch(loader)
    assert len(tail) == len(full) - 4
    for (xa, ya), (xb, yb) in zip(full[4:], tail):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # The skip applies to that epoch only: the next one is epoch 3, complete.
    nxt = run_epoch(loader)
    assert len(nxt) == len(full)
    assert torch.equal(torch.cat([y for _, y in nxt]), reference[1][epoch_indices(loader, 3).astype(np.int64)])
    with pytest.raises(ValueError):
        set_epoch(loader, 0, skip_batches=len(loader) + 1)


def test_eval_loader_order_and_count(betons):
    from ffcv.reader import Reader
    labels = Reader(str(betons[1])).metadata["f1"].ravel()
    loader = eval_loader(betons[1], 8, 2, "cpu", size=48, crop_ratio=0.875)
    batches = [(x.clone(), y.clone()) for x, y in loader]
    assert [len(y) for _, y in batches] == [8, 8, 4]
    x = torch.cat([b[0] for b in batches])
    assert x.shape == (N_VAL, 3, 48, 48) and x.dtype == torch.uint8
    assert torch.cat([b[1] for b in batches]).tolist() == labels.tolist()
    again = torch.cat([x.clone() for x, _ in loader])
    assert torch.equal(x, again)


def test_per_view_shapes(betons):
    views = ViewsConfig(global_size=48, local_size=24, n_local=1)   # every view is one more numba compile
    loader = train_loader(betons[0], 8, 2, "cpu", TrainLoaderOptions(decode="per_view", views=views))
    batch = next(iter(loader))
    assert len(batch) == 2 + 1 + 1
    xs, extent, y = unpack_train_batch(batch)
    assert extent is None
    assert [tuple(v.shape) for v in xs] == [(8, 3, 48, 48)] * 2 + [(8, 3, 24, 24)]
    assert all(v.dtype == torch.uint8 for v in xs)
    assert y.dtype == torch.int64 and y.shape == (8,)
    assert not torch.equal(xs[0], xs[1])   # two independent crops of the same images


# ------------------------------------------------------------------------------------ whole-image decode
EDGE = {"top": (255, 0, 0), "bottom": (0, 255, 0), "left": (0, 0, 255), "right": (255, 255, 0)}


def _edge_image(h, w, band=4):
    """Mid-grey with a coloured band along each edge (the left/right bands are painted last, over the corners)."""
    img = np.full((h, w, 3), 128, np.uint8)
    img[:band], img[-band:] = EDGE["top"], EDGE["bottom"]
    img[:, :band], img[:, -band:] = EDGE["left"], EDGE["right"]
    return img


@pytest.fixture(scope="module")
def raw_beton(tmp_path_factory):
    """Exact pixels (PNG sources, raw storage, no resizing): a wide and a tall edge-banded image, a plain square."""
    from PIL import Image
    from dataset_prep.options import BetonOptions
    from dataset_prep.writer import write_beton
    out = tmp_path_factory.mktemp("raw")
    imgs = [_edge_image(40, 80), _edge_image(90, 30), np.full((50, 50, 3), 200, np.uint8)]
    samples = []
    for i, a in enumerate(imgs):
        Image.fromarray(a).save(out / f"{i}.png")
        samples.append((str(out / f"{i}.png"), i))
    write_beton(samples, out / "raw.beton", BetonOptions(max_side=None, write_mode="raw", shuffle=False, num_workers=1,
                                                       progress=False), max_pixels=90 * 30)
    return out / "raw.beton", imgs


def test_whole_image_canvas_is_the_resized_image_and_follows_set_output_sizes(raw_beton):
    import cv2
    beton, imgs = raw_beton
    loader = train_loader(beton, 3, 1, "cpu", TrainLoaderOptions(decode_size=S, order="sequential", drop_last=False))
    for size in (S, 48):                                      # progressive resizing: a new side between epochs
        set_output_sizes(loader, [size])
        x, extent, y = unpack_train_batch(next(iter(loader)))
        assert x.shape == (3, 3, size, size) and y.tolist() == [0, 1, 2]
        assert extent.tolist() == [[40, 80], [90, 30], [50, 50]]
        for i, a in enumerate(imgs):                         # FFCV's crop-and-resize of the whole image
            ref = torch.from_numpy(cv2.resize(a, (size, size), interpolation=cv2.INTER_AREA)).permute(2, 0, 1)
            assert (x[i].int() - ref.int()).abs().max() <= 1, (size, i)
    with pytest.raises(ValueError):
        per_view = TrainLoaderOptions(decode="per_view", views=ViewsConfig(global_size=16, local_size=8, n_local=0))
        set_output_sizes(train_loader(beton, 3, 1, "cpu", per_view), [32])


def _edges_seen(x, extent, n_draws=60):
    """Which edge bands appear in the global views cut from x (every effect but the crop off)."""
    from fastmveb.views import ViewMaker
    cfg = ViewsConfig(global_size=32, local_size=16, n_local=0, flip_p=0.0, jitter_p=0.0, gray_p=0.0,
                      blur_p=(0.0, 0.0, 0.0), solarize_p=(0.0, 0.0, 0.0), interpolation="bilinear")
    vm = ViewMaker(cfg)
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    torch.manual_seed(0)
    seen = {}
    for _ in range(n_draws):
        for v in vm(x, extent):
            u = (v * std + mean)[:2]                         # the two edge-banded images
            for name, rgb in EDGE.items():
                c = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1) / 255
                pure = ((u - c).abs().amax(1) < 0.1).flatten(1).any(1)     # (2,) per image
                seen[name] = seen.get(name, torch.zeros(2, dtype=torch.bool)) | pure
    return {k: v.tolist() for k, v in seen.items()}


def test_crops_reach_all_four_edges_of_non_square_images(raw_beton):
    beton, _ = raw_beton
    once = train_loader(beton, 3, 1, "cpu", TrainLoaderOptions(decode_size=S, order="sequential", drop_last=False))
    x, extent, _ = unpack_train_batch(next(iter(once)))
    assert _edges_seen(x, extent) == {k: [True, True] for k in EDGE}
    # The previous centre-square decode never shows the wide image's left/right or the tall image's top/bottom.
    center = train_loader(beton, 3, 1, "cpu",
                          TrainLoaderOptions(decode="center", decode_size=S, order="sequential", drop_last=False))
    x, extent, _ = unpack_train_batch(next(iter(center)))
    assert extent is None
    assert _edges_seen(x, None) == {"top": [True, False], "bottom": [True, False], "left": [False, True],
                                    "right": [False, True]}


def test_two_rank_shards_in_process(betons, monkeypatch):
    """Both ranks' loaders built in one process (rank/world patched where DistributedSampler reads them)."""
    import torch.distributed as dist
    from ffcv.reader import Reader
    labels = Reader(str(betons[0])).metadata["f1"].ravel()
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: 2)
    shards = []
    for rank in (0, 1):
        monkeypatch.setattr(dist, "get_rank", lambda *a, r=rank: r)
        loader = train_loader(betons[0], 4, 2, "cpu", TrainLoaderOptions(decode_size=32, seed=7, distributed=True))
        assert len(loader) == N_TRAIN // 2 // 4
        shards.append([epoch_indices(loader, e).tolist() for e in (0, 1)])
        if rank == 1:
            set_epoch(loader, 1, skip_batches=2)
            ys = torch.cat([b[-1].clone() for b in loader])
            assert ys.tolist() == labels[shards[1][1][8:]].tolist()
    for e in (0, 1):
        assert not set(shards[0][e]) & set(shards[1][e])
        assert sorted(shards[0][e] + shards[1][e]) == list(range(N_TRAIN))
    assert shards[0][0] != shards[0][1]


def _rank_loaders(beton, monkeypatch, world: int, batch: int, shuffle=None, drop_last=True):
    """One loader per rank of a ``world``-process run, built in this process (rank/world patched)."""
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a: world)
    loaders = []
    for rank in range(world):
        monkeypatch.setattr(dist, "get_rank", lambda *a, r=rank: r)
        loader = train_loader(beton, batch, 1, "cpu",
                              TrainLoaderOptions(decode_size=32, seed=5, distributed=world > 1, drop_last=drop_last))
        loader.shuffle = shuffle
        loader.rank_world = lambda r=rank: (r, world)       # fixed now: the patch moves on to the next rank
        loaders.append(loader)
    return loaders


def _steps_consumed(loaders, epoch, skip_samples=0):
    """Per optimizer step, the sorted global batch (all ranks' rows of that step)."""
    orders = [lo.rank_order(epoch, skip_samples) for lo in loaders]
    b = loaders[0].batch_size
    assert len({len(o) for o in orders}) == 1                    # every rank the same number of batches
    return [sorted(int(i) for o in orders for i in o[k * b:(k + 1) * b]) for k in range(-(-len(orders[0]) // b))]


def test_sample_position_means_the_same_sample_for_any_world_size(betons, monkeypatch):
    beton = betons[0]
    # ffcv's own orders are reproduced: one process (numpy) and two (torch's DistributedSampler)
    one = _rank_loaders(beton, monkeypatch, 1, 8, shuffle="numpy")[0]
    assert np.array_equal(one.rank_order(1), np.asarray(one.traversal_order.sample_order(1))[:N_TRAIN // 8 * 8])
    two = _rank_loaders(beton, monkeypatch, 2, 4, shuffle="torch")
    for lo in two:
        assert np.array_equal(lo.rank_order(1), np.asarray(lo.traversal_order.sample_order(1))[:len(lo) * 4])
    # the same generator on 1 or 2 processes: step k consumes the same global batch of 8
    one_t = _rank_loaders(beton, monkeypatch, 1, 8, shuffle="torch")
    assert _steps_consumed(one_t, 1) == _steps_consumed(two, 1)
    # 2 -> 1 and 1 -> 2 at sample 16 (2 steps of 8): the epoch's remaining samples, each exactly once
    for before, after in ((two, one_t), (one_t, two)):
        head = _steps_consumed(before, 1)[:2]
        tail = _steps_consumed(after, 1, skip_samples=16)
        assert tail == _steps_consumed(before, 1)[2:]
        assert sorted(i for s in head + tail for i in s) == list(range(N_TRAIN))
    # a changed global batch (8 -> 12 at sample 16): the same samples from there on, cut into batches of 12
    # (this plan's epoch is 3 x 12 = 36 samples: after 16, one whole batch)
    six = _rank_loaders(beton, monkeypatch, 2, 6, shuffle="torch")
    tail = _steps_consumed(six, 1, skip_samples=16)
    assert tail == [sorted(two[0].global_order(1)[16:28].tolist())]
    # set_epoch + iteration yield exactly rank_order's samples, and batches_left says how many batches
    lo = two[1]
    set_epoch(lo, 1, skip_samples=16)
    assert lo.batches_left() == 3
    labels = torch.cat([b[-1].clone() for b in lo])
    from ffcv.reader import Reader
    assert labels.tolist() == Reader(str(beton)).metadata["f1"].ravel()[lo.rank_order(1, 16)].tolist()


@pytest.mark.slow
def test_distributed_shards_are_disjoint_and_cover(betons, tmp_path):
    """The real thing: two gloo processes, each with its own ffcv loader."""
    _spawn_two_ranks(betons, tmp_path)


def _rank_main(rank, world, port, beton, out):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loader = train_loader(beton, 4, 1, "cpu", TrainLoaderOptions(decode_size=32, seed=7, distributed=True))
        res = {}
        for epoch in (0, 1):
            set_epoch(loader, epoch)
            ys = torch.cat([b[-1].clone() for b in loader])
            res[epoch] = (epoch_indices(loader, epoch).tolist(), ys.tolist(), len(loader))
        torch.save(res, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn_two_ranks(betons, tmp_path):
    import torch.multiprocessing as tmp_mp
    from ffcv.reader import Reader
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp_mp.spawn(_rank_main, args=(2, port, str(betons[0]), str(tmp_path)), nprocs=2, join=True)
    labels = Reader(str(betons[0])).metadata["f1"].ravel()
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for epoch in (0, 1):
        i0, y0, n0 = r0[epoch]
        i1, y1, n1 = r1[epoch]
        assert n0 == n1 == N_TRAIN // 2 // 4
        assert not set(i0) & set(i1) and sorted(i0 + i1) == list(range(N_TRAIN))
        assert y0 == labels[i0].tolist() and y1 == labels[i1].tolist()   # yielded what the order says
    assert r0[0][0] != r0[1][0]                                          # reshuffled per epoch


def test_ffcv_import_reuses_numba_typed_dict_code_compiled_by_an_earlier_process():
    """dataset_prep/numba_cache.py: ffcv compiles numba typed-dict methods at import; with their on-disk cache on
    (before ffcv is imported, via fastmveb.data) a second process loads them instead of compiling (3 s less)."""
    code = ("import fastmveb.data, numba.typed.typeddict as t; s = t._setitem.stats; "
            "print(sum(s.cache_hits.values()), sum(s.cache_misses.values()))")
    runs = [subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
            for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-2000:]
    hits, misses = map(int, runs[1].stdout.split())
    assert hits >= 1 and misses == 0, runs[1].stdout
