"""The evaluation commands (python -m fastmveb.eval knn|linear|finetune) on real runs and betons: one-line errors,
transfer betons, label-set checks, the flag table, the saved linear head and fine-tuning on two processes."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from fastmveb.errors import RunError
from fastmveb.eval.features import PixelStats
from commands import eval_cli
from test_eval import _run_dir

ROOT = Path(__file__).resolve().parents[1]


def test_cli_missing_run_dir_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "fastmveb.eval", "knn", "--run", str(tmp_path / "nope")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert lines[0].startswith("error:") and "not found" in lines[0] and "Traceback" not in r.stderr


def test_cli_no_checkpoint_is_one_line_error(tmp_path, capsys):
    from fastmveb.eval.__main__ import cli
    assert cli(["linear", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no checkpoint")
    assert not (tmp_path / "eval.jsonl").exists()


def test_resolve_checkpoint_errors(tmp_path):
    from fastmveb.checkpoint import load_run_backbone
    with pytest.raises(RunError, match="not found"):
        load_run_backbone(tmp_path, tmp_path / "missing.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="cannot read checkpoint"):
        load_run_backbone(tmp_path, tmp_path / "bad.pt")


def test_eval_and_export_skip_an_unreadable_newest_checkpoint(small_betons, tmp_path, capsys):
    """A newest step_*.pt cut short (full disk, a copy killed midway): eval and export fall back to the previous
    one and say in one line which they skipped, as training's resume does; --ckpt naming it: one error line, 2."""
    import json
    from fastmveb.eval.__main__ import cli
    from fastmveb.export import cli as export_cli
    run = _run_dir(tmp_path, small_betons)
    good, broken = run / "checkpoints" / "step_00000001.pt", run / "checkpoints" / "step_00000002.pt"
    broken.write_bytes(good.read_bytes()[:4096])
    assert cli(["knn", "--run", str(run), "--max-train", "40", "--max-val", "20", "--k", "5", "--num-workers", "1"]) == 0
    out, err = capsys.readouterr()
    assert [ln for ln in err.splitlines() if "step_00000002.pt" in ln] == [
        next(ln for ln in err.splitlines() if ln.startswith("warning: checkpoint") and "unreadable" in ln)]
    assert "step_00000001.pt" in out and json.loads((run / "eval.jsonl").read_text())["ckpt"] == "step_00000001.pt"
    assert export_cli(["--run", str(run), "--out", str(tmp_path / "bb.pth")]) == 0
    out, err = capsys.readouterr()
    assert "(step 1," in out and len([ln for ln in err.splitlines() if "step_00000002.pt" in ln]) == 1
    for main, args in ((cli, ["knn", "--run", str(run), "--num-workers", "1"]), (export_cli, ["--run", str(run),
                                                                                            "--out", str(tmp_path / "b2.pth")])):
        assert main([*args, "--ckpt", str(broken)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: cannot read checkpoint") and "step_00000002.pt" in err[0]


def test_a_checkpoint_of_another_arch_is_named(tmp_path, capsys):
    """A resnet10 checkpoint under a config that says resnet18: the error names both archs and the fix (torch's
    own message lists keys and names neither)."""
    from fastmveb.config import dump_config, load_config
    from fastmveb.eval.__main__ import cli
    from fastmveb.export import cli as export_cli
    run = _run_dir(tmp_path, tmp_path / "no-betons")                  # a resnet10 checkpoint
    dump_config(load_config(run / "config.yaml", ["model.arch=resnet18"]), run / "config.yaml")
    for main, args in ((cli, ["knn", "--run", str(run)]), (export_cli, ["--run", str(run), "--out",
                                                                      str(tmp_path / "x.pth")])):
        assert main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith("error: checkpoint ") and "step_00000001.pt holds a resnet10 backbone (" in err[0]
        assert "says resnet18" in err[0] and "model.arch: resnet10" in err[0]


def test_transfer_evaluation_on_other_betons(small_betons, unlabeled_betons, tmp_path, capsys):
    """--train-beton / --val-beton: any labelled betons, even when the run's own are gone; unlabeled ones refused."""
    import json
    from fastmveb.eval.__main__ import cli
    run = _run_dir(tmp_path, tmp_path / "moved")                       # the run's own betons do not exist
    assert cli(["knn", "--run", str(run), "--num-workers", "1"]) == 2
    assert "--train-beton" in capsys.readouterr().err
    a, b = str(small_betons / "val.beton"), str(small_betons / "train.beton")
    assert cli(["knn", "--run", str(run), "--train-beton", a, "--val-beton", b, "--max-val", "40", "--k", "5",
                 "--num-workers", "1"]) == 0
    rows = [json.loads(ln) for ln in (run / "eval.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["train_beton"], r["val_beton"]) for r in rows] == [("knn", a, b)]
    assert 0 <= rows[0]["top1"] <= 100
    capsys.readouterr()
    assert cli(["knn", "--run", str(run), "--train-beton", str(unlabeled_betons / "train.beton"), "--val-beton",
                 b, "--num-workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "has no labels" in err[0]


def test_finetune_subsets_are_class_balanced_seeded_or_listed():
    from fastmveb.eval.finetune import balanced_subset, default_epochs, subset_from_list
    labels = np.repeat(np.arange(4), [100, 200, 50, 1])
    idx = balanced_subset(labels, 0.1, seed=0)
    assert np.bincount(labels[idx]).tolist() == [10, 20, 5, 1]          # each class its share, at least one
    assert np.array_equal(idx, balanced_subset(labels, 0.1, seed=0))
    assert not np.array_equal(idx, balanced_subset(labels, 0.1, seed=1))
    assert (default_epochs(0.01), default_epochs(0.1)) == (60, 30)      # SimCLR's
    files = ["/d/train/n01/n01_1.JPEG", "/d/train/n02/n02_7.JPEG", "/d/train/a/x.jpg", "/d/train/b/x.jpg"]
    assert subset_from_list(files, ["n02_7.JPEG", "", "n01_1.JPEG", "b/x.jpg"]).tolist() == [0, 1, 3]
    with pytest.raises(ValueError, match="line 1: 'gone.JPEG' is not among"):
        subset_from_list(files, ["gone.JPEG"])
    with pytest.raises(ValueError, match="matches 2 files"):
        subset_from_list(files, ["x.jpg"])


def test_cli_finetune_on_a_listed_subset_and_its_errors(small_betons, tmp_path, capsys):
    import json
    from fastmveb.eval.__main__ import cli
    run = _run_dir(tmp_path, small_betons)
    files = (small_betons / "train.beton.files.txt").read_text().splitlines()
    subset = tmp_path / "subset.txt"
    # Synthetic file names repeat across classes (00010.jpg): name the class folder too, matched as a path suffix.
    subset.write_text("".join(f"{Path(f).parent.name}/{Path(f).name}\n" for f in files[:12]))
    assert cli(["finetune", "--run", str(run), "--subset", str(subset), "--epochs", "2", "--batch", "8",
                 "--lr", "0.1", "--val-every", "1", "--num-workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "finetune on 12 labelled images" in out and out.count("val top-1") == 2   # --val-every 1: both epochs
    rows = [json.loads(ln) for ln in (run / "eval.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["n_labelled"], r["batch"], r["epochs"]) for r in rows] == [("finetune", 12, 8, 2)]
    assert rows[0]["base_lr"] == 0.1 and 0 <= rows[0]["top1"] <= 100
    # --fraction / --random-init: the subset and the baseline (run end to end by the slow test in test_learning.py)
    # An image limit it would ignore, and a global batch that torchrun's WORLD_SIZE does not divide (refused before
    # any process group is made, so one process with the variable set stands in for each of torchrun's).
    for args, env, message in ((["--fraction", "1.5"], {}, "--fraction must be in (0, 1]"), ([], {}, "--fraction F"),
                               (["--fraction", "0.1", "--max-train", "10"], {}, "--max-train: only knn and linear"),
                               (["--fraction", "0.1", "--batch", "15"], {"WORLD_SIZE": "2"},
                                "--batch 15 does not split evenly over 2 processes; pass a multiple of 2")):
        with mock.patch.dict(os.environ, env):
            assert cli(["finetune", "--run", str(run), "--random-init", "--device", "cpu", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def _odd_val_beton(small_betons: Path, root: Path, n: int = 39) -> Path:
    """A labelled beton of the first ``n`` val JPEGs (dataset_prep's list mode): an odd count, so a 2-rank
    distributed sampler pads rank 1's shard with a repeat of sample 0."""
    from dataset_prep.convert import convert_folder
    from dataset_prep.options import BetonOptions
    jpegs = sorted((small_betons / "jpeg" / "val").glob("*/*.jpg"))[:n]
    lst = root / "val_list.txt"
    lst.write_text("".join(f"{p}\t{int(p.parent.name.split('_')[0])}\n" for p in jpegs))
    convert_folder(root / "odd", BetonOptions(max_side=128, num_workers=1, progress=False), list_file=lst)
    return root / "odd" / "train.beton"


def test_finetune_on_two_processes_counts_every_val_sample_once(small_betons, tmp_path, capsys):
    """torchrun --nproc_per_node 2 -m fastmveb.eval -- finetune (one gloo group; DDP over Accelerate): the same
    subset, the global batch split over the ranks, the same number of steps as one process, val sharded and
    gathered with the padding's repeat counted once, and rank 0 alone printing and recording the result."""
    import json
    from fastmveb.eval.__main__ import main
    run = _run_dir(tmp_path, small_betons)
    val = _odd_val_beton(small_betons, tmp_path)
    # 31 listed files over 2 ranks: the sampler pads rank 1 to 16, one more batch of 8 than the 31 // 16 = 1 step
    # that reads each file once; it is read and not trained on, as one process drops its partial batch.
    files = (small_betons / "train.beton.files.txt").read_text().splitlines()
    subset = tmp_path / "subset.txt"
    subset.write_text("".join(f"{Path(f).parent.name}/{Path(f).name}\n" for f in files[::5][:31]))
    args = ["finetune", "--run", str(run), "--val-beton", str(val), "--subset", str(subset), "--epochs", "2",
            "--batch", "16", "--num-workers", "1", "--device", "cpu"]
    assert main(args) == 0
    capsys.readouterr()
    # '--': torchrun's own --run-path would otherwise claim --run (argparse prefix matching)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        str(33500 + os.getpid() % 1000), "-m", "fastmveb.eval", "--", *args], cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    [line] = [ln for ln in r.stdout.splitlines() if ln.startswith("finetune on")]
    assert "batch 16 over 2 processes; val 39 images" in line, line
    assert r.stdout.count("finetune epoch 2/2") == 1                     # rank 0's log only
    one, two = [json.loads(ln) for ln in (run / "eval.jsonl").read_text().splitlines()]
    assert (one["processes"], two["processes"]) == (1, 2)
    for k in ("n_labelled", "batch", "steps", "epochs", "n_val"):
        assert one[k] == two[k], k
    assert two["n_val"] == 39 and two["n_labelled"] == 31 and two["steps"] == 2 * (31 // 16)
    for rec in (one, two):                                              # percentages of 39 samples
        for k in ("top1", "top5"):
            assert abs(rec[k] * 39 / 100 - round(rec[k] * 39 / 100)) < 1e-9, rec


# ---------------------------------------------------------------------------------------------- label sets
@pytest.fixture(scope="module")
def mismatched_betons(small_betons, tmp_path_factory) -> Path:
    """train.beton with labels 0, 1 (8 images each) beside val.beton with 0, 1, 2 (4 each): what dataset_prep
    wrote with exit 0 when every train image of a class was unreadable (now: only with --allow-label-mismatch)."""
    from dataset_prep.options import BetonOptions
    from dataset_prep.writer import write_beton
    out = tmp_path_factory.mktemp("mismatched")
    for name, classes, n in (("train", (0, 1), 8), ("val", (0, 1, 2), 4)):
        folders = sorted((small_betons / "jpeg" / name).iterdir())
        write_beton([(str(f), c) for c in classes for f in sorted(folders[c].iterdir())[:n]], out / f"{name}.beton",
                    BetonOptions(max_side=64, num_workers=1, progress=False))
    return out


def test_eval_and_training_refuse_a_val_label_the_train_beton_lacks(small_betons, mismatched_betons, tmp_path):
    """Before: knn/linear/finetune reported figures over a class the bank or head never saw (top-5 100% with a
    3-class bank), and training ran to its end-of-run kNN. Now one line naming the labels, exit 2, before any
    work; --allow-label-mismatch (transfer) measures and names them in one warning line."""
    from commands import train_cli
    m = mismatched_betons
    run = _run_dir(tmp_path, m)
    gap = (f"1 of the 3 labels of {m / 'val.beton'} (2; 4 of its 12 images) are not in {m / 'train.beton'} "
           "(labels 0, 1)")
    for cmd in (["knn"], ["linear"], ["finetune", "--fraction", "0.5"]):
        r = eval_cli(*cmd, "--run", run, "--num-workers", "1", "--device", "cpu")
        assert r.returncode == 2 and r.stderr.strip().splitlines() == [
            f"error: {gap}: nothing trained on the train side predicts them, so the figures would count classes "
            "never seen; use a train/val pair written together, or pass --allow-label-mismatch (transfer) to "
            "measure anyway"], r.stderr
    r = eval_cli("knn", "--run", run, "--train-beton", m / "train.beton", "--val-beton", small_betons / "val.beton",
                 "--num-workers", "1")                                   # transfer: the same rule
    assert r.returncode == 2 and "(2, 3; 20 of its 40 images) are not in" in r.stderr
    r = eval_cli("knn", "--run", run, "--k", "3", "--num-workers", "1", "--device", "cpu", "--allow-label-mismatch")
    assert r.returncode == 0, r.stderr[-2000:]
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("warning: --allow-label-mismatch")] == [
        f"warning: --allow-label-mismatch: {gap}; their images count in the figures"]
    r = train_cli("--rc", ROOT / "rcs/tiny.yaml", f"data.train_beton={m / 'train.beton'}",
                  f"data.val_beton={m / 'val.beton'}", "data.global_batch_size=8",
                  f"train.run_dir={tmp_path / 'runs'}")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {gap}: the kNN checks would count classes the bank never holds; write train and val together "
        "(dataset_prep), or train without them: eval.knn_at_end=false eval.knn_every_epochs=0"], r.stderr
    assert not (tmp_path / "runs").exists()


def test_eval_refuses_a_record_that_is_not_its_betons(small_betons, tmp_path):
    """A sidecar saying "labelled": false beside a labelled beton was used anyway; now the record is checked
    against the beton's label field on open."""
    import json
    import shutil
    from dataset_prep.integrity import sidecar_path
    copy = tmp_path / "val.beton"
    shutil.copy2(small_betons / "val.beton", copy)
    rec = json.loads(sidecar_path(small_betons / "val.beton").read_text())
    rec.pop("labels", None)                                             # as an older record, edited
    sidecar_path(copy).write_text(json.dumps(dict(rec, labelled=False)))
    run = _run_dir(tmp_path, small_betons)
    r = eval_cli("knn", "--run", run, "--val-beton", copy, "--num-workers", "1")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {copy} holds labels 0, 1, 2, 3 but its record val.beton.sha256.json says \"labelled\": false: the "
        "record is not this beton's; rewrite it with 'make beton FORCE=1' (or dataset_prep ... --force)"], r.stderr


# ---------------------------------------------------------------------------------------------- flags = config rules
# (command, flag, key, a value just outside the key's rule): every eval flag that sets a config key
BAD_FLAG_VALUES = [("knn", "--size", "eval.size", 7), ("knn", "--batch-size", "data.eval_batch_size", 0),
                   ("knn", "--num-workers", "data.num_workers", 0), ("knn", "--k", "eval.knn_k", 0),
                   ("knn", "--t", "eval.knn_t", 0.0), ("linear", "--epochs", "eval.linear_epochs", 0),
                   ("linear", "--lr", "eval.linear_base_lr", 0.0),
                   ("linear", "--micro-batch", "eval.linear_micro_batch", -1),
                   ("linear", "--linear-batch-size", "eval.linear_batch_size", 0)]


def test_the_flag_list_covers_every_flag_that_sets_a_config_key():
    """BAD_FLAG_VALUES is derived here from the eval command's own table and the keys' rules (choices: argparse
    takes them from the key, fastmveb.config.CHOICES)."""
    from fastmveb.config import RANGES, fields_of
    from fastmveb.eval.__main__ import FLAG_KEYS
    from fastmveb.eval.commands import COMMANDS
    types = {k: t for k, _, t in fields_of()}
    flags = [("knn", a, k) for a, k in FLAG_KEYS.items()] + [                  # linear's batch key: fast mode's
        (name, a, k) for name, c in COMMANDS.items() for a, k in c.flag_keys(argparse.Namespace(mode="fast"), None).items()]
    derived = [(cmd, "--" + attr.replace("_", "-"), key,
                types[key](RANGES[key].lo if RANGES[key].lo_open else RANGES[key].lo - 1))
               for cmd, attr, key in flags if key in RANGES]
    assert sorted(derived) == sorted(BAD_FLAG_VALUES)


@pytest.mark.parametrize("cmd, flag, key, value", BAD_FLAG_VALUES)
def test_eval_flags_obey_the_config_rules(cmd, flag, key, value, tmp_path):
    """`--k -3` was a traceback; `--k 0`, `--t 0`, `--size 2` ran and printed a figure the config refuses. Each
    flag that sets a config key is checked by that key's own rule: one line, exit 2, before anything is read."""
    from fastmveb.config import RANGES
    r = eval_cli(cmd, "--run", tmp_path / "nope", flag, value)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"error: {flag} must be in {RANGES[key]} ({key}), got {value!r}"], r.stderr


def test_eval_knn_minus_k_is_one_line(tmp_path):
    r = eval_cli("knn", "--run", tmp_path, "--k", "-3")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["error: --k must be in [1, inf] (eval.knn_k), got -3"]


# ---------------------------------------------------------------------------------------------- the saved head
def test_a_quick_probe_never_replaces_the_saved_head(small_betons, tmp_path):
    """Before: `eval linear` (a complete probe), then `--epochs 0 --max-train 64 --max-val 64 --no-log` overwrote
    linear_head.pt, and export shipped that untrained fc. A reduced or unlogged probe saves nothing; a complete
    one replaces the head of the same checkpoint only with a top-1 at least as high (or --replace-head), and the
    head carries its top-1 and settings, which export prints."""
    from commands import in_process
    from fastmveb.export import cli as export_cli
    run = _run_dir(tmp_path, small_betons)
    head = run / "linear_head.pt"
    common = ["--run", run, "--num-workers", "1", "--device", "cpu"]
    r = eval_cli("linear", *common, "--epochs", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    saved = torch.load(head, weights_only=True)
    assert f"head: saved {head} (top-1 {saved['top1']:.2f}%): export's fc" in r.stdout
    assert {k: saved[k] for k in ("ckpt", "which", "mode", "epochs", "size", "n_val")} == {
        "ckpt": "step_00000001.pt", "which": "online", "mode": "fast", "epochs": 2, "size": 32, "n_val": 40}
    before = head.read_bytes()
    for extra, why in ((["--max-train", "64", "--max-val", "16"], "a reduced probe (--max-train and --max-val) never "
                        "replaces a complete one"), (["--no-log"], "--no-log writes nothing to the run directory")):
        r = eval_cli("linear", *common, "--epochs", "1", *extra)
        assert r.returncode == 0 and f"head: not saved ({why}); linear_head.pt is unchanged" in r.stdout, r.stdout
        assert head.read_bytes() == before
    r = eval_cli("linear", *common, "--epochs", "1", "--no-log", "--replace-head")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        "error: --replace-head: this probe's head is not saved (--no-log writes nothing to the run directory)"]
    torch.save(dict(saved, top1=100.0), head)                           # a better saved head: kept
    before = head.read_bytes()
    r = eval_cli("linear", *common, "--epochs", "1")
    assert r.returncode == 0 and f"head: kept {head} (fast probe, top-1 100.00%, higher than this probe's" in r.stdout
    assert head.read_bytes() == before
    r = in_process(export_cli, "--run", run, "--out", tmp_path / "bb.pth")
    assert r.returncode == 0 and "fc: linear probe (fast, top-1 100.00%, linear_head.pt)" in r.stdout
    r = eval_cli("linear", *common, "--epochs", "1", "--replace-head")
    assert r.returncode == 0 and "head: saved" in r.stdout and "replacing one with top-1 100.00%" in r.stdout
    assert torch.load(head, weights_only=True)["top1"] < 100.0


# ---------------------------------------------------------------------------------------------- one home each
def test_eval_commands_come_from_one_table():
    """The subcommands are COMMANDS' names, and a name outside it is one error line: `run` was an if/elif whose
    final else ran a linear probe for any other name."""
    from fastmveb.eval.__main__ import _parser, run
    from fastmveb.eval.commands import COMMANDS
    sub = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == list(COMMANDS) == ["knn", "linear", "finetune"]
    with pytest.raises(RunError, match="unknown evaluation 'probe': choose one of knn, linear, finetune"):
        run(argparse.Namespace(cmd="probe", run="nowhere"))


def test_eval_flags_leave_their_defaults_to_the_config_and_the_option_objects():
    """A flag's default lives in one place: EvalConfig (read from the run's config) or the option object of the
    protocol (LinearFullOptions, FinetuneOptions, finetune.BATCH); the parser leaves each such flag at None."""
    from fastmveb.eval.__main__ import _parser
    settings = ("k", "t", "mode", "epochs", "lr", "linear_batch_size", "micro_batch", "val_every", "trust_coef",
                "batch", "optimizer", "layer_decay", "size", "batch_size", "num_workers")
    for cmd in ("knn", "linear", "finetune"):
        args = vars(_parser().parse_args([cmd, "--run", "r"]))
        assert {a: args[a] for a in settings if a in args} == {a: None for a in settings if a in args}, cmd


def test_eval_loaders_read_the_config(small_betons):
    """The one builder of evaluation loaders (offline eval, training's kNN, the report): centre crops of eval.size
    in batches of data.eval_batch_size; a bad batch is one RunError line."""
    from fastmveb.config import Config
    from fastmveb.eval.features import eval_loaders
    cfg = Config()
    cfg.data.train_beton, cfg.data.val_beton = str(small_betons / "train.beton"), str(small_betons / "val.beton")
    cfg.eval.size, cfg.data.eval_batch_size, cfg.data.num_workers = 24, 5, 1
    (val,) = eval_loaders(cfg, "cpu", betons=("val",))
    x, y = next(iter(val))
    assert tuple(x.shape) == (5, 3, 24, 24) and x.dtype == torch.uint8 and len(val) == 8    # 40 val images
    assert [len(loader) for loader in eval_loaders(cfg, "cpu")] == [32, 8]
    cfg.data.eval_batch_size = 0
    with pytest.raises(RunError, match="batch_size must be >= 1"):
        eval_loaders(cfg, "cpu")
    assert PixelStats.of(cfg) == PixelStats(tuple(cfg.views.mean), tuple(cfg.views.std))
