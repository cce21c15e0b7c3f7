"""Typed run configuration: a dataclass tree, YAML run configs (``rcs/*.yaml``) and CLI overrides.

    cfg = load_config("rcs/tiny.yaml", ["optim.epochs=2", "data.global_batch_size=64"])

Every key is checked: an unknown key or a value of the wrong type raises ``ConfigError`` naming the key
and where it came from (the rc file or the command line). ``dump_config`` writes the resolved tree as YAML
that ``load_config`` reads back to an equal object; the run directory and every checkpoint keep it.
Defaults are the released MVEB recipe (docs/method.md) unless a comment says otherwise.
"""
from __future__ import annotations

import dataclasses
import io
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from fastmveb.errors import UserError
from fastmveb.yamlio import yaml_load


class ConfigError(UserError, ValueError):
    """A bad run configuration; the message is one line that names the key, the source and the fix."""


# Keys that existed once: an old rc or command line gets told what each became instead of "unknown key".
RENAMED = {
    "data.batch_size": "data.global_batch_size (the batch of one optimizer step over ALL processes, e.g. old "
                       "batch_size x processes) and data.per_device_batch_size (0 = global / processes)",
    "data.eval_size": "eval.size (the fixed test resolution)",
    "data.eval_crop_ratio": "eval.crop_ratio",
}


@dataclass(frozen=True)
class Range:
    """An interval a number must lie in; ``ordered``: a (low, high) pair must also have low <= high."""
    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    ordered: bool = False

    def contains(self, v) -> bool:
        if not math.isfinite(v):
            return False
        return ((v > self.lo if self.lo_open else v >= self.lo)
                and (v < self.hi if self.hi_open else v <= self.hi))

    def __str__(self) -> str:
        def num(x):
            return "inf" if x == math.inf else f"{x:g}"
        return f"{'(' if self.lo_open else '['}{num(self.lo)}, {num(self.hi)}{')' if self.hi_open else ']'}"


_POS, _NONNEG, _ONE_UP, _UNIT = Range(0, lo_open=True), Range(0), Range(1), Range(0, 1)
_SIDE = Range(8, 8192)   # image sides in pixels: under 8 px a ResNet's stride-32 features are empty
_PAIR = Range(0, lo_open=True, ordered=True)


def opt(default, range: Range | None = None, harmless: bool = False):
    """A config field with its rules beside it: ``range`` (every int and float key has one; a tuple's values
    each lie in it) and ``harmless`` (changing it cannot alter the weights a run produces, so a resume may
    change it: fastmveb/rundir.py). Choices are ``Literal`` types. CHOICES, RANGES and HARMLESS derive from these."""
    meta = {"harmless": harmless}
    if range is not None:
        meta["range"] = range
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    train_beton: str = opt("data/synthetic/train.beton")
    val_beton: str = opt("data/synthetic/val.beton", harmless=True)
    # The recipe fixes the GLOBAL batch (released: 4096 = 128 per GPU x 32 GPUs); each optimizer step averages
    # the gradient over all of it, whatever the world size. Per process: global / processes, run as
    # accumulation = global / (processes x per_device_batch_size) micro-batches of per_device_batch_size
    # (0 = one micro-batch of global / processes, no accumulation). BatchNorm (SyncBN across processes)
    # normalises each micro-batch: its statistics span per_device x processes samples, not the global batch,
    # and the running statistics update once per micro-batch. Entropy groups (loss.group) are cut within each
    # micro-batch. `train.py --dry-run --world-size N` prints what a config resolves to (fastmveb/plan.py).
    global_batch_size: int = opt(4096, _ONE_UP)
    per_device_batch_size: int = opt(0, _NONNEG)   # micro-batch one forward sees; 0 = global_batch_size / processes
    # FFCV threads (also torch's CPU thread count); capped at the core count
    num_workers: int = opt(8, _ONE_UP, harmless=True)
    # "once": decode each whole image once, GPU cuts every view; "per_view": FFCV RRC per view
    decode: Literal["once", "per_view"] = opt("once")
    # Side S of the once-decoded canvas (each whole image squeezed to S x S, its true (H, W) carried along).
    # 512 because on 500-px photos (ImageNet's usual size) it upsamples no 224-px global crop (0%, as the
    # released full-resolution crops; 448: 3%, 384: 22%, 256: 94%) at the loader speed of 256-448: JPEG decoding
    # dominates and the four sizes measured within their run-to-run spread (`python -m fastmveb.bench loader`,
    # benchmarks/results/loader-*.json, photo rows).
    decode_size: int = opt(512, _SIDE)
    order: Literal["random", "quasi_random"] = opt("random")   # quasi_random: single process only (docs/notes.md)
    os_cache: bool = opt(True, harmless=True)   # memory-map the whole beton (fits in RAM) vs. process-level page reads
    drop_last: bool = opt(True)
    eval_batch_size: int = opt(256, _ONE_UP, harmless=True)


