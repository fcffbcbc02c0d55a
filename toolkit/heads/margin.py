# Combined angular/cosine margin on target logits and the plain-PyTorch margin softmax reference.
"""Margins on the target cosine c = cos(theta) of each row's own class:

    target logit = s * (cos(m1 * theta + m2) - m3)

covers ArcFace (m2), CosFace (m3) and the multiplicative margin m1. When m1 * theta + m2 passes pi,
cos(.) would start to grow again as theta grows; there we fall back to c - m2 * sin(m2) - m3 so the
target logit keeps decreasing in theta (the usual ArcFace fallback, extended by m3).

`margin_softmax_ce_reference` is the ground truth for the sharded head and the fused kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Margin:
    """Combined margin parameters (m1, m2, m3) and scale s."""

    scale: float = 64.0
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.4

    @property
    def uses_angle(self) -> bool:
        """Whether the target needs theta = acos(c) (m1 or m2 set) or only the cosine margin m3."""
        return self.m1 != 1.0 or self.m2 != 0.0


# acos has an infinite slope at c = +-1; keep c a hair inside so the gradient stays finite.
_ACOS_EPS = 1e-7


def apply_margin_to_target(cos_target: torch.Tensor, margin: Margin) -> torch.Tensor:
    """Unscaled margin target cos(m1*theta + m2) - m3 (with the fallback) from the target cosine c."""
    if not margin.uses_angle:
        return cos_target - margin.m3
    theta = torch.acos(cos_target.clamp(-1.0 + _ACOS_EPS, 1.0 - _ACOS_EPS))
    angle = margin.m1 * theta + margin.m2
    with_margin = torch.cos(angle)
    fallback = cos_target - margin.m2 * math.sin(margin.m2)
    return torch.where(angle <= math.pi, with_margin, fallback) - margin.m3


def cosine_logits(emb_BD: torch.Tensor, centers_CD: torch.Tensor) -> torch.Tensor:
    """Cosine similarities of normalised embeddings with normalised centers: B x C."""
    return F.normalize(emb_BD, dim=1) @ F.normalize(centers_CD, dim=1).t()


def margin_logits(cos_BC: torch.Tensor, labels_B: torch.Tensor, margin: Margin) -> torch.Tensor:
    """Scaled logits with the margin applied to each row's target column (labels -1 get no margin)."""
    has_target_B = labels_B >= 0
    rows = torch.nonzero(has_target_B, as_tuple=True)[0]
    cols = labels_B[rows]
    target = apply_margin_to_target(cos_BC[rows, cols], margin)
    # index_put keeps the op out-of-place for autograd; one new B x C tensor, as in the naive reference.
    logits_BC = cos_BC.index_put((rows, cols), target)
    return logits_BC * margin.scale


def margin_softmax_ce_reference(emb_BD: torch.Tensor, centers_CD: torch.Tensor, labels_B: torch.Tensor,
                                margin: Margin) -> torch.Tensor:
    """Mean cross-entropy of the margin softmax over all C classes: the single-process ground truth.

    Computed in fp32 at least (fp64 inputs stay fp64), whatever the input precision.
    """
    dtype = torch.promote_types(torch.promote_types(emb_BD.dtype, centers_CD.dtype), torch.float32)
    logits_BC = margin_logits(cosine_logits(emb_BD.to(dtype), centers_CD.to(dtype)), labels_B, margin)
    return F.cross_entropy(logits_BC, labels_B)
