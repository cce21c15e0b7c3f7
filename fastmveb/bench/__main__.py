"""Timing benchmarks: ``python -m fastmveb.bench STAGE [--short] [--device cpu|cuda] [--out-dir DIR]``.

STAGE is one of loader, views, entropy, step, train, profile, or all (every stage in one run on one machine, then
the results table), or ramp (the step at every size of progressive-resolution schedules; not part of all), or
report (only rebuild the table). Each stage prints a markdown table and writes JSON +
markdown under benchmarks/results/; ``report`` writes benchmarks/results/README.md from the JSON files.
``all`` runs each stage in its own process (a stage's threads, compile caches and memory high-water marks
do not leak into the next), passes every option on (each stage ignores the ones it does not know), goes on
after a failing stage and exits non-zero if any failed. ``make bench`` runs ``all``; ``--short`` makes
every stage CI-sized.
"""
from __future__ import annotations

import argparse
import importlib
import subprocess
import sys
import time

from fastmveb.errors import UserError, print_error, run_cli

STAGES = ["loader", "views", "entropy", "step", "train", "profile"]     # what `all` runs, in this order
COMMANDS = STAGES + ["ramp", "all", "report"]
_LENIENT = "--ignore-unknown-args"   # set by `all` for its per-stage processes


def _parser(name: str, mod) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m fastmveb.bench {name}", description=mod.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--short", action="store_true", help="CI-friendly sizes")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
    parser.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
    mod.add_args(parser)
    return parser


def run_stage(name: str, rest: list[str]):
    lenient = _LENIENT in rest
    rest = [a for a in rest if a != _LENIENT]
    mod = importlib.import_module(f"fastmveb.bench.{name}")
    parser = _parser(name, mod)
    args, unknown = parser.parse_known_args(rest)
    if unknown and not lenient:
        parser.error(f"unrecognised arguments: {' '.join(unknown)}")
    return mod.main(args)


def run_all(rest: list[str]) -> int:
    failed = []
    for name in STAGES:
        print(f"\n==== fastmveb.bench {name} ====", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call([sys.executable, "-m", "fastmveb.bench", name, *rest, _LENIENT])
        print(f"==== {name}: {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {time.perf_counter() - t0:.0f} s ====",
              flush=True)
        if rc != 0:
            failed.append(name)
    out = argparse.ArgumentParser(add_help=False)
    out.add_argument("--out-dir", default=None)
    from fastmveb.bench import report
    print(f"wrote {report.build(out.parse_known_args(rest)[0].out_dir)}")
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