@dataclass
class ViewsConfig:
    global_size: int = opt(224, _SIDE)
    global_scale: tuple[float, float] = opt((0.4, 1.0), Range(0, 1, lo_open=True, ordered=True))
    n_local: int = opt(6, _NONNEG)                 # 0 for a two-view recipe
    local_size: int = opt(96, _SIDE)
    local_scale: tuple[float, float] = opt((0.05, 0.4), Range(0, 1, lo_open=True, ordered=True))
    ratio: tuple[float, float] = opt((3 / 4, 4 / 3), _PAIR)
    flip_p: float = opt(0.5, _UNIT)
    jitter_p: float = opt(0.8, _UNIT)
    brightness: float = opt(0.4, _NONNEG)
    contrast: float = opt(0.4, _NONNEG)
    saturation: float = opt(0.2, _NONNEG)
    hue: float = opt(0.1, Range(0, 0.5))
    gray_p: float = opt(0.2, _UNIT)
    blur_sigma: tuple[float, float] = opt((0.1, 2.0), _PAIR)
    blur_p: tuple[float, float, float] = opt((1.0, 0.1, 0.5), _UNIT)       # global 1, global 2, local
    solarize_p: tuple[float, float, float] = opt((0.0, 0.2, 0.0), _UNIT)   # global 1, global 2, local
    solarize_threshold: float = opt(0.5, _UNIT)
    antialias: bool = opt(True)                    # low-pass before downsampling crops (PIL's resize does)
    # "bicubic" as the released PIL RandomResizedCrop
    interpolation: Literal["bicubic", "bilinear"] = opt("bicubic")
    # "random": a per-sample permutation as torchvision's ColorJitter
    jitter_order: Literal["random", "fixed"] = opt("random")
    mean: tuple[float, float, float] = opt((0.485, 0.456, 0.406), _UNIT)
    std: tuple[float, float, float] = opt((0.229, 0.224, 0.225), _POS)
    dtype: Literal["float32", "bfloat16"] = opt("float32")   # the views' dtype
    channels_last: bool = opt(True)
    # Progressive resolution (fastmveb/resolution.py), off when res_start_size = 0: the global views grow
    # linearly from res_start_size at epoch res_start_epoch to global_size at res_end_epoch, in steps of
    # res_step px (FFCV's rule); local views and data.decode_size keep their ratio to global_size.
    res_start_size: int = opt(0, Range(0, 8192))
    res_start_epoch: int = opt(0, _NONNEG)
    res_end_epoch: int = opt(0, _NONNEG)
    res_step: int = opt(32, _ONE_UP)


