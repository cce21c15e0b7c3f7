"""Progressive resolution: fewer pixels early, the FFCV way, for every MVEB view.

    res = resolution_at(epoch, cfg)           # Resolution(global_size, local_size, decode_size) of that epoch
    for first, last, res in schedule(cfg):    # the epoch ranges of constant size
    print("\n".join(schedule_lines(cfg)))    # the same, as the --dry-run plan shows it

The global view side is a pure function of the epoch (``ramp_size``): ``views.res_start_size`` up to epoch
``views.res_start_epoch``, then a linear ramp to ``views.global_size`` at ``views.res_end_epoch``, rounded to
``views.res_step`` px (32 as in FFCV's ImageNet example, which trains at 160 -> 192 px and tests at 256),
then ``views.global_size`` to the end. The local views and the decode size keep their recipe ratio to the
global size (rounded to 8 px), so the crops are cut from a decode no larger than the views need, and
downscaled by the same factors as at full size. ``res_start_size = 0`` turns it off (every epoch at the
recipe's sizes). Because the sizes depend only on the epoch, a resumed run sees the sizes the
uninterrupted run saw.

What a change of size costs (see ``ViewSwitch``; tests/test_resolution.py pins the counts). torch.compile:
training compiles with dynamic=False, so every size gets its own specialised graphs, compiled once when
its first step runs (view maker, network, EMA target: 3 graphs) and reused whenever that size comes back; an
epoch never recompiles by itself. The alternative, dynamo's automatic dynamic shapes (one static compile,
then one symbolic recompile that serves every later size), was measured slower to build on the CPU with
inductor: ~300 s per static compile against over 800 s for the symbolic one, unfinished (ResNet-10, shared
2-core box; ``bench ramp --compile true`` records the per-size figures), and a ramp has few sizes.
cudnn.benchmark: cuDNN autotunes its convolution algorithms once per new input shape, so the first step at a
new size is slower; the choice is cached per shape. The CUDA caching allocator keeps the previous size's
blocks and carves the new size's tensors from them, reserving more only when the new size needs more: an
upward ramp never holds more than the final size's peak (the final epochs set the memory budget, as without
the ramp), at worst with some fragmentation.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Callable


def ramp_size(epoch: int, start_size: int, end_size: int, start_epoch: int, end_epoch: int, step: int) -> int:
    """The view side at ``epoch``: start_size until start_epoch, end_size from end_epoch, linear in between and
    rounded to the nearest multiple of ``step`` (halves up), never outside [start_size, end_size]."""
    if epoch <= start_epoch:
        return start_size
    if epoch >= end_epoch:
        return end_size
    size = start_size + (end_size - start_size) * (epoch - start_epoch) / (end_epoch - start_epoch)
    size = step * math.floor(size / step + 0.5)
    return int(min(max(size, min(start_size, end_size)), max(start_size, end_size)))


@dataclass(frozen=True)
class Resolution:
    global_size: int
    local_size: int
    decode_size: int

    def describe(self, n_local: int) -> str:
        return f"views {_label(self.global_size, self.local_size, n_local)} px, decode {self.decode_size} px"


def _label(global_size: int, local_size: int, n_local: int) -> str:
    return f"2x{global_size}" + (f" + {n_local}x{local_size}" if n_local else "")


def views_label(cfg, res: Resolution | None = None) -> str:
    """The views of ``cfg`` as "2x224 + 6x96" (at ``res``'s sizes when given): the key on which measured
    throughput rows (fastmveb/throughput.py) and benchmark rows name the views they ran."""
    g, l = (res.global_size, res.local_size) if res else (cfg.views.global_size, cfg.views.local_size)
    return _label(g, l, cfg.views.n_local)


def _scaled(size: int, ratio: float, multiple: int = 8) -> int:
    return max(multiple, multiple * math.floor(size * ratio / multiple + 0.5))


def resolution_at(epoch: int, cfg) -> Resolution:
    """The sizes of ``epoch`` under ``cfg`` (a Config): the recipe's own sizes when the ramp is off."""
    v = cfg.views
    if not v.res_start_size:
        return Resolution(v.global_size, v.local_size, cfg.data.decode_size)
    g = ramp_size(epoch, v.res_start_size, v.global_size, v.res_start_epoch, v.res_end_epoch, v.res_step)
    if g == v.global_size:
        return Resolution(v.global_size, v.local_size, cfg.data.decode_size)
    return Resolution(g, _scaled(v.local_size, g / v.global_size), _scaled(cfg.data.decode_size, g / v.global_size))


def schedule(cfg) -> list[tuple[int, int, Resolution]]:
    """[(first epoch, last epoch, sizes)] over epochs 0 .. optim.epochs - 1, one entry per run of equal sizes."""
    out: list[tuple[int, int, Resolution]] = []
    for e in range(cfg.optim.epochs):
        r = resolution_at(e, cfg)
        if out and out[-1][2] == r:
            out[-1] = (out[-1][0], e, r)
        else:
            out.append((e, e, r))
    return out


def schedule_lines(cfg) -> list[str]:
    """One line per epoch range ("epochs 0-28: views 2x128 + 4x56 px, decode 152 px"), for the run plan."""
    s = schedule(cfg)
    if len(s) == 1:
        return [f"fixed: {s[0][2].describe(cfg.views.n_local)} (views.res_start_size=0: no ramp)"
                if not cfg.views.res_start_size else f"epochs 0-{s[0][1]}: {s[0][2].describe(cfg.views.n_local)}"]
    return [f"epochs {a}-{b}: {r.describe(cfg.views.n_local)}" if b > a else
            f"epoch {a}: {r.describe(cfg.views.n_local)}" for a, b, r in s]


def views_config(cfg, res: Resolution):
    """cfg.views with the sizes of ``res`` (what one ViewMaker is built from)."""
    return dataclasses.replace(cfg.views, global_size=res.global_size, local_size=res.local_size)


def compiled_graphs() -> int:
    """Graphs torch.compile has produced in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


def decode_sizes(res: Resolution, cfg) -> list[int]:
    """The train loader's decoder output sides at ``res``: the one decode, or one per view (per_view mode)."""
    if cfg.data.decode == "per_view":
        from fastmveb.views import view_sizes      # (torch and kornia: not needed by the rest of this module)
        return view_sizes(views_config(cfg, res))
    return [res.decode_size]


class ViewSwitch:
    """Picks the view maker and the loader's decode size for each epoch; makes one view maker per size.

    ``make_views(views_cfg)`` builds (and compiles, when training compiles) a view maker for a ViewsConfig;
    the train loader's decoders are resized (data.set_output_sizes) before the epoch's iteration starts.
    """

    def __init__(self, cfg, make_views: Callable, loader):
        self.cfg, self.make_views, self.loader = cfg, make_views, loader
        # dynamo keeps at most recompile_limit graphs per function (8), then runs it eagerly: one view maker
        # per size of the schedule must fit.
        import torch._dynamo
        sizes = len({r for _, _, r in schedule(cfg)})
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, sizes + 2)
        self.makers: dict[Resolution, Callable] = {}
        self.current: Resolution | None = None

    def enter_epoch(self, epoch: int) -> tuple[Callable, str | None]:
        """(view maker for ``epoch``, a one-line message when the sizes changed, else None)."""
        res = resolution_at(epoch, self.cfg)
        msg = None
        if res != self.current:
            if res not in self.makers:
                self.makers[res] = self.make_views(views_config(self.cfg, res))
            if self.current is not None or res != resolution_at(self.cfg.optim.epochs, self.cfg):
                from fastmveb.data import set_output_sizes   # the loader was built at the recipe's sizes
                set_output_sizes(self.loader, decode_sizes(res, self.cfg))
            if self.current is not None or self.cfg.views.res_start_size:
                msg = (f"epoch {epoch}: {res.describe(self.cfg.views.n_local)} (progressive resolution; "
                       f"torch.compile graphs so far: {compiled_graphs()})")
            self.current = res
        return self.makers[res], msg

    def metrics(self) -> dict:
        """Fields for the metrics rows: the sizes in force and the compile count."""
        r = self.current
        return {"view_size": r.global_size, "local_size": r.local_size, "decode_size": r.decode_size,
                "compiled_graphs": compiled_graphs()}
