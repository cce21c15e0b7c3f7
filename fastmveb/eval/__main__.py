"""Offline evaluation of a run's checkpoint: kNN or a linear probe on the frozen backbone, or fine-tuning it.

    python -m fastmveb.eval knn    --run runs/NAME [--ckpt PATH] [--k 200 --t 0.1] [--random-init]
    python -m fastmveb.eval linear --run runs/NAME [--ckpt PATH] [--mode fast|full] [--epochs N] [--lr BASE]
    python -m fastmveb.eval linear --run runs/NAME --mode full [--micro-batch 1024]   # the released protocol
    python -m fastmveb.eval knn|linear --run runs/NAME --train-beton A.beton --val-beton B.beton  # transfer
    python -m fastmveb.eval finetune --run runs/NAME --fraction 0.01|0.1 [--subset FILE]   # semi-supervised
    torchrun --nproc_per_node N -m fastmveb.eval -- finetune --run runs/NAME --fraction 0.1  # on N processes

Reads the betons (unless --train-beton / --val-beton name other labelled ones: transfer to another dataset),
eval crop and normalisation from the run's config.yaml, loads the backbone of the newest readable
checkpoint (a newer unreadable one is skipped with one warning line, as training's resume skips it; or --ckpt;
the online encoder unless --which target), prints top-1 / top-5 and appends one JSON
line to run_dir/eval.jsonl. `linear` also saves its classifier (on raw backbone features) with its top-1 and
settings to run_dir/linear_head.pt, which `python -m fastmveb.export` then uses as the torchvision fc: only a
complete probe (every image, logged) is saved, and it replaces the saved head of the same checkpoint only with
a top-1 at least as high (--replace-head: replace it anyway); a line says which head is kept.
Defaults come from the config's eval section (knn_k, knn_t, linear_epochs, linear_base_lr,
linear_batch_size, linear_full_batch_size, linear_micro_batch, linear_mode); a flag that sets one of those (or
data.eval_batch_size, data.num_workers) must pass that key's own rule, as in a config. Train and val must share
their labels: a val label the train beton lacks (a kNN bank or probe never predicts it) is refused in one line
unless --allow-label-mismatch (transfer), which names those labels. `--mode full` is the released
protocol (batch 4096, LARC, 90 epochs; fastmveb/eval/linear.py) and reports the final top-1/5 and the best of
the validations every 10 epochs; `--mode fast` is a quick estimate on cached features. `--random-init` evaluates the same architecture untrained: the baseline
that says how much pretraining bought. `finetune` trains the whole backbone and a linear head on a labelled
subset (semi-supervised protocol: fastmveb/eval/finetune.py); compare it with `finetune --random-init` at the same
budget. Bad input (missing run, no checkpoint) -> one error line, exit 2.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
from pathlib import Path

import torch

from fastmveb.compat import end_process, hold_process_group
from fastmveb.config import CHOICES
from fastmveb.errors import RunError, run_cli
from fastmveb.eval.features import HEAD_FILE, load_run_backbone


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m fastmveb.eval", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--run", required=True, help="run directory (config.yaml, checkpoints/)")
    common.add_argument("--ckpt", help="checkpoint file (default: the run's newest readable one)")
    common.add_argument("--which", default="online", choices=["online", "target"], help="online encoder or EMA target")
    common.add_argument("--random-init", action="store_true", help="evaluate a randomly initialised backbone (baseline)")
    common.add_argument("--batch-size", type=int, help="eval loader batch size (default: data.eval_batch_size)")
    common.add_argument("--num-workers", type=int, help="FFCV threads (default: data.num_workers, capped at the cores)")
    common.add_argument("--device", help="cuda / cuda:1 / cpu (default: cuda when available)")
    common.add_argument("--amp", default="auto", choices=["auto", "bf16", "no"],
                        help="autocast for the backbone forward (auto: bf16 on CUDA when the run trained in bf16)")
    common.add_argument("--size", type=int, help="test resolution: centre-crop side in px (default: the run's eval.size; "
                        "a run trained at low resolution may test best a little above its training size)")
    common.add_argument("--max-train", type=int, help="use only the first N training images (knn, linear --mode fast)")
    common.add_argument("--max-val", type=int, help="use only the first N val images (knn, linear --mode fast)")
    common.add_argument("--no-log", action="store_true", help="write nothing to the run directory (no eval.jsonl "
                        "line, no linear_head.pt)")
    common.add_argument("--seed", type=int, default=0, help="random init (--random-init), probe init and data order")
    common.add_argument("--train-beton", metavar="A", help="labelled beton for the kNN bank / probe training "
                        "(transfer evaluation; default: the run's data.train_beton)")
    common.add_argument("--val-beton", metavar="B", help="labelled beton to measure on (default: the run's "
                        "data.val_beton)")
    common.add_argument("--allow-label-mismatch", action="store_true",
                        help="measure even when val holds labels the train beton lacks (transfer); the labels are "
                        "named and their images count in the figures, though nothing trained on train predicts them")
    k = sub.add_parser("knn", parents=[common], help="weighted kNN (bank: train set, queries: val set)")
    k.add_argument("--k", type=int, help="neighbours (default: eval.knn_k)")
    k.add_argument("--t", type=float, help="temperature (default: eval.knn_t)")
    lin = sub.add_parser("linear", parents=[common], help="linear probe on the frozen backbone")
    lin.add_argument("--mode", choices=CHOICES["eval.linear_mode"], help="fast: cached features; full: MVEB protocol (default: eval.linear_mode)")
    lin.add_argument("--epochs", type=int, help="default: eval.linear_epochs")
    lin.add_argument("--lr", type=float, help="base lr, scaled by batch/256 (default: eval.linear_base_lr)")
    lin.add_argument("--linear-batch-size", type=int, help="classifier batch size (default: eval.linear_batch_size "
                     "in fast mode, eval.linear_full_batch_size = 4096 in full mode)")
    lin.add_argument("--micro-batch", type=int, help="full mode: images per backbone forward when the device cannot "
                     "take the whole batch; the head still steps on the whole batch (default: eval.linear_micro_batch, "
                     "0 = whole batch)")
    lin.add_argument("--val-every", type=int, default=10, help="full mode: validate every N epochs (and after the last)")
    lin.add_argument("--trust-coef", type=float, default=0.001, help="LARS trust coefficient in full mode (0 = plain SGD)")
    lin.add_argument("--replace-head", action="store_true", help=f"save this probe's head to run_dir/{HEAD_FILE} even "
                     "when the saved one (same checkpoint) has a higher top-1")
    ft = sub.add_parser("finetune", parents=[common], help="semi-supervised: backbone + linear head fine-tuned on a "
                        "labelled subset (SimCLR/BYOL protocol, fastmveb/eval/finetune.py)")
    ft.add_argument("--fraction", type=float, help="labelled fraction of the train beton, class-balanced and seeded "
                    "(--seed): 0.01 or 0.1 in the literature")
    ft.add_argument("--subset", metavar="FILE", help="a published list of file names instead (e.g. SimCLR's 1%%/10%% "
                    "ImageNet lists); matched against the beton's NAME.beton.files.txt")
    ft.add_argument("--epochs", type=int, help="default: 60 for 1%%, 30 for 10%% (SimCLR)")
    ft.add_argument("--lr", type=float, help="base lr, scaled by batch/256 (default 0.05, SimCLR)")
    ft.add_argument("--batch", type=int, default=256, help="fine-tuning batch (default 256; capped at the subset size)")
    ft.add_argument("--val-every", type=int, default=0, help="also validate every N epochs (default: after the last only)")
    ft.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd", help="sgd: the semi-supervised protocol "
                    "(default); adamw: the usual ViT fine-tuning, base lr 5e-4, weight decay 0.05, layer-wise lr "
                    "decay (--layer-decay)")
    ft.add_argument("--layer-decay", type=float, help="adamw on a timm model with blocks: each block's lr x this per "
                    "block below the head (default 0.75; 1 = off)")
    return ap


def _check_betons(cfg, given: bool, allow_mismatch: bool = False) -> None:
    """Both betons exist, pass the integrity check and carry labels, and val's labels are train's (or
    ``allow_mismatch``: one warning line names the others); RunError naming the fix otherwise."""
    from dataset_prep.integrity import BetonError, check_beton, label_gap
    from fastmveb.data import num_classes
    where = "given" if given else "from the run's config.yaml"
    for path in (cfg.data.train_beton, cfg.data.val_beton):
        if not Path(path).is_file():
            raise RunError(f"dataset '{path}' ({where}) not found; " + (
                "check the path" if given else "run from the directory the run was started in, make the betons "
                "(make beton), or pass --train-beton/--val-beton"))
        try:
            check_beton(path)
            labelled = num_classes(path) > 0
        except (BetonError, ValueError) as e:
            raise RunError(str(e).splitlines()[0]) from None
        if not labelled:
            raise RunError(f"'{path}' has no labels (written by dataset_prep folder without them): evaluation "
                           "needs labelled betons; pass --train-beton A --val-beton B with labelled ones")
    try:
        gap = label_gap(cfg.data.train_beton, cfg.data.val_beton)
    except BetonError as e:
        raise RunError(str(e)) from None
    if gap and not allow_mismatch:
        raise RunError(f"{gap}: nothing trained on the train side predicts them, so the figures would count "
                       "classes never seen; use a train/val pair written together, or pass --allow-label-mismatch "
                       "(transfer) to measure anyway")
    if gap:
        print(f"warning: --allow-label-mismatch: {gap}; their images count in the figures", file=sys.stderr,
              flush=True)


def _num_classes(cfg) -> int:
    """The classifier size that covers both betons' labels (val may lack train's last classes, or, under
    --allow-label-mismatch, hold others)."""
    from dataset_prep.integrity import label_counts
    return max(set(label_counts(cfg.data.train_beton)) | set(label_counts(cfg.data.val_beton))) + 1


# Each flag that sets a config key, checked by that key's own rule (fastmveb.config.check_value), so a value a
# config refuses is refused here too, in one line. linear's --linear-batch-size sets the key of its --mode.
FLAG_KEYS = {"size": "eval.size", "batch_size": "data.eval_batch_size", "num_workers": "data.num_workers",
             "k": "eval.knn_k", "t": "eval.knn_t"}                   # (--k, --t: knn's)
# linear's; finetune's --epochs and --lr have defaults of their own (fastmveb/eval/finetune.py), not these keys
LINEAR_FLAG_KEYS = {"epochs": "eval.linear_epochs", "lr": "eval.linear_base_lr", "mode": "eval.linear_mode",
                    "micro_batch": "eval.linear_micro_batch"}


def _config_flags(args, cfg=None) -> None:
    """Check every given flag that sets a config key by the key's rule (ConfigError: one line, exit 2); with
    ``cfg``, also set the keys, so the run reads every setting from one place."""
    from fastmveb.config import check_value
    keys = dict(FLAG_KEYS, **(LINEAR_FLAG_KEYS if args.cmd == "linear" else {}))
    if args.cmd == "linear":
        mode = args.mode or (cfg.eval.linear_mode if cfg is not None else "fast")
        keys["linear_batch_size"] = "eval.linear_batch_size" if mode == "fast" else "eval.linear_full_batch_size"
    for attr, key in keys.items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        value = check_value(key, value, "--" + attr.replace("_", "-"))
        if cfg is not None:
            section, _, name = key.partition(".")
            setattr(getattr(cfg, section), name, value)


def _eval_loaders(cfg, batch_size, workers, device):
    """Centre-crop loaders over the train (the kNN bank / probe training set) and val betons."""
    from fastmveb.data import eval_loader
    try:
        return tuple(eval_loader(p, batch_size, workers, device, size=cfg.eval.size, crop_ratio=cfg.eval.crop_ratio)
                     for p in (cfg.data.train_beton, cfg.data.val_beton))
    except ValueError as e:
        raise RunError(str(e).splitlines()[0]) from None


def run(args) -> dict:
    _config_flags(args)                                               # bad values: one line before any loading
    if not Path(args.run).is_dir():
        raise RunError(f"run directory '{args.run}' not found")
    unsaved = _head_not_saved(args)
    if getattr(args, "replace_head", False) and unsaved:
        raise RunError(f"--replace-head: this probe's head is not saved ({unsaved})")
    if args.random_init:
        from fastmveb.model import build_backbone
        run_dir, path = Path(args.run), None
        from fastmveb.config import load_config
        if not (run_dir / "config.yaml").is_file():
            raise RunError(f"no config.yaml in '{run_dir}'")
        cfg = load_config(run_dir / "config.yaml")                    # a ConfigError is a UserError: one line
        torch.manual_seed(args.seed)
        backbone, _ = build_backbone(cfg.model)
        ck = {}
    else:
        backbone, info = load_run_backbone(args.run, args.ckpt, args.which)
        cfg, run_dir, path, ck = info["cfg"], Path(args.run), info["ckpt_path"], info["ckpt"]
    # Transfer evaluation: any labelled betons, not only the ones the run trained on.
    if args.train_beton:
        cfg.data.train_beton = args.train_beton
    if args.val_beton:
        cfg.data.val_beton = args.val_beton
    _check_betons(cfg, given=bool(args.train_beton or args.val_beton), allow_mismatch=args.allow_label_mismatch)
    _config_flags(args, cfg)
    if args.size is not None:
        from fastmveb.backbones import check_model_config
        check_model_config(cfg)                                       # a ViT: --size a multiple of its patch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda given but no CUDA device is available")
    accelerator = _finetune_accelerator(args, device) if args.cmd == "finetune" else None
    hold_process_group()                  # never freed (torch 2.11's gloo can hang there): cli() ends the process
    if accelerator is not None and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
        device = accelerator.device                                   # one GPU per process (torchrun)
    amp = {"bf16": torch.bfloat16, "no": None}.get(args.amp)
    if args.amp == "auto":
        amp = torch.bfloat16 if device.type == "cuda" and cfg.train.mixed_precision == "bf16" else None
    backbone.to(device)
    from fastmveb.backbones import channels_last_helps
    if device.type == "cuda" and cfg.model.channels_last and channels_last_helps(cfg.model):
        backbone.to(memory_format=torch.channels_last)
    workers = max(1, min(cfg.data.num_workers, os.cpu_count() or 1))
    bs = cfg.data.eval_batch_size
    mean, std = cfg.views.mean, cfg.views.std
    record = {"kind": args.cmd, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "ckpt": path.name if path is not None else "random-init", "step": ck.get("step"), "epoch": ck.get("epoch"),
              "which": args.which, "arch": cfg.model.arch, "device": str(device), "size": cfg.eval.size,
              "train_beton": str(cfg.data.train_beton), "val_beton": str(cfg.data.val_beton)}
    t0 = time.perf_counter()
    if args.cmd == "knn":
        from fastmveb.eval.knn import knn_eval
        k, T = cfg.eval.knn_k, cfg.eval.knn_t
        train, val = _eval_loaders(cfg, bs, workers, device)
        r = knn_eval(backbone, train, val, device, mean, std, k=k, T=T, max_train=args.max_train,
                     max_val=args.max_val, amp_dtype=amp)
        record.update(k=k, T=T, top1=r["top1"], top5=r["top5"])
    elif args.cmd == "finetune":
        r = _finetune(cfg, backbone, device, amp, workers, bs, args, accelerator)
        record.update({k: r[k] for k in ("fraction", "subset", "n_labelled", "epochs", "base_lr", "batch", "steps",
                                          "processes", "top1", "top5", "n_val")})
    else:
        from fastmveb.eval import linear
        mode, epochs, base_lr = cfg.eval.linear_mode, cfg.eval.linear_epochs, cfg.eval.linear_base_lr
        lbs = cfg.eval.linear_batch_size if mode == "fast" else cfg.eval.linear_full_batch_size
        log = lambda s: print(s, flush=True)  # noqa: E731
        if mode == "fast":
            train, val = _eval_loaders(cfg, bs, workers, device)
            r = linear.linear_fast(backbone, train, val, device, mean, std, epochs=epochs, batch_size=lbs,
                                   base_lr=base_lr, max_train=args.max_train, max_val=args.max_val,
                                   amp_dtype=amp, seed=args.seed, log=log)
        else:
            r = _linear_full(cfg, backbone, device, amp, workers, bs, lbs, epochs, base_lr, args, log)
        record.update(mode=mode, epochs=epochs, base_lr=base_lr, batch_size=lbs, top1=r["top1"], top5=r["top5"])
        if mode == "full":
            record.update({k: r[k] for k in ("best_top1", "best_top5", "best_epoch", "val_epochs", "micro_batch")})
        if "train_top1" in r:  # next to val top-1 it tells under-fitting from over-fitting
            record["train_top1"] = r["train_top1"]
        if unsaved:
            print(f"head: not saved ({unsaved}); {HEAD_FILE} is unchanged", flush=True)
        else:
            record["head"] = _save_head(run_dir, r["head"], dict(
                ckpt=path.name, which=args.which, mode=mode, top1=r["top1"], top5=r["top5"], epochs=epochs,
                base_lr=base_lr, batch_size=lbs, size=cfg.eval.size, seed=args.seed, n_val=int(r.get("n_val", 0)),
                val_beton=str(cfg.data.val_beton), time=record["time"]), replace=args.replace_head)
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def _linear_full(cfg, backbone, device, amp, workers, bs, lbs, epochs, base_lr, args, log):
    """MVEB protocol: shuffled whole-image squares from the train loader, RRC + flip cut on the device."""
    from fastmveb.data import set_epoch, train_loader
    from fastmveb.eval import linear
    _no_image_limits(args, "linear --mode full trains and validates on every image")
    _, val = _eval_loaders(cfg, bs, workers, device)
    micro = cfg.eval.linear_micro_batch
    if args.val_every < 1:
        raise RunError(f"--val-every must be >= 1, got {args.val_every}")
    # The pretraining's decode-once batches: when they carry each image's (H, W) beside a whole-image canvas,
    # linear_full draws every RandomResizedCrop on the true extent (rrc_flip), as the released protocol does.
    train = train_loader(cfg.data.train_beton, lbs, workers, device, decode="once", decode_size=cfg.data.decode_size,
                         seed=args.seed, order="random", os_cache=cfg.data.os_cache, drop_last=True)
    if len(train) == 0:
        raise RunError(f"the linear batch {lbs} exceeds the training images of {cfg.data.train_beton}; "
                       "pass a smaller --linear-batch-size")
    return linear.linear_full(backbone, train, val, device, cfg.views.mean, cfg.views.std, epochs=epochs,
                              base_lr=base_lr, trust_coef=args.trust_coef, crop_size=cfg.eval.size,
                              num_classes=_num_classes(cfg),
                              amp_dtype=amp, seed=args.seed, micro_batch=micro or None, val_every=args.val_every,
                              log=log, set_epoch=lambda e: set_epoch(train, e))


def _no_image_limits(args, instead: str) -> None:
    """--max-train/--max-val bound the cached feature passes (knn, linear --mode fast); a command that streams the
    betons through training would otherwise ignore them silently and report a figure over other images."""
    given = [f for f, v in (("--max-train", args.max_train), ("--max-val", args.max_val)) if v is not None]
    if given:
        raise RunError(f"{' and '.join(given)}: only knn and linear --mode fast take an image limit; {instead}")


def _finetune_accelerator(args, device):
    """Accelerate over the processes torchrun (or accelerate launch) started, else one process. On CPUs
    cpu=True is what makes torchrun's processes join one gloo group (docs/notes.md)."""
    from accelerate import Accelerator
    world = int(os.environ.get("WORLD_SIZE", "1"))                   # checked before any process group exists
    if world > 1 and device.type == "cuda" and device.index is not None:
        raise RunError(f"--device {args.device} names one GPU, but {world} processes were "
                       "started: pass --device cuda (each process takes its own) or start one process")
    if args.batch % world:
        raise RunError(f"--batch {args.batch} does not split evenly over {world} processes; pass a multiple of {world}")
    return Accelerator(cpu=device.type == "cpu", mixed_precision="no")


