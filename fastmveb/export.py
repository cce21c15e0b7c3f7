"""Export a trained backbone as a torchvision ResNet state_dict (.pth) and as safetensors.

    python -m fastmveb.export --run runs/NAME --out rn50.pth [--ckpt PATH] [--which online|target] [--fc auto|zero] [--force]

Writes rn50.pth (torch.save of a plain state_dict; loads with torch.load(weights_only=True)) and
rn50.safetensors (the same tensors; metadata: arch, step, epoch, git revision, which, fc source, and the
run's resolved config as a JSON string). Both are written to a temp file and renamed, so an interrupted
export never leaves a half-written file under the final name; an existing rn50.pth or rn50.safetensors is
replaced only with --force. Then, for example:

    model = torchvision.models.resnet50()
    model.load_state_dict(torch.load("rn50.pth", weights_only=True))       # strict: every key matches
    model.fc = torch.nn.Linear(2048, my_classes)                            # what users typically do next

(arch "resnet10" is torchvision.models.resnet.ResNet(BasicBlock, [1, 1, 1, 1]).)

The fc layer: pretraining has no classifier, yet torchvision's ResNet has one. ``--fc auto`` uses, in this
order, the linear probe that ``python -m fastmveb.eval linear`` saved for the same checkpoint
(run_dir/linear_head.pt), the online linear probe stored in the checkpoint (its BatchNorm folded into the
weights), and otherwise a zero-initialised fc with torchvision's default 1000 classes (all logits 0: it
predicts nothing until replaced). ``--fc zero`` always takes the last. The metadata says which one it got.
The backbone is the online encoder by default; ``--which target`` exports the EMA target instead.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from fastmveb.eval.features import (RunError, backbone_state, read_checkpoint, resolve_checkpoint, run_config)

DEFAULT_CLASSES = 1000          # torchvision's ImageNet head size
HEAD_FILE = "linear_head.pt"    # written by `python -m fastmveb.eval linear`


def torchvision_model(arch: str) -> ResNet:
    """The torchvision model (random init, default 1000-class fc) that an export of ``arch`` loads into."""
    if arch == "resnet10":
        return ResNet(BasicBlock, [1, 1, 1, 1])
    try:
        return torchvision.models.get_model(arch, weights=None)
    except ValueError:
        raise RunError(f"unknown arch {arch!r}: not a torchvision model") from None


def _probe_head(state: dict) -> dict | None:
    """Fold an OnlineLinearProbe state_dict (bn running stats + fc) into one Linear on raw features."""
    keys = {"bn.running_mean", "bn.running_var", "fc.weight", "fc.bias"}
    if not isinstance(state, dict) or not keys <= set(state):
        return None
    inv = (state["bn.running_var"].float() + 1e-5).rsqrt()  # nn.BatchNorm1d's default eps
    w = state["fc.weight"].float() * inv[None, :]
    return {"weight": w, "bias": state["fc.bias"].float() - w @ state["bn.running_mean"].float()}


def find_head(run_dir: Path | None, ck: dict, ckpt_path: Path, which: str, feat_dim: int) -> tuple[dict | None, str]:
    """(head {'weight', 'bias'} or None, description of where it came from)."""
    if run_dir is not None and (run_dir / HEAD_FILE).is_file():
        saved = _read_head(run_dir / HEAD_FILE)
        # A head trained on another checkpoint would be a wrong classifier, not merely a worse one.
        if (saved.get("ckpt") == ckpt_path.name and saved.get("which") == which
                and tuple(saved["weight"].shape[1:]) == (feat_dim,)):
            return {"weight": saved["weight"], "bias": saved["bias"]}, f"linear probe ({saved.get('mode', '?')}, {HEAD_FILE})"
    if which == "online":
        for key in ("probe", "online_probe"):
            head = _probe_head(ck.get(key))
            if head is not None and tuple(head["weight"].shape[1:]) == (feat_dim,):
                return head, f"online linear probe (checkpoint '{key}')"
    return None, "zero-initialised (1000 classes)"


def _read_head(path: Path) -> dict:
    """The saved linear head, loaded weights_only (no pickled code runs); RunError for anything else."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- torch's message suggests weights_only=False: never pass that on
        kind = "holds Python objects that are not loaded (unsafe to unpickle)" if "GLOBAL" in str(e).upper() \
            else f"is unreadable ({type(e).__name__}: not a torch tensor file)"
        raise RunError(f"{path} {kind}; delete it and rerun 'python -m fastmveb.eval linear', or pass --fc zero") from None
    if not (isinstance(saved, dict) and isinstance(saved.get("weight"), torch.Tensor)
            and isinstance(saved.get("bias"), torch.Tensor) and saved["weight"].ndim == 2):
        raise RunError(f"{path} is not a linear head (weight, bias); delete it and rerun 'python -m fastmveb.eval "
                       f"linear', or pass --fc zero")
    return saved


