"""The evaluations `python -m fastmveb.eval NAME` runs, one COMMANDS entry each: its flags, the function that runs
it on an EvalSetup (the run's backbone on its device, its config with the flags applied) and returns the fields of
its eval.jsonl record, and the opening of its result line. fastmveb/eval/__main__.py parses the flags, loads the
run and dispatches through COMMANDS, so adding an evaluation touches this table and its own functions only.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fastmveb.config import CHOICES, EvalConfig
from fastmveb.errors import RunError
from fastmveb.eval.features import HEAD_FILE, PixelStats, eval_loaders
from fastmveb.fileio import atomic_path


@dataclasses.dataclass
class EvalSetup:
    """What every evaluation starts from: the flags, the run's config (flags and transfer betons applied), the
    backbone on its device, the autocast dtype, FFCV threads, where the weights came from, the record's time, and
    the Accelerator of a command that runs on several processes (else None)."""
    args: argparse.Namespace
    cfg: object
    backbone: nn.Module
    device: torch.device
    amp: torch.dtype | None
    workers: int
    run_dir: Path
    ckpt_path: Path | None                                            # None: --random-init
    ckpt: dict
    time: str
    accelerator: object | None = None

    @property
    def stats(self) -> PixelStats:
        return PixelStats.of(self.cfg)

    def loaders(self, distributed: bool = False, betons=("train", "val")) -> tuple:
        return eval_loaders(self.cfg, self.device, self.workers, distributed, betons)


@dataclasses.dataclass(frozen=True)
class Command:
    """One `python -m fastmveb.eval NAME` (COMMANDS): its flags, what it runs, the result line's opening."""
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[EvalSetup], dict]                                  # -> the fields it adds to the record
    describe: Callable[[dict], str]                                   # the record -> "kNN (k=20, T=0.1)"
    # flags that set config keys (beyond __main__.FLAG_KEYS): (args, the run's config or None) -> {attr: "section.key"}
    flag_keys: Callable[[argparse.Namespace, object], dict] = lambda args, cfg: {}
    # a command that runs on the processes torchrun started: (args, device) -> their Accelerator
    start_processes: Callable | None = None


def _given(value, default):
    """A flag's value, or ``default`` (the one place that holds it) when the flag is not given."""
    return default if value is None else value


def _log(line: str) -> None:
    print(line, flush=True)


def _no_image_limits(args, instead: str) -> None:
    """--max-train/--max-val bound the cached feature passes (knn, linear --mode fast); a command that streams the
    betons through training would otherwise ignore them silently and report a figure over other images."""
    given = [f for f, v in (("--max-train", args.max_train), ("--max-val", args.max_val)) if v is not None]
    if given:
        raise RunError(f"{' and '.join(given)}: only knn and linear --mode fast take an image limit; {instead}")


def _num_classes(cfg) -> int:
    """The classifier size that covers both betons' labels (val may lack train's last classes, or, under
    --allow-label-mismatch, hold others)."""
    from dataset_prep.integrity import label_counts
    return max(set(label_counts(cfg.data.train_beton)) | set(label_counts(cfg.data.val_beton))) + 1


# ---------------------------------------------------------------------------------------------------------- knn
def _knn_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--k", type=int, help="neighbours (default: eval.knn_k)")
    p.add_argument("--t", type=float, help="temperature (default: eval.knn_t)")


def _knn(ev: EvalSetup) -> dict:
    from fastmveb.eval.knn import KnnOptions, knn_eval
    opts = KnnOptions.of(ev.cfg, ev.args.max_train, ev.args.max_val)
    train, val = ev.loaders()
    r = knn_eval(ev.backbone, train, val, ev.device, ev.stats, opts, amp_dtype=ev.amp)
    return dict(k=opts.k, T=opts.T, top1=r["top1"], top5=r["top5"])


# ------------------------------------------------------------------------------------------------------- linear
# linear's; finetune's --epochs and --lr have defaults of their own (fastmveb/eval/finetune.py), not these keys
LINEAR_FLAG_KEYS = {"epochs": "eval.linear_epochs", "lr": "eval.linear_base_lr", "mode": "eval.linear_mode",
                    "micro_batch": "eval.linear_micro_batch"}


