"""fastmveb/train.py (its cli()), recording what every optimizer step consumes: one JSON line per step,
{"y": the labels of this rank's batch, "lr": the step's lr}, appended to $TRACE_DIR/rank$RANK.jsonl.
On a beton whose labels are the sample indices (tests/test_elastic.py) the labels ARE the samples read.

    TRACE_DIR=/tmp/t torchrun --nproc_per_node 2 tests/trace_worker.py --rc rcs/tiny.yaml key=value ...
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastmveb.train as T  # noqa: E402

_real = T.train_step


def _traced(parts, x, y, lr, *rest, **kw):
    out = Path(os.environ["TRACE_DIR"]) / f"rank{os.environ.get('RANK', '0')}.jsonl"
    with open(out, "a") as f:
        f.write(json.dumps({"y": y.tolist(), "lr": lr}) + "\n")
    return _real(parts, x, y, lr, *rest, **kw)


T.train_step = _traced
if __name__ == "__main__":
    sys.exit(T.cli(sys.argv[1:]))
