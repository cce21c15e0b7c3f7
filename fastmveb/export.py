"""Export a trained backbone for downstream work: torchvision / timm state_dicts (.pth + safetensors), detectron2.

    python -m fastmveb.export --run runs/NAME --out rn50.pth [--ckpt PATH] [--which online|target] [--fc auto|zero] [--force]
    python -m fastmveb.export --run runs/NAME --format timm --out rn50_timm.pth
    python -m fastmveb.export --run runs/NAME --format detectron2 --out R-50.pkl

Writes rn50.pth (torch.save of a plain state_dict; loads with torch.load(weights_only=True)) and
rn50.safetensors (the same tensors; metadata: arch, step, epoch, git revision, which, fc source, and the
run's resolved config as a JSON string). Both are written to temp files first and then renamed, so an
interrupted or failed export (a full disk) never leaves a half-written file under the final name nor a new
.pth beside an old .safetensors: both files are replaced, or neither. An existing rn50.pth or rn50.safetensors
is replaced only with --force. Then, for example:

    model = torchvision.models.resnet50()
    model.load_state_dict(torch.load("rn50.pth", weights_only=True))       # strict: every key matches
    model.fc = torch.nn.Linear(2048, my_classes)                            # what users typically do next

(arch "resnet10" is torchvision.models.resnet.ResNet(BasicBlock, [1, 1, 1, 1]).)

The fc layer: pretraining has no classifier, yet torchvision's ResNet has one. ``--fc auto`` uses, in this
order, the linear probe that ``python -m fastmveb.eval linear`` saved for the same checkpoint
(run_dir/linear_head.pt: the best complete probe; the printed line gives its mode and top-1), the online linear probe stored in the checkpoint (its BatchNorm folded into the
weights), and otherwise a zero-initialised fc with torchvision's default 1000 classes (all logits 0: it
predicts nothing until replaced). ``--fc zero`` always takes the last. The metadata says which one it got.
The backbone is the online encoder by default; ``--which target`` exports the EMA target instead.

``--format timm``: every timm backbone (model.arch timm:NAME), and the ResNets timm has under the same name (resnet18
... resnet152, whose tensors timm names as torchvision does; not resnet10, which timm lacks). The file loads strictly
with ``timm.create_model(NAME, checkpoint_path="vit_timm.pth")`` (plus the run's model shape keys as kwargs, e.g.
img_size=32, patch_size=4, which the export prints) and gives the trained backbone's features from
``forward_head(forward_features(x), pre_logits=True)``; its classifier is a probe's or zeros, as for ``fc`` above.
torchvision and detectron2 take ResNets only; a format that does not apply to the run's arch is refused in one line.

``--format detectron2``: one pickle, the converted form detection codebases load for a ResNet backbone:
{"model": {detectron2 name: float32 numpy array}, "__author__": ..., "matching_heuristics": True}. Names are
detectron2's (stem.conv1, res2..res5 for layer1..layer4, convK.norm for bnK, shortcut / shortcut.norm for
downsample.0 / .1); fc and num_batches_tracked are dropped (detection has no classifier; FrozenBN keeps 4 tensors).
"matching_heuristics" lets detectron2 place them under backbone.bottom_up. (FPN) or roi_heads.res5 (C4). The
weights expect torchvision's input convention, so the detectron2 config needs
    MODEL.WEIGHTS R-50.pkl  MODEL.PIXEL_MEAN [123.675, 116.280, 103.530]  MODEL.PIXEL_STD [58.395, 57.120, 57.375]
    MODEL.RESNETS.DEPTH 50  MODEL.RESNETS.STRIDE_IN_1X1 False  INPUT.FORMAT RGB
(detectron2's own ImageNet weights are BGR Caffe2 models with the stride in the 1x1 conv). SSL detection
transfer (MoCo, BYOL, MVEB) usually also sets MODEL.RESNETS.NORM SyncBN and MODEL.FPN.NORM SyncBN.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pickle
import re
import sys
from pathlib import Path

import torch
from torch import nn
from torchvision.models.resnet import ResNet

from fastmveb.backbones import build, export_formats, family
from fastmveb.errors import RunError, run_cli
from fastmveb.fileio import atomic_path
from fastmveb.checkpoint import arch_mismatch, backbone_state, config_source, open_checkpoint, run_config
from fastmveb.eval.features import HEAD_FILE
from fastmveb.eval.online import folded_head
from fastmveb.model import torchvision_resnet

DEFAULT_CLASSES = 1000          # torchvision's ImageNet head size
FORMATS = ("torchvision", "timm", "detectron2")


def torchvision_model(arch: str) -> ResNet:
    """The torchvision model (random init, default 1000-class fc) that an export of ``arch`` loads into."""
    try:
        return torchvision_resnet(arch)
    except ValueError:
        raise RunError(f"unknown arch {arch!r}: not a torchvision model") from None


def find_head(run_dir: Path | None, ck: dict, ckpt_path: Path, which: str, feat_dim: int) -> tuple[dict | None, str]:
    """(head {'weight', 'bias'} or None, description of where it came from)."""
    if run_dir is not None and (run_dir / HEAD_FILE).is_file():
        saved = _read_head(run_dir / HEAD_FILE)
        # A head trained on another checkpoint would be a wrong classifier, not merely a worse one.
        if (saved.get("ckpt") == ckpt_path.name and saved.get("which") == which
                and tuple(saved["weight"].shape[1:]) == (feat_dim,)):
            top1 = saved.get("top1")
            score = f", top-1 {top1:.2f}%" if isinstance(top1, (int, float)) else ""
            return ({"weight": saved["weight"], "bias": saved["bias"]},
                    f"linear probe ({saved.get('mode', '?')}{score}, {HEAD_FILE})")
    if which == "online":
        for key in ("probe", "online_probe"):
            head = folded_head(ck.get(key))
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


def timm_check(sd: dict[str, torch.Tensor], arch: str) -> str:
    """Load ``sd`` strictly into timm's model of ``arch``; -> what was checked. RunError when it does not load."""
    import timm
    try:
        model = timm.create_model(arch, pretrained=False)
    except RuntimeError:
        raise RunError(f"timm has no model named {arch!r}; export --format torchvision instead") from None
    model.reset_classifier(sd["fc.weight"].shape[0])
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise RunError(f"the backbone does not load into timm {arch}: {' '.join(str(e).split())[:300]}") from None
    return f"loads strictly into timm {timm.__version__} {arch}"