def _linear_flag_keys(args, cfg) -> dict:
    """LINEAR_FLAG_KEYS, and --linear-batch-size: the batch key of the probe's mode."""
    mode = args.mode or (cfg.eval if cfg is not None else EvalConfig()).linear_mode
    return dict(LINEAR_FLAG_KEYS, linear_batch_size="eval.linear_batch_size" if mode == "fast"
                else "eval.linear_full_batch_size")


def _linear_arguments(p: argparse.ArgumentParser) -> None:
    from fastmveb.eval.linear import LinearFullOptions
    p.add_argument("--mode", choices=CHOICES["eval.linear_mode"], help="fast: cached features; full: MVEB protocol (default: eval.linear_mode)")
    p.add_argument("--epochs", type=int, help="default: eval.linear_epochs")
    p.add_argument("--lr", type=float, help="base lr, scaled by batch/256 (default: eval.linear_base_lr)")
    p.add_argument("--linear-batch-size", type=int, help="classifier batch size (default: eval.linear_batch_size "
                   f"in fast mode, eval.linear_full_batch_size = {EvalConfig().linear_full_batch_size} in full mode)")
    p.add_argument("--micro-batch", type=int, help="full mode: images per backbone forward when the device cannot "
                   "take the whole batch; the head still steps on the whole batch (default: eval.linear_micro_batch, "
                   "0 = whole batch)")
    p.add_argument("--val-every", type=int, help="full mode: validate every N epochs (and after the last; default "
                   f"{LinearFullOptions.val_every})")
    p.add_argument("--trust-coef", type=float, help="LARS trust coefficient in full mode (0 = plain SGD; default "
                   f"{LinearFullOptions.trust_coef})")
    p.add_argument("--replace-head", action="store_true", help=f"save this probe's head to run_dir/{HEAD_FILE} even "
                   "when the saved one (same checkpoint) has a higher top-1")


def _linear(ev: EvalSetup) -> dict:
    from fastmveb.eval import linear
    args, cfg = ev.args, ev.cfg
    mode, epochs, base_lr = cfg.eval.linear_mode, cfg.eval.linear_epochs, cfg.eval.linear_base_lr
    lbs = cfg.eval.linear_batch_size if mode == "fast" else cfg.eval.linear_full_batch_size
    if mode == "fast":
        train, val = ev.loaders()
        opts = linear.LinearFastOptions(epochs, lbs, base_lr, seed=args.seed, max_train=args.max_train,
                                        max_val=args.max_val)
        r = linear.linear_fast(ev.backbone, train, val, ev.device, ev.stats, opts, amp_dtype=ev.amp, log=_log)
    else:
        r = _linear_full(ev, lbs, epochs, base_lr)
    record = dict(mode=mode, epochs=epochs, base_lr=base_lr, batch_size=lbs, top1=r["top1"], top5=r["top5"])
    if mode == "full":
        record.update({k: r[k] for k in ("best_top1", "best_top5", "best_epoch", "val_epochs", "micro_batch")})
    if "train_top1" in r:  # next to val top-1 it tells under-fitting from over-fitting
        record["train_top1"] = r["train_top1"]
    unsaved = head_not_saved(args)
    if unsaved:
        print(f"head: not saved ({unsaved}); {HEAD_FILE} is unchanged", flush=True)
    else:
        record["head"] = _save_head(ev.run_dir, r["head"], dict(
            ckpt=ev.ckpt_path.name, which=args.which, mode=mode, top1=r["top1"], top5=r["top5"], epochs=epochs,
            base_lr=base_lr, batch_size=lbs, size=cfg.eval.size, seed=args.seed, n_val=int(r.get("n_val", 0)),
            val_beton=str(cfg.data.val_beton), time=ev.time), replace=args.replace_head)
    return record