def _finetune(cfg, backbone, device, amp, workers, bs, args, accelerator=None) -> dict:
    """The labelled subset of the train beton (--fraction or --subset), then fastmveb.eval.finetune.finetune.

    Several processes: the subset is drawn the same way on every rank (seeded, or the listed files); --batch is
    the global batch, split evenly over the processes; val is sharded and gathered (every sample once)."""
    from dataset_prep.writer import files_path
    from fastmveb.data import eval_loader, labels, set_epoch, train_loader
    from fastmveb.eval import finetune as ft
    _no_image_limits(args, "finetune validates on every val image and trains on the subset --fraction or --subset "
                           "chooses")
    if args.fraction is None and not args.subset:
        raise RunError("finetune needs --fraction F (e.g. 0.01 or 0.1) or --subset FILE")
    if args.fraction is not None and not 0 < args.fraction <= 1:
        raise RunError(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.batch < 1 or args.val_every < 0:
        raise RunError(f"--batch must be >= 1 and --val-every >= 0; got {args.batch} and {args.val_every}")
    beton = cfg.data.train_beton
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
    fraction = len(idx) / len(y)                                      # as selected (a --subset list's own share)
    epochs = args.epochs if args.epochs is not None else ft.default_epochs(args.fraction or fraction)
    adamw = args.optimizer == "adamw"
    base_lr = args.lr if args.lr is not None else (ft.ADAMW_BASE_LR if adamw else ft.BASE_LR)
    layer_decay = 1.0
    if args.layer_decay is not None or adamw:
        layer_decay = args.layer_decay if args.layer_decay is not None else ft.LAYER_DECAY
        if not adamw or not 0 < layer_decay <= 1:
            raise RunError(f"--layer-decay needs --optimizer adamw and a value in (0, 1]; got {args.optimizer} and "
                           f"{layer_decay}")
        if not hasattr(backbone, "group_matcher"):
            if args.layer_decay is not None and layer_decay != 1.0:
                raise RunError(f"--layer-decay applies to timm models with blocks, not {cfg.model.arch}; leave it out")
            layer_decay = 1.0
    if epochs < 1 or base_lr <= 0:
        raise RunError(f"--epochs must be >= 1 and --lr > 0; got {epochs} and {base_lr}")
    world = accelerator.num_processes if accelerator is not None else 1
    batch = min(args.batch, len(idx) // world * world)                # the global batch
    if batch == 0:
        raise RunError(f"the subset has {len(idx)} images, fewer than the {world} processes; raise --fraction")
    distributed = world > 1
    try:
        val = eval_loader(cfg.data.val_beton, bs, workers, device, size=cfg.eval.size,
                          crop_ratio=cfg.eval.crop_ratio, distributed=distributed)
    except ValueError as e:
        raise RunError(str(e).splitlines()[0]) from None
    train = train_loader(beton, batch // world, workers, device, decode="once", decode_size=cfg.data.decode_size,
                         seed=args.seed, order="random", os_cache=cfg.data.os_cache, drop_last=True, indices=idx,
                         distributed=distributed)
    # One global order for any number of processes (DistributedSampler's draw; rank r reads positions r, r + world,
    # ...): optimizer step k consumes the same samples on 1 process as on N.
    train.shuffle = "torch"
    torch.manual_seed(args.seed)
    main_process = accelerator is None or accelerator.is_main_process
    r = ft.finetune(backbone, train, val, device, cfg.views.mean, cfg.views.std, _num_classes(cfg), epochs,
                    base_lr=base_lr, crop_size=cfg.eval.size, amp_dtype=amp, seed=args.seed, val_every=args.val_every,
                    log=(lambda s: print(s, flush=True)) if main_process else None,
                    set_epoch=lambda e: set_epoch(train, e), accelerator=accelerator, optimizer=args.optimizer,
                    layer_decay=layer_decay, weight_decay=ft.ADAMW_WEIGHT_DECAY if adamw else 0.0)
    return dict(r, fraction=round(fraction, 6), subset=args.subset, n_labelled=int(len(idx)), base_lr=base_lr,
                optimizer=args.optimizer, layer_decay=layer_decay)


def _head_not_saved(args) -> str | None:
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
    tmp = run_dir / f".{HEAD_FILE}.{os.getpid()}.tmp"
    try:
        torch.save({"weight": head["weight"], "bias": head["bias"], **info}, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:                              # torch.save reports a full disk as RuntimeError
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise RunError(f"cannot save {path}: {why}; the previous head is unchanged") from None
    finally:
        tmp.unlink(missing_ok=True)
    was = f", replacing one with top-1 {old['top1']:.2f}%" if same else ""
    print(f"head: saved {path} (top-1 {info['top1']:.2f}%{was}): export's fc", flush=True)
    return "saved"


def main(argv: list[str] | None = None) -> int:
    """Run the command; bad input raises a UserError (``cli`` prints it as one line and exits 2)."""
    args = _parser().parse_args(argv)
    rec = run(args)
    if rec.get("processes", 1) > 1 and torch.distributed.get_rank() != 0:
        return 0                                                      # rank 0 reports and records, once
    if rec["kind"] == "knn":
        what = f"kNN (k={rec['k']}, T={rec['T']})"
    elif rec["kind"] == "finetune":
        procs = f" over {rec['processes']} processes" if rec["processes"] > 1 else ""
        what = (f"finetune on {rec['n_labelled']:,} labelled images ({100 * rec['fraction']:.3g}% of train"
                f"{', ' + rec['subset'] if rec['subset'] else ''}; {rec['epochs']} epochs, batch {rec['batch']}"
                f"{procs}; val {rec['n_val']:,} images)")
    elif rec["mode"] == "full":
        what = f"linear full (released protocol, batch {rec['batch_size']}, {rec['epochs']} epochs)"
    else:
        what = f"linear fast (quick estimate on cached centre-crop features, {rec['epochs']} epochs)"
    train = f"  (train top-1 {rec['train_top1']:.2f}%)" if "train_top1" in rec else ""
    final = "final " if "best_top1" in rec else ""
    print(f"{what} {rec['arch']} {rec['ckpt']} ({rec['which']}) at {rec['size']} px: {final}top-1 {rec['top1']:.2f}%  "
          f"{final}top-5 {rec['top5']:.2f}%{train}")
    if "best_top1" in rec:
        print(f"  best of the validations at epochs {rec['val_epochs']}: top-1 {rec['best_top1']:.2f}%  "
              f"top-5 {rec['best_top5']:.2f}% (epoch {rec['best_epoch']})")
    if not args.no_log:
        with open(Path(args.run) / "eval.jsonl", "a") as f:
            f.write(json.dumps(rec) + "\n")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``fastmveb-eval``: main with a UserError as one ``error: ...`` line and exit status 2."""
    return run_cli(main, argv, end=end_process)


if __name__ == "__main__":
    sys.exit(cli())
