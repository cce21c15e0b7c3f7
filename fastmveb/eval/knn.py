"""Weighted k-nearest-neighbour classification on L2-normalised backbone features (the SSL kNN monitor).

    scores = knn_predict(bank, bank_labels, queries, num_classes, k=200, T=0.1)
    top1, top5 = knn_accuracy(bank, bank_labels, queries, query_labels, num_classes)
    knn_eval(backbone, train_loader, val_loader, device, stats, KnnOptions(k=200, T=0.1))  # -> {"top1", "top5"}

Each query's class score is sum over its k most cosine-similar bank entries of exp(sim / T) for that
entry's class. The bank is streamed in chunks with a running top-k, so only a (queries x chunk) similarity
block is ever on the device: an ImageNet bank (1.28M x 2048 floats, 10 GB) can stay in host memory.

Choosing k and T. The released recipe (k=200, T=0.1) is tuned for ImageNet: 1000 classes, ~1,300 images
per class, so 200 neighbours are a small part of one class. On a small set keep k well under the number of
training images per class, or a query's vote fills up with far-away neighbours from every class and tends
to the class prior. Measured on the ~10-class synthetic set (300 train / 50 val images per class, 64-px
centre crops), with a texture descriptor (gradient-orientation histogram + low-frequency FFT magnitudes) as
the feature, T=0.1: k=1 30.4%, k=5 35.4%, k=20 36.0%, k=200 32.4% top-1 (chance 10%). So rcs/tiny uses
k=20, T=0.1. T barely matters on such features: cosine similarities between ResNet features are all close,
and T in 0.05-0.2 moved top-1 by under 2 points in every sweep we ran.
"""
from __future__ import annotations

import dataclasses

import torch

from fastmveb.collectives import all_gather_rows
from fastmveb.eval.features import PixelStats, extract_features


@dataclasses.dataclass(frozen=True)
class KnnOptions:
    """The kNN classifier's settings (k neighbours, temperature T: a run's eval.knn_k / eval.knn_t, see ``of``)
    and how many train (bank) / val (query) images it reads (None: all)."""
    k: int
    T: float
    max_train: int | None = None
    max_val: int | None = None

    @classmethod
    def of(cls, cfg, max_train: int | None = None, max_val: int | None = None) -> KnnOptions:
        return cls(cfg.eval.knn_k, cfg.eval.knn_t, max_train, max_val)