def torchvision_state(backbone_sd: dict, arch: str, head: dict | None = None, ref: ResNet | None = None) -> dict[str, torch.Tensor]:
    """Backbone state (no fc) + fc -> a state_dict that loads strictly into ``torchvision_model(arch)``.

    Raises RunError when it does not (wrong arch, missing / extra keys, shapes). ``ref``: a
    ``torchvision_model(arch)`` to check against, when the caller already built one (ResNet-50+ are slow to build).
    """
    ref = ref if ref is not None else torchvision_model(arch)
    feat_dim = ref.fc.in_features
    if head is None:
        head = {"weight": torch.zeros(DEFAULT_CLASSES, feat_dim), "bias": torch.zeros(DEFAULT_CLASSES)}
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in backbone_sd.items()}
    sd["fc.weight"] = head["weight"].detach().float().cpu().clone().contiguous()
    sd["fc.bias"] = head["bias"].detach().float().cpu().clone().contiguous()
    ref.fc = nn.Linear(feat_dim, sd["fc.weight"].shape[0])
    try:
        ref.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise RunError(f"the backbone does not load into torchvision {arch}: {' '.join(str(e).split())[:300]}") from None
    return sd


def _atomic(path: Path, write) -> None:
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        write(tmp)
        # safetensors creates its file 0600; give both outputs the permissions a plain open would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def export_backbone(out: str | Path, run: str | Path | None = None, ckpt: str | Path | None = None,
                    which: str = "online", fc: str = "auto", force: bool = False) -> dict:
    """Write OUT (.pth) and OUT with suffix .safetensors; -> {"pth", "safetensors", "arch", "step", "fc"}."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.suffix not in (".pth", ".pt"):
        raise RunError(f"--out must end in .pth or .pt (the .safetensors file is written next to it), got '{out}'")
    if fc not in ("auto", "zero"):
        raise RunError(f"--fc must be auto or zero, got {fc!r}")
    if not out.parent.exists():
        raise RunError(f"output directory '{out.parent}' does not exist")
    st_path = out.with_suffix(".safetensors")
    for p in (out, st_path):
        if p.is_dir():
            raise RunError(f"--out: '{p}' is a directory; give a file name such as {p / 'backbone.pth'}")
        if p.exists() and not force:
            raise RunError(f"'{p}' exists; pass --force to overwrite it (and its .pth/.safetensors sibling)")
    run_dir, path = resolve_checkpoint(run, ckpt)
    ck = read_checkpoint(path)
    cfg = run_config(run_dir, ck)
    arch = cfg.model.arch
    bsd = backbone_state(ck, which)
    ref = torchvision_model(arch)
    feat_dim = ref.fc.in_features
    head, source = find_head(run_dir, ck, path, which, feat_dim) if fc == "auto" else (None, "zero-initialised (1000 classes)")
    sd = torchvision_state(bsd, arch, head, ref)

    from fastmveb.config import to_dict
    meta = {
        "format": "pt",
        "arch": arch,
        "step": str(ck.get("step", "")),
        "epoch": str(ck.get("epoch", "")),
        "git": str(ck.get("git", "")),
        "which": which,
        "fc": source,
        "num_classes": str(sd["fc.weight"].shape[0]),
        "checkpoint": path.name,
        # The checkpoint's own copy is the config that produced these weights, byte for byte.
        "config": json.dumps(ck["config"] if isinstance(ck.get("config"), dict) else to_dict(cfg)),
    }
    try:
        _atomic(out, lambda p: torch.save(sd, p))
        _atomic(st_path, lambda p: save_file(sd, str(p), metadata=meta))
    except (OSError, RuntimeError) as e:   # torch.save reports a full disk as a RuntimeError
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e).splitlines()[0]
        raise RunError(f"cannot write '{out}' / '{st_path.name}': {why}; choose another --out") from None
    return {"pth": out, "safetensors": st_path, "arch": arch, "step": ck.get("step"), "fc": source}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fastmveb.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="run directory (newest checkpoint unless --ckpt)")
    ap.add_argument("--ckpt", help="a specific checkpoint file")
    ap.add_argument("--out", required=True, help="FILE.pth; FILE.safetensors is written next to it")
    ap.add_argument("--which", default="online", choices=["online", "target"], help="online encoder or EMA target")
    ap.add_argument("--fc", default="auto", choices=["auto", "zero"], help="fc from a saved probe when one fits, or zeros")
    ap.add_argument("--force", action="store_true", help="overwrite an existing OUT and its .safetensors sibling")
    args = ap.parse_args(argv)
    try:
        r = export_backbone(args.out, args.run, args.ckpt, args.which, args.fc, args.force)
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {r['arch']} (step {r['step']}, {args.which} encoder, fc: {r['fc']}) -> {r['pth']} and {r['safetensors']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
