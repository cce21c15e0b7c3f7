"""The resolved plan of a run: every batch, step and schedule quantity the trainer uses, from ONE function.

    python fastmveb/train.py --rc rcs/rn50.yaml --dry-run --world-size 8      # prints make_plan(...).format()

    plan = make_plan(cfg, world_size=8, dataset_len=1_281_167)   # raises ConfigError (one line) on a bad batch
    plan.per_process_batch, plan.micro_batch, plan.accum_steps, plan.steps_per_epoch, plan.peak_lr, ...

train.py's main() takes these numbers from here, so the dry run and the real run cannot disagree. The
recipe's batch is GLOBAL (data.global_batch_size, released: 4096): each process reads global / world
samples per optimizer step, in ``accum_steps`` micro-batches of ``micro_batch`` rows (one forward each).

The memory line is an estimate of activations + training state, not the allocator's peak: it runs the model
once on the meta device (no data, no compute) and counts the bytes autograd saves for backward per sample at
each view size (torch.autograd.graph.saved_tensors_hooks, parameters excluded, shared storage counted once),
then adds parameters, gradients, LARS momentum and the EMA target in fp32. Under bf16 autocast the saved
activations are counted at 2 bytes per element (convolutions, linears and the BatchNorms after them run in
bf16 on CUDA); the meta device itself has no autocast. Workspace, the allocator's fragmentation, the
compiler's buffers and the entropy estimator's temporaries are not in it. The count follows the backbone: per
pixel for convnets, per token for ViTs (on the CPU, fp32, it is within 3% of the resident memory a real forward
keeps: tests/test_backbones.py); for a ViT under bf16 on CUDA it is approximate both ways: LayerNorm keeps fp32
outputs (counted at 2 bytes) and fused attention saves less than the attention the meta device counts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from .config import Config, ConfigError
from .entropy import group_bounds, parse_group
from .optim import lr_at, peak_lr
from .resolution import schedule_lines
from .views import view_sizes, view_specs

IMAGENET_TRAIN = 1_281_167   # ImageNet-1k train images: the steps per epoch when the beton does not exist yet


@dataclass
class Plan:
    world_size: int
    global_batch: int
    per_process_batch: int
    micro_batch: int
    accum_steps: int
    dataset_len: int
    dataset_source: str            # the beton it was read from, or the ImageNet assumption
    steps_per_epoch: int
    epochs: int
    warmup_steps: int
    total_steps: int               # schedule length (lr cosine, EMA momentum)
    last_step: int                 # where the run stops (train.max_steps may cut it short)
    peak_lr: float
    start_lr: float
    end_lr: float
    views: list[tuple[str, int, tuple[float, float]]]    # (name, size, crop scale)
    entropy_groups: str
    batchnorm: str                 # what one BatchNorm normalisation spans
    memory: dict[str, float] = field(default_factory=dict)   # GiB per device, by part; empty = not estimated
    resolution: list[str] = field(default_factory=list)      # view / decode sizes per epoch range (resolution.py)
    cost: str = ""
    cost_detail: list[dict] = field(default_factory=list)    # per device that priced the run (gpu_hours)
    lr_ratios: tuple[float, float] = (1e-3, 1e-3)            # optim.warmup_start_ratio, optim.final_lr_ratio

    def lr(self, step: int) -> float:
        """The lr of optimizer step ``step`` (optim.lr_at under this plan's numbers)."""
        return lr_at(step, self.total_steps, self.warmup_steps, self.peak_lr, *self.lr_ratios)

    def meta(self) -> dict:
        """The quantities a run records in meta.json (and a test compares with the real loader)."""
        return {"world_size": self.world_size, "global_batch": self.global_batch,
                "per_process_batch": self.per_process_batch, "micro_batch": self.micro_batch,
                "accum_steps": self.accum_steps, "steps_per_epoch": self.steps_per_epoch,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps, "peak_lr": self.peak_lr}

    def format(self) -> str:
        views = ", ".join(f"{n} {s} px scale {a:g}-{b:g}" for n, s, (a, b) in self.views)
        rows = [
            ("processes", f"{self.world_size}"),
            ("global batch", f"{self.global_batch} per optimizer step"),
            ("per process", f"{self.per_process_batch} = {self.accum_steps} micro-batch"
                            f"{'es' if self.accum_steps > 1 else ''} of {self.micro_batch}"
                            f"{' (gradient accumulation)' if self.accum_steps > 1 else ' (no accumulation)'}"),
            ("BatchNorm", self.batchnorm),
            ("dataset", f"{self.dataset_len:,} images ({self.dataset_source})"),
            ("steps per epoch", f"{self.steps_per_epoch}"),
            ("schedule", f"{self.epochs} epochs = {self.total_steps:,} steps, warm-up {self.warmup_steps:,} steps"
                         + (f"; stops at step {self.last_step:,} (train.max_steps)"
                            if self.last_step < self.total_steps else "")),
            ("lr", f"peak {self.peak_lr:g} (base_lr x {self.global_batch}/256), warm-up from {self.start_lr:.4g}, "
                   f"cosine to {self.end_lr:.4g} at the last step"),
            ("views", views),
            *[("view sizes" if i == 0 else "", line) for i, line in enumerate(self.resolution)],
            ("entropy groups", self.entropy_groups),
        ]
        if self.memory:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in self.memory.items() if k != "total")
            rows.append(("memory / device", f"~{self.memory['total']:.1f} GiB estimated ({parts} GiB); "
                                            "activations + state, not the allocator's peak"))
        rows.append(("cost", self.cost))
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def split_batch(global_batch: int, world_size: int, per_device: int) -> tuple[int, int, int]:
    """(per_process, micro, accum) or ConfigError naming the numbers and the valid choices."""
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if global_batch % world_size:
        lo = global_batch // world_size * world_size
        raise ConfigError(f"data.global_batch_size={global_batch} does not divide over {world_size} processes; "
                          f"use a multiple of {world_size} (e.g. {lo or world_size} or {lo + world_size}) or "
                          f"a process count dividing {global_batch}")
    per_process = global_batch // world_size
    micro = per_device or per_process
    if per_process % micro:
        divisors = [d for d in range(1, per_process + 1) if per_process % d == 0]
        near = sorted(divisors, key=lambda d: abs(d - micro))[:4]
        raise ConfigError(f"data.per_device_batch_size={micro} does not divide the {per_process} samples per process "
                          f"(global {global_batch} / {world_size} processes); valid nearby: "
                          f"{', '.join(map(str, sorted(near)))} (0 = {per_process}, no accumulation)")
    return per_process, micro, per_process // micro