@torch.no_grad()
def knn_predict(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, num_classes: int,
                k: int = 200, T: float = 0.1, chunk_size: int = 65536, query_chunk_size: int = 1024,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Class scores [Q, num_classes] (float32, on the queries' device unless ``device`` is given).

    bank [N, D] and queries [Q, D] are expected L2-normalised (cosine similarity = dot product).
    The bank may live on the CPU; it crosses to ``device`` once, ``chunk_size`` rows at a time (the outer
    loop), while all queries stay on the device; each (query chunk x bank chunk) similarity block is at most
    query_chunk_size x chunk_size floats (256 MB by default). Per query only the running top-k (similarity,
    label) is kept. k is capped at N. Equivalent to the top-k of the full [Q, N] similarity matrix.
    """
    if bank.ndim != 2 or queries.ndim != 2 or bank.shape[1] != queries.shape[1]:
        raise ValueError(f"bank {tuple(bank.shape)} and queries {tuple(queries.shape)} must be [N, D] and [Q, D]")
    if bank.shape[0] != bank_labels.shape[0]:
        raise ValueError("bank and bank_labels differ in length")
    device = torch.device(device) if device is not None else queries.device
    k = min(k, bank.shape[0])
    bank_labels = bank_labels.reshape(-1).long()
    qs = [queries[i:i + query_chunk_size].to(device, torch.float32) for i in range(0, queries.shape[0], query_chunk_size)]
    # Running top-k per query chunk (Q x k, small); the bank is the outer loop so it crosses to the device once.
    best_sim = [torch.empty(q.shape[0], 0, device=device) for q in qs]
    best_lab = [torch.empty(q.shape[0], 0, dtype=torch.long, device=device) for q in qs]
    for b0 in range(0, bank.shape[0], chunk_size):
        b = bank[b0:b0 + chunk_size].to(device, torch.float32, non_blocking=True)
        lab = bank_labels[b0:b0 + chunk_size].to(device, non_blocking=True)
        for i, q in enumerate(qs):
            sim = q @ b.T                                                    # [q, chunk]
            # Candidates = previous top-k + this chunk; keeping k of them loses nothing the global top-k
            # would keep, because every discarded entry is beaten by k others already.
            cand_sim = torch.cat([best_sim[i], sim], dim=1)
            cand_lab = torch.cat([best_lab[i], lab.expand(q.shape[0], -1)], dim=1)
            best_sim[i], idx = cand_sim.topk(min(k, cand_sim.shape[1]), dim=1)
            best_lab[i] = cand_lab.gather(1, idx)
    out = []
    for s_, l_ in zip(best_sim, best_lab):
        scores = torch.zeros(s_.shape[0], num_classes, device=device)
        scores.scatter_add_(1, l_, (s_ / T).exp())
        out.append(scores)
    return torch.cat(out) if out else torch.zeros(0, num_classes, device=device)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[float]:
    """Percent of rows whose label is among the ``k`` highest scores, for each k (capped at the class count)."""
    labels = labels.reshape(-1).to(scores.device)
    kmax = min(max(ks), scores.shape[1])
    pred = scores.topk(kmax, dim=1).indices                              # [Q, kmax]
    hit = pred.eq(labels[:, None])
    n = max(labels.shape[0], 1)
    return [100.0 * hit[:, :min(k, kmax)].any(dim=1).sum().item() / n for k in ks]


def knn_accuracy(bank, bank_labels, queries, query_labels, num_classes: int | None = None, k: int = 200,
                 T: float = 0.1, chunk_size: int = 65536, device=None) -> tuple[float, float]:
    """(top-1, top-5) in percent of the weighted kNN classifier; num_classes defaults to max label + 1."""
    if num_classes is None:
        num_classes = int(max(bank_labels.max().item(), query_labels.max().item())) + 1
    scores = knn_predict(bank, bank_labels, queries, num_classes, k=k, T=T, chunk_size=chunk_size, device=device)
    top1, top5 = topk_accuracy(scores, query_labels, (1, 5))
    return top1, top5


def knn_eval(backbone, train_loader, val_loader, device, stats: PixelStats, opts: KnnOptions,
             amp_dtype=None, gather: bool = False) -> dict:
    """kNN accuracy of ``backbone``: train-set features form the bank, val-set features are the queries.

    Use deterministic eval loaders (centre crop, no augmentation). The backbone's train/eval mode is
    restored afterwards. With ``gather=True`` (distributed loaders) every rank ends up with the full bank and
    queries and computes the same numbers. Returns {"top1": %, "top5": %}.
    """
    bank, bank_labels = extract_features(backbone, train_loader, device, stats, opts.max_train, amp_dtype, gather=gather)
    queries, query_labels = extract_features(backbone, val_loader, device, stats, opts.max_val, amp_dtype, gather=gather)
    num_classes = int(max(bank_labels.max().item(), query_labels.max().item())) + 1
    device = torch.device(device)
    # Queries stay on the compute device in chunks; the bank streams from host memory.
    top1, top5 = knn_accuracy(bank, bank_labels, queries, query_labels, num_classes, k=opts.k, T=opts.T,
                              device=device)
    return {"top1": top1, "top5": top5}


def check_monitor_labels(cfg) -> None:
    """Training's kNN checks (eval.knn_every_epochs, eval.knn_at_end) measure val against a bank of train: a val
    label the train beton lacks is never predicted right, so the figures would mix in classes the bank cannot
    hold. UserError (one line naming the labels) at start-up, before training spends any time; nothing when the
    checks are off or a beton has no labels (train.switch_off_label_parts turns them off then)."""
    if not (cfg.eval.knn_at_end or cfg.eval.knn_every_epochs):
        return
    from dataset_prep.integrity import label_gap
    from fastmveb.errors import UserError
    gap = label_gap(cfg.data.train_beton, cfg.data.val_beton)
    if gap:
        raise UserError(f"{gap}: the kNN checks would count classes the bank never holds; write train and val "
                        "together (dataset_prep), or train without them: eval.knn_at_end=false "
                        "eval.knn_every_epochs=0")


# ---------------------------------------------------------------------------------------------------------
# The kNN monitor on every process: no rank works alone while the others wait at a barrier.

def _first_occurrence(idx: torch.Tensor, all_idx: torch.Tensor, offset: int) -> torch.Tensor:
    """Mask of this rank's rows (idx, at ``offset`` in the rank-ordered all_idx) that are the first copy of
    their sample: FFCV's distributed sampler pads the shards with repeats, which would vote twice."""
    order = torch.argsort(all_idx, stable=True)
    first = torch.ones_like(all_idx, dtype=torch.bool)
    s = all_idx[order]
    first[order[1:]] = s[1:] != s[:-1]
    return first[offset:offset + idx.shape[0]]


@torch.no_grad()
def distributed_knn(backbone, bank_loader, query_loader, device, stats: PixelStats, opts: KnnOptions,
                    amp_dtype=None, feature_dtype: torch.dtype = torch.bfloat16) -> dict:
    """knn_eval with the work split over the processes: every rank extracts features of its shard of the
    bank and of the queries (loaders made with distributed=True; ``opts.max_train`` / ``max_val`` bound the
    totals), the queries are gathered, every rank takes the top-k of all queries against its own bank shard,
    and the (Q, k) candidates of all ranks are merged: the result equals one process over the whole sets.
    Features are kept in ``feature_dtype`` (bf16 halves memory and traffic; similarities are float32).
    Measured on the synthetic set (3,000 / 500 images, k=20, untrained ResNet-10/18, the worst case: all
    cosines close): bf16 moved top-1 by 0.0, +0.2, +0.4 points (binomial noise at 500 queries: ~1.5).
    Returns {"top1", "top5"} on every rank. Without a process group it is knn_eval on one process.
    """
    import torch.distributed as dist
    from fastmveb.data import epoch_indices
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        bank, bank_y = extract_features(backbone, bank_loader, device, stats, opts.max_train, amp_dtype)
        queries, query_y = extract_features(backbone, query_loader, device, stats, opts.max_val, amp_dtype)
        top1, top5 = knn_accuracy(bank.to(feature_dtype), bank_y, queries.to(feature_dtype), query_y, k=opts.k,
                                  T=opts.T, device=device)
        return {"top1": top1, "top5": top5}
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device(device)
    comm = device if dist.get_backend() == "nccl" else torch.device("cpu")   # NCCL moves device tensors, gloo CPU
    per_rank = lambda m: None if m is None else -(-m // world)              # noqa: E731

    def shard(loader, limit):
        # Eval loaders read in file order, rank r taking samples r, r + world, ...: the first `limit` samples
        # (what one process would use) are within each rank's first ceil(limit / world) rows.
        f, y = extract_features(backbone, loader, device, stats, per_rank(limit), amp_dtype)
        idx = torch.as_tensor(epoch_indices(loader, 0)[: f.shape[0]], dtype=torch.int64)
        keep = idx < limit if limit is not None else torch.ones_like(idx, dtype=torch.bool)
        return f[keep].to(comm, feature_dtype), y[keep].to(comm), idx[keep].to(comm)

    bank, bank_y, bank_i = shard(bank_loader, opts.max_train)
    q, q_y, q_i = shard(query_loader, opts.max_val)
    # Queries: every rank gets all of them, each sample once.
    all_qi = all_gather_rows(q_i)
    keep_q = _first_occurrence(all_qi, all_qi, 0)
    queries, query_y = all_gather_rows(q)[keep_q], all_gather_rows(q_y)[keep_q]
    # Bank: this rank's shard, minus rows that another rank (or an earlier row) holds too.
    sizes = all_gather_rows(torch.tensor([bank_i.shape[0]], device=comm))
    offset = int(sizes[:rank].sum())
    keep_b = _first_occurrence(bank_i, all_gather_rows(bank_i), offset)
    bank, bank_y = bank[keep_b], bank_y[keep_b]
    num_classes = int(torch.stack([bank_y.max(), query_y.max()]).max().item()) + 1
    num_classes = int(all_gather_rows(torch.tensor([num_classes], device=comm)).max())
    # Local top-k (similarity, label) per query against this shard, merged over the ranks.
    k_all = min(opts.k, int(all_gather_rows(torch.tensor([bank.shape[0]], device=comm)).sum()))
    sims, labs = _local_topk(bank, bank_y, queries, k_all, device)
    sims, labs = sims.to(comm), labs.to(comm)
    all_s = [torch.empty_like(sims) for _ in range(world)]
    all_l = [torch.empty_like(labs) for _ in range(world)]
    dist.all_gather(all_s, sims)
    dist.all_gather(all_l, labs)
    cand_s, cand_l = torch.cat(all_s, 1), torch.cat(all_l, 1)
    best, pos = cand_s.topk(k_all, dim=1)                  # k_all <= the bank: the -inf pads never win
    scores = torch.zeros(queries.shape[0], num_classes, device=comm)
    scores.scatter_add_(1, cand_l.gather(1, pos), (best / opts.T).exp())
    top1, top5 = topk_accuracy(scores, query_y, (1, 5))
    return {"top1": top1, "top5": top5}


def _local_topk(bank, bank_y, queries, k: int, device, chunk: int = 65536):
    """(Q, k) best similarities and their labels of every query against ``bank``, padded with -inf / 0 where
    the bank has fewer than k rows."""
    qs = queries.to(device, torch.float32)
    best_s = torch.full((qs.shape[0], 0), -float("inf"), device=device)
    best_l = torch.zeros((qs.shape[0], 0), dtype=torch.long, device=device)
    for b0 in range(0, bank.shape[0], chunk):
        b = bank[b0:b0 + chunk].to(device, torch.float32)
        lab = bank_y[b0:b0 + chunk].to(device).long()
        cand_s = torch.cat([best_s, qs @ b.T], 1)
        cand_l = torch.cat([best_l, lab.expand(qs.shape[0], -1)], 1)
        best_s, i = cand_s.topk(min(k, cand_s.shape[1]), dim=1)
        best_l = cand_l.gather(1, i)
    if best_s.shape[1] < k:
        pad = k - best_s.shape[1]
        best_s = torch.cat([best_s, best_s.new_full((qs.shape[0], pad), -float("inf"))], 1)
        best_l = torch.cat([best_l, best_l.new_zeros((qs.shape[0], pad))], 1)
    return best_s, best_l
