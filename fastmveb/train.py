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
import contextlib
import datetime
import json
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python fastmveb/train.py` and `accelerate launch fastmveb/train.py`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn as nn
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, gather_object, set_seed
from tqdm import tqdm

from dataset_prep.integrity import BetonError, check_beton
from fastmveb import checkpoint as ckpt
from fastmveb import throughput
from fastmveb.batchnorm import views
from fastmveb.config import Config, ConfigError, dump_config, load_config, to_dict
from fastmveb.data import eval_loader, set_epoch, train_loader, unpack_train_batch
from fastmveb.eval.knn import distributed_knn
from fastmveb.entropy import parse_group
from fastmveb.loss import mveb_loss
from fastmveb.metrics import MetricsLogger, collapse_warning, effective_rank, uniformity
from fastmveb.build import build_training
from fastmveb.model import MVEBModel, ema_momentum_table, ema_update
from fastmveb.optim import all_finite, lr_at, where_
from fastmveb.plan import dataset_length, make_plan, resume_lines
from fastmveb.resolution import ViewSwitch
from fastmveb.views import ViewMaker
from fastmveb.rundir import RunDirError, open_run_dir


def train_step(net, target, view_maker, optimizer, x, y, lr: float, m: torch.Tensor, cfg: Config, accelerator,
               micro_batch: int | None = None, extent: torch.Tensor | None = None):
    """One optimisation step over this process's batch, no host sync: returns detached stats (batch means),
    the skip flag and z of global view 1 (first micro-batch).

    Gradient accumulation: the batch runs as micro-batches of ``micro_batch`` rows (None: one), each with its
    own views, forward, loss (entropy groups within it) and backward. Their gradients add up in .grad, each
    loss weighted by its share of the rows, so .grad is the whole batch's mean gradient; DDP all-reduces only
    on the last backward (no_sync before it). Then ONE optimizer step and ONE EMA step, skipped if any
    micro-step's loss or the summed gradient is non-finite. BatchNorm sees each micro-batch on its own.
    The networks inside are compiled; the step itself stays eager because the entropy solve (Cholesky,
    float64) and the optimizer's skip logic gain nothing from compilation.
    """
    online = ckpt.unwrap(net).model
    # A skipped step must leave no trace, but its forward already moved the BN running statistics (maybe to
    # NaN): keep a copy to put back. BN buffers are ~0.1% of the parameters, so this is cheap.
    buffers = list(online.buffers())
    saved = torch._foreach_mul(buffers, 1) if buffers else []      # the copy, batched (foreach) on CUDA
    n = y.shape[0]
    ext = [] if extent is None else [extent]                       # each image's (H, W) travels with its rows
    micro = list(zip(*(t.split(micro_batch or n) for t in (x if isinstance(x, (list, tuple)) else [x])),
                     *(e.split(micro_batch or n) for e in ext),
                     y.split(micro_batch or n)))                     # [(x_1 .. or x, [extent], y) per micro-batch]
    stats, finite, z0 = {}, None, None
    for k, (*xk, yk) in enumerate(micro):
        share = yk.shape[0] / n
        ek = xk.pop() if ext else None
        with contextlib.nullcontext() if k == len(micro) - 1 else accelerator.no_sync(net):
            loss, stats_k, z = _micro_step(net, target, view_maker, xk if len(xk) > 1 else xk[0], yk, cfg,
                                           accelerator, share, ek)
        stats = {key: stats.get(key, 0) + share * val for key, val in stats_k.items()}
        finite = torch.isfinite(loss) if finite is None else finite & torch.isfinite(loss)
        z0 = z if z0 is None else z0

    with phase("optimizer"):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        skip = ~(finite & torch.isfinite(grad_norm))                   # grads are all-reduced: every rank agrees
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.step(skip=skip)
        skip = optimizer.skipped                                       # also: an update that was not finite
        optimizer.zero_grad(set_to_none=True)
        # Also held back: BN statistics a finite step overflowed (huge activations); buffers only, so this
        # rank-local verdict never reaches the shared weights. where_: a few launches, not one per buffer.
        where_(skip | ~all_finite([b for b in buffers if b.is_floating_point()]), buffers, saved)
    with phase("ema"):
        ema_update(target, online, torch.where(skip, torch.ones_like(m), m))  # skipped: the target does not move
    stats = dict(stats, grad_norm=grad_norm.detach())
    return stats, skip, z0


def _micro_step(net, target, view_maker, x, y, cfg: Config, accelerator, share: float, extent=None):
    """Views, forward, loss and backward of one micro-batch; the loss is weighted by its share of the batch."""
    with phase("views"), torch.no_grad():
        v = view_maker(x, extent)                                      # V views, globals first
    with accelerator.autocast():
        with phase("forward"):
            _, p_views, probe_out = net(v, y)
        with phase("target"), torch.no_grad(), views(2):
            _, t_p = target(torch.cat(v[:2]))                          # (2N, d): targets of the two globals
    with phase("loss"):
        z = [F.normalize(p.float(), dim=1) for p in p_views]
        t = [F.normalize(tp.float(), dim=1) for tp in t_p.chunk(2)]
        loss, stats = mveb_loss(z, t, lam=cfg.loss.lam, group=parse_group(cfg.loss.group), eta=cfg.loss.eta,
                                min_tau=cfg.loss.min_tau)
        total = loss
        if probe_out is not None:
            total = loss + probe_out[0]                                # the probe sees detached features
            stats = dict(stats, probe_loss=probe_out[0].detach(), probe_top1=probe_out[1].detach())
    with phase("backward"):
        accelerator.backward(total * share if share != 1 else total)
    return loss, dict(stats, loss=loss.detach()), z[0].detach()


class phase(torch.profiler.record_function):
    """A named profiler range around one phase of the step (a few microseconds; records only under a profiler).
    ``phase.current`` names the phase running (bench profile's launch counter reads it)."""
    current = "other"

    def __init__(self, name: str):
        super().__init__("fastmveb/" + name)
        self.phase = name

    def __enter__(self):
        self.prev, phase.current = phase.current, self.phase
        return super().__enter__()

    def __exit__(self, *exc):
        phase.current = self.prev
        return super().__exit__(*exc)


# Exit status of a run stopped by SIGTERM / SIGUSR1 after writing its checkpoint: EX_TEMPFAIL (sysexits.h),
# "try again later". Rerunning the same command resumes from that checkpoint exactly.
PREEMPTED_EXIT = 75
PREEMPT_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)    # what SLURM (--signal) and Kubernetes send before a kill


class Preemption:
    """SIGTERM / SIGUSR1 -> a flag, nothing else: the step in flight finishes, and a signal that lands during
    a checkpoint save cannot cut it (the save is atomic anyway: checkpoint.save_checkpoint). The ranks agree
    on the flag at the logging interval only (``agree``: one all_reduce of one integer, next to that interval's
    host sync), so the step itself never syncs; the stop comes at most train.log_every steps after the signal."""

    def __init__(self):
        self.signum = 0
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):
        self.signum = self.signum or signum

    def agree(self, device, world: int) -> int:
        """The signal any rank received (0: none); every rank returns the same value."""
        if world == 1:
            return self.signum
        flag = torch.tensor([self.signum], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rc", required=True, help="run config YAML (see rcs/)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides, e.g. optim.epochs=10")
    parser.add_argument("--dry-run", action="store_true", help="print the resolved plan (batches, steps, lr, "
                        "memory) and exit; reads no data, needs no GPU")
    parser.add_argument("--world-size", type=int, help="processes to plan for with --dry-run (default: $WORLD_SIZE or 1)")
    parser.add_argument("--throughput-from", metavar="SUMMARY_JSON", help="with --dry-run: price the plan from the "
                        "throughput `make gpu-check OUT=DIR` measured (DIR/summary.json; default: the committed CUDA "
                        "step benchmarks under benchmarks/results/)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.rc, args.overrides)
        if args.world_size is not None and not args.dry_run:
            raise ConfigError("--world-size only applies to --dry-run; a real run takes it from the launcher")
        if args.throughput_from is not None and not args.dry_run:
            raise ConfigError("--throughput-from only applies to --dry-run (it prices the plan)")
        rates = None
        if args.dry_run:                                              # measured rates only: exact matches price the plan
            rates = (throughput.read_summary(args.throughput_from) if args.throughput_from else
                     throughput.committed(throughput.RESULTS))
        # Every batch/step/lr quantity of the run, for the world size torchrun / accelerate launch set.
        plan = make_plan(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1")),
                         dataset_length(cfg.data.train_beton), throughput=rates)
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":                        # one line, not one per process
            print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(plan.format())
        return 0
    for path in (cfg.data.train_beton, cfg.data.val_beton):
        if path == cfg.data.val_beton:
            note = switch_off_label_parts(cfg)                        # unlabeled data: before val is needed
            if note and os.environ.get("RANK", "0") == "0":
                print(note, flush=True)
            if not (cfg.eval.knn_at_end or cfg.eval.knn_every_epochs):
                break
        if not Path(path).is_file():
            print(f"error: dataset '{path}' not found; run 'make beton' (synthetic) or set data.train_beton/"
                  f"data.val_beton to betons written by 'make beton DATA=... OUT=...'", file=sys.stderr)
            return 2
        try:
            check_beton(path)                                         # header, size, integrity record
        except BetonError as e:
            print(f"error: {e}", file=sys.stderr)
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
    init_elastic_process_group(cfg.train.collective_timeout_s)       # torchrun restarts: before Accelerate
    accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[ddp, InitProcessGroupKwargs(
                                  timeout=datetime.timedelta(seconds=cfg.train.collective_timeout_s))])
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    main_proc = accelerator.is_main_process
    if world != plan.world_size:                                      # a launcher that left WORLD_SIZE unset
        print(f"error: {world} processes but WORLD_SIZE={plan.world_size}; launch with torchrun or accelerate "
              "launch (they set it)", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = True                      # conv/matmul speed; the estimator turns it off
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cudnn.benchmark = True
    run_dir = Path(cfg.train.run_dir) / cfg.train.name
    git = ckpt.git_revision()                                         # once: meta.json and every checkpoint
    # Lock the run dir (a second training stops here), choose the checkpoint, refuse a changed trajectory:
    # all before anything is written.
    try:
        lock, latest, state = open_run_dir(run_dir, cfg, main_proc, device, world)   # lock: held until exit
    except RunDirError as e:
        if main_proc:
            print(f"error: {e}", file=sys.stderr)
        return 2

    set_seed(cfg.train.seed)                                          # same initial weights on every rank
    classes = None
    if cfg.eval.online_linear:
        from fastmveb.data import num_classes
        classes = num_classes(cfg.data.train_beton)
    parts = build_training(cfg, accelerator, plan.peak_lr, classes)
    net, target, probe, optimizer = parts["net"], parts["target"], parts["probe"], parts["optimizer"]
    net_c, target_c = parts["net_c"], parts["target_c"]
    loader = train_loader(cfg.data.train_beton, plan.per_process_batch, cfg.data.num_workers, device,
                          decode=cfg.data.decode, decode_size=cfg.data.decode_size, views=cfg.views,
                          seed=cfg.train.seed, distributed=world > 1, order=cfg.data.order,
                          os_cache=cfg.data.os_cache, drop_last=cfg.data.drop_last)
    steps_per_epoch, total_steps = plan.steps_per_epoch, plan.total_steps
    assert len(loader) == steps_per_epoch, f"plan {steps_per_epoch} != loader {len(loader)} steps per epoch"
    # One view maker per view size (progressive resolution: views.res_*), made when its first epoch starts.
    views = ViewSwitch(cfg, lambda views_cfg: parts["compile"](ViewMaker(views_cfg).to(device)), loader)

    # ---- resume (exact: weights, target, optimizer, position in the data, every RNG) -------------------
    # The position in the epoch is a count of samples of the epoch's global order, which every world size
    # and batch reads in the same sequence (data.ResumableLoader): a resume on another number of processes,
    # or under a changed global batch (train.allow_config_change), continues at the same sample.
    step, epoch, samples_in_epoch = 0, 0, 0
    loader.shuffle = "torch" if world > 1 else "numpy"               # ffcv's own generator for a fresh run
    resume_notes: list[str] = []
    if latest is not None:
        try:
            ckpt.load_module_state(ckpt.unwrap(net).model, state["model"], "model", latest)
            ckpt.load_module_state(target, state["target"], "model", latest)
            if probe is not None and "probe" in state:
                ckpt.load_module_state(probe, state["probe"], "online probe", latest)
            optimizer.load_state_dict(state["optimizer"])
        except (ckpt.CheckpointError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        step, epoch = state["step"], state["epoch"]
        samples_in_epoch, loader.shuffle = ckpt.data_position(state)  # the run's generator, whatever the world
        resume_notes = _resume_notes(state, cfg, plan, step, world)
    set_seed(cfg.train.seed + 1 + rank)                               # the view stream differs per rank
    if latest is not None and len(state["rng"]) == world:
        ckpt.restore_rng_state(state["rng"][rank])                    # (another world size: resume_notes say so)
    if main_proc:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_config(cfg, run_dir / "config.yaml")
        meta = {"git": git, "device": str(device), "argv": sys.argv, "torch": torch.__version__,
                "compile": parts["use_compile"], "resumed_from": str(latest) if latest else None,
                "resume_changes": resume_notes, **plan.meta()}
        (run_dir / "meta.json").write_text(json.dumps(meta, indent=2))
        print(plan.format(), flush=True)
        if latest is not None:
            print(f"{'resume':<15}  {latest.name}: step {step}, epoch {epoch}, sample {samples_in_epoch} of the "
                  f"epoch's {steps_per_epoch * plan.global_batch}", flush=True)
            for line in resume_notes:
                print(f"{'':<15}  {line}", flush=True)
    logger = MetricsLogger(run_dir, enabled=main_proc)
    logger.truncate_after(step)

    def save(at_epoch: int, at_sample: int, epoch_done: bool = False) -> None:
        if epoch_done:                                                # position = the next sample to read
            at_epoch, at_sample = at_epoch + 1, 0
        rngs = gather_object([ckpt.capture_rng_state()])              # one entry per rank
        if main_proc:
            # batch_in_epoch: for readers that know only the batch index (same global batch only)
            state = {"model": ckpt.unwrap(net).model.state_dict(), "target": target.state_dict(),
                     "optimizer": optimizer.state_dict(), "step": step, "epoch": at_epoch,
                     "samples_in_epoch": at_sample, "batch_in_epoch": at_sample // plan.global_batch,
                     "shuffle": loader.shuffle, "rng": rngs, "config": to_dict(cfg), "git": git}
            if probe is not None:
                state["probe"] = probe.state_dict()
            if ckpt.save_checkpoint(ckpt.checkpoint_path(run_dir, step), state):   # CheckpointError: disk full
                ckpt.prune_checkpoints(run_dir, cfg.train.keep_last)
        accelerator.wait_for_everyone()

    # ---- loop ---------------------------------------------------------------------------------------
    last_step = plan.last_step
    bar = tqdm(total=last_step, initial=step, unit="step", dynamic_ncols=True,
               disable=not (main_proc and cfg.train.progress))
    m_table = ema_momentum_table(total_steps, cfg.model.ema_momentum, device)   # m_table[step]: no upload per step
    sums: dict[str, torch.Tensor] = {}
    n_acc, data_wait, consecutive_bad = 0, 0.0, torch.zeros((), dtype=torch.int64, device=device)
    max_bad = torch.zeros_like(consecutive_bad)
    t_window = time.perf_counter()
    stop_reason = None
    preempt, preempted = Preemption(), 0
    left = None                                                       # batches left in the current epoch
    net.train()
    target.train()
    while step < last_step and stop_reason is None and not preempted:
        views_c, change = views.enter_epoch(epoch)                    # sizes depend on the epoch only: resume-exact
        if change and main_proc:
            tqdm.write(change)
        set_epoch(loader, epoch, skip_samples=samples_in_epoch)
        left = loader.batches_left()                                  # the same on every rank
        batches = iter(loader)
        while step < last_step and left:
            t0 = time.perf_counter()
            batch = next(batches, None)
            data_wait += time.perf_counter() - t0
            if batch is None:                                         # (left says when; never reached)
                left = 0
                break
            x, extent, y = unpack_train_batch(batch)                  # extent: each image's (H, W), or None
            lr = lr_at(step, total_steps, plan.warmup_steps, plan.peak_lr, cfg.optim.warmup_start_ratio,
                       cfg.optim.final_lr_ratio)
            m = m_table[min(step, total_steps)]
            stats, skip, z0 = train_step(net_c, target_c, views_c, optimizer, x, y, lr, m, cfg, accelerator,
                                         plan.micro_batch, extent)
            step, samples_in_epoch, left, n_acc = step + 1, samples_in_epoch + plan.global_batch, left - 1, n_acc + 1
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
                           samples_per_s=n_acc * plan.global_batch / (now - t_window),
                           time_data=data_wait / n_acc, time_total=(now - t_window) / n_acc, **views.metrics())
                if device.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                logger.log(step, step / steps_per_epoch, row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tau=f"{row.get('tau', 0):.3f}",
                                sps=f"{row['samples_per_s']:.0f}")
                warn = collapse_warning(row["erank"], row["uniformity"], z0.shape[0], z0.shape[1])
                if warn and main_proc:
                    tqdm.write(f"warning: step {step}: {warn}")
                if vals[-1] >= cfg.optim.max_bad_steps:
                    stop_reason = (f"{int(vals[-1])} consecutive non-finite steps (loss, gradients or updated weights NaN/Inf) by step "
                                   f"{step}; they were skipped, the weights are the last finite ones. Lower "
                                   "optim.base_lr or check the data, then rerun to resume from the last checkpoint")
                sums, n_acc, data_wait, t_window = {}, 0, 0.0, time.perf_counter()
                max_bad = torch.zeros_like(max_bad)
                preempted = preempt.agree(device, world)
                if preempted:
                    break
            bar.update(1)
            if stop_reason:
                break
            if cfg.train.ckpt_every_steps and step % cfg.train.ckpt_every_steps == 0:
                save(epoch, samples_in_epoch, left == 0)
        if stop_reason or preempted:
            break
        if left == 0:                                                 # epoch finished
            epoch, samples_in_epoch, left = epoch + 1, 0, None            # (left: the next epoch's, unknown yet)
            if cfg.train.ckpt_every_epochs and epoch % cfg.train.ckpt_every_epochs == 0 and step < last_step:
                save(epoch, 0)
            if cfg.eval.knn_every_epochs and epoch % cfg.eval.knn_every_epochs == 0:
                knn = run_knn(cfg, ckpt.unwrap(net).model.backbone, device, accelerator,
                              max_train=cfg.eval.knn_max_train or None, max_val=cfg.eval.knn_max_val,
                              feature_dtype=torch.bfloat16)           # bf16: top-1 within noise (knn.py)
                if main_proc:
                    logger.log(step, epoch, {"knn_top1": knn["top1"], "knn_top5": knn["top5"], "knn_size": cfg.eval.size})
                    tqdm.write(f"epoch {epoch}: kNN top-1 {knn['top1']:.2f}% at {cfg.eval.size} px")
                net.train()
    bar.close()
    if stop_reason:
        logger.close()
        if main_proc:
            print(f"error: {stop_reason}", file=sys.stderr)
        return 1
    save(epoch, samples_in_epoch, left == 0)
    preempted = preempted or preempt.agree(device, world)            # (a signal during the last steps or save)
    if preempted:
        # From here on a repeated signal has nothing left to protect; ignored rather than handled because the
        # interpreter's shutdown puts Python-handled signals back to their default (death), not ignored ones.
        for sig in PREEMPT_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        logger.close()
        if main_proc:
            print(f"stopped by {signal.Signals(preempted).name} at step {step}: checkpoint "
                  f"{ckpt.checkpoint_path(run_dir, step)} written; rerun the same command to resume (exit status "
                  f"{PREEMPTED_EXIT})", file=sys.stderr, flush=True)
        return PREEMPTED_EXIT

    # ---- the learning check: kNN of the trained encoder next to the same encoder at initialisation -------
    if cfg.eval.knn_at_end:
        trained = run_knn(cfg, ckpt.unwrap(net).model.backbone, device, accelerator)
        set_seed(cfg.train.seed)                                      # rebuilds the run's exact initial weights
        init = MVEBModel.from_config(cfg.model).to(device, memory_format=parts["memory_format"])
        random = run_knn(cfg, init.backbone, device, accelerator)
        if main_proc:
            logger.log(step, epoch + samples_in_epoch / (steps_per_epoch * plan.global_batch),
                       {"final_knn_top1": trained["top1"], "final_knn_top5": trained["top5"],
                        "random_knn_top1": random["top1"], "random_knn_top5": random["top5"], "knn_size": cfg.eval.size})
            print(f"kNN top-1 on {cfg.data.val_beton} (k={cfg.eval.knn_k}, T={cfg.eval.knn_t}, {cfg.eval.size} px): "
                  f"trained {trained['top1']:.2f}%  |  same encoder at random init {random['top1']:.2f}%")
    logger.close()
    accelerator.end_training()
    return 0


def switch_off_label_parts(cfg: Config) -> str | None:
    """Unlabeled data (dataset_prep folder): switch off what needs labels in ``cfg``; -> the line saying so.

    The kNN monitor and the end-of-run learning check need labels in train (the bank) and val (the queries), the
    online probe in train. The label-free monitors (uniformity, effective rank of z) need none and stay on.
    """
    from fastmveb.data import num_classes
    parts = {"knn_every_epochs": "the kNN monitor (eval.knn_every_epochs)",
             "online_linear": "the online linear probe (eval.online_linear)",
             "knn_at_end": "the end-of-run kNN learning check (eval.knn_at_end)"}
    if num_classes(cfg.data.train_beton) == 0:
        why = f"{cfg.data.train_beton} has no labels"
    elif ((cfg.eval.knn_every_epochs or cfg.eval.knn_at_end) and Path(cfg.data.val_beton).is_file()
          and num_classes(cfg.data.val_beton) == 0):
        why = f"{cfg.data.val_beton} has no labels"
        del parts["online_linear"]                                    # it trains and reports on train's labels
    else:
        return None
    off = [name for key, name in parts.items() if getattr(cfg.eval, key)]
    for key in parts:
        setattr(cfg.eval, key, type(getattr(cfg.eval, key))(0))      # False / 0
    if not off:
        return None
    return (f"note: {why}: {', '.join(off)} switched off; the label-free monitors (uniformity, effective rank) "
            "stay on")


def _resume_notes(state: dict, cfg: Config, plan, step: int, world: int) -> list[str]:
    """The start-up lines of a resume that changes the world size or (train.allow_config_change) the config:
    every changed key, the processes' batch split, the schedule (plan.resume_lines)."""
    from fastmveb.config import from_dict
    from fastmveb.rundir import _flatten, config_changes
    old_tree = state.get("config") or {}
    trajectory = config_changes(old_tree, to_dict(cfg))[0] if old_tree else []   # (harmless keys: not news)
    a, b = _flatten(old_tree), _flatten(to_dict(cfg))
    changed = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in trajectory]
    old_world = len(state.get("rng") or [])
    try:
        old_plan = make_plan(from_dict(old_tree, "checkpoint"), old_world, plan.dataset_len, memory=False)
    except (ConfigError, TypeError):                                 # an older tree: the keys still show
        old_plan = None
    if not changed and old_plan is not None and old_world == world:
        return []
    return resume_lines(old_plan, plan, step, changed, rng_kept=old_world == world)


def run_knn(cfg: Config, backbone: nn.Module, device, accelerator, max_train: int | None = None,
            max_val: int | None = None, feature_dtype=torch.float32):
    """Weighted kNN (train bank, val queries), the work split over all processes (no rank waits alone at a
    barrier); every rank gets the result of one process over the whole sets (distributed_knn)."""
    kw = dict(size=cfg.eval.size, crop_ratio=cfg.eval.crop_ratio, distributed=accelerator.num_processes > 1)
    bank = eval_loader(cfg.data.train_beton, cfg.data.eval_batch_size, cfg.data.num_workers, device, **kw)
    queries = eval_loader(cfg.data.val_beton, cfg.data.eval_batch_size, cfg.data.num_workers, device, **kw)
    return distributed_knn(backbone, bank, queries, device, cfg.views.mean, cfg.views.std, k=cfg.eval.knn_k,
                           T=cfg.eval.knn_t, max_train=max_train, max_val=max_val, feature_dtype=feature_dtype)


def init_elastic_process_group(timeout_s: int) -> None:
    """Under torchrun, join the process group through the launcher's store with a per-attempt key prefix.

    torchrun's default (static) rendezvous keeps ONE store for all restarts of the group, and the workers'
    default init adds no per-attempt prefix, so a restarted group can read the dead attempt's keys: issue 22
    traced a restart failing that way in gloo ("connectFullMesh failed ... Connection refused", torch 2.14.1).
    It did not recur in tests/test_elastic.py's restart test on the CPU box (which passes with or without
    this); keys under "fastmveb/attempt<TORCHELASTIC_RESTART_COUNT>/" rule it out, with any rendezvous backend. Accelerate then finds the group initialised and uses it (accelerate.state checks
    is_initialized()). Outside torchrun (or when the launcher hosts no store) Accelerate initialises as usual.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if (world <= 1 or torch.distributed.is_initialized() or "TORCHELASTIC_RESTART_COUNT" not in os.environ
            or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"):
        return
    timeout = datetime.timedelta(seconds=timeout_s)
    store = torch.distributed.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                                       is_master=False, timeout=timeout)
    store = torch.distributed.PrefixStore(f"fastmveb/attempt{os.environ['TORCHELASTIC_RESTART_COUNT']}/", store)
    backend = "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "nccl"
    torch.distributed.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world,
                                         timeout=timeout)


def lost_peer(e: BaseException) -> str | None:
    """One line for a collective that failed because another process died or hung, else None."""
    dist_error = getattr(torch.distributed, "DistError", ())
    text = " ".join(str(e).split())
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return None
    if not isinstance(e, dist_error) and not (isinstance(e, RuntimeError) and any(
            k in text.lower() for k in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))):
        return None
    return (f"error: rank {torch.distributed.get_rank()} of {torch.distributed.get_world_size()}: a collective "
            f"failed, another process died or hung (train.collective_timeout_s bounds the wait): {text[:160]}; "
            f"rerun to resume from the newest checkpoint")


def cli() -> int:
    """The command (fastmveb-train, python -m fastmveb.train, accelerate launch [-m] fastmveb[/.]train): main()
    with a failed checkpoint save (a full disk) or a lost peer as one line and exit 1 instead of a traceback."""
    try:
        return main()
    except ckpt.CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:                                           # noqa: BLE001 -- only a lost peer is caught
        line = lost_peer(e)
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        # Not sys.exit: tearing down a process group whose peer is gone can block (NCCL's abort, atexit hooks).
        os._exit(1)


if __name__ == "__main__":
    sys.exit(cli())
