"""MVEB pretraining, the spine: build -> loop -> log -> checkpoint. Read it top to bottom.

    accelerate launch fastmveb/train.py --rc rcs/rn50.yaml [section.key=value ...]   # one GPU, many GPUs, nodes
    python fastmveb/train.py --rc rcs/tiny.yaml                                     # CPU demo, a few minutes

Trains a ResNet with the MVEB objective (alignment between views + the von Mises-Fisher entropy of the
embeddings, ../shared/MVEB.md): FFCV decodes each image once, the GPU cuts every view, the online network
runs channels-last under bf16 autocast (compiled on CUDA), LARS steps it and an EMA copy gives the targets.
Everything goes to runs/NAME/ (config.yaml, meta.json, metrics.jsonl, tb/, checkpoints/); running the same
command again resumes from the newest checkpoint and reproduces the uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python fastmveb/train.py` and `accelerate launch fastmveb/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from tqdm import tqdm

from fastmveb import checkpoint as ckpt
from fastmveb.batchnorm import convert_batchnorm, views
from fastmveb.config import Config, ConfigError, dump_config, load_config, to_dict
from fastmveb.data import eval_loader, set_epoch, train_loader, unpack_train_batch
from fastmveb.eval.knn import knn_eval
from fastmveb.loss import mveb_loss
from fastmveb.metrics import MetricsLogger, collapse_warning, effective_rank, uniformity
from fastmveb.model import MVEBModel, ema_momentum_table, ema_update, make_target
from fastmveb.optim import LARS, lr_at, param_groups, peak_lr
from fastmveb.views import ViewMaker


class MultiView(nn.Module):
    """All views in ONE forward call: DDP allows one forward per backward, and views of equal size
    (the two globals, then the locals) share a backbone call; ``views(k)`` makes every BatchNorm normalise
    each view's chunk with its own statistics, as the released per-crop calls do (fastmveb/batchnorm.py)."""

    def __init__(self, model: nn.Module, probe: nn.Module | None = None):
        super().__init__()
        self.model, self.probe = model, probe

    def forward(self, v: list[torch.Tensor], y: torch.Tensor | None = None):
        h_views, p_views, i = [], [], 0
        while i < len(v):
            j = i
            while j < len(v) and v[j].shape[-1] == v[i].shape[-1]:
                j += 1
            with views(j - i):
                h, p = self.model(torch.cat(v[i:j]))                  # (k*N, ...) -> k chunks of N
            h_views += h.chunk(j - i)
            p_views += p.chunk(j - i)
            i = j
        probe_out = self.probe(h_views[0], y) if self.probe is not None else None
        return h_views, p_views, probe_out


def train_step(net, target, view_maker, optimizer, x, y, lr: float, m: torch.Tensor, cfg: Config, accelerator):
    """One optimisation step, no host sync: returns detached stats, the skip flag and z of global view 1.

    The networks inside are compiled; the step itself stays eager because the entropy solve (Cholesky,
    float64) and the optimizer's skip logic gain nothing from compilation.
    """
    online = ckpt.unwrap(net).model
    # A skipped step must leave no trace, but its forward already moved the BN running statistics (maybe to
    # NaN): keep a copy to put back. BN buffers are ~0.1% of the parameters, so this is cheap.
    buffers = list(online.buffers())
    saved = torch._foreach_mul(buffers, 1) if buffers else []      # the copy, batched (foreach) on CUDA
    # The named phases are what `python -m fastmveb.bench profile` splits the step time by.
    with phase("views"), torch.no_grad():
        v = view_maker(x)                                              # V views, globals first
    with accelerator.autocast():
        with phase("forward"):
            _, p_views, probe_out = net(v, y)
        with phase("target"), torch.no_grad(), views(2):
            _, t_p = target(torch.cat(v[:2]))                          # (2N, d): targets of the two globals
    with phase("loss"):
        z = [F.normalize(p.float(), dim=1) for p in p_views]
        t = [F.normalize(tp.float(), dim=1) for tp in t_p.chunk(2)]
        loss, stats = mveb_loss(z, t, lam=cfg.loss.lam, group=_group(cfg.loss.group), eta=cfg.loss.eta,
                                min_tau=cfg.loss.min_tau)
        total = loss
        if probe_out is not None:
            total = loss + probe_out[0]                                # the probe sees detached features
            stats = dict(stats, probe_loss=probe_out[0].detach(), probe_top1=probe_out[1].detach())
    with phase("backward"):
        accelerator.backward(total)

    with phase("optimizer"):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        skip = ~(torch.isfinite(loss) & torch.isfinite(grad_norm))     # grads are all-reduced: every rank agrees
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step(skip=skip)
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for b, old in zip(buffers, saved):
                torch.where(skip, old, b, out=b)
    with phase("ema"):
        ema_update(target, online, torch.where(skip, torch.ones_like(m), m))  # skipped: the target does not move
    stats = dict(stats, loss=loss.detach(), grad_norm=grad_norm.detach())
    return stats, skip, z[0].detach()


