"""One-page PNG report of a run: the training curves people look at, evaluation, and throughput.

    python -m fastmveb.report --run runs/NAME [--out FILE.png]      # default: runs/NAME/report.png
    python -m fastmveb.report --run runs/NAME --embedding [FILE.png]  # also runs/NAME/embedding.png

Reads run_dir/metrics.jsonl (and meta.json / eval.jsonl when present) and draws, against the training
step: loss; alignment; the entropy surrogate (a trend only: its value means nothing, docs/method.md); the kernel
bandwidth tau; uniformity and effective rank (the collapse monitors); kNN top-1/top-5 and the online probe;
learning rate with the EMA momentum; gradient norm; samples/s; where each step's time goes (loading, views,
model step, as shares of the step time, for whichever of them were logged); peak memory. A metric the
run did not log gets an empty panel that says so, so every report has the same layout.

``--embedding`` adds a second page: the val set's backbone features projected to 2-D (PCA, first two
principal axes) and coloured by class, for the trained encoder (newest checkpoint) and for the same encoder at
its random initialisation (rebuilt from train.seed as train.py does), side by side, each titled with its kNN
top-1 on the same features (the run's k and T). It reads the run's betons, so run it where the run was started.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from fastmveb.errors import RunError, run_cli
from fastmveb.fileio import atomic_path, write_text


def replace_block(path: Path, begin: str, end: str, body: str) -> bool:
    """Rewrite the text between the markers ``begin`` and ``end`` of ``path`` with ``body`` (atomically, only when it
    changes); False when the file is unreadable or lacks a marker. README figures (speed, demo) are generated through this."""
    try:
        text = path.read_text()
    except OSError:
        return False
    if begin not in text or end not in text:
        return False
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    new = f"{head}{begin}\n{body}{end}{tail}"
    if new != text:
        write_text(path, new)
    return True


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(rows, number of unreadable lines): a run killed mid-write may leave a truncated last line."""
    rows, bad = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict) and "step" in row:
            rows.append(row)
        else:
            bad += 1
    return rows, bad


def series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


# Panel: (title, [(key, label)], options). Order is the reading order: objective, collapse, eval, optimiser, speed.
PANELS = [
    ("loss", [("loss", "loss")], {}),
    ("alignment", [("align", "align")], {}),
    ("entropy surrogate (trend only)", [("entropy", "H_sur")], {}),
    ("bandwidth tau", [("tau", "tau")], {}),
    ("uniformity (-4 spread, 0 collapsed)", [("uniformity", "uniformity")], {}),
    ("effective rank of z", [("erank", "erank")], {}),
    ("accuracy (%)", [("knn_top1", "kNN top-1"), ("knn_top5", "kNN top-5"),
                      ("online_linear_top1", "online linear top-1"), ("probe_top1", "online probe top-1 (train)")],
     {"markers": True}),
    ("learning rate", [("lr", "lr")], {"twin": ("ema_momentum", "EMA momentum")}),
    ("gradient norm", [("grad_norm", "grad norm")], {"log": True}),
    ("throughput (samples/s)", [("samples_per_s", "samples/s")], {}),
    ("time per step", [], {"time_shares": True}),
    ("peak memory (GB)", [("peak_mem_gb", "peak mem")], {}),
]
TIME_PARTS = [("time_data", "loading"), ("time_views", "views"), ("time_step", "model step")]


def _empty(ax, text="not logged in this run"):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.5")
    ax.set_xticks([])
    ax.set_yticks([])


