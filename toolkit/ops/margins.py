# Margin math on the target cosine (ArcFace / CosFace / SphereFace-style combined margin): plain PyTorch.
"""Margins on the target cosine c = cos(theta) of each row's own class:

    target logit = s * (cos(m1 * theta + m2) - m3)

- ArcFace: m2 (0.5), additive angular margin; CosFace: m3 (0.4), additive cosine margin;
  m1: multiplicative angular margin (SphereFace). Non-target logits are s * c.
- When m1 * theta + m2 passes pi, cos(.) would start to grow again as theta grows (a wrong-way gradient);
  there we fall back to c - m2 * sin(m2) - m3 so the target logit keeps decreasing in theta (the usual
  ArcFace fallback, extended by m3).
- acos has an infinite slope at c = +-1, so c is clamped a hair inside [-1, 1] before acos.

This module is the single source of the margin formula: the unfused head path (toolkit/ops/unfused.py),
the single-process reference head (toolkit/heads) and the C++/CUDA kernels (kernels/csrc/margin_math.h,
tested against this) all implement exactly this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