def timm_call(name: str, kwargs: dict, num_classes: int) -> str:
    """The timm.create_model call that rebuilds an exported timm backbone (for the messages and the docs)."""
    kw = "".join(f", {k}={v!r}" for k, v in kwargs.items())
    classes = f", num_classes={num_classes}" if num_classes != DEFAULT_CLASSES else ""
    return f"timm.create_model({name!r}{kw}{classes}, checkpoint_path=OUT)"


def timm_model_state(backbone_sd: dict, model_cfg, head: dict | None) -> tuple[dict[str, torch.Tensor], str, str]:
    """A timm backbone's state (trained without classifier) + a classifier -> a state_dict that loads strictly into
    timm's model of that name and shape (its default 1000 classes with a zero head, or the probe's classes);
    -> (state_dict, the classifier's weight key, what was checked). RunError when it does not load."""
    import timm
    bb = build(model_cfg, device="meta")
    ref = timm.create_model(bb.timm_name, pretrained=False, **bb.timm_kwargs)
    if head is not None:
        ref.reset_classifier(head["weight"].shape[0])
    clf = ref.get_classifier()
    name = next(n for n, m in ref.named_modules() if m is clf)        # head (ViT), head.fc (ConvNeXt), ...
    if head is None:
        head = {"weight": torch.zeros_like(clf.weight), "bias": torch.zeros_like(clf.bias)}
    sd = {k: v.detach().cpu().clone().contiguous() for k, v in backbone_sd.items()}
    sd[f"{name}.weight"] = head["weight"].detach().float().cpu().clone().contiguous()
    sd[f"{name}.bias"] = head["bias"].detach().float().cpu().clone().contiguous()
    try:
        ref.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise RunError(f"the backbone does not load into timm {bb.timm_name}: {' '.join(str(e).split())[:300]}") \
            from None
    call = timm_call(bb.timm_name, bb.timm_kwargs, sd[f"{name}.weight"].shape[0])
    return sd, f"{name}.weight", f"loads strictly into timm {timm.__version__}: {call}"


# torchvision name -> detectron2 name (ResNet backbones). Rules, applied to the part after the block index:
_D2_STEM = re.compile(r"^(conv1|bn1)\.(.+)$")
_D2_BLOCK = re.compile(r"^layer([1-4])\.(\d+)\.(conv[1-3]|bn[1-3]|downsample\.[01])\.(.+)$")


def detectron2_key(key: str) -> str | None:
    """detectron2's name for a torchvision ResNet tensor; None for what detectron2 has no place for (fc,
    num_batches_tracked); RunError for a name that is not a torchvision ResNet's."""
    if key.startswith("fc.") or key.endswith(".num_batches_tracked"):
        return None
    m = _D2_STEM.match(key)
    if m:
        return f"stem.conv1.{m[2]}" if m[1] == "conv1" else f"stem.conv1.norm.{m[2]}"
    m = _D2_BLOCK.match(key)
    if not m:
        raise RunError(f"'{key}' is not a torchvision ResNet tensor: detectron2 export supports ResNets only")
    stage, block, part, rest = int(m[1]) + 1, m[2], m[3], m[4]
    module = {"downsample.0": "shortcut", "downsample.1": "shortcut.norm"}.get(part)
    if module is None:
        module = part if part.startswith("conv") else f"conv{part[2]}.norm"   # bnK normalises convK's output
    return f"res{stage}.{block}.{module}.{rest}"


