"""End-to-end training-step benchmark: ``python -m fastmveb.bench train [--short] [--device cpu|cuda]``.

For each recipe (two-view 2 x G, multi-crop 2 x G + 6 x L) and in one run on the same data, it times:
  fastmveb   FFCV loader (decode once) -> ViewMaker -> fastmveb.step.train_step, built as fastmveb/train.py
             builds it (same run config, Accelerator, precision, channels-last, compilation; see bench/common.py)
  step       the same step on random device-resident views (bench/stage_step.py with identical settings): the
             compute bound; ``e2e_over_step`` = fastmveb / step says how much of it the input side leaves
  released   the released pipeline re-implemented (fastmveb/bench/reference/released_pipeline.py): PIL views in
             a torch DataLoader with as many worker processes as FFCV has threads, eager NCHW model under fp16
             autocast (CUDA; on CPU at fastmveb's precision, see --baseline-precision), N x N x d estimator
             with an explicit inverse, per-parameter LARS and EMA, a host sync per step; same model and sizes.
             ``x_vs_released`` = fastmveb / released.
Samples/s counts source images (each makes 2 or 2 + n_local views). Warm-up steps (worker start, numba and
torch.compile compilation, cudnn autotuning, plus as many steps as the loader has batches prefetched) are not
timed; the timed steps end with one device sync. ``data_wait_frac``: share of the timed wall time spent
waiting for the next batch. torch's intra-op threads are pinned to the same count for all three (see
bench/common.py pin_threads).
Data: data/synthetic/train.beton and the JPEG tree it was written from (data/synthetic/jpeg/train), generated
when missing (``python -m dataset_prep synthetic --out data/synthetic``).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from fastmveb.bench.common import (DEFAULT_DATA, RECIPES, add_settings_args, bench_config, build, default_rc,
                                   default_threads, ensure_data, environment, free, loadavg, make_accelerator,
                                   markdown_table, pick_device, pin_threads, recipe_names, settings_of, step_iters,
                                   sync, write_results)
from fastmveb.bench.stage_step import measure_step
from fastmveb.build import uses_compile

COLUMNS = ["recipe", "views", "arch", "batch", "precision", "compile", "fastmveb_samples_per_s", "first_step_s",
           "step_samples_per_s", "e2e_over_step", "data_wait_frac", "released_samples_per_s",
           "released_precision", "released_data_wait_frac", "x_vs_released"]


def add_args(parser) -> None:
    add_settings_args(parser)
    parser.add_argument("--beton", default=str(DEFAULT_DATA / "train.beton"), help="train beton")
    parser.add_argument("--jpeg-root", default=None,
                        help="ImageFolder tree of the same images for the baseline (default <beton dir>/jpeg/train)")
    parser.add_argument("--workers", type=int, default=None,
                        help="FFCV threads = DataLoader worker processes (default: the rc's, capped at the cores)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per pipeline")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per pipeline")
    parser.add_argument("--baseline-precision", choices=["auto", "fp16", "bf16", "no"], default="auto",
                        help="released pipeline autocast (auto: fp16 on CUDA as released; on CPU fastmveb's)")
    parser.add_argument("--no-released", action="store_true", help="skip the released pipeline")


class _Batches:
    """Endless batches from an FFCV loader, epoch after epoch (as the training loop reads them); close()
    stops the loader's thread so that it does not compete with what is timed next."""

    def __init__(self, loader):
        self.loader, self.epoch, self.it = loader, 0, None

    def __call__(self):
        from fastmveb.data import set_epoch
        while True:
            if self.it is None:
                set_epoch(self.loader, self.epoch)
                self.it = iter(self.loader)
            batch = next(self.it, None)
            if batch is not None:
                return batch
            self.it, self.epoch = None, self.epoch + 1

    def close(self):
        if self.it is not None:
            self.it.close()
            self.it = None


def _timed_loop(next_batch, step, warmup: int, steps: int, device) -> dict:
    """Run warmup untimed steps (the first one, which compiles, timed alone), then time ``steps`` steps (data wait
    included) with one sync at the end."""
    t0 = time.perf_counter()
    step(next_batch())
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step(next_batch())
    sync(device)
    wait = 0.0
    t0 = time.perf_counter()
    for _ in range(steps):
        tw = time.perf_counter()
        batch = next_batch()
        wait += time.perf_counter() - tw
        step(batch)
    sync(device)
    dt = time.perf_counter() - t0
    return {"seconds": dt, "data_wait_frac": wait / dt, "first_step_s": first}


