"""fastmveb.errors: how every command ends. A command run as its process (console script or `python -m`) ends
through run_cli the same way either way: same exit status, numba's finalizer noise silenced; a caller passing
an argv list gets the status back."""
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

from fastmveb.errors import UserError, quiet_numba_finalizers, run_cli

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _env():
    # The worktree's code wins over an installed copy, in the console script too.
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1")


def _run(cmd) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def test_console_script_and_python_m_end_the_same(tmp_path):
    """fastmveb-eval (a console script: `sys.exit(cli())`) and `python -m fastmveb.eval` give one error line, the
    same status, and nothing after it (no KeyError traceback from numba's finalizers at interpreter exit)."""
    argv = ["knn", "--run", str(tmp_path / "nope")]
    script = BIN / "fastmveb-eval"
    console = ([str(script)] if script.is_file() else
               [sys.executable, "-c", "import sys; from fastmveb.eval.__main__ import cli; sys.exit(cli())"])
    results = {"console script": _run(console + argv), "python -m": _run([sys.executable, "-m", "fastmveb.eval",
                                                                         *argv])}
    for how, r in results.items():
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (how, r.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("error: ") and "nope" in lines[0], (how, r.stderr[-2000:])
        assert "KeyError" not in r.stderr and "Traceback" not in r.stderr, how


# A command whose main returns 3 after registering an exit hook: whether the interpreter's teardown ran shows.
_ENDING = r'''
import atexit, sys
if sys.argv[1] == "numba":
    import numba  # noqa: F401
from fastmveb.errors import run_cli
atexit.register(lambda: print("teardown ran", flush=True))
argv = None if sys.argv[2] == "none" else []
status = run_cli(lambda a: 3, argv)
print("returned", status, flush=True)
sys.exit(status)
'''


@pytest.mark.parametrize("numba,argv,out", [
    ("numba", "none", ""),                                        # the process: ends in run_cli, no teardown
    ("plain", "none", "returned 3\nteardown ran\n"),              # no numba: sys.exit as before
    ("numba", "list", "returned 3\nteardown ran\n"),              # an argv list (tests): the status comes back
])
def test_a_command_that_is_its_process_ends_in_run_cli_when_numba_is_loaded(numba, argv, out):
    r = _run([sys.executable, "-c", _ENDING, numba, argv])
    assert (r.returncode, r.stdout) == (3, out), r.stderr[-2000:]


def test_end_runs_before_the_status_comes_back():
    seen = []
    assert run_cli(lambda a: 0, [], end=lambda s: seen.append(s) or 7) == 7 and seen == [0]

    def bad(argv):
        raise UserError("a problem; the fix")
    assert run_cli(bad, [], end=lambda s: s + 1) == 3                     # a user error's status goes through end


def _unraisable(exc_type, filename: str):
    """An unraisable-exception record like the interpreter's, raised from code that claims to live in ``filename``."""
    try:
        exec(compile(f"raise {exc_type.__name__}('x')", filename, "exec"))
    except exc_type as e:
        return types.SimpleNamespace(exc_type=exc_type, exc_value=e, exc_traceback=e.__traceback__, err_msg=None,
                                     object=None)


def test_only_numbas_finalizer_key_error_is_dropped(monkeypatch):
    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    quiet_numba_finalizers()
    quiet_numba_finalizers()                                              # once installed, not twice
    numba_key = _unraisable(KeyError, "/site-packages/numba/core/dispatcher.py")
    other_key = _unraisable(KeyError, "/site-packages/mylib/cache.py")
    numba_value = _unraisable(ValueError, "/site-packages/numba/core/dispatcher.py")
    for u in (numba_key, other_key, numba_value):
        sys.unraisablehook(u)
    assert seen == [other_key, numba_value]