def detectron2_state(sd: dict[str, torch.Tensor]) -> dict:
    """The pickled object detectron2's DetectionCheckpointer loads (see the module doc)."""
    model = {}
    for k, v in sd.items():
        name = detectron2_key(k)
        if name is not None:
            model[name] = v.detach().float().cpu().numpy()
    return model


def _atomic(*writes: tuple[Path, object]) -> None:
    """Write every (path, write(tmp)) to a temporary file first (fileio.atomic_path), then rename them all into
    place, in the order given: an export is a pair of files of one model, so a failed write (a full disk) leaves
    the previous pair whole, never a new .pth beside an old .safetensors. A rename that fails after the first
    (rare: same folder) puts the replaced file back. The temporaries are removed on any failure."""
    backups: list[tuple[Path, Path]] = []
    umask = os.umask(0)
    os.umask(umask)
    with contextlib.ExitStack() as stack:
        # Unwound last in, first out: the backups' names go last, after a failed rename has put them back.
        stack.callback(lambda: [b.unlink(missing_ok=True) for _, b in backups])
        stack.push(lambda failed, *_: _put_back(backups) if failed else None)
        # Entered in reverse, so that leaving the stack renames in the order given.
        tmps = [stack.enter_context(atomic_path(path)) for path, _ in reversed(writes)][::-1]
        for (path, write), tmp in zip(writes, tmps):
            write(tmp)
            os.chmod(tmp, 0o666 & ~umask)   # safetensors creates its file 0600; give the permissions open() would
        for path, _ in writes if len(writes) > 1 else ():
            backup = _second_name(path) if path.exists() else None
            if backup is not None:
                backups.append((path, backup))


def _second_name(path: Path) -> Path | None:
    """A hard link to ``path`` beside it, so the old file survives a later failed rename; None where the file
    system has no hard links (no way back for that rename)."""
    backup = path.parent / f".{path.name}.{os.getpid()}.old"
    try:
        os.link(path, backup)
    except OSError:
        return None
    return backup


def _put_back(backups: list[tuple[Path, Path]]) -> None:
    for path, backup in backups:
        if backup.exists():
            os.replace(backup, path)


def export_backbone(out: str | Path, run: str | Path | None = None, ckpt: str | Path | None = None,
                    which: str = "online", fc: str = "auto", force: bool = False, fmt: str | None = None) -> dict:
    """Write OUT (.pth) and OUT with suffix .safetensors (torchvision, timm) or OUT (.pkl, detectron2);
    -> {"pth" (the .pkl for detectron2), "safetensors" (None for detectron2), "arch", "step", "fc", "format", "check"}."""
    from safetensors.torch import save_file

    out = Path(out)
    st_path = _check_out(out, fmt, fc, force)
    run_dir, path, ck = open_checkpoint(run, ckpt)
    cfg = run_config(run_dir, ck)
    arch = cfg.model.arch
    formats = export_formats(arch)                                    # the backbone registry's say
    fmt = fmt or formats[0]                                           # default: torchvision, timm for timm models
    if fmt not in formats:
        raise RunError(f"--format {fmt} does not apply to {arch}: its formats are {', '.join(formats)}")
    bsd = backbone_state(ck, which)
    timm_family = family(arch) == "timm"
    ref = None if timm_family else torchvision_model(arch)
    feat_dim = build(cfg.model, device="meta").dim if timm_family else ref.fc.in_features
    if fmt == "detectron2":
        fc = "zero"                                                   # detection has no classifier: fc is dropped
    head, source = find_head(run_dir, ck, path, which, feat_dim) if fc == "auto" else (None, "zero-initialised (1000 classes)")
    head_key, check = "fc.weight", f"loads strictly into torchvision {arch}"
    try:
        if timm_family:                                               # the strict timm check
            sd, head_key, check = timm_model_state(bsd, cfg.model, head)
        else:
            sd = torchvision_state(bsd, arch, head, ref)              # the strict torchvision check, every format
    except RunError as e:                                             # a checkpoint of another arch: name it
        raise RunError((not timm_family and arch_mismatch(bsd, arch, path, config_source(run_dir))) or str(e)) \
            from None
    result = {"pth": None, "safetensors": None, "arch": arch, "step": ck.get("step"), "fc": source, "format": fmt,
              "check": check}
    if fmt == "detectron2":
        blob = {"model": detectron2_state(sd), "matching_heuristics": True,
                "__author__": f"fastmveb {arch} {which} encoder, step {ck.get('step')}, {path.name}"}
        try:
            _atomic((out, lambda p: p.write_bytes(pickle.dumps(blob, protocol=4))))
        except OSError as e:
            raise RunError(f"cannot write '{out}': {e.strerror or e}; choose another --out") from None
        return dict(result, pth=out, fc="dropped (detectron2 has no classifier)")
    if fmt == "timm" and not timm_family:
        result["check"] = timm_check(sd, arch)

    meta = _metadata(ck, cfg, path, fmt, which, source, num_classes=sd[head_key].shape[0])
    from safetensors import SafetensorError
    try:
        _atomic((out, lambda p: torch.save(sd, p)), (st_path, lambda p: save_file(sd, str(p), metadata=meta)))
    except (OSError, RuntimeError, SafetensorError) as e:   # torch.save reports a full disk as a RuntimeError
        why = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[0]
        kept = " (the previous pair is unchanged)" if out.exists() or st_path.exists() else ""
        raise RunError(f"cannot write '{out}' / '{st_path.name}': {why}{kept}; free space or choose another "
                       "--out") from None
    return dict(result, pth=out, safetensors=st_path)


