"""Evaluation: kNN against a brute-force restatement, feature extraction, linear probes, online probe, CLI errors."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastmveb.eval.features import PixelStats, extract_features, normalize_uint8
from fastmveb.eval.knn import KnnOptions, knn_accuracy, knn_eval, knn_predict, topk_accuracy
from fastmveb.eval.linear import (LARC, LinearFastOptions, LinearFullOptions, linear_fast, linear_full, rrc_flip,
                                  train_linear_on_features)
from commands import eval_cli
from fastmveb.eval.online import OnlineLinearProbe, folded_head

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
STATS = PixelStats(MEAN, STD)


def brute_knn(bank, bank_labels, queries, num_classes, k, T):
    """The definition, in float64 over the full similarity matrix."""
    sim = queries.double() @ bank.double().T
    top, idx = sim.topk(min(k, bank.shape[0]), dim=1)
    scores = torch.zeros(queries.shape[0], num_classes, dtype=torch.float64)
    for q in range(queries.shape[0]):
        for s, i in zip(top[q], idx[q]):
            scores[q, bank_labels[i]] += math.exp(s.item() / T)
    return scores


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1)


@pytest.mark.parametrize("k", [1, 7, 50, 1000])
def test_knn_chunked_equals_brute_force(k):
    bank, queries = _unit(300, 16, 0), _unit(41, 16, 1)
    labels = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(2))
    ref = brute_knn(bank, labels, queries, 7, k, 0.1)
    whole = knn_predict(bank, labels, queries, 7, k=k, T=0.1, chunk_size=10**6, query_chunk_size=10**6)
    # Bank chunks smaller than k force the running top-k to merge across chunks.
    chunked = knn_predict(bank, labels, queries, 7, k=k, T=0.1, chunk_size=5, query_chunk_size=13)
    torch.testing.assert_close(whole.double(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-6)


def test_knn_known_tiny_example():
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8]])
    labels = torch.tensor([0, 1, 1, 2])
    q = torch.tensor([[1.0, 0.0]])
    # Similarities 1, 0, -1, 0.6: the two nearest are bank 0 (class 0) and bank 3 (class 2).
    s = knn_predict(bank, labels, q, num_classes=3, k=2, T=0.5, chunk_size=1)
    torch.testing.assert_close(s, torch.tensor([[math.exp(2.0), 0.0, math.exp(1.2)]]))
    # k larger than the bank: every entry votes.
    s = knn_predict(bank, labels, q, num_classes=3, k=200, T=1.0)
    torch.testing.assert_close(s, torch.tensor([[math.e, 1 + math.exp(-1), math.exp(0.6)]]))


def test_topk_accuracy_and_top5():
    scores = torch.tensor([[9.0, 8, 7, 6, 5, 4, 3],     # label 2 at rank 3: top-5 hit, top-1 miss
                           [0.0, 1, 2, 3, 4, 5, 6],     # label 0 at rank 7: miss both
                           [1.0, 0, 0, 0, 0, 0, 0]])    # label 0 at rank 1: hit both
    top1, top5 = topk_accuracy(scores, torch.tensor([2, 0, 0]), (1, 5))
    assert top1 == pytest.approx(100 / 3) and top5 == pytest.approx(200 / 3)
    # Fewer classes than 5: top-5 is every class, 100%.
    assert topk_accuracy(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), (1, 5))[1] == 100.0


def test_knn_accuracy_separates_clusters():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(5, 32, generator=g), dim=1)
    def draw(n):
        y = torch.randint(0, 5, (n,), generator=g)
        return F.normalize(centres[y] + 0.1 * torch.randn(n, 32, generator=g), dim=1), y
    (b, by), (q, qy) = draw(400), draw(100)
    top1, top5 = knn_accuracy(b, by, q, qy, k=20, T=0.1, chunk_size=64)
    assert top1 == 100.0 and top5 == 100.0
    # Shuffled bank labels: chance level, so the metric is not trivially 100.
    top1, _ = knn_accuracy(b, by[torch.randperm(400, generator=g)], q, qy, k=20, T=0.1)
    assert top1 < 50.0


class ReusingLoader:
    """Mimics FFCV: every batch is written into the same output buffers."""

    def __init__(self, xs, ys, batch):
        self.xs, self.ys, self.batch = xs, ys, batch

    def __iter__(self):
        bx = torch.empty((self.batch,) + self.xs.shape[1:], dtype=torch.uint8)
        by = torch.empty(self.batch, 1, dtype=torch.int64)
        for i in range(0, len(self.xs), self.batch):
            n = min(self.batch, len(self.xs) - i)
            bx[:n] = self.xs[i:i + n]
            by[:n, 0] = self.ys[i:i + n]
            yield bx[:n], by[:n]

    def __len__(self):
        return math.ceil(len(self.xs) / self.batch)


def colour_dataset(n, size=24, seed=0, classes=3):
    """Class c = images dominated by colour channel c, with texture noise: a linear function of mean colour."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randint(0, 120, (n, 3, size, size), generator=g)
    x[torch.arange(n), y] += 120
    return x.to(torch.uint8), y


