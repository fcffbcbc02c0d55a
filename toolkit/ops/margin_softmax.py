# Margin softmax cross-entropy through the fused kernels: single-process losses and the sharded-head protocol.
"""Shapes: N rows (the gathered batch), C (or S, sampled) classes of this rank, D embedding dims.

Protocol of the sharded head (each rank holds some of the classes of every row):

1. `torch.ops.facecl.margin_softmax_ce_stats(cos_NS, local_target_N, s, m1, m2, m3, filter)` (or the linear
   variant on embeddings and centers) -> per row, over this rank's columns only: the max of the margin
   logits, the sum of exp(logit - that max), the margin target logit if this rank owns the target (else 0);
2. `combine_partial_stats`: max by all-reduce(MAX), the sums rescaled to the global max and the target
   logits summed by one all-reduce(SUM) of both -> loss_N = log(sum) + max - target;
3. backward: `margin_softmax_ce_backward_` (in place over the cosine buffer) or
   `linear_margin_softmax_ce_backward` (gradients of embeddings and centers, logits recomputed blockwise)
   from the global max and sum.

`distributed_margin_softmax_ce` / `distributed_linear_margin_softmax_ce` wrap the three steps in an
autograd function and return the mean loss over the N rows, the same value on every rank, with exactly
the gradients of ShardedIdentityCenterHead's reference path (tested on 1 and 2 ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from toolkit.distributed.collectives import all_reduce_
from toolkit.heads.margin import Margin
from toolkit.ops import reference
from toolkit.ops.extension import FUSED_KERNELS_AVAILABLE


def _params(margin: Margin, interclass_filter: float) -> tuple[float, float, float, float, float]:
    return float(margin.scale), float(margin.m1), float(margin.m2), float(margin.m3), float(interclass_filter)


def margin_softmax_ce(cos_NC: torch.Tensor, local_target_N: torch.Tensor, margin: Margin, *,
                      interclass_filter: float = 0.0) -> torch.Tensor:
    """Per-row (N) margin softmax loss of cosine logits against these C columns; fp32.

    local_target_N: the row's target column, or -1 (no target here: the target logit counts as 0).
    The backward consumes `cos_NC`: the gradient is written over it (see toolkit/ops/registration.py), so
    do not read `cos_NC` after backward, and do not hand it to another op that saves it for its backward.
    """
    if not FUSED_KERNELS_AVAILABLE:
        return reference.margin_softmax_ce(cos_NC, local_target_N, margin, interclass_filter=interclass_filter)
    loss_N, _, _ = torch.ops.facecl.margin_softmax_ce(cos_NC.contiguous(), local_target_N,
                                                       *_params(margin, interclass_filter))
    return loss_N


def linear_margin_softmax_ce(emb_ND: torch.Tensor, centers_CD: torch.Tensor, local_target_N: torch.Tensor,
                             margin: Margin, *, interclass_filter: float = 0.0, block_size: int = 0) -> torch.Tensor:
    """Per-row (N) margin softmax loss of emb_ND @ centers_CD^T without materialising the N x C logits.

    emb_ND and centers_CD must already be L2-normalised (their product is the cosine). block_size: classes
    per block (0: about 8 MB of fp32 logits per block on a CPU, 64 MB on a GPU).
    """
    if not FUSED_KERNELS_AVAILABLE:
        return reference.linear_margin_softmax_ce(emb_ND, centers_CD, local_target_N, margin,
                                                  interclass_filter=interclass_filter)
    loss_N, _, _ = torch.ops.facecl.linear_margin_softmax_ce(
        emb_ND.contiguous(), centers_CD.contiguous(), local_target_N, *_params(margin, interclass_filter),
        int(block_size))
    return loss_N


def combine_partial_stats(row_max_N: torch.Tensor, sum_exp_N: torch.Tensor, target_logit_N: torch.Tensor,
                          group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-rank (max, sum of exp(logit - max), owned target logit) -> the same three over all ranks' columns.

    Two all-reduces: MAX of the maxima, then one SUM of [sums rescaled to the global max; target logits].
    A rank without columns contributes max -inf and sum 0.
    """
    global_max_N = all_reduce_(row_max_N.clone(), dist.ReduceOp.MAX, group)
    rescaled_sum_N = sum_exp_N * torch.exp(row_max_N - global_max_N)
    summed_2N = all_reduce_(torch.stack([rescaled_sum_N, target_logit_N]), dist.ReduceOp.SUM, group)
    return global_max_N, summed_2N[0], summed_2N[1]