def _time_panel(ax, rows):
    """Shares of the step time. The whole is time_total when logged, else the sum of the logged parts."""
    parts = [(k, lab) for k, lab in TIME_PARTS if series(rows, k)[0]]
    if not parts:
        return _empty(ax)
    pts = []
    for r in rows:
        vals = [r.get(k) for k, _ in parts]
        if any(not isinstance(v, (int, float)) for v in vals):
            continue
        whole = r.get("time_total")
        whole = whole if isinstance(whole, (int, float)) and whole > 0 else sum(vals)
        if whole <= 0:
            continue
        pts.append((r["step"], [v / whole for v in vals], whole))
    if not pts:
        return _empty(ax)
    xs = [p[0] for p in pts]
    shares = [[p[1][i] * 100 for p in pts] for i in range(len(parts))]
    labels = [lab for _, lab in parts]
    has_total = any(isinstance(r.get("time_total"), (int, float)) for r in rows)
    if has_total:
        other = [max(0.0, 100 - sum(p[1]) * 100) for p in pts]
        shares.append(other)
        # Name what the remainder holds, so a run that logs only loading time does not read as "mystery time".
        rest = [lab for k, lab in TIME_PARTS if (k, lab) not in parts]
        labels.append("rest (" + " + ".join(rest) + ")" if rest else "other")
    ax.stackplot(xs, *shares, labels=labels, alpha=0.8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("% of step time")
    mean_ms = 1000 * sum(p[2] for p in pts) / len(pts)
    ax.set_title(f"time per step (mean {mean_ms:.0f} ms)", fontsize=10)
    ax.legend(fontsize=7, loc="upper right")
    return None


def _read_metrics(run_dir: Path) -> tuple[list[dict], int]:
    """(metric rows, unreadable lines) of a run directory; a RunError when it has none."""
    if not run_dir.is_dir():
        raise RunError(f"run directory '{run_dir}' not found")
    mpath = run_dir / "metrics.jsonl"
    if not mpath.is_file():
        raise RunError(f"no metrics.jsonl in '{run_dir}' (has the run logged a step yet?)")
    rows, bad = read_jsonl(mpath)
    if not rows:
        raise RunError(f"'{mpath}' has no metric lines")
    return rows, bad


def _read_extras(run_dir: Path) -> tuple[dict, list[dict]]:
    """(meta.json or {}, offline evaluation records with a top-1) of a run directory."""
    meta = {}
    if (run_dir / "meta.json").is_file():
        try:
            meta = json.loads((run_dir / "meta.json").read_text())
        except json.JSONDecodeError:
            pass
    evals = read_jsonl(run_dir / "eval.jsonl")[0] if (run_dir / "eval.jsonl").is_file() else []
    evals = [e for e in evals if "top1" in e]  # read_jsonl needs "step"; eval lines carry it (may be None)
    return meta, evals


def _accuracy_marks(ax, rows: list[dict], evals: list[dict]) -> int:
    """The accuracy panel's single points (end-of-training kNN, offline evaluations); returns how many drawn."""
    drawn = 0
    # End-of-training kNN of the trained and of the randomly initialised encoder: the gain from training.
    last = rows[-1]["step"]
    for key, label, mk in (("final_knn_top1", "final kNN top-1", "*"), ("random_knn_top1", "random-init kNN top-1", "x")):
        xs, ys = series(rows, key)
        if xs:
            ax.plot(xs[-1:], ys[-1:], mk, ms=11, label=f"{label} ({ys[-1]:.2f})")
            drawn += 1
    for e in evals:
        if e.get("ckpt") == "random-init":
            continue
        x = e.get("step") if isinstance(e.get("step"), (int, float)) else last
        name = "kNN" if e.get("kind") == "knn" else f"linear {e.get('mode', '')}"
        ax.plot([x], [e["top1"]], "D", ms=6, label=f"offline {name} top-1 ({e['top1']:.2f})")
        drawn += 1
    return drawn


def _twin_axis(ax, rows: list[dict], key: str, label: str) -> None:
    xs, ys = series(rows, key)
    if xs:
        ax2 = ax.twinx()
        ax2.plot(xs, ys, color="tab:orange", lw=1, ls="--", label=f"{label} ({ys[-1]:.5g})")
        ax2.tick_params(labelsize=8)
        # One legend for both axes: two separate ones land on top of each other.
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax2.legend(h1 + h2, l1 + l2, fontsize=7, loc="center right")


def _panel(ax, rows: list[dict], keys: list, opt: dict, evals: list[dict]) -> None:
    """One PANELS entry: its series against the step, or the empty panel that says it was not logged."""
    drawn = 0
    for key, label in keys:
        xs, ys = series(rows, key)
        if not xs:
            continue
        style = dict(marker="o", ms=3) if opt.get("markers") or len(xs) < 3 else {}
        ax.plot(xs, ys, label=f"{label} ({ys[-1]:.3g})", lw=1.2, **style)
        drawn += 1
    if opt.get("markers"):
        drawn += _accuracy_marks(ax, rows, evals)
    if not drawn:
        _empty(ax)
        return
    if opt.get("log") and all(y > 0 for k, _ in keys for y in series(rows, k)[1]):
        ax.set_yscale("log")
    if "twin" in opt:
        _twin_axis(ax, rows, *opt["twin"])
    if not ax.get_legend() and not ("twin" in opt and series(rows, opt["twin"][0])[0]):
        ax.legend(fontsize=7, loc="best")
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.3)


