"""Run under torchrun (2 CPU ranks): the DDP-wrapped MultiView network must produce gradients equal to the
average of what each rank computes alone on its own views (several backbone calls in one forward included),
and gradient accumulation over two micro-batches (the first under accelerator.no_sync) must give the same."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import Accelerator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fastmveb.config import ModelConfig  # noqa: E402
from fastmveb.loss import mveb_loss  # noqa: E402
from fastmveb.model import MVEBModel  # noqa: E402
from fastmveb.build import MultiView  # noqa: E402
from fastmveb.compat import exit_now  # noqa: E402


def objective(net, v, t, group="local"):
    _, p, _ = net(v)
    z = [F.normalize(x.float(), dim=1) for x in p]
    return mveb_loss(z, t, lam=0.01, group=group)[0]


def main(out: str, model_cfg: str = '{"arch": "resnet10"}'):
    """``model_cfg``: the backbone's ModelConfig fields as JSON (a ResNet-10 by default)."""
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    cfg = ModelConfig(**json.loads(model_cfg), proj_hidden=32, proj_out=32)
    model = MVEBModel.from_config(cfg)
    local = MultiView(MVEBModel.from_config(cfg))
    local.model.load_state_dict(model.state_dict())
    net = acc.prepare(MultiView(model))
    g = torch.Generator().manual_seed(100 + acc.process_index)        # different data on each rank
    v = [torch.randn(8, 3, 32, 32, generator=g) for _ in range(2)] + [torch.randn(8, 3, 16, 16, generator=g)]
    t = [F.normalize(torch.randn(8, 32, generator=g), dim=1) for _ in range(2)]
    objective(net, v, t).backward()
    objective(local, v, t).backward()
    worst = 0.0
    for (name, p_ddp), p_loc in zip(net.module.named_parameters(), local.parameters()):
        ref = p_loc.grad.clone()
        dist.all_reduce(ref)
        ref /= acc.num_processes
        worst = max(worst, (p_ddp.grad - ref).abs().max().item() / (ref.abs().max().item() + 1e-12))
    differs = torch.tensor([float(sum(p.grad.abs().sum() for p in local.parameters()))])
    all_d = [torch.zeros(1) for _ in range(acc.num_processes)]
    dist.all_gather(all_d, differs)
    accum_err, unsynced = accumulation(acc, net, local, v, t)
    if acc.is_main_process:
        Path(out).write_text(json.dumps({"world": acc.num_processes, "max_rel_err": worst, "arch": cfg.arch,
                                         "params": sum(p.numel() for p in model.parameters()),
                                         "local_grad_sums": [float(x) for x in all_d],
                                         "accum_max_rel_err": accum_err, "first_micro_step_unsynced": unsynced}))
    # Every collective is done on both ranks once they pass the barrier: end here, without freeing the process
    # group (torch 2.11's gloo destructor can deadlock; fastmveb.compat.end_process says why).
    acc.wait_for_everyone()
    exit_now(0)


def accumulation(acc, net, local, v, t):
    """Two half-batches under DDP, the first inside accelerator.no_sync, each loss weighted 1/2, against the
    rank-average of the full-batch gradient. BN in eval mode (a micro-batch is normalised as the full batch)
    and entropy groups of 4 rows (the same groups either way)."""
    net.eval()
    local.eval()
    with torch.no_grad():                 # the same running statistics everywhere (DDP broadcasts rank 0's)
        for b_ddp, b_loc in zip(net.module.buffers(), local.buffers()):
            dist.broadcast(b_ddp, 0)
            b_loc.copy_(b_ddp)
    for m in (net, local):
        m.zero_grad(set_to_none=True)
    objective(local, v, t, group=4).backward()
    halves = [([x[:4] for x in v], [y[:4] for y in t]), ([x[4:] for x in v], [y[4:] for y in t])]
    with acc.no_sync(net):
        (0.5 * objective(net, *halves[0], group=4)).backward()
    g = torch.tensor([float(sum(p.grad.double().sum() for p in net.module.parameters()))])
    gs = [torch.zeros(1, dtype=g.dtype) for _ in range(acc.num_processes)]
    dist.all_gather(gs, g)
    unsynced = bool(gs[0] != gs[1])                                 # no all-reduce yet: ranks still differ
    (0.5 * objective(net, *halves[1], group=4)).backward()
    worst = 0.0
    for p_ddp, p_loc in zip(net.module.parameters(), local.parameters()):
        ref = p_loc.grad.clone()
        dist.all_reduce(ref)
        ref /= acc.num_processes
        worst = max(worst, (p_ddp.grad - ref).abs().max().item() / (ref.abs().max().item() + 1e-12))
    return worst, unsynced


if __name__ == "__main__":
    main(*sys.argv[1:3])
