"""MVEB pretraining, the spine: build -> loop -> log -> checkpoint. Read it top to bottom.

    accelerate launch fastmveb/train.py --rc rcs/rn50.yaml [section.key=value ...]   # one GPU, many GPUs, nodes
    python fastmveb/train.py --rc rcs/tiny.yaml                                     # CPU demo, a few minutes

Trains a ResNet with the MVEB objective (alignment between views + the von Mises-Fisher entropy of the
embeddings, docs/method.md): FFCV decodes each image once, the GPU cuts every view, the online network
runs channels-last under bf16 autocast (compiled on CUDA), LARS steps it and an EMA copy gives the targets.
Everything goes to runs/NAME/ (config.yaml, meta.json, metrics.jsonl, tb/, checkpoints/); running the same
command again resumes from the newest checkpoint and reproduces the uninterrupted run. One optimisation step
(views, forward, loss, backward, optimizer and EMA steps) is fastmveb/step.py's train_step.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
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
from accelerate.utils import set_seed
from tqdm import tqdm

from dataset_prep.integrity import beton_identity, check_beton
from fastmveb import checkpoint as ckpt
from fastmveb import throughput
from fastmveb.build import build_training, make_accelerator
from fastmveb.compat import end_process, hold_process_group, skip_teardown
from fastmveb.config import Config, ConfigError, dump_config, load_config, to_dict
from fastmveb.data import num_classes, set_epoch, train_loader_from_config, unpack_train_batch
from fastmveb.elastic import Preemption, lost_peer, stop_status
from fastmveb.errors import Interrupted, UserError, run_cli
from fastmveb.eval.features import PixelStats, eval_loaders
from fastmveb.eval.knn import KnnOptions, check_monitor_labels, distributed_knn
from fastmveb.metrics import LogWindow, MetricsLogger, collapse_warning
from fastmveb.model import MVEBModel, ema_momentum_table
from fastmveb.optim import lr_at, wd_at
from fastmveb.plan import Plan, dataset_length, make_plan, resume_lines
from fastmveb.resolution import ViewSwitch
from fastmveb.rundir import git_revision, open_run_dir
from fastmveb.step import StepParts, step_parts, train_step


class NonFiniteStop(UserError):
    """optim.max_bad_steps consecutive steps were skipped as non-finite: the run stops (exit status 1) with the
    last finite weights in the newest checkpoint."""
    exit_code = 1


def main(argv: list[str] | None = None) -> int:
    """The training run; bad input raises a UserError (cli() turns it into one line). -> exit status."""
    args = _parser().parse_args(argv)
    # ---- config and plan: every batch/step/lr quantity, for the world size the launcher set ----------------
    cfg, plan = config_and_plan(args)
    if args.dry_run:
        print(plan.format())
        return 0
    data = check_data(cfg)                                            # betons readable; labels or not; identities

    # ---- accelerator and run dir -------------------------------------------------------------------------
    accelerator = make_accelerator(cfg)
    device, world = accelerator.device, accelerator.num_processes
    hold_process_group()                  # never freed (torch 2.11's gloo can hang there): cli() ends the process
    main_proc = accelerator.is_main_process
    if world != plan.world_size:                                      # a launcher that left WORLD_SIZE unset
        raise UserError(f"{world} processes but WORLD_SIZE={plan.world_size}; launch with torchrun or accelerate "
                        "launch (they set it)")
    run_dir = Path(cfg.train.run_dir) / cfg.train.name
    git = git_revision()                                              # once: meta.json and every checkpoint
    # Lock the run dir (a second training stops here), choose the checkpoint, refuse a changed trajectory:
    # all before anything is written. The lock is held until exit.
    lock, latest, state = open_run_dir(run_dir, cfg, main_proc, device, world, data)

    # ---- build -------------------------------------------------------------------------------------------
    set_seed(cfg.train.seed)                                          # same initial weights on every rank
    t = build_training(cfg, accelerator, plan.peak_lr, num_classes(cfg.data.train_beton) if cfg.eval.online_linear
                       else None)
    loader = train_loader_from_config(cfg, plan.per_process_batch, device, distributed=world > 1)
    if len(loader) != plan.steps_per_epoch:
        raise UserError(f"{cfg.data.train_beton} gives {len(loader)} batches per epoch where the plan counted "
                        f"{plan.steps_per_epoch}: was it rewritten while the run started? Rerun")
    views = ViewSwitch(cfg, t.view_maker, loader)                     # one view maker per view size (views.res_*)

    # ---- resume (exact: weights, target, optimizer, position in the data, every RNG) ------------------------
    pos, notes = resume(cfg, plan, t, loader, accelerator, latest, state, data)
    if main_proc:
        _start_run_dir(run_dir, cfg, plan, git, device, t.use_compile, latest, pos, notes, data)
    logger = MetricsLogger(run_dir, enabled=main_proc)
    logger.truncate_after(pos.step)
    preempt = Preemption()                                            # SIGTERM / SIGUSR1 / SIGINT -> a flag
    save = functools.partial(ckpt.save_training, ckpt.SaveOptions(
        run_dir, shuffle=loader.shuffle, global_batch=plan.global_batch, config=to_dict(cfg), git=git,
        keep_last=cfg.train.keep_last, data=data), t=t, accelerator=accelerator)
    parts = step_parts(t, accelerator, cfg, micro_batch=plan.micro_batch)   # the loss bound once; fit sets the views

    # ---- fit ---------------------------------------------------------------------------------------------
    try:
        pos, epoch_done, preempted = fit(cfg, plan, t, parts, views, pos, logger, save, preempt)
        save(pos, epoch_done=epoch_done)
        preempted = preempted or preempt.agree(device, world)         # (a signal during the last steps or save)
        where = f"at step {pos.step}: checkpoint {ckpt.checkpoint_path(run_dir, pos.step)} written; rerun the same " \
                "command to resume"

        # ---- the learning check: kNN of the trained encoder next to the same encoder at initialisation -----
        if cfg.eval.knn_at_end and not preempted:
            # A stop signal ends it between two batches (the weights are saved): on ImageNet it takes minutes,
            # longer than a launcher waits between its SIGTERM and its kill.
            preempted = learning_check(cfg, t, accelerator, logger, pos.step,
                                       pos.epoch + pos.samples_in_epoch / (plan.steps_per_epoch * plan.global_batch),
                                       stop=functools.partial(preempt.agree, device, world))
            where = (f"during the end-of-run learning check (kNN): check skipped; training is finished and saved "
                     f"({ckpt.checkpoint_path(run_dir, pos.step)}); rerun the same command to run the check")
        if preempted:
            preempt.ignore()                                          # nothing left to protect
            if main_proc:
                print(f"stopped by {signal.Signals(preempted).name} {where} (exit status {stop_status(preempted)})",
                      file=sys.stderr, flush=True)
            return stop_status(preempted)
    except Interrupted:                                               # a Ctrl-C while a stop was pending
        newest = ckpt.latest_checkpoint(run_dir)
        raise Interrupted("stopped at once by a second Ctrl-C, no checkpoint written for this stop; rerun the same "
                          + (f"command to resume from {newest}" if newest else "command to start again (no "
                             "checkpoint yet)")) from None
    finally:
        logger.close()
    accelerator.end_training()
    return 0


def fit(cfg: Config, plan, t, parts: StepParts, views: ViewSwitch, pos: ckpt.Position, logger: MetricsLogger, save,
        preempt: Preemption) -> tuple[ckpt.Position, bool, int]:
    """The loop: steps from ``pos`` to plan.last_step, logging every train.log_every steps (the only host syncs),
    checkpoints and the kNN monitor at their intervals. ``t``: the build.Training; ``parts``: what each step runs
    (each epoch's view maker set here); ``views``: the view switch over the train loader. -> (position, whether
    its epoch's batches are all read, the preemption signal the ranks agreed on (0: none)). Raises NonFiniteStop
    after optim.max_bad_steps consecutive skipped steps."""
    accelerator, loader = parts.accelerator, views.loader
    device, world, main_proc = accelerator.device, accelerator.num_processes, accelerator.is_main_process
    step, epoch, samples = pos.step, pos.epoch, pos.samples_in_epoch
    bar = tqdm(total=plan.last_step, initial=step, unit="step", dynamic_ncols=True,
               disable=not (main_proc and cfg.train.progress))
    m_table = ema_momentum_table(plan.total_steps, cfg.model.ema_momentum, device)   # no upload per step
    window, preempted, left = LogWindow(device), 0, None              # left: batches left in the epoch
    t.net.train()
    t.target.train()
    while step < plan.last_step and not preempted:
        views_c, change = views.enter_epoch(epoch)                    # sizes depend on the epoch only: resume-exact
        parts = dataclasses.replace(parts, view_maker=views_c)
        if change and main_proc:
            tqdm.write(change)
        set_epoch(loader, epoch, skip_samples=samples)
        left = loader.batches_left()                                  # the same on every rank
        batches = iter(loader)
        while step < plan.last_step and left:
            t0 = time.perf_counter()
            x, extent, y = unpack_train_batch(next(batches))          # extent: each image's (H, W), or None
            wait = time.perf_counter() - t0
            lr = lr_at(step, plan.total_steps, plan.warmup_steps, plan.peak_lr, cfg.optim.warmup_start_ratio,
                       cfg.optim.final_lr_ratio)
            wd = wd_at(step, plan.total_steps, cfg.optim.weight_decay, cfg.optim.weight_decay_end)
            m = m_table[min(step, plan.total_steps)]
            stats, skip, z0 = train_step(parts, x, y, lr, m, extent, wd)
            step, samples, left = step + 1, samples + plan.global_batch, left - 1
            window.add(stats, skip, wait)
            if step % cfg.train.log_every == 0 or step == plan.last_step:
                row, max_bad = window.read(z0, plan.global_batch)    # the loop's only host sync
                row.update(lr=lr, ema_momentum=float(m), **views.metrics())
                if cfg.optim.weight_decay_end >= 0:
                    row["weight_decay"] = wd
                if device.type == "cuda":
                    row["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                logger.log(step, step / plan.steps_per_epoch, row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tau=f"{row.get('tau', 0):.3f}",
                                sps=f"{row['samples_per_s']:.0f}")
                warn = collapse_warning(row["erank"], row["uniformity"], z0.shape[0], z0.shape[1])
                if warn and main_proc:
                    tqdm.write(f"warning: step {step}: {warn}")
                if max_bad >= cfg.optim.max_bad_steps:
                    bar.close()
                    raise NonFiniteStop(
                        f"{max_bad} consecutive non-finite steps (loss, gradients or updated weights NaN/Inf) by step "
                        f"{step}; they were skipped, the weights are the last finite ones. Lower optim.base_lr or "
                        "check the data, then rerun to resume from the last checkpoint")
                preempted = preempt.agree(device, world)
                if preempted:
                    break
            bar.update(1)
            if cfg.train.ckpt_every_steps and step % cfg.train.ckpt_every_steps == 0:
                save(ckpt.Position(step, epoch, samples), epoch_done=left == 0)
        if left == 0 and not preempted:                               # epoch finished
            epoch, samples, left = epoch + 1, 0, None                 # (left: the next epoch's, unknown yet)
            if cfg.train.ckpt_every_epochs and epoch % cfg.train.ckpt_every_epochs == 0 and step < plan.last_step:
                save(ckpt.Position(step, epoch, 0))
            if cfg.eval.knn_every_epochs and epoch % cfg.eval.knn_every_epochs == 0:
                try:                                                  # (minutes on ImageNet: a signal ends it)
                    knn = run_knn(cfg, t.model.backbone, device, accelerator, max_train=cfg.eval.knn_max_train or None,
                                  max_val=cfg.eval.knn_max_val, feature_dtype=torch.bfloat16,   # bf16: within noise
                                  stop=functools.partial(preempt.agree, device, world))
                except StopRequested as e:
                    preempted = e.signum                              # the checkpoint: at the next epoch's start
                    skip_teardown()                                   # a loader stopped mid-epoch (compat)
                    break
                logger.log(step, epoch, {"knn_top1": knn["top1"], "knn_top5": knn["top5"], "knn_size": cfg.eval.size})
                if main_proc:
                    tqdm.write(f"epoch {epoch}: kNN top-1 {knn['top1']:.2f}% at {cfg.eval.size} px")
                t.net.train()
    bar.close()
    return ckpt.Position(step, epoch, samples), left == 0, preempted


def _parser() -> argparse.ArgumentParser:
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
    return parser


def config_and_plan(args) -> tuple[Config, Plan]:
    """The run config (file + overrides, validated) and its plan for the launcher's world size (or
    --world-size with --dry-run, priced from measured throughput only: exact matches)."""
    cfg = load_config(args.rc, args.overrides)
    if args.world_size is not None and not args.dry_run:
        raise ConfigError("--world-size only applies to --dry-run; a real run takes it from the launcher")
    if args.throughput_from is not None and not args.dry_run:
        raise ConfigError("--throughput-from only applies to --dry-run (it prices the plan)")
    rates = None
    if args.dry_run:
        rates = (throughput.read_summary(args.throughput_from) if args.throughput_from else
                 throughput.committed(throughput.RESULTS))
    plan = make_plan(cfg, args.world_size or int(os.environ.get("WORLD_SIZE", "1")),
                     dataset_length(cfg.data.train_beton), throughput=rates)
    return cfg, plan


def check_data(cfg: Config) -> dict:
    """The betons the run reads exist and pass their integrity check (header, size, record); on unlabeled data
    the label-based parts are switched off first, with one line (then val is not needed). -> {"train": identity,
    "val": identity or None (not read)} (dataset_prep.integrity.beton_identity): every checkpoint records them
    and a resume compares them (fastmveb.rundir.check_data)."""
    data = {"train": None, "val": None}
    for role, path in (("train", cfg.data.train_beton), ("val", cfg.data.val_beton)):
        if role == "val":
            note = switch_off_label_parts(cfg)                        # unlabeled data: before val is needed
            if note and os.environ.get("RANK", "0") == "0":
                print(note, flush=True)
            if not (cfg.eval.knn_at_end or cfg.eval.knn_every_epochs):
                break
        if not Path(path).is_file():
            raise UserError(f"dataset '{path}' not found; run 'make beton' (synthetic) or set data.train_beton/"
                            f"data.val_beton to betons written by 'make beton DATA=... OUT=...'")
        check_beton(path)                                             # BetonError: one line
        data[role] = beton_identity(path)
    check_monitor_labels(cfg)                                         # val's labels among train's for the kNN
    return data


def _start_run_dir(run_dir: Path, cfg: Config, plan, git: str, device, use_compile: bool, latest, pos, notes,
                   data: dict) -> None:
    """Main process: config.yaml and meta.json of this (re)start, and the plan (and resume lines) on stdout."""
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    meta = {"git": git, "device": str(device), "argv": sys.argv, "torch": torch.__version__, "compile": use_compile,
            "resumed_from": str(latest) if latest else None, "resume_changes": notes, "data": data, **plan.meta()}
    (run_dir / "meta.json").write_text(json.dumps(meta, indent=2))
    print(plan.format(), flush=True)
    if latest is not None:
        print(f"{'resume':<15}  {latest.name}: step {pos.step}, epoch {pos.epoch}, sample {pos.samples_in_epoch} of "
              f"the epoch's {plan.steps_per_epoch * plan.global_batch}", flush=True)
        for line in notes:
            print(f"{'':<15}  {line}", flush=True)


def learning_check(cfg: Config, t, accelerator, logger: MetricsLogger, step: int, epoch: float, stop=None) -> int:
    """kNN top-1 of the trained backbone next to the same backbone at the run's initial weights (rebuilt from
    train.seed): the end-of-run check that it learned something. Logged and printed by the main process.
    ``stop`` (every rank the same answer: Preemption.agree) is asked before each batch; a signal ends the check
    unlogged. -> that signal, 0 when the check ran."""
    try:
        trained = run_knn(cfg, t.model.backbone, accelerator.device, accelerator, stop=stop)
        set_seed(cfg.train.seed)                                      # rebuilds the run's exact initial weights
        init = MVEBModel.from_config(cfg.model).to(accelerator.device, memory_format=t.memory_format)
        random = run_knn(cfg, init.backbone, accelerator.device, accelerator, stop=stop)
    except StopRequested as e:
        skip_teardown()                                               # a loader stopped mid-epoch (compat)
        return e.signum
    logger.log(step, epoch, {"final_knn_top1": trained["top1"], "final_knn_top5": trained["top5"],
                             "random_knn_top1": random["top1"], "random_knn_top5": random["top5"],
                             "knn_size": cfg.eval.size})
    if accelerator.is_main_process:
        print(f"kNN top-1 on {cfg.data.val_beton} (k={cfg.eval.knn_k}, T={cfg.eval.knn_t}, {cfg.eval.size} px): "
              f"trained {trained['top1']:.2f}%  |  same encoder at random init {random['top1']:.2f}%")
    return 0


def switch_off_label_parts(cfg: Config) -> str | None:
    """Unlabeled data (dataset_prep folder): switch off what needs labels in ``cfg``; -> the line saying so.

    The kNN monitor and the end-of-run learning check need labels in train (the bank) and val (the queries), the
    online probe in train. The label-free monitors (uniformity, effective rank of z) need none and stay on.
    """
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


def resume(cfg: Config, plan, t, loader, accelerator, latest, state: dict | None, data: dict):
    """The training state of checkpoint ``latest`` (None: a fresh run) put into ``t``, the loader's generator
    and this rank's RNG: -> (the position to continue from, the notes a resume prints).

    The position in the epoch is a count of samples of the epoch's global order, which every world size
    and batch reads in the same sequence (data.ResumableLoader): a resume on another number of processes,
    or under a changed global batch (train.allow_config_change), continues at the same sample."""
    rank, world = accelerator.process_index, accelerator.num_processes
    pos, notes = ckpt.Position(), []
    loader.shuffle = "torch" if world > 1 else "numpy"               # ffcv's own generator for a fresh run
    if latest is not None:
        pos, loader.shuffle = ckpt.restore_training(state, latest, t)  # the run's generator, whatever the world
        notes = _resume_notes(state, cfg, plan, pos.step, world, data)
        if pos.samples_in_epoch > plan.dataset_len:                   # other (smaller) train data, allowed
            notes.append(f"the checkpoint's position, sample {pos.samples_in_epoch} of epoch {pos.epoch}, is past the "
                         f"{plan.dataset_len} samples of {cfg.data.train_beton}: continuing at epoch {pos.epoch + 1}")
            pos = ckpt.Position(pos.step, pos.epoch + 1, 0)
    set_seed(cfg.train.seed + 1 + rank)                               # the view stream differs per rank
    if latest is not None and len(state["rng"]) == world:
        ckpt.restore_rng_state(state["rng"][rank])                    # (another world size: the notes say so)
    return pos, notes


def _resume_notes(state: dict, cfg: Config, plan, step: int, world: int, data: dict) -> list[str]:
    """The start-up lines of a resume that changes the world size or (train.allow_config_change) the config or
    the train data: every changed key, the processes' batch split, the schedule (plan.resume_lines); and the
    data notes (an unrecorded identity, other val data: fastmveb.rundir.data_changes)."""
    from fastmveb.config import from_dict
    from fastmveb.rundir import config_changes, data_changes, describe_changes
    old_tree = state.get("config") or {}
    trajectory = config_changes(old_tree, to_dict(cfg))[0] if old_tree else []   # (harmless keys: not news)
    changed = describe_changes(old_tree, to_dict(cfg), trajectory)
    train, data_notes = data_changes(state.get("data"), data)
    if train:                                                         # (train.allow_config_change)
        data_notes.insert(0, f"train data changed: {train}")
    old_world = len(state.get("rng") or [])
    old_len = ((state.get("data") or {}).get("train") or {}).get("num_samples", plan.dataset_len)
    try:
        old_plan = make_plan(from_dict(old_tree, "checkpoint"), old_world, old_len, memory=False)
    except (ConfigError, TypeError):                                 # an older tree: the keys still show
        old_plan = None
    if not changed and not train and old_plan is not None and old_world == world:
        return data_notes
    return data_notes + resume_lines(old_plan, plan, step, changed, rng_kept=old_world == world)


def run_knn(cfg: Config, backbone: nn.Module, device, accelerator, max_train: int | None = None,
            max_val: int | None = None, feature_dtype=torch.float32, stop=None):
    """Weighted kNN (train bank, val queries), the work split over all processes (no rank waits alone at a
    barrier); every rank gets the result of one process over the whole sets (distributed_knn). ``stop``: asked
    before each batch, on every rank alike (the loaders give every rank the same number of batches); a signal
    it returns raises StopRequested."""
    bank, queries = eval_loaders(cfg, device, distributed=accelerator.num_processes > 1)
    if stop is not None:
        bank, queries = _StopBetweenBatches(bank, stop), _StopBetweenBatches(queries, stop)
    return distributed_knn(backbone, bank, queries, device, PixelStats.of(cfg), KnnOptions.of(cfg, max_train, max_val),
                           feature_dtype=feature_dtype)


class StopRequested(Exception):
    """A stop signal the processes agreed on, raised between two batches of an evaluation."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _StopBetweenBatches:
    """An eval loader that asks ``stop()`` before handing out each batch and raises StopRequested on a signal;
    otherwise the loader itself (its length and order, which the distributed kNN reads)."""

    def __init__(self, loader, stop):
        self._loader, self._stop = loader, stop

    def __iter__(self):
        batches = iter(self._loader)
        for batch in batches:
            signum = self._stop()
            if signum:
                # FFCV's reader thread would go on decoding the batches ahead, and the exit waits for them.
                getattr(batches, "close", lambda: None)()
                raise StopRequested(signum)
            yield batch

    def __len__(self) -> int:
        return len(self._loader)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def cli(argv: list[str] | None = None) -> int:
    """The command (fastmveb-train, python -m fastmveb.train, accelerate launch [-m] fastmveb[/.]train): main()
    with bad input, a failed checkpoint save (a full disk) or a lost peer as one line instead of a traceback."""
    try:
        return run_cli(main, argv, end=end_process)
    except Exception as e:                                           # noqa: BLE001 -- only a lost peer is caught
        line = lost_peer(e)
        if line is None:
            raise
        print(line, file=sys.stderr, flush=True)
        # Not sys.exit: tearing down a process group whose peer is gone can block (NCCL's abort, atexit hooks).
        os._exit(1)


if __name__ == "__main__":
    sys.exit(cli())