def test_extract_features_normalises_copies_labels_and_restores_mode():
    xs, ys = colour_dataset(10, size=4)
    net = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(48))
    net.train()
    f, y = extract_features(nn.Sequential(nn.Flatten()), ReusingLoader(xs, ys, 4), "cpu", STATS)
    expect = F.normalize(normalize_uint8(xs, STATS).flatten(1), dim=1)
    torch.testing.assert_close(f, expect)
    assert torch.equal(y, ys) and y.dtype == torch.int64        # not the last batch's buffer repeated
    f, y = extract_features(net, ReusingLoader(xs, ys, 4), "cpu", STATS, max_samples=6, normalize=False)
    assert f.shape == (6, 48) and torch.equal(y, ys[:6])
    assert net.training                                          # mode restored after eval
    m = torch.tensor(MEAN).view(1, 3, 1, 1)
    s = torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(normalize_uint8(xs, STATS), (xs.float() / 255 - m) / s)


def test_knn_eval_on_colour_images_beats_random_labels():
    train, val = colour_dataset(90, seed=0), colour_dataset(30, seed=1)
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    r = knn_eval(pool, ReusingLoader(*train, 32), ReusingLoader(*val, 32), "cpu", STATS, KnnOptions(k=10, T=0.1))
    assert set(r) == {"top1", "top5"}
    assert r["top1"] > 90.0 and r["top5"] == 100.0
    r = knn_eval(pool, ReusingLoader(*train, 32), ReusingLoader(*val, 32), "cpu", STATS, KnnOptions(k=10, T=0.1, max_val=7))
    assert r["top1"] * 7 / 100 == pytest.approx(round(r["top1"] * 7 / 100))  # a whole number of 7 queries


def test_linear_on_cached_features_learns_separable_set():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 64, generator=g)
    # Large common offset and tiny scale: raw, SGD at lr 0.1 would crawl; standardised it does not.
    def draw(n):
        x = torch.randn(n, 64, generator=g)
        return 50.0 + 0.01 * x, (x @ w.T).argmax(1)
    (xtr, ytr), (xva, yva) = draw(2000), draw(500)
    r = train_linear_on_features(xtr, ytr, xva, yva, LinearFastOptions(epochs=8, batch_size=128, base_lr=0.1))
    assert r["top1"] > 90.0, r
    # The folded head works on raw features directly (what export ships as the torchvision fc).
    pred = (xva @ r["head"]["weight"].T + r["head"]["bias"]).argmax(1)
    assert (pred == yva).float().mean().item() * 100 == pytest.approx(r["top1"])
    # Labels unrelated to the features: no better than chance, so the > 90% above is learnt.
    bad = train_linear_on_features(xtr, ytr[torch.randperm(2000, generator=g)], xva, yva,
                                   LinearFastOptions(epochs=2, batch_size=128, base_lr=0.1))
    assert bad["top1"] < 50.0


def test_linear_fast_end_to_end_on_images():
    train, val = colour_dataset(120, seed=0), colour_dataset(45, seed=1)
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    r = linear_fast(pool, ReusingLoader(*train, 32), ReusingLoader(*val, 32), "cpu", STATS,
                    LinearFastOptions(epochs=30, batch_size=32, base_lr=0.1))
    assert r["top1"] > 90.0 and r["n_train"] == 120 and r["head"]["weight"].shape == (3, 3)