def _check_out(out: Path, fmt: str | None, fc: str, force: bool) -> Path:
    """Refuse, in one line, a format, --out or --fc the export cannot take, and files it would overwrite without
    --force; -> the .safetensors path beside ``out``."""
    if fmt is not None and fmt not in FORMATS:
        raise RunError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt == "detectron2" and out.suffix != ".pkl":
        raise RunError(f"--format detectron2 writes a pickle: --out must end in .pkl, got '{out}'")
    if fmt != "detectron2" and out.suffix not in (".pth", ".pt"):
        raise RunError(f"--out must end in .pth or .pt (the .safetensors file is written next to it), got '{out}'")
    if fc not in ("auto", "zero"):
        raise RunError(f"--fc must be auto or zero, got {fc!r}")
    if not out.parent.exists():
        raise RunError(f"output directory '{out.parent}' does not exist")
    st_path = out.with_suffix(".safetensors")
    for p in (out,) if fmt == "detectron2" else (out, st_path):
        if p.is_dir():
            raise RunError(f"--out: '{p}' is a directory; give a file name such as {p / ('backbone' + out.suffix)}")
        if p.exists() and not force:
            raise RunError(f"'{p}' exists; pass --force to overwrite it" + ("" if fmt == "detectron2" else
                           " (and its .pth/.safetensors sibling)"))
    return st_path


def _metadata(ck: dict, cfg, path: Path, fmt: str, which: str, source: str, num_classes: int) -> dict[str, str]:
    """The .safetensors metadata: what the weights are and where they came from."""
    from fastmveb.config import to_dict
    return {
        "format": "pt",
        "layout": fmt,
        "arch": cfg.model.arch,
        "step": str(ck.get("step", "")),
        "epoch": str(ck.get("epoch", "")),
        "git": str(ck.get("git", "")),
        "which": which,
        "fc": source,
        "num_classes": str(num_classes),
        "checkpoint": path.name,
        # The checkpoint's own copy is the config that produced these weights, byte for byte.
        "config": json.dumps(ck["config"] if isinstance(ck.get("config"), dict) else to_dict(cfg)),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the export; bad input raises a UserError (``cli`` prints it as one line and exits 2)."""
    ap = argparse.ArgumentParser(prog="python -m fastmveb.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="run directory (newest readable checkpoint unless --ckpt; a newer unreadable "
                    "one is skipped with a warning, as training's resume skips it)")
    ap.add_argument("--ckpt", help="a specific checkpoint file")
    ap.add_argument("--out", required=True, help="FILE.pth (FILE.safetensors is written next to it); FILE.pkl "
                    "with --format detectron2")
    ap.add_argument("--format", default=None, choices=FORMATS, dest="fmt",
                    help="torchvision (the default for ResNets), timm (the default for timm backbones; also "
                         "timm's ResNets), detectron2 (ResNets: a .pkl for detection codebases; see the module doc for the config it needs)")
    ap.add_argument("--which", default="online", choices=["online", "target"], help="online encoder or EMA target")
    ap.add_argument("--fc", default="auto", choices=["auto", "zero"], help="fc from a saved probe when one fits, or zeros")
    ap.add_argument("--force", action="store_true", help="overwrite an existing OUT and its .safetensors sibling")
    args = ap.parse_args(argv)
    r = export_backbone(args.out, args.run, args.ckpt, args.which, args.fc, args.force, args.fmt)
    files = f"{r['pth']} and {r['safetensors']}" if r["safetensors"] else str(r["pth"])
    print(f"exported {r['arch']} for {r['format']} (step {r['step']}, {args.which} encoder, fc: {r['fc']}; "
          f"{r['check']}) -> {files}")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``fastmveb-export``: main with a UserError as one ``error: ...`` line and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
