"""Timing benchmarks, one module per stage (stage_NAME.py):
``python -m fastmveb.bench {all,loader,views,entropy,step,ramp,train,profile,report}``.

Each stage module exposes ``add_args(parser)`` and ``main(args) -> dict``; results are printed as a markdown
table and written as JSON (device, torch version, date, settings) under benchmarks/results/. What the stages
share (settings flags, the run config of a benchmark, construction as training builds, thread pinning, memory,
results writing, data generation) is in common.py; reference/ holds the released pipeline re-derived
(released_*.py), the baseline the stages compare against.
"""