def released_larc_sgd(params, grads_per_step, lr, momentum, trust, wd=0.0, eps=1e-8, scale_1d=True):
    """Restatement of the released linear-eval optimizer: LARC (scale mode, no clip) around torch SGD; every
    tensor is scaled by trust * |w| / (|g| + wd |w| + eps) when both norms are non-zero."""
    params = [p.detach().clone().requires_grad_(True) for p in params]
    sgd = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=0.0)
    for grads in grads_per_step:
        for p, g in zip(params, grads):
            pn, gn = p.detach().norm(), g.norm()
            scale = trust * pn / (gn + wd * pn + eps) if pn != 0 and gn != 0 and (scale_1d or p.ndim > 1) else 1.0
            p.grad = (g + wd * p.detach()) * scale
        sgd.step()
    return [p.detach() for p in params]


def test_larc_matches_the_released_optimizer_on_weight_and_bias():
    g = torch.Generator().manual_seed(0)
    w0, b0 = torch.randn(5, 7, generator=g) * 0.01, torch.zeros(5)          # the probe's init: bias 0
    steps = [[torch.randn(5, 7, generator=g), torch.randn(5, generator=g)] for _ in range(4)]
    w, b = nn.Parameter(w0.clone()), nn.Parameter(b0.clone())
    opt = LARC([w, b], lr=1.6, momentum=0.9, weight_decay=0.0, trust_coef=0.001)
    for gw, gb in steps:
        w.grad, b.grad = gw.clone(), gb.clone()
        opt.step()
    ew, eb = released_larc_sgd([w0, b0], steps, lr=1.6, momentum=0.9, trust=0.001)
    torch.testing.assert_close(w.detach(), ew)
    torch.testing.assert_close(b.detach(), eb)
    # the bias is trust-scaled too (from its second step, once non-zero): not what weights-only LARS gives
    _, eb_weights_only = released_larc_sgd([w0, b0], steps, lr=1.6, momentum=0.9, trust=0.001, scale_1d=False)
    assert (b.detach() - eb_weights_only).abs().max() > 0.1


def sample_rrc_boxes(n, height, width, scale, ratio, generator):
    """The boxes rrc_flip cuts, as roi_align's (x1, y1, x2, y2): training's sampler (views.sample_crop_boxes)."""
    from fastmveb.views import sample_crop_boxes
    top, left, h, w = sample_crop_boxes(n, height, width, scale, ratio, torch.device("cpu"), generator).unbind(1)
    return torch.stack([left, top, left + w, top + h], dim=1)


