# Unfused (plain-PyTorch) implementations of every toolkit.ops contract: the head's path without kernels.
"""Each function here has the signature and result of its fused twin in toolkit.ops. This is a production
path (head.implementation 'reference', and what 'auto' falls back to when the kernels are not built), not
only a test oracle: it materialises the rows x classes logits, the fused kernels do not.

Sharded softmax cross-entropy (`_DistributedSoftmaxCE`), with the classes of every row split over W ranks
and z_j the logit of column j (this rank holds columns S_r):

    loss_i = log sum_j exp(z_ij) - z_i,y(i)
           = M_i + log sum_r sum_{j in S_r} exp(z_ij - M_i) - z_i,y(i),   M_i = max_r max_{j in S_r} z_ij

so each rank computes its local max, one all-reduce(MAX) gives M_i, each rank sums exp(z - M_i) over its
columns, one all-reduce(SUM) gives the denominator, and the owner of column y(i) contributes the target
logit through another all-reduce(SUM) (the others add 0). The gradient of the (weighted) mean loss with
respect to this rank's logits is w_i * (softmax_ij - [j = y(i)]): local, no communication in backward.
Because embeddings and centers are unit vectors, every cosine is in [-1, 1] and every logit in [-s, s]
(before the margin), so exp(z - M) never overflows.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from toolkit.distributed.collectives import all_reduce_
from toolkit.ops.margins import Margin, apply_margin_to_target
from toolkit.ops.unicon_reference import unicon_loss_reference


def local_margin_logits(cos_NC: torch.Tensor, local_target_N: torch.Tensor, margin: Margin,
                        interclass_filter: float = 0.0) -> torch.Tensor:
    """N x C fp32 logits: inter-class filter on negatives, margin on the owned target entries, times the scale.

    The steps of the sharded head's forward (toolkit/heads/partial_fc.py); rows with local target -1 get no margin.
    """
    cos_NC = cos_NC.float()
    rows = torch.nonzero(local_target_N >= 0, as_tuple=True)[0]
    cols = local_target_N[rows]
    if interclass_filter > 0:
        too_close_NC = cos_NC.detach() > interclass_filter
        too_close_NC[rows, cols] = False
        cos_NC = cos_NC.masked_fill(too_close_NC, 0.0)
    target = apply_margin_to_target(cos_NC[rows, cols], margin)
    return cos_NC.index_put((rows, cols), target) * margin.scale


def margin_softmax_ce(cos_NC: torch.Tensor, local_target_N: torch.Tensor, margin: Margin, *,
                      interclass_filter: float = 0.0) -> torch.Tensor:
    """Per-row loss log(sum_j exp(logit_j)) - target logit against these columns (target logit 0 when -1)."""
    logits_NC = local_margin_logits(cos_NC, local_target_N, margin, interclass_filter)
    owned_N = local_target_N >= 0
    target_N = torch.where(owned_N, logits_NC.gather(1, local_target_N.clamp(min=0)[:, None])[:, 0],
                           torch.zeros((), dtype=logits_NC.dtype, device=logits_NC.device))
    return torch.logsumexp(logits_NC, dim=1) - target_N


def linear_margin_softmax_ce(emb_ND: torch.Tensor, centers_CD: torch.Tensor, local_target_N: torch.Tensor,
                             margin: Margin, *, interclass_filter: float = 0.0, block_size: int = 0) -> torch.Tensor:
    """margin_softmax_ce of the cosines emb @ centers^T (inputs already normalised); block_size is ignored."""
    del block_size
    cos_NC = emb_ND.float() @ centers_CD.float().t()
    return margin_softmax_ce(cos_NC, local_target_N, margin, interclass_filter=interclass_filter)


def unicon_loss(query_BD: torch.Tensor, keys_KD: torch.Tensor, query_labels_B: torch.Tensor,
                key_labels_K: torch.Tensor, own_key_B: torch.Tensor, temperature: float, margin: float = 0.0, *,
                block_size: int = 0) -> torch.Tensor:
    """unicon_loss_reference (toolkit/ops/unicon_reference.py); block_size is ignored."""
    del block_size
    return unicon_loss_reference(query_BD, keys_KD, query_labels_B, key_labels_K, own_key_B, temperature, margin)


def normalized_row_weights(row_weight_N: torch.Tensor | None, num_rows: int, device) -> torch.Tensor:
    """fp32 weights w_N of the loss sum(w_N * loss_N): the head's row_weight_N / max(sum(row_weight_N), 1).

    None weighs every row 1: the loss is then the mean over the N rows. Weight 0 leaves a row out (the head
    gives unlabeled rows weight 0, so the loss is the mean over labeled rows, 0 when there are none).
    """
    if row_weight_N is None:
        return torch.full((num_rows,), 1.0 / max(num_rows, 1), dtype=torch.float32, device=device)
    row_weight_N = row_weight_N.float()
    return row_weight_N / row_weight_N.sum().clamp(min=1.0)


class _DistributedSoftmaxCE(torch.autograd.Function):
    """Weighted cross-entropy of rows whose columns are spread over ranks (the algorithm of partial_fc.py)."""

    @staticmethod
    def forward(ctx, logits_NS: torch.Tensor, local_target_N: torch.Tensor, weight_N: torch.Tensor,
                group) -> torch.Tensor:
        num_rows = logits_NS.shape[0]
        row_max_N = logits_NS.max(dim=1).values if logits_NS.shape[1] else torch.full(
            (num_rows,), float("-inf"), device=logits_NS.device)
        all_reduce_(row_max_N, dist.ReduceOp.MAX, group)
        probs_NS = torch.exp(logits_NS - row_max_N[:, None])
        sum_exp_N = probs_NS.sum(dim=1)
        all_reduce_(sum_exp_N, dist.ReduceOp.SUM, group)
        probs_NS.div_(sum_exp_N[:, None])
        rows = torch.nonzero(local_target_N >= 0, as_tuple=True)[0]
        target_logit_N = torch.zeros(num_rows, dtype=logits_NS.dtype, device=logits_NS.device)
        target_logit_N[rows] = logits_NS[rows, local_target_N[rows]]
        all_reduce_(target_logit_N, dist.ReduceOp.SUM, group)
        loss_N = torch.log(sum_exp_N) + row_max_N - target_logit_N
        ctx.save_for_backward(probs_NS, local_target_N, weight_N)
        return (loss_N * weight_N).sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        probs_NS, local_target_N, weight_N = ctx.saved_tensors
        grad_NS = probs_NS.clone()
        rows = torch.nonzero(local_target_N >= 0, as_tuple=True)[0]
        grad_NS[rows, local_target_N[rows]] -= 1.0
        grad_NS.mul_(weight_N[:, None] * grad_loss)
        return grad_NS, None, None, None


def distributed_margin_softmax_ce(cos_NS: torch.Tensor, local_target_N: torch.Tensor, margin: Margin, group=None, *,
                                  interclass_filter: float = 0.0,
                                  row_weight_N: torch.Tensor | None = None) -> torch.Tensor:
    """Row-weighted mean margin-softmax loss over rows whose classes are sharded over the ranks of `group`."""
    logits_NS = local_margin_logits(cos_NS, local_target_N, margin, interclass_filter)
    weight_N = normalized_row_weights(row_weight_N, logits_NS.shape[0], logits_NS.device)
    return _DistributedSoftmaxCE.apply(logits_NS, local_target_N, weight_N, group)


def distributed_linear_margin_softmax_ce(emb_ND: torch.Tensor, centers_SD: torch.Tensor, local_target_N: torch.Tensor,
                                         margin: Margin, group=None, *, interclass_filter: float = 0.0,
                                         row_weight_N: torch.Tensor | None = None,
                                         block_size: int = 0) -> torch.Tensor:
    """distributed_margin_softmax_ce of emb @ centers^T (inputs already normalised); block_size is ignored."""
    del block_size
    cos_NS = emb_ND.float() @ centers_SD.float().t()
    return distributed_margin_softmax_ce(cos_NS, local_target_N, margin, group, interclass_filter=interclass_filter,
                                         row_weight_N=row_weight_N)


def distributed_normalized_linear_margin_softmax_ce(emb_ND: torch.Tensor, centers_SD: torch.Tensor,
                                                    local_target_N: torch.Tensor, margin: Margin, group=None, *,
                                                    interclass_filter: float = 0.0,
                                                    row_weight_N: torch.Tensor | None = None,
                                                    block_size: int = 0,
                                                    kept_S: torch.Tensor | None = None) -> torch.Tensor:
    """distributed_linear_margin_softmax_ce on raw centers (normalised here with F.normalize, as a copy); with
    kept_S, on the kept rows centers_SD[kept_S] (a copy, its gradient scattered back by autograd)."""
    if kept_S is not None:
        centers_SD = centers_SD[kept_S]
    return distributed_linear_margin_softmax_ce(emb_ND, torch.nn.functional.normalize(centers_SD.float(), dim=1),
                                                local_target_N, margin, group, interclass_filter=interclass_filter,
                                                row_weight_N=row_weight_N, block_size=block_size)
