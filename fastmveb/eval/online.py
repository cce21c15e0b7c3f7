"""Online monitors used during pretraining: a linear probe on detached features, and a cheap kNN.

    probe = OnlineLinearProbe(feat_dim, num_classes)          # its params go into the trainer's optimiser
    probe_loss, top1 = probe(h, y)                            # h: backbone features of a (global) view
    loss = loss + probe_loss                                  # cannot change the backbone's gradients

The probe reads h.detach(), so adding its loss to the objective leaves every backbone / projector gradient
bit-for-bit unchanged; it only trains itself. A non-affine BatchNorm in front of the linear layer makes the
probe insensitive to the feature scale, which drifts during pretraining (and to the trainer's lr/LARS
settings, which were chosen for the encoder, not for a classifier). ``head_state()`` folds that BatchNorm
into the linear layer, giving a plain fc on raw features that ``fastmveb.export`` can ship as the
torchvision fc.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmveb.eval.knn import knn_eval


class OnlineLinearProbe(nn.Module):
    """BatchNorm1d(affine=False) + Linear on detached features; forward(h, y) -> (loss, top-1 % as a 0-d tensor)."""

    def __init__(self, feat_dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(feat_dim, affine=False)
        self.fc = nn.Linear(feat_dim, num_classes)
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.zeros_(self.fc.bias)

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # fp32 whatever the trainer's autocast: the probe is tiny and bf16 logits hurt its accuracy signal.
        with torch.autocast(device_type=h.device.type, enabled=False):
            logits = self.fc(self.bn(h.detach().float().flatten(1)))
            y = y.reshape(-1).long()
            loss = F.cross_entropy(logits, y)
        # Stays a tensor: the trainer reads it only at logging steps (no host sync per step).
        top1 = (logits.detach().argmax(dim=1) == y).float().mean() * 100.0
        return loss, top1

    @torch.no_grad()
    def head_state(self) -> dict[str, torch.Tensor]:
        """{'weight', 'bias'} of one Linear on raw features equal to fc(bn(h)) in eval mode."""
        inv = (self.bn.running_var + self.bn.eps).rsqrt()
        w = self.fc.weight * inv[None, :]
        b = self.fc.bias - w @ self.bn.running_mean
        return {"weight": w.float().cpu().clone(), "bias": b.float().cpu().clone()}


def online_knn(backbone, train_loader, val_loader, device, mean, std, k: int = 200, T: float = 0.1,
               max_train: int | None = None, max_val: int | None = 10000, amp_dtype=None, gather: bool = False) -> dict:
    """kNN monitor during training: knn_eval on a prefix of the eval loaders; -> {"knn_top1", "knn_top5"}.

    Keys carry the metrics.jsonl names, so the trainer can log the dict as it is.
    """
    r = knn_eval(backbone, train_loader, val_loader, device, mean, std, k=k, T=T, max_train=max_train,
                 max_val=max_val, amp_dtype=amp_dtype, gather=gather)
    return {"knn_top1": r["top1"], "knn_top5": r["top5"]}