def test_rrc_boxes_and_crops():
    g = torch.Generator().manual_seed(0)
    boxes = sample_rrc_boxes(2000, 40, 60, (0.08, 1.0), (3 / 4, 4 / 3), g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all() and (boxes[:, 2] <= 60).all() and (boxes[:, 3] <= 40).all()
    area = w * h / (40 * 60)
    assert area.min() > 0.06 and area.max() <= 1.0 and 0.35 < area.mean() < 0.65
    assert ((w / h) > 0.7).all() and ((w / h) < 1.45).all()
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    # Whole-image box at the same size is the identity; flip_p=1 mirrors it.
    same = rrc_flip(x, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0)
    torch.testing.assert_close(same, x.float())
    torch.testing.assert_close(rrc_flip(x, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=1.0), x.float().flip(-1))
    out = rrc_flip(x, 8, generator=g)
    assert out.shape == (3, 3, 8, 8) and out.min() >= 0 and out.max() <= 255


def test_rrc_on_whole_images_held_in_a_canvas():
    # A 30 x 60 image squeezed into a 16 x 16 canvas (the decode-once batch): crops are drawn on 30 x 60.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=g)
    extent = torch.tensor([[30, 60], [16, 16]])
    # scale 1 at the image's own aspect: the box is the whole image, i.e. the whole canvas
    whole = rrc_flip(x[:1], 16, scale=(1.0, 1.0), ratio=(2.0, 2.0), flip_p=0.0, extent=extent[:1])
    torch.testing.assert_close(whole, x[:1].float())
    # per-image extents: the crop scale is relative to each image's own area, boxes stay inside it
    ext = torch.tensor([[30, 60], [80, 40]]).repeat(1000, 1)
    boxes = sample_rrc_boxes(2000, ext[:, 0], ext[:, 1], (0.08, 1.0), (3 / 4, 4 / 3), g)
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert (boxes[:, 2] <= ext[:, 1]).all() and (boxes[:, 3] <= ext[:, 0]).all() and (boxes[:, :2] >= 0).all()
    area = w * h / (ext[:, 0] * ext[:, 1])
    from torchvision.transforms import RandomResizedCrop
    torch.manual_seed(0)
    for k, (hh, ww) in enumerate(((30, 60), (80, 40))):        # torchvision on the same image sizes
        tv = torch.tensor([(lambda b: b[2] * b[3] / (hh * ww))(RandomResizedCrop.get_params(
            torch.empty(3, hh, ww), (0.08, 1.0), (3 / 4, 4 / 3))) for _ in range(1000)])
        assert area[k::2].min() >= 0.06 and area[k::2].max() <= tv.max() + 1e-6
        assert abs(float(area[k::2].mean() - tv.mean())) < 4 * float(tv.std()) / 1000 ** 0.5 * 2 ** 0.5
    # a square box in the 30 x 60 image covers half the canvas width and all its height
    half = rrc_flip(x[:1].expand(64, -1, -1, -1), 8, scale=(0.5, 0.5), ratio=(1.0, 1.0), flip_p=0.0,
                    extent=extent[:1].expand(64, -1), generator=g)
    assert half.shape == (64, 3, 8, 8)


def test_linear_full_protocol_learns_colour_classes():
    train, val = colour_dataset(96, size=32, seed=0), colour_dataset(30, size=32, seed=1)
    pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))  # feature scale ~1
    logs = []
    r = linear_full(pool, ReusingLoader(*train, 16), ReusingLoader(*val, 16), "cpu", STATS,
                    LinearFullOptions(epochs=8, base_lr=4.0, trust_coef=0.0, crop_size=16, val_every=3), log=logs.append)
    assert r["top1"] > 90.0, (r["top1"], logs)
    assert len(logs) == 8 and r["head"]["weight"].shape == (3, 3)
    # validations every 3 epochs and after the last; final and best both reported, best = the max of them
    assert r["val_epochs"] == [3, 6, 8] and r["batch"] == 16
    tops = {h["epoch"]: h["top1"] for h in r["history"] if "top1" in h}
    assert r["best_top1"] == max(tops.values()) and tops[r["best_epoch"]] == r["best_top1"]
    assert r["top1"] == tops[8] and r["best_top1"] >= r["top1"]
    # per-epoch cosine from 0.1 x ... here base_lr 4.0 x 16/256, constant within an epoch
    lr = 4.0 * 16 / 256
    for h in r["history"]:
        assert h["lr"] == pytest.approx(lr * 0.5 * (1 + math.cos(math.pi * (h["epoch"] - 1) / 8)))


def test_linear_full_micro_batches_give_the_undivided_result():
    # A backbone with BatchNorm: frozen in eval mode, so chunking the forward changes nothing; the head steps
    # on the whole batch's features either way.
    train, val = colour_dataset(64, size=24, seed=0), colour_dataset(30, size=24, seed=1)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    net[1].running_mean.uniform_(-0.5, 0.5)
    whole = linear_full(net, ReusingLoader(*train, 32), ReusingLoader(*val, 16), "cpu", STATS,
                        LinearFullOptions(epochs=3, base_lr=0.1, crop_size=16, val_every=1))
    parts = linear_full(net, ReusingLoader(*train, 32), ReusingLoader(*val, 16), "cpu", STATS,
                        LinearFullOptions(epochs=3, base_lr=0.1, crop_size=16, val_every=1, micro_batch=8))
    assert parts["micro_batch"] == 8 and whole["micro_batch"] == 32 and net.training
    for k in ("weight", "bias"):
        torch.testing.assert_close(parts["head"][k], whole["head"][k], rtol=1e-5, atol=1e-7)
    assert not torch.equal(whole["head"]["bias"], torch.zeros(3))    # the bias moved (LARC scales it too)


