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

from fastmveb.checkpoint import load_run_backbone
from fastmveb.compat import end_process, hold_process_group
from fastmveb.errors import RunError, run_cli
from fastmveb.eval.commands import COMMANDS, Command, EvalSetup, head_not_saved


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
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, parents=[common], help=command.help))
    return ap


def run(args) -> dict:
    """The evaluation ``args.cmd`` names (a COMMANDS entry) of the run's backbone -> its eval.jsonl record."""
    command = COMMANDS.get(args.cmd)
    if command is None:                                               # never another evaluation's figures
        raise RunError(f"unknown evaluation {args.cmd!r}: choose one of {', '.join(COMMANDS)}")
    _config_flags(args, command)                                      # bad values: one line before any loading
    if not Path(args.run).is_dir():
        raise RunError(f"run directory '{args.run}' not found")
    unsaved = head_not_saved(args)
    if getattr(args, "replace_head", False) and unsaved:
        raise RunError(f"--replace-head: this probe's head is not saved ({unsaved})")
    ev = _prepare(args, command)
    cfg = ev.cfg
    record = {"kind": args.cmd, "time": ev.time,
              "ckpt": ev.ckpt_path.name if ev.ckpt_path is not None else "random-init", "step": ev.ckpt.get("step"),
              "epoch": ev.ckpt.get("epoch"), "which": args.which, "arch": cfg.model.arch, "device": str(ev.device),
              "size": cfg.eval.size, "train_beton": str(cfg.data.train_beton), "val_beton": str(cfg.data.val_beton)}
    t0 = time.perf_counter()
    record.update(command.run(ev))
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def _load(args):
    """(backbone, the run's config, checkpoint path or None, its contents or {}) of the run, or an untrained
    backbone of its architecture (--random-init, seeded with --seed)."""
    if not args.random_init:
        backbone, info = load_run_backbone(args.run, args.ckpt, args.which)
        return backbone, info["cfg"], info["ckpt_path"], info["ckpt"]
    from fastmveb.config import load_config
    from fastmveb.model import build_backbone
    run_dir = Path(args.run)
    if not (run_dir / "config.yaml").is_file():
        raise RunError(f"no config.yaml in '{run_dir}'")
    cfg = load_config(run_dir / "config.yaml")                        # a ConfigError is a UserError: one line
    torch.manual_seed(args.seed)
    backbone, _ = build_backbone(cfg.model)
    return backbone, cfg, None, {}


def _prepare(args, command: Command) -> EvalSetup:
    """Load the backbone, apply the transfer betons and the flags to the config, check the betons, and place the
    backbone on its device (one process per GPU under torchrun for a command that runs on several)."""
    backbone, cfg, path, ck = _load(args)
    # Transfer evaluation: any labelled betons, not only the ones the run trained on.
    if args.train_beton:
        cfg.data.train_beton = args.train_beton
    if args.val_beton:
        cfg.data.val_beton = args.val_beton
    _check_betons(cfg, given=bool(args.train_beton or args.val_beton), allow_mismatch=args.allow_label_mismatch)
    _config_flags(args, command, cfg)
    if args.size is not None:
        from fastmveb.backbones import check_model_config
        check_model_config(cfg)                                       # a ViT: --size a multiple of its patch
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda given but no CUDA device is available")
    accelerator = command.start_processes(args, device) if command.start_processes else None
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
    return EvalSetup(args, cfg, backbone, device, amp, workers, Path(args.run), path, ck,
                     _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), accelerator)


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


# Each flag that sets a config key, checked by that key's own rule (fastmveb.config.check_value), so a value a
# config refuses is refused here too, in one line: these for every command, a command's own in its flag_keys.
FLAG_KEYS = {"size": "eval.size", "batch_size": "data.eval_batch_size", "num_workers": "data.num_workers"}


def _config_flags(args, command: Command, cfg=None) -> None:
    """Check every given flag that sets a config key by the key's rule (ConfigError: one line, exit 2); with
    ``cfg``, also set the keys, so the run reads every setting from one place."""
    from fastmveb.config import check_value
    for attr, key in dict(FLAG_KEYS, **command.flag_keys(args, cfg)).items():
        value = getattr(args, attr, None)
        if value is None:
            continue
        value = check_value(key, value, "--" + attr.replace("_", "-"))
        if cfg is not None:
            section, _, name = key.partition(".")
            setattr(getattr(cfg, section), name, value)


def main(argv: list[str] | None = None) -> int:
    """Run the command; bad input raises a UserError (``cli`` prints it as one line and exits 2)."""
    args = _parser().parse_args(argv)
    rec = run(args)
    if rec.get("processes", 1) > 1 and torch.distributed.get_rank() != 0:
        return 0                                                      # rank 0 reports and records, once
    what = COMMANDS[rec["kind"]].describe(rec)
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
