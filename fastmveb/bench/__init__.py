"""Timing benchmarks, one module per stage:
``python -m fastmveb.bench {all,loader,views,entropy,step,train,profile,report}``.

Each stage module exposes ``add_args(parser)`` and ``main(args) -> dict``; results are printed as a markdown
table and written as JSON (device, torch version, date, settings) under benchmarks/results/.
"""