@dataclass
class ModelConfig:
    # torchvision ResNets (resnet18/34/50/101/152, wide_resnet50_2, ...) + "resnet10", or any timm model as
    # timm:NAME (timm:vit_small_patch16_224, timm:convnext_tiny); fastmveb/backbones.py
    arch: str = opt("resnet50")
    zero_init_residual: bool = opt(True)
    proj_hidden: int = opt(2048, _ONE_UP)
    proj_out: int = opt(2048, _ONE_UP)
    proj_layers: int = opt(3, _ONE_UP)
    ema_momentum: float = opt(0.996, _UNIT)   # base momentum; cosine schedule to 1.0 over training
    sync_bn: bool = opt(True)        # BatchNorm statistics over all processes (per view; fastmveb/batchnorm.py)
    channels_last: bool = opt(True)          # applied where the backbone's family says it helps (convnets)
    drop_path: float = opt(0.0, Range(0, 1, hi_open=True))   # timm models: stochastic depth (drop_path_rate)
    # timm models: the shape passed to timm.create_model, 0 = the named model's own (a small ViT for the CPU:
    # rcs/tiny_vit.yaml). A ViT's view and evaluation sizes must be multiples of its patch size.
    img_size: int = opt(0, _NONNEG)          # the position-embedding grid's image side (other sizes interpolate)
    patch_size: int = opt(0, _NONNEG)
    embed_dim: int = opt(0, _NONNEG)
    depth: int = opt(0, _NONNEG)
    num_heads: int = opt(0, _NONNEG)


@dataclass
class LossConfig:
    lam: float = opt(0.01, _NONNEG)  # lambda: weight of the entropy term
    eta: float = opt(0.01, _POS)     # Stein estimator ridge
    min_tau: float = opt(0.1, _POS)  # bandwidth floor
    group: str = opt("128")          # entropy group: an int size >= 2 (released: 128 per GPU) | "local" | "global"
    # kernel bandwidth rule: "median" = the paper's (upper median of the 1 - cosines, >= min_tau) | "fixed" = loss.tau
    bandwidth: Literal["median", "fixed"] = opt("median")
    tau: float = opt(0.0, _NONNEG)   # the fixed bandwidth, > 0 with loss.bandwidth=fixed (unset otherwise: 0)


@dataclass
class OptimConfig:
    name: Literal["lars", "adamw"] = opt("lars")   # lars: the released recipe; adamw: the usual ViT optimizer
    base_lr: float = opt(0.3, _POS)  # peak lr = base_lr * global_batch / 256
    weight_decay: float = opt(1e-6, _NONNEG)
    # cosine from weight_decay (step 0) to this at the last step (optim.wd_at); -1 = weight_decay throughout
    weight_decay_end: float = opt(-1.0, Range(-1))
    momentum: float = opt(0.9, Range(0, 1, hi_open=True))   # LARS
    trust_coef: float = opt(0.001, _POS)   # LARS eta
    betas: tuple[float, float] = opt((0.9, 0.999), Range(0, 1, hi_open=True))   # AdamW
    clip_grad: float = opt(0.0, _NONNEG)   # clip the global gradient norm to this before the step; 0 = off
    epochs: int = opt(800, _ONE_UP)
    warmup_epochs: int = opt(10, _NONNEG)
    warmup_start_ratio: float = opt(1e-3, _UNIT)   # warm-up starts at ratio * peak
    # cosine floor; phase (t - warm-up) / TOTAL steps as released, so the last step's lr is ~1.4e-3 x peak at
    # 10/800 warm-up epochs (optim.lr_at)
    final_lr_ratio: float = opt(1e-3, _UNIT)
    max_bad_steps: int = opt(20, _ONE_UP, harmless=True)   # stop after this many consecutive non-finite steps