def measure_fastmveb(cfg, device, warmup: int, steps: int, threads: int | None) -> dict:
    """FFCV -> ViewMaker -> train_step, constructed as fastmveb/train.py does: the same loader call and the same
    view switch (one view maker per size, compiled as training compiles). Reads cfg.data.train_beton."""
    from fastmveb.data import train_loader_from_config, unpack_train_batch
    from fastmveb.resolution import ViewSwitch
    from fastmveb.step import step_parts, train_step
    accelerator = make_accelerator(cfg, device)
    b = build(cfg, device, accelerator)
    loader = train_loader_from_config(cfg, cfg.data.global_batch_size, device)
    views_c, _ = ViewSwitch(cfg, b["training"].view_maker, loader).enter_epoch(0)
    threads = pin_threads(threads)             # the Loader has just set torch's threads to its worker count
    parts = step_parts(b["training"], accelerator, cfg, views_c)
    batches = _Batches(loader)
    out = {}

    def step(batch):
        # FFCV's iterator resets torch's thread count to its worker count when an epoch starts (measured:
        # 2 inside the step although 1 was pinned), which made end to end beat the 1-thread step bound.
        torch.set_num_threads(threads)
        x, extent, y = unpack_train_batch(batch)
        out["stats"] = train_step(parts, x, y, b["lr"], b["m"], extent=extent)[0]

    try:
        # + the loader's batches_ahead (3): timing starts once the prefetched batches are consumed.
        r = _timed_loop(batches, step, warmup + 3, steps, device)
    finally:
        batches.close()
    r["samples_per_s"] = steps * cfg.data.global_batch_size / r["seconds"]
    r["loss"] = float(out["stats"]["loss"])
    r["torch_threads"] = threads
    del b, views_c, parts, loader, batches, out
    free(device, uses_compile(cfg, device))
    return r


def baseline_precision(arg: str, cfg, device) -> str:
    if arg != "auto":
        return arg
    return "fp16" if device.type == "cuda" else cfg.train.mixed_precision


def measure_released(cfg, device, jpeg_root: Path, workers: int, precision: str, warmup: int, steps: int,
                     threads: int | None) -> dict:
    from accelerate.utils import set_seed
    from fastmveb.bench.reference.released_pipeline import ReleasedHyper, ReleasedStep, released_loader
    from fastmveb.model import MVEBModel, make_target
    from fastmveb.optim import lr_at, peak_lr
    threads = pin_threads(threads)
    set_seed(cfg.train.seed)
    model = MVEBModel.from_config(cfg.model).to(device)          # NCHW, eager: as released
    target = make_target(model)
    model.train()
    lr_peak = peak_lr(cfg.optim.base_lr, cfg.data.global_batch_size)
    lr = lr_at(1000, 10_000, 100, lr_peak, cfg.optim.warmup_start_ratio, cfg.optim.final_lr_ratio)
    hyper = ReleasedHyper(lr=lr, weight_decay=cfg.optim.weight_decay, momentum=cfg.optim.momentum,
                          trust_coef=cfg.optim.trust_coef, ema_momentum=cfg.model.ema_momentum, lam=cfg.loss.lam,
                          eta=cfg.loss.eta, min_tau=cfg.loss.min_tau)
    step_fn = ReleasedStep(model, target, device, precision, hyper)
    v = cfg.views
    loader = released_loader(jpeg_root, v.global_size, v.local_size, v.n_local, cfg.data.global_batch_size, workers,
                             v.global_scale, v.local_scale)

    def endless():
        while True:
            yield from loader
    batches = endless()
    out = {}

    def step(batch):
        out["loss"] = step_fn(batch[0])

    # Warm-up also drains the workers' prefetched batches (2 per worker), so timing starts in steady state.
    r = _timed_loop(lambda: next(batches), step, warmup + 2 * workers, steps, device)
    r["samples_per_s"] = steps * cfg.data.global_batch_size / r["seconds"]
    r["loss"] = out["loss"]
    r["torch_threads"] = threads
    batches.close()
    del batches, loader      # stops the worker processes
    free(device, False)
    return r


def main(args) -> dict:
    return run(args, pick_device(args.device), args.beton, args.jpeg_root, args.workers, args.warmup, args.steps,
               None if args.no_released else args.baseline_precision, args.out_dir)