def phase(name: str):
    """A named profiler range around one phase of the step (a few microseconds; records only under a profiler)."""
    return torch.profiler.record_function("fastmveb/" + name)


def _group(g: str):
    return g if g in ("local", "global") else int(g)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rc", required=True, help="run config YAML (see rcs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.epochs=10")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.rc, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in (cfg.data.train_beton,) + ((cfg.data.val_beton,) if cfg.eval.knn_at_end or cfg.eval.knn_every_epochs else ()):
        if not Path(path).is_file():
            print(f"error: dataset '{path}' not found; run 'make beton' (synthetic) or set data.train_beton/"
                  f"data.val_beton to betons written by 'make beton DATA=... OUT=...'", file=sys.stderr)
            return 2

    # ---- build --------------------------------------------------------------------------------------
    if cfg.train.deterministic:                                       # before CUDA and cuBLAS start
        try:
            ckpt.use_deterministic_algorithms()
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    # cpu=True is what makes torchrun-started CPU processes join one gloo group (NOTES.md)
    # With synchronised BatchNorm every rank computes the same running statistics from the same gathered
    # numbers, so DDP's per-forward broadcast of buffers from rank 0 would only cost a collective.
    ddp = DistributedDataParallelKwargs(broadcast_buffers=not cfg.model.sync_bn)
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[ddp])
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main_proc = accelerator.is_main_process
    torch.backends.cuda.matmul.allow_tf32 = True                      # conv/matmul speed; the estimator turns it off
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    run_dir = Path(cfg.train.run_dir) / cfg.train.name
    git = ckpt.git_revision()                                         # once: meta.json and every checkpoint

    set_seed(cfg.train.seed)                                          # same initial weights on every rank
    model = convert_batchnorm(MVEBModel.from_config(cfg.model), sync=cfg.model.sync_bn)   # per-view BN
    memory_format = torch.channels_last if cfg.model.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    target = make_target(model)
    probe = None
    if cfg.eval.online_linear:
        from fastmveb.data import num_classes
        from fastmveb.eval.online import OnlineLinearProbe
        probe = convert_batchnorm(OnlineLinearProbe(model.feat_dim, num_classes(cfg.data.train_beton)),
                                  sync=cfg.model.sync_bn).to(device)
    net = MultiView(model, probe)
    view_maker = ViewMaker(cfg.views).to(device)

    loader = train_loader(cfg.data.train_beton, cfg.data.batch_size, cfg.data.num_workers, device,
                          decode=cfg.data.decode, decode_size=cfg.data.decode_size, views=cfg.views,
                          seed=cfg.train.seed, distributed=world > 1, order=cfg.data.order,
                          os_cache=cfg.data.os_cache, drop_last=cfg.data.drop_last)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        print(f"error: data.batch_size={cfg.data.batch_size} x {world} processes exceeds the "
              f"{cfg.data.train_beton} dataset; lower data.batch_size", file=sys.stderr)
        return 2
    total_steps = cfg.optim.epochs * steps_per_epoch
    warmup_steps = cfg.optim.warmup_epochs * steps_per_epoch
    global_batch = cfg.data.batch_size * world
    lr_peak = peak_lr(cfg.optim.base_lr, global_batch)
    optimizer = LARS(param_groups(net, cfg.optim.weight_decay), lr=lr_peak, weight_decay=cfg.optim.weight_decay,
                     momentum=cfg.optim.momentum, trust_coef=cfg.optim.trust_coef)
    net = accelerator.prepare(net)                                    # DDP when world > 1; FFCV shards itself
    use_compile = cfg.train.compile == "true" or (cfg.train.compile == "auto" and device.type == "cuda")
    net_c, target_c, views_c = net, target, view_maker
    if use_compile:
        net_c = torch.compile(net, backend=cfg.train.compile_backend)
        target_c = torch.compile(target, backend=cfg.train.compile_backend)
        views_c = torch.compile(view_maker, backend=cfg.train.compile_backend)

    # ---- resume (exact: weights, target, optimizer, position in the data, every RNG) -------------------
    step, epoch, batch_in_epoch = 0, 0, 0
    latest = ckpt.latest_checkpoint(run_dir) if cfg.train.resume else None
    if latest is not None:
        state = ckpt.load_checkpoint(latest, map_location=device if device.type != "cpu" else "cpu")  # not cpu:0
        ckpt.unwrap(net).model.load_state_dict(state["model"], strict=True)
        target.load_state_dict(state["target"], strict=True)
        if probe is not None and "probe" in state:
            probe.load_state_dict(state["probe"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    set_seed(cfg.train.seed + 1 + rank)                               # the view stream differs per rank
    if latest is not None:
        rngs = state["rng"]
        if len(rngs) == world:
            ckpt.restore_rng_state(rngs[rank])
        elif main_proc:
            print(f"warning: checkpoint from {len(rngs)} processes resumed on {world}; views will not "
                  "repeat the uninterrupted run exactly", file=sys.stderr)
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        meta = {"git": git, "world_size": world, "device": str(device), "argv": sys.argv,
                "torch": torch.__version__, "compile": use_compile, "resumed_from": str(latest) if latest else None,
                "steps_per_epoch": steps_per_epoch, "global_batch": global_batch, "peak_lr": lr_peak}
        (run_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    logger = MetricsLogger(run_dir, enabled=main_proc)
    logger.truncate_after(step)

    def save(at_epoch: int, at_batch: int) -> None:
        if at_batch >= steps_per_epoch:                               # position = the next batch to read
            at_epoch, at_batch = at_epoch + 1, 0
        rngs = gather_object([ckpt.capture_rng_state()])              # one entry per rank
        if main_proc:
            state = {"model": ckpt.unwrap(net).model.state_dict(), "target": target.state_dict(),
                     "optimizer": optimizer.state_dict(), "step": step, "epoch": at_epoch,
                     "batch_in_epoch": at_batch, "rng": rngs, "config": to_dict(cfg), "git": git}
            if probe is not None:
                state["probe"] = probe.state_dict()
            if ckpt.save_checkpoint(ckpt.checkpoint_path(run_dir, step), state):
                ckpt.prune_checkpoints(run_dir, cfg.train.keep_last)
        accelerator.wait_for_everyone()

    # ---- loop ---------------------------------------------------------------------------------------
    last_step = min(total_steps, cfg.train.max_steps) if cfg.train.max_steps else total_steps
    bar = tqdm(total=last_step, initial=step, unit="step", dynamic_ncols=True,
               disable=not (main_proc and cfg.train.progress))
    m_table = ema_momentum_table(total_steps, cfg.model.ema_momentum, device)   # m_table[step]: no upload per step
    sums: dict[str, torch.Tensor] = {}
    n_acc, data_wait, consecutive_bad = 0, 0.0, torch.zeros((), dtype=torch.int64, device=device)
    max_bad = torch.zeros_like(consecutive_bad)
    t_window = time.perf_counter()
    stop_reason = None
    net.train()
    target.train()
    while step < last_step and stop_reason is None:
        set_epoch(loader, epoch, skip_batches=batch_in_epoch)
        batches = iter(loader)
        while step < last_step:
            t0 = time.perf_counter()
            batch = next(batches, None)
            data_wait += time.perf_counter() - t0
            if batch is None:
                break
            x, y = unpack_train_batch(batch)
            lr = lr_at(step, total_steps, warmup_steps, lr_peak, cfg.optim.warmup_start_ratio, cfg.optim.final_lr_ratio)
            m = m_table[min(step, total_steps)]
            stats, skip, z0 = train_step(net_c, target_c, views_c, optimizer, x, y, lr, m, cfg, accelerator)
            step, batch_in_epoch, n_acc = step + 1, batch_in_epoch + 1, n_acc + 1
            consecutive_bad = torch.where(skip, consecutive_bad + 1, torch.zeros_like(consecutive_bad))
            max_bad = torch.maximum(max_bad, consecutive_bad)
            for k, val in stats.items():
                sums[k] = sums[k] + val.float() if k in sums else val.float()
            sums["skipped"] = sums.get("skipped", 0) + skip.float()

            if step % cfg.train.log_every == 0 or step == last_step:  # the only host syncs of the loop
                keys = list(sums)
                vals = torch.stack([sums[k] for k in keys] + [uniformity(z0), effective_rank(z0), max_bad.float()]).tolist()
                now = time.perf_counter()
                row = {k: v / n_acc for k, v in zip(keys, vals)}
                row["skipped"] = vals[keys.index("skipped")]
                row.update(uniformity=vals[-3], erank=vals[-2], lr=lr, ema_momentum=float(m),
                           samples_per_s=n_acc * global_batch / (now - t_window),
                           time_data=data_wait / n_acc, time_total=(now - t_window) / n_acc)
                if device.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                logger.log(step, step / steps_per_epoch, row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tau=f"{row.get('tau', 0):.3f}",
                                sps=f"{row['samples_per_s']:.0f}")
                warn = collapse_warning(row["erank"], row["uniformity"], z0.shape[0], z0.shape[1])
                if warn and main_proc:
                    tqdm.write(f"warning: step {step}: {warn}")
                if vals[-1] >= cfg.optim.max_bad_steps:
                    stop_reason = (f"{int(vals[-1])} consecutive non-finite steps (loss or gradients NaN/Inf) by step "
                                   f"{step}; they were skipped, the weights are the last finite ones. Lower "
                                   "optim.base_lr or check the data, then rerun to resume from the last checkpoint")
                sums, n_acc, data_wait, t_window = {}, 0, 0.0, time.perf_counter()
                max_bad = torch.zeros_like(max_bad)
            bar.update(1)
            if stop_reason:
                break
            if cfg.train.ckpt_every_steps and step % cfg.train.ckpt_every_steps == 0:
                save(epoch, batch_in_epoch)
        if stop_reason:
            break
        if batch_in_epoch >= steps_per_epoch:                          # epoch finished
            epoch, batch_in_epoch = epoch + 1, 0
            if cfg.train.ckpt_every_epochs and epoch % cfg.train.ckpt_every_epochs == 0 and step < last_step:
                save(epoch, 0)
            if cfg.eval.knn_every_epochs and epoch % cfg.eval.knn_every_epochs == 0:
                knn = run_knn(cfg, ckpt.unwrap(net).model.backbone, device, main_proc, accelerator, max_val=cfg.eval.knn_max_val)
                if knn:
                    logger.log(step, epoch, {"knn_top1": knn["top1"], "knn_top5": knn["top5"]})
                    tqdm.write(f"epoch {epoch}: kNN top-1 {knn['top1']:.2f}%")
                net.train()
    bar.close()
    if stop_reason:
        logger.close()
        if main_proc:
            print(f"error: {stop_reason}", file=sys.stderr)
        return 1
    save(epoch, batch_in_epoch)

    # ---- the learning check: kNN of the trained encoder next to the same encoder at initialisation -------
    if cfg.eval.knn_at_end:
        trained = run_knn(cfg, ckpt.unwrap(net).model.backbone, device, main_proc, accelerator)
        set_seed(cfg.train.seed)                                      # rebuilds the run's exact initial weights
        init = MVEBModel.from_config(cfg.model).to(device, memory_format=memory_format)
        random = run_knn(cfg, init.backbone, device, main_proc, accelerator)
        if main_proc:
            logger.log(step, epoch + batch_in_epoch / steps_per_epoch,
                       {"final_knn_top1": trained["top1"], "final_knn_top5": trained["top5"],
                        "random_knn_top1": random["top1"], "random_knn_top5": random["top5"]})
            print(f"kNN top-1 on {cfg.data.val_beton} (k={cfg.eval.knn_k}, T={cfg.eval.knn_t}): "
                  f"trained {trained['top1']:.2f}%  |  same encoder at random init {random['top1']:.2f}%")
    logger.close()
    accelerator.end_training()
    return 0


def run_knn(cfg: Config, backbone: nn.Module, device, main_proc: bool, accelerator, max_val: int | None = None):
    """Weighted kNN (train bank, val queries) on the main process; the other ranks wait."""
    result = None
    if main_proc:
        workers = cfg.data.num_workers
        bank = eval_loader(cfg.data.train_beton, cfg.data.eval_batch_size, workers, device,
                           size=cfg.data.eval_size, crop_ratio=cfg.data.eval_crop_ratio)
        queries = eval_loader(cfg.data.val_beton, cfg.data.eval_batch_size, workers, device,
                              size=cfg.data.eval_size, crop_ratio=cfg.data.eval_crop_ratio)
        result = knn_eval(backbone, bank, queries, device, cfg.views.mean, cfg.views.std,
                          k=cfg.eval.knn_k, T=cfg.eval.knn_t, max_val=max_val)
    accelerator.wait_for_everyone()
    return result


if __name__ == "__main__":
    sys.exit(main())
