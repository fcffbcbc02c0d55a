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

`distributed_normalized_linear_margin_softmax_ce` is the linear variant on raw (unnormalised) centers: the
kernels divide each product by its center's norm on the fly and apply the normalisation's backward to the
centers' gradient in place (see kernels/csrc/blockwise.h), so there is no normalised copy of the centers and,
when N <= D, no logits memory beyond the centers' gradient (the cosines are kept in the gradient's storage).

`distributed_margin_softmax_ce` / `distributed_linear_margin_softmax_ce` wrap the three steps in an
autograd function and return the (row-weighted) mean loss over the N rows, the same value on every rank,
with exactly the gradients of the unfused path (toolkit/ops/unfused.py) (tested on 1 and 2 ranks).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from toolkit.distributed.collectives import all_reduce_
from toolkit.ops import unfused
from toolkit.ops.extension import FUSED_KERNELS_AVAILABLE
from toolkit.ops.margins import Margin

if FUSED_KERNELS_AVAILABLE:
    from toolkit.ops.registration import buffer_is_consumable, gradient_buffer


def _params(margin: Margin, interclass_filter: float) -> tuple[float, float, float, float, float]:
    return float(margin.scale), float(margin.m1), float(margin.m2), float(margin.m3), float(interclass_filter)


def margin_softmax_ce(cos_NC: torch.Tensor, local_target_N: torch.Tensor, margin: Margin, *,
                      interclass_filter: float = 0.0) -> torch.Tensor:
    """Per-row (N) margin softmax loss of cosine logits against these C columns; fp32.

    local_target_N: the row's target column, or -1 (no target here: the target logit counts as 0).
    The backward consumes `cos_NC` when it is an op's output (not a leaf, not a view): the gradient is
    written over it (see toolkit/ops/registration.py), so do not read `cos_NC` after backward.
    """
    if not FUSED_KERNELS_AVAILABLE:
        return unfused.margin_softmax_ce(cos_NC, local_target_N, margin, interclass_filter=interclass_filter)
    loss_N, _, _ = torch.ops.facecl.margin_softmax_ce(cos_NC.contiguous(), local_target_N,
                                                       *_params(margin, interclass_filter))
    return loss_N