def _linear_full(ev: EvalSetup, batch: int, epochs: int, base_lr: float) -> dict:
    """MVEB protocol: shuffled whole-image squares from the train loader, RRC + flip cut on the device."""
    from fastmveb.data import TrainLoaderOptions, set_epoch, train_loader
    from fastmveb.eval import linear
    args, cfg = ev.args, ev.cfg
    _no_image_limits(args, "linear --mode full trains and validates on every image")
    (val,) = ev.loaders(betons=("val",))
    val_every = _given(args.val_every, linear.LinearFullOptions.val_every)
    if val_every < 1:
        raise RunError(f"--val-every must be >= 1, got {val_every}")
    # The pretraining's decode-once batches: when they carry each image's (H, W) beside a whole-image canvas,
    # linear_full draws every RandomResizedCrop on the true extent (rrc_flip), as the released protocol does.
    options = TrainLoaderOptions(decode="once", decode_size=cfg.data.decode_size, seed=args.seed, order="random",
                                 os_cache=cfg.data.os_cache, drop_last=True)
    train = train_loader(cfg.data.train_beton, batch, ev.workers, ev.device, options)
    if len(train) == 0:
        raise RunError(f"the linear batch {batch} exceeds the training images of {cfg.data.train_beton}; "
                       "pass a smaller --linear-batch-size")
    opts = linear.LinearFullOptions(epochs, base_lr, cfg.eval.size, seed=args.seed, val_every=val_every,
                                    trust_coef=_given(args.trust_coef, linear.LinearFullOptions.trust_coef),
                                    micro_batch=cfg.eval.linear_micro_batch or None)
    return linear.linear_full(ev.backbone, train, val, ev.device, ev.stats, opts, num_classes=_num_classes(cfg),
                              amp_dtype=ev.amp, log=_log, set_epoch=lambda e: set_epoch(train, e))


def _describe_linear(rec: dict) -> str:
    if rec["mode"] == "full":
        return f"linear full (released protocol, batch {rec['batch_size']}, {rec['epochs']} epochs)"
    return f"linear fast (quick estimate on cached centre-crop features, {rec['epochs']} epochs)"


def head_not_saved(args) -> str | None:
    """Why this command saves no head to run_dir/linear_head.pt (None: it may). Export ships that head as the
    fc, so only a complete probe of the run's own checkpoint on its own betons may replace it."""
    if args.cmd != "linear":
        return "only linear saves a head"
    if args.random_init:
        return "--random-init"
    if args.train_beton or args.val_beton:
        return "transfer to other betons: export's fc is for the run's own classes"
    reduced = [f for f, v in (("--max-train", args.max_train), ("--max-val", args.max_val)) if v is not None]
    if reduced:
        return f"a reduced probe ({' and '.join(reduced)}) never replaces a complete one"
    if args.no_log:
        return "--no-log writes nothing to the run directory"
    return None


def _save_head(run_dir: Path, head: dict, info: dict, replace: bool = False) -> str:
    """Save the probe's head with its top-1 and settings, unless the saved head of the same checkpoint and encoder
    scored higher (``replace``: save anyway). Prints one line saying which head export now uses; -> "saved" or
    "kept"."""
    path = run_dir / HEAD_FILE
    old = None
    if path.is_file():
        try:
            old = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 -- an unreadable head is replaced
            old = None
    same = (isinstance(old, dict) and old.get("ckpt") == info["ckpt"] and old.get("which") == info["which"]
            and isinstance(old.get("top1"), (int, float)))
    if same and old["top1"] > info["top1"] and not replace:
        print(f"head: kept {path} ({old.get('mode', '?')} probe, top-1 {old['top1']:.2f}%, higher than this "
              f"probe's {info['top1']:.2f}%; --replace-head saves this one instead)", flush=True)
        return "kept"
    try:
        with atomic_path(path) as tmp:
            torch.save({"weight": head["weight"], "bias": head["bias"], **info}, tmp)
    except (OSError, RuntimeError) as e:                              # torch.save reports a full disk as RuntimeError
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise RunError(f"cannot save {path}: {why}; the previous head is unchanged") from None
    was = f", replacing one with top-1 {old['top1']:.2f}%" if same else ""
    print(f"head: saved {path} (top-1 {info['top1']:.2f}%{was}): export's fc", flush=True)
    return "saved"


