"""Typed run configuration: a dataclass tree, YAML run configs (``rcs/*.yaml``) and CLI overrides.

    cfg = load_config("rcs/tiny.yaml", ["optim.epochs=2", "data.global_batch_size=64"])

Every key is checked: an unknown key or a value of the wrong type raises ``ConfigError`` naming the key
and where it came from (the rc file or the command line). ``dump_config`` writes the resolved tree as YAML
that ``load_config`` reads back to an equal object; the run directory and every checkpoint keep it.
Defaults are the released MVEB recipe (../shared/MVEB.md) unless a comment says otherwise.
"""
from __future__ import annotations

import dataclasses
import io
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml


class ConfigError(ValueError):
    """A bad run configuration; the message is one line that names the key, the source and the fix."""


class _Loader(yaml.SafeLoader):
    """safe_load with YAML 1.2's float syntax: PyYAML (YAML 1.1) reads `1e-6` (no dot, unsigned exponent)
    as a string, which would reject `optim.weight_decay=1e-6`. Tags stay the safe set (no Python objects)."""


_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                   for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def yaml_load(text: str):
    """yaml.safe_load, with `1e-6` read as a float (see _Loader)."""
    return yaml.load(text, Loader=_Loader)


# Keys that existed once: an old rc or command line gets told what each became instead of "unknown key".
RENAMED = {
    "data.batch_size": "data.global_batch_size (the batch of one optimizer step over ALL processes, e.g. old "
                       "batch_size x processes) and data.per_device_batch_size (0 = global / processes)",
    "data.eval_size": "eval.size (the fixed test resolution)",
    "data.eval_crop_ratio": "eval.crop_ratio",
}


@dataclass
class DataConfig:
    train_beton: str = "data/synthetic/train.beton"
    val_beton: str = "data/synthetic/val.beton"
    # The recipe fixes the GLOBAL batch (released: 4096 = 128 per GPU x 32 GPUs); each optimizer step averages
    # the gradient over all of it, whatever the world size. Per process: global / processes, run as
    # accumulation = global / (processes x per_device_batch_size) micro-batches of per_device_batch_size
    # (0 = one micro-batch of global / processes, no accumulation). BatchNorm (SyncBN across processes)
    # normalises each micro-batch: its statistics span per_device x processes samples, not the global batch,
    # and the running statistics update once per micro-batch. Entropy groups (loss.group) are cut within each
    # micro-batch. `train.py --dry-run --world-size N` prints what a config resolves to (fastmveb/plan.py).
    global_batch_size: int = 4096
    per_device_batch_size: int = 0   # micro-batch one forward sees; 0 = global_batch_size / processes
    num_workers: int = 8             # FFCV threads (also torch's CPU thread count); capped at the core count
    decode: str = "once"             # "once": decode each whole image once, GPU cuts every view; "per_view": FFCV RRC per view
    # Side S of the once-decoded canvas (each whole image squeezed to S x S, its true (H, W) carried along).
    # 512 because on 500-px photos (ImageNet's usual size) it upsamples no 224-px global crop (0%, as the
    # released full-resolution crops; 448: 3%, 384: 22%, 256: 94%) at the loader speed of 256-448: JPEG decoding
    # dominates and the four sizes measured within their run-to-run spread (`python -m fastmveb.bench loader`,
    # benchmarks/results/loader-*.json, photo rows).
    decode_size: int = 512
    order: str = "random"            # "random" | "quasi_random" (single process only, see NOTES.md)
    os_cache: bool = True            # memory-map the whole beton (fits in RAM) vs. process-level page reads
    drop_last: bool = True
    eval_batch_size: int = 256


