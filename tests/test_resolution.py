"""Progressive resolution: the size schedule as a pure function of the epoch (end points, mid-ramp, rounding),
the proportional local / decode sizes, the recipes, the config checks, the loader's decode-size switch on a
real beton, and a tiny training run whose sizes change at the scheduled epochs and that resumes exactly
mid-ramp (plus offline evaluation at a chosen test size)."""
import json
import sys
from pathlib import Path

import pytest
import torch

from fastmveb.config import ConfigError, load_config
from fastmveb.resolution import Resolution, ramp_size, resolution_at, schedule, schedule_lines

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_train import losses, run, tiny_overrides  # noqa: E402


def ramp_cfg(**kw):
    o = {"views.global_size": 192, "views.local_size": 80, "data.decode_size": 224, "optim.epochs": 100,
         "views.res_start_size": 128, "views.res_start_epoch": 10, "views.res_end_epoch": 85, "views.res_step": 32}
    o.update(kw)
    return load_config(None, [f"{k}={v}" for k, v in o.items()])


def test_ramp_end_points_and_mid_ramp():
    f = lambda e: ramp_size(e, 160, 192, 10, 20, 32)  # noqa: E731
    assert [f(e) for e in (0, 9, 10)] == [160, 160, 160]               # flat before the ramp starts
    assert [f(e) for e in (20, 21, 1000)] == [192, 192, 192]           # the end size from res_end_epoch on
    assert f(14) == 160 and f(15) == 192 and f(16) == 192               # 176 at the midpoint: halves round up
    # Restatement: linear interpolation, then the nearest multiple of the step.
    for e in range(10, 21):
        exact = 128 + (224 - 128) * (e - 10) / 10
        assert ramp_size(e, 128, 224, 10, 20, 32) == 32 * int(exact / 32 + 0.5)
    # Ends that are not multiples of the step stay exact and the ramp never leaves [start, end].
    assert ramp_size(0, 100, 210, 0, 10, 32) == 100 and ramp_size(10, 100, 210, 0, 10, 32) == 210
    assert all(100 <= ramp_size(e, 100, 210, 0, 10, 32) <= 210 for e in range(11))
    assert ramp_size(1, 100, 210, 0, 10, 32) == 100                     # 111 rounds to 96, below the start: clamped
    assert ramp_size(5, 224, 160, 0, 10, 32) == 192                     # a downward ramp works the same way


def test_resolution_scales_local_and_decode_with_the_global_size():
    cfg = ramp_cfg()
    assert resolution_at(0, cfg) == Resolution(128, 56, 152)           # 80 x 128/192 = 53.3 -> 56; 224 x 2/3 = 149 -> 152
    assert resolution_at(50, cfg) == Resolution(160, 64, 184)          # 66.7 -> 64; 186.7 -> 184 (multiples of 8)
    assert resolution_at(85, cfg) == Resolution(192, 80, 224)          # the recipe's own sizes at the end
    off = load_config(None, ["views.global_size=192", "views.local_size=80", "data.decode_size=224"])
    assert {resolution_at(e, off) for e in range(off.optim.epochs)} == {Resolution(192, 80, 224)}


def test_schedule_ranges_and_table():
    cfg = ramp_cfg()
    s = schedule(cfg)
    # 128 -> 160 where the ramp passes 144 (epoch 28.75), 160 -> 192 where it passes 176 (epoch 66.25).
    assert [(a, b, r.global_size) for a, b, r in s] == [(0, 28, 128), (29, 66, 160), (67, 99, 192)]
    assert all(resolution_at(e, cfg) == r for a, b, r in s for e in range(a, b + 1))   # the table is the function
    assert schedule_lines(cfg) == ["epochs 0-28: views 2x128 + 6x56 px, decode 152 px",
                                   "epochs 29-66: views 2x160 + 6x64 px, decode 184 px",
                                   "epochs 67-99: views 2x192 + 6x80 px, decode 224 px"]
    off = load_config(None, ["views.global_size=224", "views.local_size=96", "views.n_local=6", "data.decode_size=256"])
    assert schedule_lines(off) == ["fixed: views 2x224 + 6x96 px, decode 256 px (views.res_start_size=0: no ramp)"]


