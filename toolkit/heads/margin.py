# Plain-PyTorch margin softmax over all classes: the ground truth that heads and kernels are tested against.
"""Full-logits margin softmax over all C classes, the single-process ground truth for the sharded head and
the fused kernels. The margin formula itself (ArcFace / CosFace / combined, with its fallback past pi)
lives in toolkit/ops/margins.py and is re-exported here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from toolkit.ops.margins import Margin, apply_margin_to_target

__all__ = ["Margin", "apply_margin_to_target", "cosine_logits", "margin_logits", "margin_softmax_ce_reference"]


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