@dataclass
class ViewsConfig:
    global_size: int = 224
    global_scale: tuple[float, float] = (0.4, 1.0)
    n_local: int = 6                 # 0 for a two-view recipe
    local_size: int = 96
    local_scale: tuple[float, float] = (0.05, 0.4)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    gray_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_p: tuple[float, float, float] = (1.0, 0.1, 0.5)       # global 1, global 2, local
    solarize_p: tuple[float, float, float] = (0.0, 0.2, 0.0)   # global 1, global 2, local
    solarize_threshold: float = 0.5
    antialias: bool = True           # low-pass before downsampling crops (PIL's resize does)
    interpolation: str = "bicubic"   # "bicubic" (as the released PIL RandomResizedCrop) | "bilinear"
    jitter_order: str = "random"     # "random": a per-sample permutation as torchvision's ColorJitter | "fixed"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    dtype: str = "float32"           # "float32" | "bfloat16" output
    channels_last: bool = True
    # Progressive resolution (fastmveb/resolution.py), off when res_start_size = 0: the global views grow
    # linearly from res_start_size at epoch res_start_epoch to global_size at res_end_epoch, in steps of
    # res_step px (FFCV's rule); local views and data.decode_size keep their ratio to global_size.
    res_start_size: int = 0
    res_start_epoch: int = 0
    res_end_epoch: int = 0
    res_step: int = 32


@dataclass
class ModelConfig:
    arch: str = "resnet50"           # torchvision ResNets (resnet18/34/50/101/152, wide_resnet50_2, ...) + "resnet10"
    zero_init_residual: bool = True
    proj_hidden: int = 2048
    proj_out: int = 2048
    proj_layers: int = 3
    ema_momentum: float = 0.996      # base momentum; cosine schedule to 1.0 over training
    sync_bn: bool = True             # BatchNorm statistics over all processes (per view; fastmveb/batchnorm.py)
    channels_last: bool = True


@dataclass
class LossConfig:
    lam: float = 0.01                # lambda: weight of the entropy term
    eta: float = 0.01                # Stein estimator ridge
    min_tau: float = 0.1             # bandwidth floor
    group: str = "128"               # entropy group: an int size (released: 128 per GPU) | "local" | "global"


@dataclass
class OptimConfig:
    base_lr: float = 0.3             # peak lr = base_lr * global_batch / 256
    weight_decay: float = 1e-6
    momentum: float = 0.9
    trust_coef: float = 0.001        # LARS eta
    epochs: int = 800
    warmup_epochs: int = 10
    warmup_start_ratio: float = 1e-3  # warm-up starts at ratio * peak
    final_lr_ratio: float = 1e-3     # cosine floor; phase (t - warm-up) / TOTAL steps as released, so the last
                                     # step's lr is ~1.4e-3 x peak at 10/800 warm-up epochs (optim.lr_at)
    max_bad_steps: int = 20          # stop after this many consecutive non-finite steps


@dataclass
class TrainConfig:
    run_dir: str = "runs"
    name: str = ""                   # run directory name; empty = rc file stem
    seed: int = 0
    mixed_precision: str = "bf16"    # "bf16" | "no" (bf16 needs no loss scaler; on CPU it is slow: rcs/tiny uses "no")
    compile: str = "auto"            # "auto" (on for CUDA) | "true" | "false"
    compile_backend: str = "inductor"
    deterministic: bool = False      # torch.use_deterministic_algorithms (exact resume tests)
    max_steps: int = 0               # stop after this many steps in total (0 = run all epochs)
    log_every: int = 20              # steps between metric reads (the only host syncs)
    ckpt_every_steps: int = 0        # 0 = only per epoch / at the end
    ckpt_every_epochs: int = 1
    keep_last: int = 3
    resume: bool = True              # continue from the newest checkpoint in the run directory
    allow_config_change: bool = False  # resume although trajectory keys changed (fastmveb/rundir.py says what it does)
    progress: bool = True
    # How long a rank waits in one collective before it gives up (the process group's timeout). It bounds
    # only the case nothing else notices: a peer that hangs. A peer that dies is noticed sooner: gloo sees the
    # closed connection at once and torchrun stops the rest of the group within seconds. 600 s (Accelerate's
    # and torch's NCCL default) because ranks legitimately wait minutes for each other: the first compiled
    # step on a cold compile cache, a slow rank's checkpoint read at resume; lower it only where those are fast.
    collective_timeout_s: int = 600


