"""The online monitor trained during pretraining: a linear probe on detached features (the kNN monitor is
fastmveb.eval.knn.distributed_knn).

    probe = OnlineLinearProbe(feat_dim, num_classes)          # its params go into the trainer's optimiser
    probe_loss, top1 = probe(h, y)                            # h: backbone features of a (global) view
    loss = loss + probe_loss                                  # cannot change the backbone's gradients

The probe reads h.detach(), so adding its loss to the objective leaves every backbone / projector gradient
bit-for-bit unchanged; it only trains itself. A non-affine BatchNorm in front of the linear layer makes the
probe insensitive to the feature scale, which drifts during pretraining (and to the trainer's lr/LARS
settings, which were chosen for the encoder, not for a classifier). ``folded_head(probe.state_dict())`` folds
that BatchNorm into the linear layer, giving a plain fc on raw features that ``fastmveb.export`` ships as the
torchvision fc.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastmveb.eval.linear import fold_standardisation


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



def folded_head(state: dict | None) -> dict[str, torch.Tensor] | None:
    """{'weight', 'bias'} of one Linear on raw features equal to fc(bn(h)) in eval mode, from an
    OnlineLinearProbe state_dict (what checkpoints store); None when ``state`` is not one."""
    keys = {"bn.running_mean", "bn.running_var", "fc.weight", "fc.bias"}
    if not isinstance(state, dict) or not keys <= set(state):
        return None
    eps = nn.BatchNorm1d(1).eps                                      # the probe's BatchNorm1d keeps the default
    return fold_standardisation(state["fc.weight"], state["fc.bias"], state["bn.running_mean"],
                                (state["bn.running_var"].float() + eps).sqrt())