def _run_dir(root: Path, betons: Path) -> Path:
    """A run directory as the trainer leaves it: config.yaml + one checkpoint of a tiny ResNet-10."""
    from fastmveb.checkpoint import checkpoint_path, save_checkpoint
    from fastmveb.config import dump_config, load_config, to_dict
    from fastmveb.model import MVEBModel
    cfg = load_config(ROOT / "rcs/tiny.yaml", [f"data.train_beton={betons / 'train.beton'}",
                                               f"data.val_beton={betons / 'val.beton'}", "data.decode_size=48",
                                               "eval.size=32", "data.num_workers=1", "model.proj_hidden=32",
                                               "model.proj_out=32"])
    run = root / "run"
    run.mkdir()
    dump_config(cfg, run / "config.yaml")
    torch.manual_seed(0)
    model = MVEBModel.from_config(cfg.model)
    assert save_checkpoint(checkpoint_path(run, 1), {"model": model.state_dict(), "target": model.state_dict(),
                                                     "step": 1, "epoch": 0, "config": to_dict(cfg)})
    return run


def test_cli_linear_full_reports_final_and_best_and_fast_says_quick_estimate(small_betons, tmp_path):
    import json
    run = _run_dir(tmp_path, small_betons)
    r = eval_cli("linear", "--run", str(run), "--mode", "full", "--epochs", "2", "--val-every", "1",
             "--linear-batch-size", "32", "--micro-batch", "16", "--device", "cpu", "--num-workers", "1")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "linear full (released protocol, batch 32, 2 epochs)" in r.stdout and "final top-1" in r.stdout
    assert "best of the validations at epochs [1, 2]: top-1" in r.stdout
    rec = json.loads((run / "eval.jsonl").read_text().splitlines()[-1])
    assert rec["mode"] == "full" and rec["batch_size"] == 32 and rec["micro_batch"] == 16
    assert rec["best_top1"] >= rec["top1"] and rec["best_epoch"] in (1, 2) and rec["val_epochs"] == [1, 2]
    r = eval_cli("linear", "--run", str(run), "--mode", "full", "--epochs", "1", "--device", "cpu",
             "--num-workers", "1")                                                 # batch 4096 > 160 images
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: the linear batch 4096 exceeds")
    r = eval_cli("linear", "--run", str(run), "--mode", "full", "--max-train", "10", "--max-val", "5", "--device", "cpu")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --max-train and --max-val: only knn and linear --mode fast take an image limit; linear --mode full "
        "trains and validates on every image"], r.stderr
    r = eval_cli("linear", "--run", str(run), "--mode", "fast", "--epochs", "2", "--device", "cpu",
             "--num-workers", "1", "--no-log")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "linear fast (quick estimate on cached centre-crop features, 2 epochs)" in r.stdout


def test_online_probe_leaves_backbone_gradients_unchanged():
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    head = nn.Linear(8, 4)
    probe = OnlineLinearProbe(8, 5)
    x, y = torch.randn(6, 3, 10, 10), torch.randint(0, 5, (6,))

    def grads(with_probe):
        for p in list(backbone.parameters()) + list(head.parameters()) + list(probe.parameters()):
            p.grad = None
        h = backbone(x)
        loss = head(h).pow(2).mean()
        if with_probe:
            pl, top1 = probe(h, y)
            loss = loss + 10.0 * pl
            assert top1.ndim == 0 and 0.0 <= top1.item() <= 100.0
        loss.backward()
        return [p.grad.clone() for p in list(backbone.parameters()) + list(head.parameters())]

    plain, probed = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, probed))
    assert probe.fc.weight.grad is not None and probe.fc.weight.grad.abs().sum() > 0


def test_online_probe_folded_head_matches_eval_forward():
    probe = OnlineLinearProbe(6, 3)
    probe.train()
    for _ in range(5):
        probe(torch.randn(16, 6) * 3 + 2, torch.randint(0, 3, (16,)))
    probe.eval()
    h = torch.randn(4, 6)
    hs = folded_head(probe.state_dict())
    torch.testing.assert_close(h @ hs["weight"].T + hs["bias"], probe.fc(probe.bn(h)))
