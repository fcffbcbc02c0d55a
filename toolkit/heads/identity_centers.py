# Single-process identity-center layer over all classes: the reference the sharded head is tested against.
"""Training uses ShardedIdentityCenterHead (partial_fc.py), which on one process computes the same loss.
This head keeps every class and the full B x C logits, so its loss is the plain formula; tests compare the
sharded head, the kernels and the trainer with it.
"""

from __future__ import annotations

import torch
from torch import nn

from toolkit.heads.margin import Margin, margin_softmax_ce_reference


class ReferenceIdentityCenterHead(nn.Module):
    """C x D class centers, fp32, initialised N(0, 0.01); forward returns the mean margin-softmax loss."""

    def __init__(self, num_classes: int, embedding_size: int, margin: Margin):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.margin = margin
        self.centers_CD = nn.Parameter(torch.empty(num_classes, embedding_size).normal_(0.0, 0.01))

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        # The loss is computed in fp32 even under autocast: logits reach |s| = 64 and exp() needs the range.
        with torch.autocast(device_type=emb_BD.device.type, enabled=False):
            return margin_softmax_ce_reference(emb_BD, self.centers_CD, labels_B, self.margin)

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, embedding_size={self.centers_CD.shape[1]}, margin={self.margin}"