def steps_per_epoch(dataset_len: int, world_size: int, per_process: int, drop_last: bool) -> int:
    """Exactly what FFCV's Loader reports: distributed RANDOM pads the index list to a multiple of the world
    size (torch's DistributedSampler, drop_last=False), then each rank batches its ceil(n / world) samples."""
    per_rank = -(-dataset_len // world_size)
    return per_rank // per_process if drop_last else -(-per_rank // per_process)


def dataset_length(beton: str | Path) -> int | None:
    """Number of samples in a beton (its header only), or None when the file does not exist."""
    if not Path(beton).is_file():
        return None
    from dataset_prep.integrity import BetonError, check_beton
    from ffcv.reader import Reader
    try:
        check_beton(beton)             # a truncated or foreign file: one line, not ffcv's traceback
    except BetonError as e:
        raise ConfigError(str(e)) from None
    return int(Reader(str(beton)).num_samples)


def check_groups(cfg: Config, micro: int, world: int) -> None:
    """ConfigError (one line) when a micro-batch would give the step a statistic over a single sample: an
    entropy group of one embedding (the vMF bandwidth and score need two) or a BatchNorm over one sample per
    view (its variance is undefined). The dry run and the real run both reach this through make_plan."""
    g = parse_group(cfg.loss.group)
    rows = micro * world if g == "global" else micro         # "global" gathers every process's rows
    how = (f"a micro-batch of {micro} per process (data.global_batch_size={cfg.data.global_batch_size} over "
           f"{world} process{'es' if world > 1 else ''}, data.per_device_batch_size={cfg.data.per_device_batch_size})")
    fix = ("raise data.global_batch_size (or data.per_device_batch_size) so that each micro-batch holds at "
           "least 2 samples")
    if rows < 2:
        raise ConfigError(f"loss.group={cfg.loss.group} gives entropy groups of {rows} embedding under {how}; "
                          f"the vMF entropy estimate needs at least 2 per group: {fix}")
    span = micro * world if world > 1 and cfg.model.sync_bn else micro
    if span < 2:
        raise ConfigError(f"BatchNorm would normalise each view over {span} sample under {how}; it needs at least "
                          f"2: {fix}{' or set model.sync_bn=true' if world > 1 else ''}")


def describe_groups(group: str, micro: int, world: int) -> str:
    g = parse_group(group)
    if g == "local":
        return f"1 group of {micro} rows per view per micro-batch (loss.group=local)"
    if g == "global":
        return f"1 group of {micro * world} rows per view per micro-step, gathered over all processes (loss.group=global)"
    bounds = group_bounds(micro, g)
    sizes = [b - a for a, b in bounds]
    k = sizes.count(g)
    text = f"{k} group{'s' if k > 1 else ''} of {g} rows" if k else ""
    rest = [s for s in sizes if s != g]
    if rest:
        text += (" + " if text else "") + f"1 group of {rest[0]} rows"
    return f"{text} per view per micro-batch of {micro}"


def make_plan(cfg: Config, world_size: int, dataset_len: int | None = None, memory: bool = True,
              throughput: list[dict] | None = None, device: str | None = None) -> Plan:
    """Every quantity of the run for ``world_size`` processes; ConfigError (one line) if the batch cannot split
    or a micro-batch is too small for the loss or BatchNorm (check_groups).
    ``throughput``: measured rows (fastmveb/throughput.py) the cost is priced from (exact matches only; none:
    the cost is "unmeasured"); ``device`` restricts them to one device name."""
    per_process, micro, accum = split_batch(cfg.data.global_batch_size, world_size, cfg.data.per_device_batch_size)
    check_groups(cfg, micro, world_size)
    source = str(cfg.data.train_beton)
    if dataset_len is None:
        dataset_len, source = IMAGENET_TRAIN, f"{cfg.data.train_beton} not found: assumed ImageNet-1k train"
    spe = steps_per_epoch(dataset_len, world_size, per_process, cfg.data.drop_last)
    if spe == 0:
        raise ConfigError(f"data.global_batch_size={cfg.data.global_batch_size} exceeds the {dataset_len} samples "
                          f"of {source}; lower data.global_batch_size")
    o = cfg.optim
    total, warmup = o.epochs * spe, o.warmup_epochs * spe
    peak = peak_lr(o.base_lr, cfg.data.global_batch_size)
    views = view_rows(cfg)
    plan = Plan(world_size=world_size, global_batch=cfg.data.global_batch_size, per_process_batch=per_process,
                micro_batch=micro, accum_steps=accum, dataset_len=dataset_len, dataset_source=source,
                steps_per_epoch=spe, epochs=o.epochs, warmup_steps=warmup, total_steps=total,
                last_step=min(total, cfg.train.max_steps) if cfg.train.max_steps else total, peak_lr=peak,
                start_lr=lr_at(0, total, warmup, peak, o.warmup_start_ratio, o.final_lr_ratio),
                end_lr=lr_at(total, total, warmup, peak, o.warmup_start_ratio, o.final_lr_ratio),
                lr_ratios=(o.warmup_start_ratio, o.final_lr_ratio), views=views, resolution=schedule_lines(cfg), entropy_groups=describe_groups(cfg.loss.group, micro, world_size),
                batchnorm=f"statistics per view and micro-batch: {micro} samples per process" + (
                    f" x {world_size} processes = {micro * world_size} (model.sync_bn)"
                    if world_size > 1 and cfg.model.sync_bn else ""))
    if memory:
        plan.memory = estimate_memory(cfg, micro, per_process, world_size)
    plan.cost, plan.cost_detail = gpu_hours(cfg, plan, throughput, device)
    return plan


def view_rows(cfg: Config) -> list[tuple[str, int, tuple[float, float]]]:
    """(name, size, crop scale) per view of the recipe, equal views counted once: "local x6"."""
    specs = view_specs(cfg.views)
    names = [s.name for s in specs]
    by_name = {s.name: s for s in specs}
    return [(n if names.count(n) == 1 else f"{n} x{names.count(n)}", s.size, s.scale) for n, s in by_name.items()]


def resume_lines(old: Plan | None, new: Plan, step: int, changed: list[str], rng_kept: bool) -> list[str]:
    """What a resume under another world size or config changes, for the start-up output: the processes
    and how each splits the batch, every changed key, and the schedule under the new numbers (steps per
    epoch, total steps, lr at the resume step). ``old`` is the checkpoint's plan (None: not rebuildable)."""
    lines = []
    if changed:
        lines.append("changed keys: " + "; ".join(changed))
    if old is None:
        return lines
    if old.world_size != new.world_size or (old.micro_batch, old.accum_steps) != (new.micro_batch, new.accum_steps):
        lines.append(f"processes {old.world_size} -> {new.world_size}: per process {old.per_process_batch} -> "
                     f"{new.per_process_batch} samples, micro-batch {old.micro_batch} -> {new.micro_batch}, "
                     f"accumulation {old.accum_steps} -> {new.accum_steps}")
    sched = [("global batch", old.global_batch, new.global_batch),
             ("steps per epoch", old.steps_per_epoch, new.steps_per_epoch),
             ("total steps", old.total_steps, new.total_steps), ("warm-up steps", old.warmup_steps, new.warmup_steps)]
    lr = [p.lr(step) for p in (old, new)]
    moved = [f"{name} {a} -> {b}" for name, a, b in sched if a != b]
    if moved or lr[0] != lr[1]:
        lines.append("schedule: " + ", ".join(moved + [f"lr at step {step} {lr[0]:.4g} -> {lr[1]:.4g}"]))
    else:
        lines.append(f"schedule unchanged: global batch {new.global_batch}, {new.total_steps} steps, lr at step "
                     f"{step} {lr[1]:.4g}")
    if not rng_kept:
        lines.append(f"views: the checkpoint holds the random streams of {old.world_size} processes, this run has "
                     f"{new.world_size}: the views' random streams restart here (the data order is kept), so "
                     f"the views differ from the uninterrupted run's")
    return lines


# ------------------------------------------------------------------------------------------------- memory
def saved_bytes_per_sample(model: torch.nn.Module, size: int, bf16: bool) -> float:
    """Bytes autograd keeps for backward per sample of a size x size view (model on the meta device)."""
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st._cdata not in params:
            per = 2 if bf16 and t.is_floating_point() else t.element_size()
            seen[st._cdata] = st.nbytes() // t.element_size() * per
        return t

    n = 2                                                     # BatchNorm in train mode needs > 1 sample
    x = torch.empty(n, 3, size, size, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values()) / n


def estimate_memory(cfg: Config, micro: int, per_process: int, world_size: int) -> dict[str, float]:
    """GiB per device by part (see the module docstring for what is and is not counted)."""
    from .batchnorm import convert_batchnorm
    from .model import MVEBModel
    with torch.device("meta"):
        model = convert_batchnorm(MVEBModel.from_config(cfg.model), sync=False)   # the trainer's BatchNorm
    model.train()
    v, bf16, sizes = cfg.views, cfg.train.mixed_precision == "bf16", view_sizes(cfg.views)
    per_size = {s: saved_bytes_per_sample(model, s, bf16) for s in sizes}     # one meta forward per distinct size
    act = sum(per_size[s] for s in sizes)
    n_params = sum(p.numel() for p in model.parameters())
    # weights, grads, LARS momentum (AdamW: two moments), EMA (+ DDP buckets)
    copies = 4 + (1 if cfg.optim.name == "adamw" else 0) + (1 if world_size > 1 else 0)
    view_bytes = (2 if v.dtype == "bfloat16" else 4) * 3 * sum(s * s for s in sizes)
    gib = 2 ** 30
    parts = {"activations": micro * act / gib,
             "state": copies * 4 * n_params / gib,
             "views + decoded batch": (micro * view_bytes + per_process * 3 * cfg.data.decode_size ** 2) / gib}
    parts["total"] = sum(parts.values())
    return parts


# --------------------------------------------------------------------------------------------------- cost
def _device_kind(device: str | None) -> torch.device:
    """The torch device type a measured row's device name stands for (names: fastmveb.bench.common.device_name)."""
    return torch.device("cpu" if str(device).startswith("cpu") else "cuda")


def gpu_hours(cfg: Config, plan: Plan, rows: list[dict] | None, device: str | None = None) -> tuple[str, list[dict]]:
    """(cost line, detail per device) of the run from MEASURED per-device throughput rows (fastmveb/throughput.py).

    A device prices the run only when, for every view size the run trains at (one with views.res_start_size=0,
    each epoch range of the ramp otherwise), it has a row equal to the plan on every key that changes the rate:
    arch, views, per-device batch (the micro-batch), precision, compile (as it resolves on that device) and
    channels-last. A near match (another batch, compile off) measured something else and is not used; nothing is
    scaled or assumed. ``device`` restricts the rows to one device name. GPU-hours = samples / (samples/s per
    device) / 3600, so linear scaling over devices is assumed and communication is not counted."""
    from .build import uses_compile
    from .resolution import schedule, views_label
    from .throughput import match
    rows = [r for r in (rows or []) if device is None or r.get("device") == device]
    spans = schedule(cfg)
    base = {"arch": cfg.model.arch, "batch": plan.micro_batch, "precision": cfg.train.mixed_precision,
            "channels_last": cfg.model.channels_last}
    detail = []
    for dev in dict.fromkeys(r.get("device") for r in rows):            # first-seen order: best file first
        want = {**base, "device": dev, "compile": uses_compile(cfg, _device_kind(dev))}
        seconds, used, steps_left = 0.0, [], plan.last_step
        for first, last, res in spans:
            steps = min(steps_left, (last - first + 1) * plan.steps_per_epoch)
            steps_left -= steps
            if steps <= 0:
                continue
            hits = match(rows, {**want, "views": views_label(cfg, res)})
            if not hits:
                break
            seconds += steps * plan.global_batch / hits[0]["samples_per_s"]
            used.append(hits[0])
        else:
            hours = seconds / 3600
            detail.append({"device": dev, "gpu_hours": hours, "wall_hours": hours / plan.world_size, "rows": used})
    first_want = {**base, "views": views_label(cfg, spans[0][2]), "compile (on CUDA)": uses_compile(
        cfg, torch.device("cuda"))}
    if not detail:
        where = f"for {device} " if device else ""
        wanted = ", ".join(f"{k} {v}" for k, v in first_want.items())
        return (f"unmeasured: no measured throughput {where}of this exact setting ({wanted}"
                f"{'; and every other size of the ramp' if len(spans) > 1 else ''}); run `make gpu-check OUT=DIR` "
                f"on the GPU host and pass --throughput-from DIR/summary.json; no throughput is assumed"), []
    d = detail[0]
    unit = "device-hours" if _device_kind(d["device"]).type == "cpu" else "GPU-hours"
    rates = ", ".join(f"{r['samples_per_s']:,.0f} samples/s ({r['views']}, {r['source']}, {r['file']})"
                      for r in d["rows"])
    what = ("end to end (loading included)" if all(r["source"] == "train" for r in d["rows"]) else
            "step only (data loading not included)")
    text = (f"~{d['gpu_hours']:,.0f} {unit} on {d['device']} ({d['wall_hours']:,.1f} h wall on {plan.world_size}) "
            f"for {plan.last_step:,} steps at the measured {rates} per device; {what}, communication not included")
    if len(detail) > 1:
        text += "; also measured: " + ", ".join(f"{x['device']} ~{x['gpu_hours']:,.0f} h" for x in detail[1:])
    return text, detail
