"""Timing benchmarks: ``python -m fastmveb.bench STAGE [--short] [--device cpu|cuda] [--out-dir DIR]``.

STAGE is one of loader, views, entropy, step, train, profile, or all (every stage in one run on one machine, then
the results table), or ramp (the step at every size of progressive-resolution schedules; not part of all), or
report (only rebuild the table). Each stage prints a markdown table and writes JSON +
markdown under benchmarks/results/; ``report`` writes benchmarks/results/README.md from the JSON files.
``all`` runs each stage in its own process (fastmveb/bench/runner.py, the GPU check's runner too: a stage's
threads, compile caches and memory high-water marks do not leak into the next), passes every option on (each
stage ignores the ones it does not know), goes on after a failing stage and exits non-zero if any failed.
``make bench`` runs ``all``; ``--short`` makes every stage CI-sized.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import tempfile

from fastmveb.bench.runner import Ctx, Stage, run_stages
from fastmveb.errors import UserError, print_error, run_cli

COMMANDS = ["loader", "views", "entropy", "step", "train", "profile", "ramp", "all", "report"]


def _parser(name: str, mod) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m fastmveb.bench {name}", description=mod.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="CI-friendly sizes")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    mod.add_args(parser)
    return parser


def stage_module(name: str):
    """The module of the stage (or ``report``) a user names: fastmveb/bench/stage_NAME.py."""
    return importlib.import_module(f"fastmveb.bench.stage_{name}")


def run_stage(name: str, rest: list[str], lenient: bool = False):
    """One stage from its command line; ``lenient``: options it does not know are ignored (``all``)."""
    mod = stage_module(name)
    parser = _parser(name, mod)
    args, unknown = parser.parse_known_args(rest)
    if unknown and not lenient:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    return mod.main(args)


def _cli_stage(name: str) -> Stage:
    def fn(ctx, res):
        run_stage(name, ctx.argv, lenient=True)
        res.set(done=True)
    return Stage(name, fn, keys=("done",))


STAGES = [_cli_stage(n) for n in ("loader", "views", "entropy", "step", "train", "profile")]   # `all`, in order


def run_all(rest: list[str]) -> int:
    with tempfile.TemporaryDirectory(prefix="fastmveb-bench-") as work:
        entries = run_stages(Ctx("fastmveb.bench.__main__", work, argv=rest), STAGES,
                             lambda text: print(text, end="", flush=True))
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--out-dir", default=None)
    from fastmveb.bench import stage_report as report
    print(f"wrote {report.build(out.parse_known_args(rest)[0].out_dir)}")
    failed = [k for k, v in entries.items() if v["status"] != "ok"]
    if failed:                     # not bad input: the run could not finish (exit 1, each stage said why)
        print_error(f"stage(s) failed: {', '.join(failed)}")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in COMMANDS:
        raise UserError(f"unknown benchmark '{stage}'; choose one of {', '.join(COMMANDS)}")
    if stage == "all":
        if "-h" in rest or "--help" in rest:        # not a run of every stage with --help passed on
            print(__doc__.strip())
            return 0
        return run_all(rest)
    run_stage(stage, rest)
    return 0


def cli(argv: list[str] | None = None) -> int:
    """``fastmveb-bench``: main with a UserError as one ``error: ...`` line and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())