@dataclass
class EvalConfig:
    # The test resolution, fixed whatever size the views were trained at (offline eval, online and final kNN):
    # centre crop of side crop_ratio x the short side, resized to size (224 of 256 by default).
    size: int = 224
    crop_ratio: float = 0.875
    knn_k: int = 200
    knn_t: float = 0.1
    knn_every_epochs: int = 0        # online kNN monitor during training (0 = off)
    knn_max_val: int = 10000         # val subset for the online monitor
    knn_max_train: int = 0           # train (bank) subset for the online monitor (0 = the whole train set)
    knn_at_end: bool = True          # kNN of trained and random-init encoders after training
    online_linear: bool = False      # online linear probe on detached features
    linear_epochs: int = 90
    linear_base_lr: float = 0.1
    linear_batch_size: int = 256     # fast mode (cached features)
    linear_full_batch_size: int = 4096  # full mode: the released protocol's batch
    linear_micro_batch: int = 0      # full mode: images per backbone forward (0 = whole batch); the head's step
                                     # still sees the whole batch, so this changes memory, not the result
    linear_mode: str = "fast"        # "fast": cached features | "full": the released protocol


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


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
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        hint = " (YAML reads no/yes/off/on as booleans: quote the value)" if isinstance(value, bool) else ""
        raise ConfigError(f"{source}: '{key}' must be a string, got {value!r}{hint}")
    raise ConfigError(f"{source}: '{key}' has an unsupported type {tp}")


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _apply(obj, tree: dict, source: str, prefix: str = ""):
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {tree!r}")
    hints = _hints(type(obj))
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
    return _hints(type(obj)).get(parts[-1]) if dataclasses.is_dataclass(obj) else None