def _mean_grad_per_row(grad_loss: torch.Tensor, num_rows: int) -> torch.Tensor:
    """d(mean over rows)/d(loss_i) times the incoming gradient, as an fp32 vector of N."""
    return (grad_loss.float() / num_rows).expand(num_rows).contiguous()


class _FusedDistributedMarginSoftmaxCE(torch.autograd.Function):
    """Mean loss over rows of a cosine buffer (N x S, this rank's columns); backward in place over the buffer."""

    @staticmethod
    def forward(ctx, cos_NS, local_target_N, params, group):
        row_max_N, sum_exp_N, target_logit_N = torch.ops.facecl.margin_softmax_ce_stats(cos_NS, local_target_N,
                                                                                        *params)
        max_N, sum_N, target_N = combine_partial_stats(row_max_N, sum_exp_N, target_logit_N, group)
        ctx.save_for_backward(cos_NS, local_target_N, max_N, sum_N)
        ctx.params = params
        return (torch.log(sum_N) + max_N - target_N).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        cos_NS, local_target_N, max_N, sum_N = ctx.saved_tensors
        torch.ops.facecl.margin_softmax_ce_backward_(cos_NS, local_target_N, max_N, sum_N,
                                                     _mean_grad_per_row(grad_loss, cos_NS.shape[0]), *ctx.params)
        return cos_NS, None, None, None


class _FusedDistributedLinearMarginSoftmaxCE(torch.autograd.Function):
    """Mean loss over rows of emb_ND @ centers_SD^T (this rank's centers), blockwise: no N x S tensor."""

    @staticmethod
    def forward(ctx, emb_ND, centers_SD, local_target_N, params, block_size, group):
        row_max_N, sum_exp_N, target_logit_N = torch.ops.facecl.linear_margin_softmax_ce_stats(
            emb_ND, centers_SD, local_target_N, *params, block_size)
        max_N, sum_N, target_N = combine_partial_stats(row_max_N, sum_exp_N, target_logit_N, group)
        ctx.save_for_backward(emb_ND, centers_SD, local_target_N, max_N, sum_N)
        ctx.params = params
        ctx.block_size = block_size
        return (torch.log(sum_N) + max_N - target_N).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        emb_ND, centers_SD, local_target_N, max_N, sum_N = ctx.saved_tensors
        grad_emb_ND, grad_centers_SD = torch.ops.facecl.linear_margin_softmax_ce_backward(
            _mean_grad_per_row(grad_loss, emb_ND.shape[0]), emb_ND, centers_SD, local_target_N, max_N, sum_N,
            *ctx.params, ctx.block_size)
        return grad_emb_ND, grad_centers_SD, None, None, None, None


def distributed_margin_softmax_ce(cos_NS: torch.Tensor, local_target_N: torch.Tensor, margin: Margin, group=None, *,
                                  interclass_filter: float = 0.0) -> torch.Tensor:
    """Mean margin-softmax loss over the N rows; this rank holds the S columns of cos_NS (cosines, not logits).

    local_target_N: the row's target column in cos_NS, or -1 when another rank owns it. group: the
    model-parallel process group (None: single process). The inter-class filter zeroes negative cosines
    above the threshold (0: off), as the head does. Backward writes the gradient over cos_NS (consumed).
    """
    if not FUSED_KERNELS_AVAILABLE:
        return reference.distributed_margin_softmax_ce(cos_NS, local_target_N, margin, group,
                                                       interclass_filter=interclass_filter)
    return _FusedDistributedMarginSoftmaxCE.apply(cos_NS.contiguous(), local_target_N,
                                                  _params(margin, interclass_filter), group)


def distributed_linear_margin_softmax_ce(emb_ND: torch.Tensor, centers_SD: torch.Tensor, local_target_N: torch.Tensor,
                                         margin: Margin, group=None, *, interclass_filter: float = 0.0,
                                         block_size: int = 0) -> torch.Tensor:
    """As distributed_margin_softmax_ce, on normalised embeddings (N x D) and this rank's normalised centers
    (S x D, e.g. the sampled ones), never holding more than one N x block_size block of logits."""
    if not FUSED_KERNELS_AVAILABLE:
        return reference.distributed_linear_margin_softmax_ce(emb_ND, centers_SD, local_target_N, margin, group,
                                                              interclass_filter=interclass_filter)
    return _FusedDistributedLinearMarginSoftmaxCE.apply(emb_ND.contiguous(), centers_SD.contiguous(), local_target_N,
                                                        _params(margin, interclass_filter), int(block_size), group)