@dataclass
class TrainConfig:
    run_dir: str = opt("runs", harmless=True)
    name: str = opt("", harmless=True)   # run directory name; empty = rc file stem
    seed: int = opt(0, Range(0, 2**32 - 1))
    # bf16 needs no loss scaler; on CPU it is slow: rcs/tiny uses "no"
    mixed_precision: Literal["bf16", "no"] = opt("bf16")
    compile: Literal["auto", "true", "false"] = opt("auto")   # "auto": on for CUDA
    compile_backend: str = opt("inductor")
    deterministic: bool = opt(False, harmless=True)   # torch.use_deterministic_algorithms (exact resume tests)
    max_steps: int = opt(0, _NONNEG, harmless=True)  # stop after this many steps in total (0 = run all epochs)
    log_every: int = opt(20, _ONE_UP, harmless=True)   # steps between metric reads (the only host syncs)
    ckpt_every_steps: int = opt(0, _NONNEG, harmless=True)   # 0 = only per epoch / at the end
    ckpt_every_epochs: int = opt(1, _NONNEG, harmless=True)
    keep_last: int = opt(3, _NONNEG, harmless=True)
    resume: bool = opt(True, harmless=True)   # continue from the newest checkpoint in the run directory
    # resume although trajectory keys changed (fastmveb/rundir.py says what it does)
    allow_config_change: bool = opt(False, harmless=True)
    progress: bool = opt(True, harmless=True)
    # How long a rank waits in one collective before it gives up (the process group's timeout). It bounds
    # only the case nothing else notices: a peer that hangs. A peer that dies is noticed sooner: gloo sees the
    # closed connection at once and torchrun stops the rest of the group within seconds. 600 s (Accelerate's
    # and torch's NCCL default) because ranks legitimately wait minutes for each other: the first compiled
    # step on a cold compile cache, a slow rank's checkpoint read at resume; lower it only where those are fast.
    collective_timeout_s: int = opt(600, Range(10, 86400), harmless=True)


@dataclass
class EvalConfig:
    # The test resolution, fixed whatever size the views were trained at (offline eval, online and final kNN):
    # centre crop of side crop_ratio x the short side, resized to size (224 of 256 by default).
    size: int = opt(224, _SIDE, harmless=True)
    crop_ratio: float = opt(0.875, Range(0, 1, lo_open=True), harmless=True)
    knn_k: int = opt(200, _ONE_UP, harmless=True)
    knn_t: float = opt(0.1, _POS, harmless=True)
    knn_every_epochs: int = opt(0, _NONNEG, harmless=True)    # online kNN monitor during training (0 = off)
    knn_max_val: int = opt(10000, _ONE_UP, harmless=True)     # val subset for the online monitor
    # train (bank) subset for the online monitor (0 = the whole train set)
    knn_max_train: int = opt(0, _NONNEG, harmless=True)
    knn_at_end: bool = opt(True, harmless=True)   # kNN of trained and random-init encoders after training
    online_linear: bool = opt(False)              # online linear probe on detached features
    linear_epochs: int = opt(90, _ONE_UP, harmless=True)
    linear_base_lr: float = opt(0.1, _POS, harmless=True)
    linear_batch_size: int = opt(256, _ONE_UP, harmless=True)         # fast mode (cached features)
    linear_full_batch_size: int = opt(4096, _ONE_UP, harmless=True)   # full mode: the released protocol's batch
    # full mode: images per backbone forward (0 = whole batch); the head's step still sees the whole batch,
    # so this changes memory, not the result
    linear_micro_batch: int = opt(0, _NONNEG, harmless=True)
    # "fast": cached features | "full": the released protocol
    linear_mode: Literal["fast", "full"] = opt("fast", harmless=True)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def fields_of(cfg_type=Config):
    """(key "section.name", dataclasses.Field, resolved type) of every leaf field, in declaration order."""
    for section in dataclasses.fields(cfg_type):
        sec_type = typing.get_type_hints(cfg_type)[section.name]
        hints = typing.get_type_hints(sec_type)
        for f in dataclasses.fields(sec_type):
            yield f"{section.name}.{f.name}", f, hints[f.name]


def _is_choice(tp) -> bool:
    return typing.get_origin(tp) is typing.Literal


# The derived tables: the rules live on the fields above; these are read-only views of them.
# CHOICES: the string keys that take one of a few values (tests/test_options.py runs every value).
CHOICES: dict[str, tuple[str, ...]] = {k: typing.get_args(tp) for k, _, tp in fields_of() if _is_choice(tp)}
# RANGES: every int and float key with the values it may take (tests check every number key has one).
RANGES: dict[str, Range] = {k: f.metadata["range"] for k, f, _ in fields_of() if "range" in f.metadata}
# HARMLESS: keys whose change cannot alter the weights a run produces (fastmveb/rundir.py).
HARMLESS: tuple[str, ...] = tuple(k for k, f, _ in fields_of() if f.metadata.get("harmless"))


