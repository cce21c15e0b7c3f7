"""Config: YAML + overrides, round trip, unknown keys and wrong types named with their source."""
import typing
from pathlib import Path

import pytest
import yaml

from fastmveb.config import Config, ConfigError, dump_config, from_dict, load_config
from commands import train_cli

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_released_recipe():
    c = Config()
    assert c.loss.lam == 0.01 and c.loss.eta == 0.01 and c.loss.min_tau == 0.1 and c.loss.group == "128"
    assert c.views.global_scale == (0.4, 1.0) and c.views.local_scale == (0.05, 0.4) and c.views.n_local == 6
    assert c.views.blur_p == (1.0, 0.1, 0.5) and c.views.solarize_p == (0.0, 0.2, 0.0)
    assert c.optim.weight_decay == 1e-6 and c.optim.trust_coef == 0.001 and c.model.ema_momentum == 0.996


@pytest.mark.parametrize("rc", sorted((ROOT / "rcs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_rc_loads_and_round_trips(rc, tmp_path):
    cfg = load_config(rc)
    assert cfg.train.name == rc.stem
    out = tmp_path / "resolved.yaml"
    dump_config(cfg, out)
    assert load_config(out) == cfg
    assert from_dict(yaml.safe_load(out.read_text())) == cfg


def test_rn50_is_the_released_global_batch():
    cfg = load_config(ROOT / "rcs/rn50.yaml")
    assert cfg.data.global_batch_size == 4096 and cfg.optim.epochs == 800 and cfg.views.n_local == 6
    assert cfg.data.per_device_batch_size == 128                       # the released per-GPU batch


def test_old_batch_size_key_says_what_it_became(tmp_path):
    rc = tmp_path / "old.yaml"
    rc.write_text("data:\n  batch_size: 128\n")
    for args in ((rc, None), (None, ["data.batch_size=64"])):
        with pytest.raises(ConfigError, match=r"'data.batch_size' was replaced by data.global_batch_size .* "
                                              r"data.per_device_batch_size") as e:
            load_config(*args)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"data.per_device_batch_size must be in \[0, inf\], got -1"):
        load_config(None, ["data.per_device_batch_size=-1"])
    with pytest.raises(ConfigError, match=r"data.global_batch_size must be in \[1, inf\], got 0"):
        load_config(None, ["data.global_batch_size=0"])


def test_overrides_parse_types():
    cfg = load_config(None, ["optim.base_lr=0.5", "views.global_scale=[0.3, 1]", "train.resume=false",
                             "loss.group=local", "data.global_batch_size=64",
                             "data.per_device_batch_size=32"])
    assert cfg.optim.base_lr == 0.5 and cfg.views.global_scale == (0.3, 1.0)
    assert cfg.train.resume is False and cfg.loss.group == "local" and cfg.data.global_batch_size == 64
    assert cfg.data.per_device_batch_size == 32


def test_unknown_key_names_key_and_file(tmp_path):
    rc = tmp_path / "bad.yaml"
    rc.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'optim.lr'"):
        load_config(rc)
    with pytest.raises(ConfigError, match=r"command line: unknown key 'nosection'"):
        load_config(None, ["nosection.x=1"])


def test_wrong_type_names_key(tmp_path):
    rc = tmp_path / "bad.yaml"
    rc.write_text("data:\n  global_batch_size: many\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: 'data.global_batch_size' must be an integer"):
        load_config(rc)
    with pytest.raises(ConfigError, match=r"'views.global_scale' must be a list of 2"):
        load_config(None, ["views.global_scale=0.4"])
    with pytest.raises(ConfigError, match=r"'train.resume' must be true or false"):
        load_config(None, ["train.resume=3"])


def test_invalid_choices_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="loss.group"):
        load_config(None, ["loss.group=abc"])
    with pytest.raises(ConfigError, match="data.decode must be one of"):
        load_config(None, ["data.decode=twice"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_train_cli_reports_config_error_in_one_line(tmp_path):
    rc = tmp_path / "bad.yaml"
    rc.write_text("model:\n  layers: 50\n")
    r = train_cli("--rc", rc)
    assert r.returncode == 2
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert err == [f"error: {rc}: unknown key 'model.layers' (valid: arch, zero_init_residual, proj_hidden, "
                   "proj_out, proj_layers, ema_momentum, sync_bn, channels_last, drop_path, img_size, patch_size, "
                   "embed_dim, depth, num_heads)"], r.stderr


@pytest.mark.parametrize("overrides,line", [
    (["loss.bandwidth=fixed"], "error: loss.bandwidth=fixed needs the fixed bandwidth loss.tau > 0 (e.g. loss.tau=0.5)"),
    (["loss.bandwidth=fixed", "loss.tau=0"], "error: loss.bandwidth=fixed needs the fixed bandwidth loss.tau > 0"),
    (["loss.tau=0.5"], "error: loss.tau=0.5 is read only with loss.bandwidth=fixed, not median: set that, or leave "
                       "loss.tau out")])
def test_fixed_bandwidth_needs_its_tau_and_only_it_reads_tau(overrides, line):
    r = train_cli("--rc", ROOT / "rcs/tiny.yaml", *overrides, "--dry-run")
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith(line), r.stderr
    assert load_config(ROOT / "rcs/tiny.yaml", ["loss.bandwidth=fixed", "loss.tau=0.5"]).loss.tau == 0.5


def test_string_fields_take_override_text_verbatim(tmp_path):
    cfg = load_config(None, ["train.mixed_precision=no", "train.compile=false", "loss.group=128"])
    assert cfg.train.mixed_precision == "no" and cfg.train.compile == "false" and cfg.loss.group == "128"
    rc = tmp_path / "bad.yaml"
    rc.write_text("train:\n  mixed_precision: no\n")
    with pytest.raises(ConfigError, match="quote the value"):
        load_config(rc)


def test_every_field_carries_its_rules():
    # Rules live on the fields (config.opt / Literal); the tables derive from them, so a new key cannot miss one.
    from fastmveb.config import CHOICES, HARMLESS, RANGES, fields_of
    keys = [k for k, _, _ in fields_of()]
    for key, f, tp in fields_of():
        assert "harmless" in f.metadata, f"{key}: declare it with opt(default, range, harmless)"
        base = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else tp
        assert (base in (int, float)) == ("range" in f.metadata), f"{key}: a number needs a range, nothing else has one"
    assert set(RANGES) <= set(keys) and set(CHOICES) <= set(keys) and set(HARMLESS) <= set(keys)


def test_resume_may_change_the_eval_keys_and_nothing_that_moves_the_weights():
    from fastmveb.config import to_dict
    from fastmveb.rundir import RunDirError, check_resume, config_changes
    old = to_dict(load_config(None))
    new = to_dict(load_config(None, ["eval.size=64", "eval.crop_ratio=0.9", "eval.knn_max_train=100"]))
    assert config_changes(old, new) == ([], ["eval.crop_ratio", "eval.knn_max_train", "eval.size"])
    assert check_resume(old, new, "ckpt") == ["eval.crop_ratio", "eval.knn_max_train", "eval.size"]
    with pytest.raises(RunDirError, match="views.global_size"):
        check_resume(old, to_dict(load_config(None, ["views.global_size=192"])), "ckpt")


def test_a_key_added_since_a_checkpoint_is_no_change_at_its_default_and_a_removed_key_is(monkeypatch):
    """An upgrade that adds a key (at a default keeping today's behaviour) stopped every resume with
    `views.erase_p None -> 0.0; these change the training trajectory`."""
    from fastmveb import config
    from fastmveb.config import to_dict
    from fastmveb.rundir import RunDirError, check_resume, config_changes
    from newer_config import NewerConfig
    old = to_dict(load_config(None))                                  # written before the key existed
    monkeypatch.setattr(config, "Config", NewerConfig)
    new = to_dict(load_config(None))
    assert new["views"]["erase_p"] == 0.0 and "erase_p" not in old["views"]
    assert config_changes(old, new) == ([], []) and check_resume(old, new, "ckpt") == []
    with pytest.raises(RunDirError, match=r"views.erase_p <absent> -> 0.5; these change the training trajectory"):
        check_resume(old, to_dict(load_config(None, ["views.erase_p=0.5"])), "ckpt")
    # a key the checkpoint has and this version does not (removed or renamed since): still a change, in one line
    with pytest.raises(RunDirError, match=r"views.erase_p 0.0 -> <absent>"):
        check_resume(new, old, "ckpt")