def run(args, device: torch.device, beton, jpeg_root=None, workers: int | None = None, warmup: int | None = None,
        steps: int | None = None, released: str | None = "auto", out_dir=None, step_rows: dict | None = None) -> dict:
    """End to end beside the step and (``released``: its precision, None: not run) the released pipeline, for each
    recipe of the settings ``args`` (common.settings); writes the results; {rows, settings, path}. ``step_rows``:
    recipe -> a step row measured just before at the same setting (the GPU check's), used as the compute bound
    instead of timing the step again."""
    from fastmveb.data import available_cores
    beton = Path(beton)
    jpeg_root = Path(jpeg_root) if jpeg_root else beton.parent / "jpeg" / "train"
    ensure_data(beton, jpeg_root)
    cuda = device.type == "cuda"
    warmup = warmup or ((5 if cuda else 1) if args.short else (10 if cuda else 2))
    steps = steps or ((20 if cuda else 4) if args.short else (50 if cuda else 12))
    s_warmup = step_iters(args, device)[0]
    threads = default_threads(args, device)
    load_before = loadavg()
    rows = []
    for name in recipe_names(args):
        cfg = bench_config(args, device, args.n_local if RECIPES[name] else 0)
        cfg.data.train_beton = str(beton)
        if workers:
            cfg.data.num_workers = workers
        cfg.data.num_workers = max(1, min(cfg.data.num_workers, available_cores()))   # as the loader caps it
        workers = cfg.data.num_workers
        fm = measure_fastmveb(cfg, device, warmup, steps, threads)
        print(f"train {name:10s} fastmveb e2e {fm['samples_per_s']:9.1f} samples/s "
              f"(data wait {100 * fm['data_wait_frac']:.0f}%)", flush=True)
        known = (step_rows or {}).get(name)                 # only a row of exactly this setting stands in
        st = known if known and all(known.get(k) == v for k, v in settings_of(cfg, device).items()) else \
            measure_step(cfg, device, s_warmup, steps, threads)  # as many timed steps as end to end
        print(f"train {name:10s} step only    {st['samples_per_s']:9.1f} samples/s", flush=True)
        row = {"recipe": name, **settings_of(cfg, device), "workers": workers, "torch_threads": fm["torch_threads"],
               "fastmveb_samples_per_s": fm["samples_per_s"], "first_step_s": fm["first_step_s"],
               "step_samples_per_s": st["samples_per_s"], "step_from": "given" if st is known else "measured here",
               "e2e_over_step": fm["samples_per_s"] / st["samples_per_s"], "data_wait_frac": fm["data_wait_frac"],
               "step_peak_mem_gb": st["peak_mem_gb"], "fastmveb_loss": fm["loss"]}
        if released:
            prec = baseline_precision(released, cfg, device)
            rel = measure_released(cfg, device, jpeg_root, workers, prec, warmup, steps, threads)
            print(f"train {name:10s} released     {rel['samples_per_s']:9.1f} samples/s ({prec})", flush=True)
            row.update(released_samples_per_s=rel["samples_per_s"], released_precision=prec,
                       released_data_wait_frac=rel["data_wait_frac"], released_loss=rel["loss"],
                       x_vs_released=fm["samples_per_s"] / rel["samples_per_s"])
        rows.append(row)
    settings = {"rc": args.rc or default_rc(device), "short": bool(args.short),
                "device": str(device), "beton": str(beton), "jpeg_root": str(jpeg_root),
                "warmup_steps": f"{warmup} + prefetch depth (FFCV 3, DataLoader 2 x workers)", "timed_steps": steps,
                "step_warmup": s_warmup,
                "decode": f"{cfg.data.decode} {cfg.data.decode_size}", "loss_group": cfg.loss.group,
                "workers": "FFCV threads = DataLoader worker processes (see rows)",
                "torch_threads_pinned": threads,
                "released_precision_note": "fp16 autocast + GradScaler on CUDA as released; on CPU the "
                                           "precision fastmveb runs at (no = fp32)",
                "loadavg_before": load_before, "loadavg_after": loadavg()}
    columns = [c for c in COLUMNS if any(c in r for r in rows)]
    print(markdown_table(rows, columns))
    path = write_results("train", environment(device), settings, rows, columns, out_dir=out_dir)
    print(f"wrote {path}")
    return {"rows": rows, "settings": settings, "path": str(path)}