# ----------------------------------------------------------------------------------------------------- finetune
def _finetune_arguments(p: argparse.ArgumentParser) -> None:
    from fastmveb.eval import finetune as ft
    p.add_argument("--fraction", type=float, help="labelled fraction of the train beton, class-balanced and seeded "
                   "(--seed): 0.01 or 0.1 in the literature")
    p.add_argument("--subset", metavar="FILE", help="a published list of file names instead (e.g. SimCLR's 1%%/10%% "
                   "ImageNet lists); matched against the beton's NAME.beton.files.txt")
    p.add_argument("--epochs", type=int, help=f"default: {ft.EPOCHS[0.01]} for 1%%, {ft.EPOCHS[0.1]} for 10%% (SimCLR)")
    p.add_argument("--lr", type=float, help=f"base lr, scaled by batch/256 (default {ft.BASE_LR}, SimCLR)")
    p.add_argument("--batch", type=int, help=f"fine-tuning batch (default {ft.BATCH}; capped at the subset size)")
    p.add_argument("--val-every", type=int, help="also validate every N epochs (default: after the last only)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], help="sgd: the semi-supervised protocol (default); "
                   f"adamw: the usual ViT fine-tuning, base lr {ft.ADAMW_BASE_LR:g}, weight decay "
                   f"{ft.ADAMW_WEIGHT_DECAY}, layer-wise lr decay (--layer-decay)")
    p.add_argument("--layer-decay", type=float, help="adamw on a timm model with blocks: each block's lr x this per "
                   f"block below the head (default {ft.LAYER_DECAY}; 1 = off)")


def _finetune_accelerator(args, device):
    """Accelerate over the processes torchrun (or accelerate launch) started, else one process. On CPUs
    cpu=True is what makes torchrun's processes join one gloo group (docs/notes.md)."""
    from accelerate import Accelerator

    from fastmveb.eval.finetune import BATCH
    world = int(os.environ.get("WORLD_SIZE", "1"))                   # checked before any process group exists
    if world > 1 and device.type == "cuda" and device.index is not None:
        raise RunError(f"--device {args.device} names one GPU, but {world} processes were "
                       "started: pass --device cuda (each process takes its own) or start one process")
    batch = _given(args.batch, BATCH)
    if batch % world:
        raise RunError(f"--batch {batch} does not split evenly over {world} processes; pass a multiple of {world}")
    return Accelerator(cpu=device.type == "cpu", mixed_precision="no")


