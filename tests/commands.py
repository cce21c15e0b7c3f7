"""A command's cli(argv) run in the test process: its exit status, stdout and stderr as a CompletedProcess.

For checks that end before an accelerator or data exist (plans, argument and config errors) or that need no
process of their own (eval, report), this costs milliseconds instead of a ~10 s interpreter start. Each command
keeps one test of its real command line (exit status and stderr through the interpreter)."""
import io
import os
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from unittest import mock


def in_process(cli, *argv, env_extra=None) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    with mock.patch.dict(os.environ, env_extra or {}), redirect_stdout(out), redirect_stderr(err):
        rc = cli([str(a) for a in argv])
    return subprocess.CompletedProcess(argv, rc, out.getvalue(), err.getvalue())


def train_cli(*argv, env_extra=None) -> subprocess.CompletedProcess:
    """`train.py ARGV` (test_plan's test_real_run_with_a_non_dividing_batch_stops_with_one_line: the real one)."""
    from fastmveb.train import cli
    return in_process(cli, *argv, env_extra=env_extra)


def eval_cli(*argv) -> subprocess.CompletedProcess:
    """`python -m fastmveb.eval ARGV` (test_eval's test_cli_missing_run_dir_is_one_line_error: the real one)."""
    from fastmveb.eval.__main__ import cli
    return in_process(cli, *argv)