def linear_margin_softmax_ce(emb_ND: torch.Tensor, centers_CD: torch.Tensor, local_target_N: torch.Tensor,
                             margin: Margin, *, interclass_filter: float = 0.0, block_size: int = 0) -> torch.Tensor:
    """Per-row (N) margin softmax loss of emb_ND @ centers_CD^T without materialising the N x C logits.

    emb_ND and centers_CD must already be L2-normalised (their product is the cosine). block_size: classes
    per block (0: about 64 MB of fp32 logits per block, 4096 classes for 4096 rows).
    """
    if not FUSED_KERNELS_AVAILABLE:
        return unfused.linear_margin_softmax_ce(emb_ND, centers_CD, local_target_N, margin,
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


def _grad_per_row(grad_loss: torch.Tensor, weight_N: torch.Tensor) -> torch.Tensor:
    """d(sum_i w_i loss_i)/d(loss_i) times the incoming gradient, as a contiguous fp32 vector of N."""
    return (weight_N * grad_loss.float()).contiguous()


class _FusedDistributedMarginSoftmaxCE(torch.autograd.Function):
    """Weighted loss over rows of a cosine buffer (N x S, this rank's columns); backward in place over the buffer."""

    @staticmethod
    def forward(ctx, cos_NS, local_target_N, weight_N, params, group):
        row_max_N, sum_exp_N, target_logit_N = torch.ops.facecl.margin_softmax_ce_stats(cos_NS, local_target_N,
                                                                                        *params)
        max_N, sum_N, target_N = combine_partial_stats(row_max_N, sum_exp_N, target_logit_N, group)
        ctx.save_for_backward(cos_NS, local_target_N, max_N, sum_N, weight_N)
        ctx.params = params
        ctx.consume_buffer = buffer_is_consumable(cos_NS)
        return ((torch.log(sum_N) + max_N - target_N) * weight_N).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        cos_NS, local_target_N, max_N, sum_N, weight_N = ctx.saved_tensors
        grad_NS = gradient_buffer(cos_NS, ctx.consume_buffer)
        torch.ops.facecl.margin_softmax_ce_backward_(grad_NS, local_target_N, max_N, sum_N,
                                                     _grad_per_row(grad_loss, weight_N), *ctx.params)
        return grad_NS, None, None, None, None


class _FusedDistributedLinearMarginSoftmaxCE(torch.autograd.Function):
    """Weighted loss over rows of emb_ND @ centers_SD^T (this rank's centers), blockwise: no N x S tensor."""

    @staticmethod
    def forward(ctx, emb_ND, centers_SD, local_target_N, weight_N, params, block_size, group):
        row_max_N, sum_exp_N, target_logit_N = torch.ops.facecl.linear_margin_softmax_ce_stats(
            emb_ND, centers_SD, local_target_N, *params, block_size)
        max_N, sum_N, target_N = combine_partial_stats(row_max_N, sum_exp_N, target_logit_N, group)
        ctx.save_for_backward(emb_ND, centers_SD, local_target_N, max_N, sum_N, weight_N)
        ctx.params = params
        ctx.block_size = block_size
        return ((torch.log(sum_N) + max_N - target_N) * weight_N).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        emb_ND, centers_SD, local_target_N, max_N, sum_N, weight_N = ctx.saved_tensors
        grad_emb_ND, grad_centers_SD = torch.ops.facecl.linear_margin_softmax_ce_backward(
            _grad_per_row(grad_loss, weight_N), emb_ND, centers_SD, local_target_N, max_N, sum_N, *ctx.params,
            ctx.block_size)
        return grad_emb_ND, grad_centers_SD, None, None, None, None, None


class _FusedDistributedNormalizedLinearMarginSoftmaxCE(torch.autograd.Function):
    """Weighted loss over rows of emb_ND @ normalize(centers_CD)^T (or, with kept_S, over the kept rows
    centers_CD[kept_S] only); the centers' gradient is written into the C x D workspace the forward allocated
    (which may hold the cosines until then; with kept_S the rows not kept end up zero)."""

    @staticmethod
    def forward(ctx, emb_ND, centers_CD, kept_S, local_target_N, weight_N, params, block_size, group):
        facecl = torch.ops.facecl
        if kept_S is None:
            row_max_N, sum_exp_N, target_logit_N, inv_norm_S, workspace_CD = (
                facecl.normalized_linear_margin_softmax_ce_stats(emb_ND, centers_CD, local_target_N, *params,
                                                                 block_size))
        else:
            row_max_N, sum_exp_N, target_logit_N, inv_norm_S, workspace_CD = (
                facecl.sampled_normalized_linear_margin_softmax_ce_stats(emb_ND, centers_CD, kept_S, local_target_N,
                                                                         *params, block_size))
        max_N, sum_N, target_N = combine_partial_stats(row_max_N, sum_exp_N, target_logit_N, group)
        ctx.save_for_backward(emb_ND, centers_CD, kept_S, local_target_N, max_N, sum_N, weight_N, inv_norm_S)
        ctx.workspace_CD = workspace_CD  # not an input or output: kept as an attribute, freed with the graph
        ctx.params = params
        ctx.block_size = block_size
        return ((torch.log(sum_N) + max_N - target_N) * weight_N).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        emb_ND, centers_CD, kept_S, local_target_N, max_N, sum_N, weight_N, inv_norm_S = ctx.saved_tensors
        grad_centers_CD, ctx.workspace_CD = ctx.workspace_CD, None  # a second backward finds no workspace
        if grad_centers_CD is None:
            raise RuntimeError("the fused normalised head's backward ran twice: its workspace became the centers' "
                               "gradient the first time (retain_graph is not supported)")
        grad_N = _grad_per_row(grad_loss, weight_N)
        if kept_S is None:
            grad_emb_ND = torch.ops.facecl.normalized_linear_margin_softmax_ce_backward_(
                grad_N, emb_ND, centers_CD, local_target_N, max_N, sum_N, inv_norm_S, grad_centers_CD, *ctx.params,
                ctx.block_size)
        else:
            grad_emb_ND = torch.ops.facecl.sampled_normalized_linear_margin_softmax_ce_backward_(
                grad_N, emb_ND, centers_CD, kept_S, local_target_N, max_N, sum_N, inv_norm_S, grad_centers_CD,
                *ctx.params, ctx.block_size)
        return grad_emb_ND, grad_centers_CD, None, None, None, None, None, None


def distributed_margin_softmax_ce(cos_NS: torch.Tensor, local_target_N: torch.Tensor, margin: Margin, group=None, *,
                                  interclass_filter: float = 0.0,
                                  row_weight_N: torch.Tensor | None = None) -> torch.Tensor:
    """Margin-softmax loss over the N rows, averaged with row weights; this rank holds the S columns of cos_NS.

    cos_NS: cosines (not logits). local_target_N: the row's target column in cos_NS, or -1 when another rank
    owns it (or the row is unlabeled). group: the model-parallel process group (None: single process).
    interclass_filter: negative cosines above it are zeroed, as the head does (0: off). row_weight_N: the
    loss is sum(w * loss_N) with w = row_weight_N / max(sum(row_weight_N), 1) (None: the plain mean); the
    head passes (labels_N >= 0) so that unlabeled rows are left out. The same value on every rank.
    Backward writes the gradient over cos_NS (the buffer is consumed).
    """
    if not FUSED_KERNELS_AVAILABLE:
        return unfused.distributed_margin_softmax_ce(cos_NS, local_target_N, margin, group,
                                                       interclass_filter=interclass_filter, row_weight_N=row_weight_N)
    weight_N = unfused.normalized_row_weights(row_weight_N, cos_NS.shape[0], cos_NS.device)
    return _FusedDistributedMarginSoftmaxCE.apply(cos_NS.contiguous(), local_target_N, weight_N,
                                                  _params(margin, interclass_filter), group)


def distributed_linear_margin_softmax_ce(emb_ND: torch.Tensor, centers_SD: torch.Tensor, local_target_N: torch.Tensor,
                                         margin: Margin, group=None, *, interclass_filter: float = 0.0,
                                         row_weight_N: torch.Tensor | None = None,
                                         block_size: int = 0) -> torch.Tensor:
    """As distributed_margin_softmax_ce, on normalised embeddings (N x D) and this rank's normalised centers
    (S x D, e.g. the sampled ones), never holding more than one N x block_size block of logits."""
    if not FUSED_KERNELS_AVAILABLE:
        return unfused.distributed_linear_margin_softmax_ce(emb_ND, centers_SD, local_target_N, margin, group,
                                                              interclass_filter=interclass_filter,
                                                              row_weight_N=row_weight_N)
    weight_N = unfused.normalized_row_weights(row_weight_N, emb_ND.shape[0], emb_ND.device)
    return _FusedDistributedLinearMarginSoftmaxCE.apply(emb_ND.contiguous(), centers_SD.contiguous(), local_target_N,
                                                        weight_N, _params(margin, interclass_filter), int(block_size),
                                                        group)


def distributed_normalized_linear_margin_softmax_ce(emb_ND: torch.Tensor, centers_SD: torch.Tensor,
                                                    local_target_N: torch.Tensor, margin: Margin, group=None, *,
                                                    interclass_filter: float = 0.0,
                                                    row_weight_N: torch.Tensor | None = None,
                                                    block_size: int = 0,
                                                    kept_S: torch.Tensor | None = None) -> torch.Tensor:
    """As distributed_linear_margin_softmax_ce with centers_SD raw (not normalised): the kernels normalise them
    on the fly. emb_ND must be normalised. Memory beyond the centers' gradient: O(S) norms and one block.

    kept_S (Partial FC sampling): strictly increasing int64 indices of the rows of centers_SD (then all C
    centers of this rank) that take part, the same as passing centers_SD[kept_S], with local_target_N
    indexing the kept columns; the kernels read the kept rows in place (no S x D copy) and the gradient of
    centers_SD is the dense C x D one, zero in the rows not kept (no scatter through autograd's index
    backward). None: every row."""
    if not FUSED_KERNELS_AVAILABLE:
        return unfused.distributed_normalized_linear_margin_softmax_ce(
            emb_ND, centers_SD, local_target_N, margin, group, interclass_filter=interclass_filter,
            row_weight_N=row_weight_N, kept_S=kept_S)
    weight_N = unfused.normalized_row_weights(row_weight_N, emb_ND.shape[0], emb_ND.device)
    return _FusedDistributedNormalizedLinearMarginSoftmaxCE.apply(
        emb_ND.contiguous(), centers_SD.contiguous(), kept_S, local_target_N, weight_N,
        _params(margin, interclass_filter), int(block_size), group)
