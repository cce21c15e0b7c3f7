"""The commands as Python users expect them: [project.scripts] console scripts, `python -m fastmveb.train`,
`accelerate launch -m fastmveb.train` and `accelerate launch fastmveb/train.py` all run the same main()."""
import importlib
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
DRY = ["--rc", str(ROOT / "rcs/tiny.yaml"), "--dry-run"]


def test_every_console_script_points_at_a_main():
    assert {"fastmveb-train", "fastmveb-eval", "fastmveb-export", "fastmveb-prep"} <= set(SCRIPTS)
    for name, target in SCRIPTS.items():
        module, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), name


def test_every_command_reports_bad_input_through_run_cli(tmp_path, capsys):
    """One path for user errors: each main raises a UserError, and its console script (cli = errors.run_cli(main))
    prints it once as `error: ...` and exits 2. The GPU check, run as `python -m`, goes the same way."""
    from fastmveb.errors import UserError
    nope = str(tmp_path / "nope")
    bad = {"fastmveb-eval": ["knn", "--run", nope], "fastmveb-export": ["--run", nope, "--out", nope + ".pth"],
           "fastmveb-report": ["--run", nope], "fastmveb-bench": ["nope"],
           "fastmveb-demo": ["report", "--readme", nope + ".md"], "fastmveb-prep": ["auto", "--data", nope],
           "gpu_check": ["--out", str(tmp_path / "gc"), "--work", str(tmp_path / "w"), "--only", "nope"]}
    targets = dict(SCRIPTS, gpu_check="fastmveb.bench.gpu_check:cli")
    assert set(targets) - set(bad) == {"fastmveb-train"}                # a new command gets its line here
    for name, argv in bad.items():
        module, _, func = targets[name].partition(":")
        mod = importlib.import_module(module)
        assert func == "cli", name
        with pytest.raises(UserError):
            mod.main(argv)
        capsys.readouterr()
        assert mod.cli(argv) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and "Traceback" not in err[0], (name, err)


def _run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_training_entry_points_print_the_same_plan(tmp_path):
    forms = {
        "console script": [str(BIN / "fastmveb-train"), *DRY],
        "python -m": [sys.executable, "-m", "fastmveb.train", *DRY],
        "accelerate launch -m": [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "1",
                                 "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                 "-m", "fastmveb.train", *DRY],
        "accelerate launch file": [str(BIN / "accelerate"), "launch", "--cpu", "--num_processes", "1",
                                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                   "fastmveb/train.py", *DRY],
    }
    plans = {}
    for form, cmd in forms.items():
        r = _run(cmd)
        assert r.returncode == 0, (form, r.stderr[-2000:])
        plans[form] = r.stdout
    assert "global batch" in plans["python -m"]
    assert len(set(plans.values())) == 1, plans
    # A bad override is one line through the console script too.
    r = _run([str(BIN / "fastmveb-train"), *DRY, "train.log_every=0"])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and "train.log_every" in r.stderr


def test_make_test_takes_its_workers_from_test_workers():
    """`make test TEST_WORKERS=N` runs the suite on N pytest-xdist workers (CI: the default, 2); 0 runs it in one
    process. The command make prints is run as printed, on one small file."""
    import shlex
    def make_n(*args) -> str:                     # the pytest line `make -n` prints (also when run under make)
        out = subprocess.run(["make", "--no-print-directory", "-n", "test", *args], cwd=ROOT, capture_output=True,
                             text=True, timeout=60).stdout
        return next(ln for ln in out.splitlines() if " -m pytest " in ln)
    cmd = make_n("TEST_WORKERS=0", "PYTEST_ARGS=tests/test_loss.py -p no:cacheprovider")
    assert cmd.endswith('-m "not slow and not gpu" -n 0 --dist loadscope tests/test_loss.py -p no:cacheprovider'), cmd
    r = _run(shlex.split(cmd))
    assert r.returncode == 0 and " passed" in r.stdout and "workers" not in r.stdout, r.stdout[-2000:]
    assert "-n 2 --dist loadscope" in make_n()
