"""Run under torchrun (2 CPU gloo ranks): the distributed kNN monitor equals one process over the whole sets."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastmveb.compat import exit_now  # noqa: E402
from fastmveb.data import eval_loader  # noqa: E402
from fastmveb.eval.features import PixelStats  # noqa: E402
from fastmveb.eval.knn import KnnOptions, distributed_knn, knn_eval  # noqa: E402
from fastmveb.model import build_backbone  # noqa: E402

STATS = PixelStats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def main(betons: str, out: str):
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    backbone, _ = build_backbone("resnet10")
    b = Path(betons)
    # 160 + 40 images over 2 ranks, batch 24: shards of 80 / 20 rows; 50 and 30 caps make padded, odd shards.
    results = {}
    for max_train, max_val in ((None, None), (101, 29)):
        loaders = [eval_loader(b / f, 24, 1, "cpu", size=32, distributed=True) for f in ("train.beton", "val.beton")]
        opts = KnnOptions(k=10, T=0.1, max_train=max_train, max_val=max_val)
        r32 = distributed_knn(backbone, *loaders, "cpu", STATS, opts, feature_dtype=torch.float32)
        loaders = [eval_loader(b / f, 24, 1, "cpu", size=32, distributed=True) for f in ("train.beton", "val.beton")]
        r16 = distributed_knn(backbone, *loaders, "cpu", STATS, opts)
        single = None
        if dist.get_rank() == 0:
            loaders = [eval_loader(b / f, 24, 1, "cpu", size=32) for f in ("train.beton", "val.beton")]
            single = knn_eval(backbone, *loaders, "cpu", STATS, opts)
        results[str((max_train, max_val))] = {"dist_fp32": r32, "dist_bf16": r16, "single": single}
    every = [None, None]
    dist.all_gather_object(every, results)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(every))
    dist.barrier()                        # end without freeing the process group (fastmveb.compat.end_process)
    exit_now(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