def test_recipes_off_in_rn50_on_in_rn50_fast():
    rn50 = load_config(ROOT / "rcs" / "rn50.yaml")
    assert rn50.views.res_start_size == 0 and len(schedule(rn50)) == 1
    fast = load_config(ROOT / "rcs" / "rn50_fast.yaml")
    sizes = [r.global_size for _, _, r in schedule(fast)]
    assert len(sizes) > 1 and sizes == sorted(sizes) and sizes[-1] == fast.views.global_size
    assert all(s % fast.views.res_step == 0 for s in sizes)


@pytest.mark.parametrize("bad, words", [
    ({"views.res_start_size": 4}, "views.res_start_size must be 0 (off) or in [8, 8192]"),
    ({"views.res_step": 0}, "views.res_step must be in [1, inf]"),
    ({"views.res_end_epoch": 120}, "res_end_epoch <= optim.epochs"),
    ({"views.res_start_epoch": 85}, "res_start_epoch < views.res_end_epoch"),
    ({"eval.size": 0}, "eval.size must be in [8, 8192]"),
])
def test_bad_schedule_is_one_line_error(bad, words):
    with pytest.raises(ConfigError) as e:
        ramp_cfg(**bad)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_old_eval_size_key_names_the_new_one(tmp_path):
    rc = tmp_path / "old.yaml"
    rc.write_text("data:\n  eval_size: 64\n")
    with pytest.raises(ConfigError, match=r"'data.eval_size' was replaced by eval.size"):
        load_config(rc)
    with pytest.raises(ConfigError, match=r"'data.eval_crop_ratio' was replaced by eval.crop_ratio"):
        load_config(None, ["data.eval_crop_ratio=0.9"])


def test_loader_decode_size_follows_between_epochs(small_betons):
    from fastmveb.data import TrainLoaderOptions, set_epoch, set_output_sizes, train_loader
    loader = train_loader(small_betons / "train.beton", 16, 1, torch.device("cpu"),
                          TrainLoaderOptions(decode="once", decode_size=48))
    for epoch, size in enumerate([48, 24, 40]):
        set_output_sizes(loader, [size])
        set_epoch(loader, epoch)
        assert {tuple(b[0].shape) for b in loader} == {(16, 3, size, size)}
    with pytest.raises(ValueError, match="2 sizes given for the loader's 1 image decoders"):
        set_output_sizes(loader, [32, 32])
    from fastmveb.config import ViewsConfig
    per_view = train_loader(small_betons / "train.beton", 16, 1, torch.device("cpu"), TrainLoaderOptions(
        decode="per_view", views=ViewsConfig(global_size=32, n_local=1, local_size=16)))
    set_output_sizes(per_view, [24, 24, 8])
    x = next(iter(per_view))
    assert [tuple(t.shape[2:]) for t in x[:3]] == [(24, 24), (24, 24), (8, 8)]


# Batch 32 of 160 images: 5 steps per epoch; epochs 0, 1, 2 at globals 16, 24, 32 (locals 8, 16, 16; decode 24, 40, 48).
RAMP = {"data.global_batch_size": 32, "optim.epochs": 3, "views.res_start_size": 16, "views.res_start_epoch": 0,
        "views.res_end_epoch": 2, "views.res_step": 8}