def _finetune(ev: EvalSetup) -> dict:
    """The labelled subset of the train beton (--fraction or --subset), then fastmveb.eval.finetune.finetune.

    Several processes: the subset is drawn the same way on every rank (seeded, or the listed files); --batch is
    the global batch, split evenly over the processes; val is sharded and gathered (every sample once)."""
    from fastmveb.data import TrainLoaderOptions, train_loader
    from fastmveb.eval import finetune as ft
    args, cfg, accelerator = ev.args, ev.cfg, ev.accelerator
    _no_image_limits(args, "finetune validates on every val image and trains on the subset --fraction or --subset "
                           "chooses")
    if args.fraction is None and not args.subset:
        raise RunError("finetune needs --fraction F (e.g. 0.01 or 0.1) or --subset FILE")
    if args.fraction is not None and not 0 < args.fraction <= 1:
        raise RunError(f"--fraction must be in (0, 1], got {args.fraction}")
    batch, val_every = _given(args.batch, ft.BATCH), _given(args.val_every, ft.FinetuneOptions.val_every)
    if batch < 1 or val_every < 0:
        raise RunError(f"--batch must be >= 1 and --val-every >= 0; got {batch} and {val_every}")
    idx, fraction = _finetune_subset(cfg.data.train_beton, args)
    opts = _finetune_options(ev, fraction, val_every)
    world = accelerator.num_processes if accelerator is not None else 1
    batch = min(batch, len(idx) // world * world)                     # the global batch
    if batch == 0:
        raise RunError(f"the subset has {len(idx)} images, fewer than the {world} processes; raise --fraction")
    distributed = world > 1
    (val,) = ev.loaders(distributed=distributed, betons=("val",))
    options = TrainLoaderOptions(decode="once", decode_size=cfg.data.decode_size, seed=args.seed, order="random",
                                 os_cache=cfg.data.os_cache, drop_last=True, distributed=distributed)
    train = train_loader(cfg.data.train_beton, batch // world, ev.workers, ev.device, options, indices=idx)
    # One global order for any number of processes (DistributedSampler's draw; rank r reads positions r, r + world,
    # ...): optimizer step k consumes the same samples on 1 process as on N.
    train.shuffle = "torch"
    torch.manual_seed(args.seed)
    main_process = accelerator is None or accelerator.is_main_process
    r = ft.finetune(ev.backbone, train, val, ev.device, ev.stats, _num_classes(cfg), opts, amp_dtype=ev.amp,
                    log=_log if main_process else None, accelerator=accelerator)
    r = dict(r, fraction=round(fraction, 6), subset=args.subset, n_labelled=int(len(idx)), base_lr=opts.base_lr)
    return {k: r[k] for k in ("fraction", "subset", "n_labelled", "epochs", "base_lr", "batch", "steps", "processes",
                              "top1", "top5", "n_val")}


def _finetune_subset(beton, args) -> tuple:
    """(sorted sample indices of the labelled subset, its share of the beton): --subset's listed files, or a
    class-balanced --fraction drawn with --seed."""
    from dataset_prep.writer import files_path
    from fastmveb.data import labels
    from fastmveb.eval import finetune as ft
    y = labels(beton)
    if args.subset:
        fp = files_path(beton)
        if not fp.is_file():
            raise RunError(f"{beton} has no {fp.name} (written before dataset_prep recorded file names); rewrite it "
                           "with dataset_prep ... --force, or use --fraction")
        try:
            names = Path(args.subset).read_text().splitlines()
            idx = ft.subset_from_list(fp.read_text().splitlines(), names, source=args.subset)
        except OSError as e:
            raise RunError(f"cannot read --subset file {args.subset}: {e.strerror or e}") from None
        except ValueError as e:
            raise RunError(str(e)) from None
    else:
        idx = ft.balanced_subset(y, args.fraction, args.seed)
    return idx, len(idx) / len(y)                                     # as selected (a --subset list's own share)


def _finetune_options(ev: EvalSetup, fraction: float, val_every: int):
    """FinetuneOptions from the flags, each unset one at its protocol default (fastmveb/eval/finetune.py)."""
    from fastmveb.eval import finetune as ft
    args = ev.args
    epochs = _given(args.epochs, ft.default_epochs(args.fraction or fraction))
    optimizer = _given(args.optimizer, ft.FinetuneOptions.optimizer)
    adamw = optimizer == "adamw"
    base_lr = _given(args.lr, ft.ADAMW_BASE_LR if adamw else ft.BASE_LR)
    layer_decay = 1.0
    if args.layer_decay is not None or adamw:
        layer_decay = _given(args.layer_decay, ft.LAYER_DECAY)
        if not adamw or not 0 < layer_decay <= 1:
            raise RunError(f"--layer-decay needs --optimizer adamw and a value in (0, 1]; got {optimizer} and "
                           f"{layer_decay}")
        if not hasattr(ev.backbone, "group_matcher"):
            if args.layer_decay is not None and layer_decay != 1.0:
                raise RunError(f"--layer-decay applies to timm models with blocks, not {ev.cfg.model.arch}; leave it "
                               "out")
            layer_decay = 1.0
    if epochs < 1 or base_lr <= 0:
        raise RunError(f"--epochs must be >= 1 and --lr > 0; got {epochs} and {base_lr}")
    return ft.FinetuneOptions(epochs, ev.cfg.eval.size, base_lr=base_lr, seed=args.seed, val_every=val_every,
                              optimizer=optimizer, layer_decay=layer_decay,
                              weight_decay=ft.ADAMW_WEIGHT_DECAY if adamw else 0.0)


def _describe_finetune(rec: dict) -> str:
    procs = f" over {rec['processes']} processes" if rec["processes"] > 1 else ""
    return (f"finetune on {rec['n_labelled']:,} labelled images ({100 * rec['fraction']:.3g}% of train"
            f"{', ' + rec['subset'] if rec['subset'] else ''}; {rec['epochs']} epochs, batch {rec['batch']}"
            f"{procs}; val {rec['n_val']:,} images)")


# The evaluations, by name: the subcommands, their flags and what they run all come from here. A new evaluation is
# one entry (and its functions above).
COMMANDS = {
    "knn": Command("weighted kNN (bank: train set, queries: val set)", _knn_arguments, _knn,
                   lambda rec: f"kNN (k={rec['k']}, T={rec['T']})",
                   flag_keys=lambda args, cfg: {"k": "eval.knn_k", "t": "eval.knn_t"}),
    "linear": Command("linear probe on the frozen backbone", _linear_arguments, _linear, _describe_linear,
                      flag_keys=_linear_flag_keys),
    "finetune": Command("semi-supervised: backbone + linear head fine-tuned on a labelled subset (SimCLR/BYOL "
                        "protocol, fastmveb/eval/finetune.py)", _finetune_arguments, _finetune, _describe_finetune,
                        start_processes=_finetune_accelerator),
}