def _headline(run_dir: Path, rows: list[dict], bad: int, meta: dict) -> str:
    last = rows[-1]
    head = [f"run {run_dir.resolve().name}", f"step {last['step']}", f"epoch {last.get('epoch', '?')}"]
    if meta.get("git"):
        head.append(f"git {str(meta['git'])[:20]}")
    if meta.get("world_size"):
        head.append(f"{meta['world_size']} process(es)")
    fin = [r for r in rows if "final_knn_top1" in r]
    if fin:
        f = fin[-1]
        head.append(f"final kNN top-1 {f['final_knn_top1']:.2f}%" +
                    (f" (random init {f['random_knn_top1']:.2f}%)" if "random_knn_top1" in f else ""))
    if bad:
        head.append(f"{bad} unreadable line(s) skipped")
    return "   |   ".join(head)


def make_report(run: str | Path, out: str | Path | None = None) -> Path:
    """Draw the report of ``run`` into ``out`` (default run_dir/report.png); returns the PNG path."""
    run_dir = Path(run)
    rows, bad = _read_metrics(run_dir)
    out = Path(out) if out is not None else run_dir / "report.png"
    if not out.parent.is_dir():
        raise RunError(f"output directory '{out.parent}' does not exist")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta, evals = _read_extras(run_dir)
    fig, axes = plt.subplots(3, 4, figsize=(20, 12))
    for ax, (title, keys, opt) in zip(axes.flat, PANELS):
        ax.set_title(title, fontsize=10)
        if opt.get("time_shares"):
            _time_panel(ax, rows)
        else:
            _panel(ax, rows, keys, opt, evals)
    for ax in axes[-1]:
        ax.set_xlabel("step", fontsize=9)
    fig.suptitle(_headline(run_dir, rows, bad, meta), fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    _save_figure(fig, out, dpi=80)
    return out


def _save_figure(fig, out: Path, dpi: int) -> None:
    """Save via a temporary file and a rename (an interrupted save never leaves a half PNG under the name); the
    temporary ends in .png, the suffix savefig picks the format from."""
    import matplotlib.pyplot as plt
    try:
        with atomic_path(out, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)


def pca_2d(x):
    """(N, D) features -> ((N, 2) coordinates on the first two principal axes, their shares of the variance)."""
    import torch
    x = x.double() - x.double().mean(0, keepdim=True)
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    var = s.square()
    share = (var[:2] / var.sum().clamp_min(1e-30)).tolist()
    xy = x @ vh[:2].T
    # An SVD's axis signs are arbitrary: orient each axis so its largest coordinate is positive (stable plots).
    sign = torch.where(xy.gather(0, xy.abs().argmax(0, keepdim=True)) < 0, -1.0, 1.0).to(xy.dtype)
    return (xy * sign).float(), share


def _class_names(beton: Path, k: int) -> list[str]:
    """Names of the synthetic set's classes (its JPEG tree sits next to the betons), else 'class i'."""
    tree = Path(beton).parent / "jpeg" / "train"
    names = sorted(p.name for p in tree.iterdir() if p.is_dir()) if tree.is_dir() else []
    return names if len(names) == k else [f"class {i}" for i in range(k)]


def make_embedding(run: str | Path, out: str | Path | None = None, max_val: int | None = None) -> tuple[Path, dict]:
    """Draw the trained vs random-init embedding page of ``run`` into ``out`` (default run_dir/embedding.png).

    Returns (PNG path, {"trained": kNN top-1 %, "random_init": kNN top-1 %}).
    """
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise RunError(f"run directory '{run_dir}' not found")
    out = Path(out) if out is not None else run_dir / "embedding.png"
    if not out.parent.is_dir():
        raise RunError(f"output directory '{out.parent}' does not exist")
    import torch
    from accelerate.utils import set_seed

    from fastmveb.checkpoint import load_run_backbone
    from fastmveb.eval.features import PixelStats, eval_loaders, extract_features
    from fastmveb.eval.knn import knn_accuracy
    from fastmveb.model import MVEBModel
    trained, info = load_run_backbone(run_dir)
    cfg = info["cfg"]
    for path in (cfg.data.train_beton, cfg.data.val_beton):
        if not Path(path).is_file():
            raise RunError(f"dataset '{path}' (from the run's config) not found; run from the directory the run was "
                           "started in, or make the betons (make beton)")
    set_seed(cfg.train.seed)                      # train.py's initial weights: the same encoder, untrained
    untrained = MVEBModel.from_config(cfg.model).backbone
    device = torch.device("cpu")
    loaders = eval_loaders(cfg, device)
    panels = []
    for title, net in (("trained", trained), ("random init", untrained)):
        bank, bank_y = extract_features(net, loaders[0], device, PixelStats.of(cfg))
        val, val_y = extract_features(net, loaders[1], device, PixelStats.of(cfg), max_val)
        top1, _ = knn_accuracy(bank, bank_y, val, val_y, k=cfg.eval.knn_k, T=cfg.eval.knn_t)
        panels.append((title, top1, *pca_2d(val), val_y))
    num_classes = int(max(p[4].max().item() for p in panels)) + 1
    names = _class_names(Path(cfg.data.train_beton), num_classes)

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6))
    cmap = plt.get_cmap("tab10" if num_classes <= 10 else "tab20")
    for ax, (title, top1, xy, share, y) in zip(axes, panels):
        for c in range(num_classes):
            sel = y == c
            ax.scatter(xy[sel, 0], xy[sel, 1], s=9, color=cmap(c % cmap.N), label=names[c], alpha=0.8, linewidths=0)
        ax.set_title(f"{title}: kNN top-1 {top1:.1f}%", fontsize=12)
        ax.set_xlabel(f"PC 1 ({share[0]:.0%} of variance)", fontsize=9)
        ax.set_ylabel(f"PC 2 ({share[1]:.0%} of variance)", fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=2, frameon=False)
    n = int(panels[0][4].shape[0])
    fig.suptitle(f"{run_dir.resolve().name}: {cfg.model.arch} backbone features of {n} val images "
                 f"({Path(cfg.data.val_beton).name}), PCA; kNN k={cfg.eval.knn_k}, T={cfg.eval.knn_t}, "
                 f"chance {100 / num_classes:.0f}%", fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    _save_figure(fig, out, dpi=60)
    return out, {"trained": panels[0][1], "random_init": panels[1][1]}


def main(argv: list[str] | None = None) -> int:
    """Draw the pages; bad input raises a UserError (``cli`` prints it as one line and exits 2)."""
    ap = argparse.ArgumentParser(prog="python -m fastmveb.report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="run directory with metrics.jsonl")
    ap.add_argument("--out", help="PNG path (default: RUN/report.png)")
    ap.add_argument("--embedding", nargs="?", const="", default=None, metavar="PNG",
                    help="also draw the PCA embedding of val features, trained vs random init, with their kNN top-1 "
                         "(default path: RUN/embedding.png; needs the run's checkpoint and betons)")
    args = ap.parse_args(argv)
    out = make_report(args.run, args.out)
    print(f"report -> {out}")
    if args.embedding is not None:
        emb, knn = make_embedding(args.run, args.embedding or None)
        print(f"embedding -> {emb} (kNN top-1: trained {knn['trained']:.2f}%, random init {knn['random_init']:.2f}%)")
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``fastmveb-report``: main with a UserError as one ``error: ...`` line and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