def test_ramp_run_changes_sizes_on_schedule_and_resumes_exactly_mid_ramp(small_betons, tmp_path):
    full = run(tiny_overrides(small_betons, tmp_path, "full", **RAMP))
    assert full.returncode == 0, full.stderr[-3000:]
    rows = [json.loads(ln) for ln in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    sizes = {r["step"]: (r["view_size"], r["local_size"], r["decode_size"]) for r in rows if "view_size" in r}
    assert [sizes[s] for s in (1, 5, 6, 10, 11, 15)] == [(16, 8, 24), (16, 8, 24), (24, 16, 40), (24, 16, 40),
                                                         (32, 16, 48), (32, 16, 48)]
    assert all(r["compiled_graphs"] == 0 for r in rows if "compiled_graphs" in r)     # eager run: nothing compiled
    changes = [ln for ln in full.stdout.splitlines() + full.stderr.splitlines() if "progressive resolution" in ln]
    assert [c.split(":")[0] for c in changes] == ["epoch 0", "epoch 1", "epoch 2"], changes
    assert "views 2x24 + 2x16 px, decode 40 px" in changes[1] and "torch.compile graphs so far: 0" in changes[1]
    reference = losses(tmp_path / "full")
    assert sorted(reference) == list(range(1, 16))

    # The same run stopped at step 8 (epoch 1, batch 3: mid-ramp, at 24 px), then resumed to the end.
    stopped = run(tiny_overrides(small_betons, tmp_path, "resumed", **RAMP, **{"train.max_steps": 8}))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    resumed = run(tiny_overrides(small_betons, tmp_path, "resumed", **RAMP))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "epoch 1: views 2x24" in resumed.stdout + resumed.stderr        # the resumed run starts at the epoch's size
    assert losses(tmp_path / "resumed") == reference                      # bitwise equal, every step
    from fastmveb.checkpoint import latest_checkpoint, load_checkpoint
    a = load_checkpoint(latest_checkpoint(tmp_path / "full"))
    b = load_checkpoint(latest_checkpoint(tmp_path / "resumed"))
    assert a["step"] == b["step"] == 15
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])

    # Offline evaluation at a fixed test size, whatever the training sizes were; the size is reported.
    from commands import eval_cli
    for extra, size in (([], 32), (["--size", "40"], 40)):
        r = eval_cli("knn", "--run", tmp_path / "full", "--num-workers", "1", "--k", "5", *extra)
        assert r.returncode == 0, r.stderr[-3000:]
        assert f") at {size} px: top-1" in r.stdout
        assert json.loads((tmp_path / "full" / "eval.jsonl").read_text().splitlines()[-1])["size"] == size


def test_compiled_ramp_compiles_per_size_not_per_epoch(small_betons, tmp_path):
    # Sizes 16, 24, 24 over 3 epochs (the ramp's end, 32, would come at epoch 3), compiled (aot_eager: dynamo's
    # graph counting without inductor's C++ build). Static shapes: each new size adds its own 3 graphs (view maker,
    # network, EMA target); an epoch at a size already seen adds nothing.
    r = run(tiny_overrides(small_betons, tmp_path, "compiled", **{**RAMP, **{
        "data.global_batch_size": 80, "optim.epochs": 3, "views.res_end_epoch": 3, "train.compile": "true",
        "train.compile_backend": "aot_eager"}}))                          # 2 steps per epoch
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(ln) for ln in (tmp_path / "compiled" / "metrics.jsonl").read_text().splitlines()]
    graphs = {int(r["step"]): (r["view_size"], r["compiled_graphs"]) for r in rows if "compiled_graphs" in r}
    by_epoch = [graphs[2 * e + 2] for e in range(3)]                    # at the end of each epoch
    assert by_epoch == [(16, 3), (24, 6), (24, 6)], by_epoch
    changes = [ln for ln in (r.stdout + r.stderr).splitlines() if "progressive resolution" in ln]
    assert [c.split(":")[0] for c in changes] == ["epoch 0", "epoch 1"], changes
    assert "torch.compile graphs so far: 3" in changes[1]


def test_dry_run_plan_shows_the_size_schedule():
    from fastmveb.plan import make_plan
    text = make_plan(load_config(ROOT / "rcs" / "rn50_fast.yaml"), 8, dataset_len=1_281_167, memory=False).format()
    lines = text.splitlines()
    i = next(k for k, ln in enumerate(lines) if ln.startswith("view sizes"))
    assert lines[i].endswith("epochs 0-28: views 2x128 + 4x56 px, decode 256 px")
    assert lines[i + 1].strip() == "epochs 29-66: views 2x160 + 4x64 px, decode 320 px"
    assert lines[i + 2].strip() == "epochs 67-99: views 2x192 + 4x80 px, decode 384 px"
    rn50 = make_plan(load_config(ROOT / "rcs" / "rn50.yaml"), 8, dataset_len=1_281_167, memory=False).format()
    assert "view sizes" in rn50 and "(views.res_start_size=0: no ramp)" in rn50