# ----------------------------------------------------------------------------------------------------------
def _coerce(value, tp, key: str, source: str):
    """Check / convert one value against a field type; YAML lists become tuples."""
    origin = typing.get_origin(tp)
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: '{key}' must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            try:
                return _coerce(value, a, key, source)
            except ConfigError:
                pass
        raise ConfigError(f"{source}: '{key}' has type {tp}, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):   # .nan / .inf would reach the weights (or every comparison) silently
                raise ConfigError(f"{source}: '{key}' must be a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{source}: '{key}' must be a number, got {value!r}")
    if tp is str or _is_choice(tp):                 # a choice is a string; validate() checks it is one of them
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        hint = " (YAML reads no/yes/off/on as booleans: quote the value)" if isinstance(value, bool) else ""
        raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}{hint}")
    raise ConfigError(f"{source}: '{key}' has an unsupported type {tp}")


def _apply(obj, tree: dict, source: str, prefix: str = ""):
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {tree!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if k not in names:
            if key in RENAMED:
                raise ConfigError(f"{source}: '{key}' was replaced by {RENAMED[key]}")
            raise ConfigError(f"{source}: unknown key '{key}' (valid: {', '.join(names)})")
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _apply(cur, v, source, key + ".")
        else:
            setattr(obj, k, _coerce(v, hints[k], key, source))


def _field_type(cfg, path: str):
    obj = cfg
    parts = path.split(".")
    for p in parts[:-1]:
        obj = getattr(obj, p, None)
        if not dataclasses.is_dataclass(obj):
            return None
    return typing.get_type_hints(type(obj)).get(parts[-1]) if dataclasses.is_dataclass(obj) else None


def apply_overrides(cfg: Config, overrides: list[str], source: str = "command line") -> Config:
    """Apply ``section.key=value`` strings; values are parsed as YAML scalars/lists ("0.1", "[1, 2]", "true")."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override '{item}' must look like section.key=value")
        path, raw = item.split("=", 1)
        try:
            # a string field takes the text as typed: YAML would turn "no" into False
            tp = _field_type(cfg, path.strip())
            value = raw if tp is str or _is_choice(tp) else (yaml_load(raw) if raw != "" else "")
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: cannot parse the value of '{path}': {e}".splitlines()[0]) from None
        tree: dict = {}
        node = tree
        parts = path.strip().split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
        _apply(cfg, tree, source)
    return cfg


def load_config(rc: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- rc YAML file <- overrides. Raises ConfigError with a one-line message."""
    cfg = Config()
    if rc is not None:
        rc = Path(rc)
        if not rc.is_file():
            raise ConfigError(f"run config '{rc}' not found (see rcs/ for the provided ones)")
        try:
            tree = yaml_load(rc.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{rc}: not valid YAML: {str(e).splitlines()[0]}") from None
        _apply(cfg, tree, str(rc))
        if not cfg.train.name:
            cfg.train.name = rc.stem
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks that a type alone cannot express."""
    from .entropy import parse_group                   # the one parse of loss.group (the estimator's)
    try:
        parse_group(cfg.loss.group)
    except ValueError as e:
        raise ConfigError(f"loss.{e}") from None
    for key, allowed in CHOICES.items():
        section, _, name = key.partition(".")
        val = getattr(getattr(cfg, section), name)
        if val not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}; got {val!r}")
    if cfg.views.dtype == "bfloat16" and cfg.train.mixed_precision != "bf16":
        raise ConfigError("views.dtype=bfloat16 needs train.mixed_precision=bf16 (float32 weights do not take "
                          "bf16 input); set both or neither")
    for key, rng in RANGES.items():
        section, _, name = key.partition(".")
        val = getattr(getattr(cfg, section), name)     # derived from the fields: every key exists
        for i, v in enumerate(val if isinstance(val, tuple) else (val,)):
            if not rng.contains(v):
                where = f"{key}[{i}]" if isinstance(val, tuple) else key
                raise ConfigError(f"{where} must be in {rng}, got {v!r}")
        if isinstance(val, tuple) and len(val) == 2 and rng.ordered and val[0] > val[1]:
            raise ConfigError(f"{key} must be (low, high) with low <= high, got {list(val)}")
    if (cfg.loss.bandwidth == "fixed") != (cfg.loss.tau > 0):     # tau is the fixed bandwidth, read by no other rule
        raise ConfigError("loss.bandwidth=fixed needs the fixed bandwidth loss.tau > 0 (e.g. loss.tau=0.5)"
                          if cfg.loss.bandwidth == "fixed" else f"loss.tau={cfg.loss.tau} is read only with "
                          f"loss.bandwidth=fixed, not {cfg.loss.bandwidth}: set that, or leave loss.tau out")
    if cfg.optim.weight_decay_end < 0 and cfg.optim.weight_decay_end != -1:
        raise ConfigError(f"optim.weight_decay_end must be -1 (no schedule) or >= 0, got {cfg.optim.weight_decay_end}")
    v = cfg.views
    if v.res_start_size:   # progressive resolution (fastmveb/resolution.py)
        if v.res_start_size < 8:
            raise ConfigError(f"views.res_start_size must be 0 (off) or in {_SIDE}, got {v.res_start_size}")
        if not v.res_start_epoch < v.res_end_epoch <= cfg.optim.epochs:
            raise ConfigError(f"progressive resolution needs views.res_start_epoch < views.res_end_epoch <= "
                              f"optim.epochs, got {v.res_start_epoch}, {v.res_end_epoch}, {cfg.optim.epochs}; set "
                              "the ramp's epochs inside the run (or views.res_start_size=0 to turn it off)")
    from .backbones import check_model_config        # model.arch's family, its shape keys, ViT patch multiples
    check_model_config(cfg)


def check_value(key: str, value, name: str | None = None):
    """``value`` for the leaf key ``key`` ("section.name") checked by that key's own rules (type, choices, range
    from the field's metadata): what load_config refuses is refused for a value that arrives another way, such as
    an eval command-line flag. -> the value as the config holds it; ConfigError naming ``name`` (default: the key)
    and the rule."""
    tp = next(t for k, _, t in fields_of() if k == key)
    name = name or key
    value = _coerce(value, tp, key, name)
    of = f" ({key})" if name != key else ""
    if key in CHOICES and value not in CHOICES[key]:
        raise ConfigError(f"{name} must be one of {', '.join(CHOICES[key])}{of}; got {value!r}")
    rng = RANGES.get(key)
    for v in (value if isinstance(value, tuple) else (value,)) if rng is not None else ():
        if not rng.contains(v):
            raise ConfigError(f"{name} must be in {rng}{of}, got {v!r}")
    return value


def to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)

    def lists(x):
        if isinstance(x, dict):
            return {k: lists(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return [lists(v) for v in x]
        return x
    return lists(d)


def flatten(tree: dict, prefix: str = "") -> dict:
    """A to_dict() tree (or a checkpoint's) as {"section.key": value}, tuples as lists."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


_NO_DEFAULT = object()


def added_at_default(key: str, value, known) -> bool:
    """A key that did not exist when a config was recorded (not in ``known``: the recorded config's keys) and is at
    its default now: no change. A new key's default keeps the old behaviour, so an upgrade must not stop a resume
    (fastmveb.rundir) or date recorded figures (fastmveb.demo.fingerprint); set away from its default, it counts."""
    # Config() looked up at call time, not a table built at import: the defaults are those of the Config in use.
    return key not in known and value == flatten(to_dict(Config())).get(key, _NO_DEFAULT)


def from_dict(tree: dict, source: str = "<dict>") -> Config:
    cfg = Config()
    _apply(cfg, tree, source)
    validate(cfg)
    return cfg


def dump_config(cfg: Config, path: str | Path | None = None) -> str:
    """Resolved config as YAML text; written to ``path`` when given."""
    buf = io.StringIO()
    yaml.safe_dump(to_dict(cfg), buf, sort_keys=False)
    text = buf.getvalue()
    if path is not None:
        Path(path).write_text(text)
    return text
