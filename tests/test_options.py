"""Every config option that can be switched on runs: each bool key and each choice value is exercised by a
tiny training run of at least two steps (independent options share a run), or named with the test that
runs it. A new bool or choice key without a run fails test_every_switch_is_covered."""
import json
import typing

import pytest
import torch

from fastmveb.config import CHOICES, Config
from fastmveb.checkpoint import latest_checkpoint, load_checkpoint

from test_train import ROOT, tiny_overrides


# Each run flips options away from tiny_overrides' values; names say what the run combines.
RUNS = {
    "per_view_and_view_options": {
        "data.decode": "per_view", "data.os_cache": "false", "views.antialias": "false",
        "views.channels_last": "false", "views.interpolation": "bilinear",
        "views.jitter_order": "fixed", "model.channels_last": "false", "model.zero_init_residual": "false",
        "model.sync_bn": "false", "eval.online_linear": "true", "loss.group": "global", "train.max_steps": 2,
    },
    "bf16_partial_batch_progress_knn": {
        # 160 images / 112: one full batch and a partial one (drop_last off), i.e. two steps.
        "data.global_batch_size": 112, "data.drop_last": "false", "data.order": "quasi_random", "optim.epochs": 1,
        "optim.warmup_epochs": 0, "train.mixed_precision": "bf16", "train.progress": "true",
        "eval.knn_at_end": "true", "eval.knn_every_epochs": 1, "train.deterministic": "false", "views.interpolation": "bicubic",
        "views.dtype": "bfloat16", "views.jitter_order": "random", "data.decode": "once",
    },
    "fixed_bandwidth": {"loss.bandwidth": "fixed", "loss.tau": 0.5, "train.max_steps": 2},
}
# (key, value) pairs run by other tests, and values training never reads.
ELSEWHERE = {
    ("train.compile", "true"): "tests/test_train.py::test_compiled_step_runs",
    ("train.compile", "auto"): "train.compile=auto is false on a CPU: the runs above",
    ("train.compile", "false"): "tiny_overrides (every run above)",
    ("train.resume", True): "tests/test_train.py::test_resume_after_kill_reproduces_the_uninterrupted_run",
    ("train.resume", False): "test_resume_false_starts_over",
    ("train.allow_config_change", True):
        "tests/test_faults_runs.py::test_resume_with_a_changed_trajectory_stops_in_one_line",
    ("train.allow_config_change", False): "tiny_overrides (every run; its refusal: the same test_faults_runs test)",
    ("train.deterministic", True): "tiny_overrides (run per_view_and_view_options)",
    ("eval.linear_mode", "fast"): "tests/test_eval_cli.py (the eval CLI; training never reads it)",
    ("eval.linear_mode", "full"): "tests/test_eval_cli.py (the eval CLI; training never reads it)",
    ("train.mixed_precision", "no"): "tiny_overrides",
    ("data.order", "random"): "tiny_overrides",
    ("views.dtype", "float32"): "tiny_overrides",
    ("optim.name", "lars"): "tiny_overrides",
    ("optim.name", "adamw"):
        "tests/test_backbones.py::test_tiny_vit_trains_two_steps_with_every_new_option_and_resumes_exactly",
}


def _switches() -> list[tuple[str, object]]:
    out = []
    for sec, sec_type in typing.get_type_hints(Config).items():
        hints = typing.get_type_hints(sec_type)
        out += [(f"{sec}.{name}", v) for name, tp in hints.items() if tp is bool for v in (True, False)]
    return out + [(key, v) for key, values in CHOICES.items() for v in values]


def test_every_switch_is_covered(tmp_path):
    from fastmveb.config import load_config
    ran = [load_config(ROOT / "rcs/tiny.yaml", tiny_overrides(tmp_path, tmp_path, run, **extra))
           for run, extra in RUNS.items()]
    missing = []
    for key, value in _switches():
        sec, _, name = key.partition(".")
        if (key, value) not in ELSEWHERE and not any(getattr(getattr(c, sec), name) == value for c in ran):
            missing.append(f"{key}={value}")
    assert not missing, f"no run exercises: {', '.join(missing)}"


def run_main(args: list[str]) -> int:
    from accelerate.state import AcceleratorState
    from fastmveb import train
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        return train.main(["--rc", str(ROOT / "rcs/tiny.yaml"), *args])
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("run", list(RUNS))
def test_option_run(run, small_betons, tmp_path):
    rc = run_main(tiny_overrides(small_betons, tmp_path, run, **RUNS[run]))
    assert rc == 0
    rows = [json.loads(ln) for ln in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(torch.isfinite(torch.tensor([r["loss"] for r in steps])))
    if RUNS[run].get("loss.bandwidth") == "fixed":
        assert all(r["tau"] == pytest.approx(RUNS[run]["loss.tau"]) for r in steps)   # every group's kernel at it
    if RUNS[run].get("eval.online_linear") == "true":
        assert "probe_loss" in steps[-1]
        assert "probe" in load_checkpoint(latest_checkpoint(tmp_path / run))
    if RUNS[run].get("eval.knn_at_end") == "true":
        assert "final_knn_top1" in rows[-1] and any("knn_top1" in r for r in rows)   # the monitor, then the check


def test_resume_false_starts_over(small_betons, tmp_path):
    args = tiny_overrides(small_betons, tmp_path, "again", **{"train.max_steps": 2})
    assert run_main(args) == 0
    assert run_main(args + ["train.resume=false"]) == 0
    meta = json.loads((tmp_path / "again" / "meta.json").read_text())
    assert meta["resumed_from"] is None                               # started over, not from step 2
    assert load_checkpoint(latest_checkpoint(tmp_path / "again"))["step"] == 2


def test_deterministic_sets_cublas_workspace(monkeypatch):
    from fastmveb.build import use_deterministic_algorithms
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        use_deterministic_algorithms()
        import os
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and torch.are_deterministic_algorithms_enabled()
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":0:0")
        with pytest.raises(ValueError, match="CUBLAS_WORKSPACE_CONFIG=:4096:8"):
            use_deterministic_algorithms()
    finally:
        torch.use_deterministic_algorithms(False)


def test_bf16_views_need_bf16_autocast():
    from fastmveb.config import ConfigError, load_config
    with pytest.raises(ConfigError, match="views.dtype=bfloat16 needs train.mixed_precision=bf16"):
        load_config(None, ["views.dtype=bfloat16", "train.mixed_precision=no"])