def apply_overrides(cfg: Config, overrides: list[str], source: str = "command line") -> Config:
    """Apply ``section.key=value`` strings; values are parsed as YAML scalars/lists ("0.1", "[1, 2]", "true")."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{source}: override '{item}' must look like section.key=value")
        path, raw = item.split("=", 1)
        try:
            # a string field takes the text as typed: YAML would turn "no" into False
            value = raw if _field_type(cfg, path.strip()) is str else (yaml_load(raw) if raw != "" else "")
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


# The string keys that take one of a few values (tests/test_options.py runs every value).
CHOICES: dict[str, tuple[str, ...]] = {
    "data.decode": ("once", "per_view"),
    "data.order": ("random", "quasi_random"),
    "views.dtype": ("float32", "bfloat16"),
    "views.interpolation": ("bicubic", "bilinear"),
    "views.jitter_order": ("random", "fixed"),
    "train.mixed_precision": ("bf16", "no"),
    "train.compile": ("auto", "true", "false"),
    "eval.linear_mode": ("fast", "full"),
}


def validate(cfg: Config) -> None:
    """Cross-field checks that a type alone cannot express."""
    if cfg.loss.group not in ("local", "global"):
        try:
            if int(cfg.loss.group) < 2:
                raise ValueError
        except ValueError:
            raise ConfigError(f"loss.group must be an integer >= 2, 'local' or 'global', got {cfg.loss.group!r}") from None
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
        val = getattr(getattr(cfg, section, None), name, None)
        if val is None:                                    # a key another version of the tree does not have
            continue
        for i, v in enumerate(val if isinstance(val, tuple) else (val,)):
            if not rng.contains(v):
                where = f"{key}[{i}]" if isinstance(val, tuple) else key
                raise ConfigError(f"{where} must be in {rng}, got {v!r}")
        if isinstance(val, tuple) and len(val) == 2 and rng.ordered and val[0] > val[1]:
            raise ConfigError(f"{key} must be (low, high) with low <= high, got {list(val)}")
    v = cfg.views
    if v.res_start_size:   # progressive resolution (fastmveb/resolution.py)
        if v.res_start_size < 8:
            raise ConfigError(f"views.res_start_size must be 0 (off) or in {_SIDE}, got {v.res_start_size}")
        if not v.res_start_epoch < v.res_end_epoch <= cfg.optim.epochs:
            raise ConfigError(f"progressive resolution needs views.res_start_epoch < views.res_end_epoch <= "
                              f"optim.epochs, got {v.res_start_epoch}, {v.res_end_epoch}, {cfg.optim.epochs}; set "
                              "the ramp's epochs inside the run (or views.res_start_size=0 to turn it off)")


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
# Every int and float key with the values it may take; a key missing here is checked for finiteness only.
RANGES: dict[str, Range] = {
    "data.global_batch_size": _ONE_UP, "data.per_device_batch_size": _NONNEG, "data.num_workers": _ONE_UP, "data.decode_size": _SIDE,
    "data.eval_batch_size": _ONE_UP,
    "views.global_size": _SIDE, "views.local_size": _SIDE, "views.n_local": _NONNEG,
    "views.global_scale": Range(0, 1, lo_open=True, ordered=True),
    "views.local_scale": Range(0, 1, lo_open=True, ordered=True),
    "views.ratio": Range(0, lo_open=True, ordered=True), "views.flip_p": _UNIT, "views.jitter_p": _UNIT,
    "views.brightness": _NONNEG, "views.contrast": _NONNEG, "views.saturation": _NONNEG,
    "views.hue": Range(0, 0.5), "views.gray_p": _UNIT, "views.blur_sigma": Range(0, lo_open=True, ordered=True),
    "views.blur_p": _UNIT, "views.solarize_p": _UNIT, "views.solarize_threshold": _UNIT, "views.mean": _UNIT,
    "views.std": _POS, "views.res_start_size": Range(0, 8192), "views.res_start_epoch": _NONNEG,
    "views.res_end_epoch": _NONNEG, "views.res_step": _ONE_UP,
    "model.proj_hidden": _ONE_UP, "model.proj_out": _ONE_UP, "model.proj_layers": _ONE_UP,
    "model.ema_momentum": _UNIT,
    "loss.lam": _NONNEG, "loss.eta": _POS, "loss.min_tau": _POS,
    "optim.base_lr": _POS, "optim.weight_decay": _NONNEG, "optim.momentum": Range(0, 1, hi_open=True),
    "optim.trust_coef": _POS, "optim.epochs": _ONE_UP, "optim.warmup_epochs": _NONNEG,
    "optim.warmup_start_ratio": _UNIT, "optim.final_lr_ratio": _UNIT, "optim.max_bad_steps": _ONE_UP,
    "train.seed": Range(0, 2**32 - 1), "train.max_steps": _NONNEG, "train.log_every": _ONE_UP,
    "train.ckpt_every_steps": _NONNEG, "train.collective_timeout_s": Range(10, 86400), "train.ckpt_every_epochs": _NONNEG, "train.keep_last": _NONNEG,
    "eval.size": _SIDE, "eval.crop_ratio": Range(0, 1, lo_open=True), "eval.knn_k": _ONE_UP, "eval.knn_t": _POS, "eval.knn_every_epochs": _NONNEG, "eval.knn_max_val": _ONE_UP,
    "eval.knn_max_train": _NONNEG,
    "eval.linear_epochs": _ONE_UP, "eval.linear_base_lr": _POS, "eval.linear_batch_size": _ONE_UP,
    "eval.linear_full_batch_size": _ONE_UP, "eval.linear_micro_batch": _NONNEG,
}


def to_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)

    def lists(x):
        if isinstance(x, dict):
            return {k: lists(v) for k, v in x.items()}
        if isinstance(x, tuple):
            return [lists(v) for v in x]
        return x
    return lists(d)


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
