"""Timing benchmarks: ``python -m fastmveb.bench STAGE [--short] [--device cpu|cuda]``.

STAGE is one of loader, views, entropy, step, train, or all (every stage in one run on one machine).
Each prints a markdown table and writes JSON + markdown under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import importlib
import sys

STAGES = ["loader", "views", "entropy", "step", "train"]


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES + ["all"]:
        print(f"error: unknown benchmark '{stage}'; choose one of {', '.join(STAGES + ['all'])}", file=sys.stderr)
        return 2
    todo = STAGES if stage == "all" else [stage]
    for name in todo:
        mod = importlib.import_module(f"fastmveb.bench.{name}")
        parser = argparse.ArgumentParser(prog=f"python -m fastmveb.bench {name}")
        parser.add_argument("--short", action="store_true", help="CI-friendly sizes")
        parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda if available)")
        parser.add_argument("--out-dir", default=None, help="results folder (default benchmarks/results)")
        mod.add_args(parser)
        args, unknown = parser.parse_known_args(rest)
        if unknown and stage != "all":
            parser.error(f"unrecognised arguments: {' '.join(unknown)}")
        mod.main(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
