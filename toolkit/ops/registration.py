# Fake (meta) functions and autograd formulas of the torch.ops.facecl.* kernels (imported only when they exist).
"""Shapes: N rows, C classes, D dims, B queries, K keys. Every per-row statistic and loss is fp32 of shape N
(or B); gradients come back in the dtype of the input they belong to.

Autograd:
- margin_softmax_ce: backward writes the gradient over the saved cosine buffer (margin_softmax_ce_backward_)
  and returns that buffer as the gradient, so no second N x C tensor is allocated. The buffer is consumed:
  after backward it holds the gradient, not the cosines (see `gradient_buffer` for the safety net). A leaf
  tensor (created by the user) or a view is never overwritten: its gradient goes into a copy. Under
  torch.compile the compiler owns the buffers, so the gradient goes into a copy that it may reuse.
- linear_margin_softmax_ce and unicon_loss: backward recomputes the logits block by block.
"""

from __future__ import annotations

import torch

_LIB = "facecl"


def _stat(like: torch.Tensor, rows: int) -> torch.Tensor:
    return like.new_empty((rows,), dtype=torch.float32)


# ---- fake functions: output metadata without computing ----------------------------------------------------------

@torch.library.register_fake(f"{_LIB}::margin_softmax_ce_stats")
def _margin_softmax_ce_stats_fake(cos_NC, local_target_N, scale, m1, m2, m3, interclass_filter):
    rows = cos_NC.shape[0]
    return _stat(cos_NC, rows), _stat(cos_NC, rows), _stat(cos_NC, rows)


@torch.library.register_fake(f"{_LIB}::margin_softmax_ce")
def _margin_softmax_ce_fake(cos_NC, local_target_N, scale, m1, m2, m3, interclass_filter):
    rows = cos_NC.shape[0]
    return _stat(cos_NC, rows), _stat(cos_NC, rows), _stat(cos_NC, rows)


@torch.library.register_fake(f"{_LIB}::margin_softmax_ce_backward_")
def _margin_softmax_ce_backward_fake(cos_NC, local_target_N, row_max_N, sum_exp_N, grad_loss_N, scale, m1, m2, m3,
                                     interclass_filter):
    return None


@torch.library.register_fake(f"{_LIB}::linear_margin_softmax_ce_stats")
def _linear_stats_fake(emb_ND, centers_CD, local_target_N, scale, m1, m2, m3, interclass_filter, block_size):
    rows = emb_ND.shape[0]
    return _stat(emb_ND, rows), _stat(emb_ND, rows), _stat(emb_ND, rows)


@torch.library.register_fake(f"{_LIB}::linear_margin_softmax_ce")
def _linear_fake(emb_ND, centers_CD, local_target_N, scale, m1, m2, m3, interclass_filter, block_size):
    rows = emb_ND.shape[0]
    return _stat(emb_ND, rows), _stat(emb_ND, rows), _stat(emb_ND, rows)


@torch.library.register_fake(f"{_LIB}::linear_margin_softmax_ce_backward")
def _linear_backward_fake(grad_loss_N, emb_ND, centers_CD, local_target_N, row_max_N, sum_exp_N, scale, m1, m2, m3,
                          interclass_filter, block_size):
    return emb_ND.new_empty(emb_ND.shape), centers_CD.new_empty(centers_CD.shape)


@torch.library.register_fake(f"{_LIB}::normalized_linear_margin_softmax_ce_stats")
def _normalized_linear_stats_fake(emb_ND, centers_CD, local_target_N, scale, m1, m2, m3, interclass_filter,
                                  block_size):
    rows = emb_ND.shape[0]
    return (_stat(emb_ND, rows), _stat(emb_ND, rows), _stat(emb_ND, rows), _stat(centers_CD, centers_CD.shape[0]),
            centers_CD.new_empty(centers_CD.shape))


@torch.library.register_fake(f"{_LIB}::normalized_linear_margin_softmax_ce_backward_")
def _normalized_linear_backward_fake(grad_loss_N, emb_ND, centers_CD, local_target_N, row_max_N, sum_exp_N,
                                     inv_norm_C, workspace_CD, scale, m1, m2, m3, interclass_filter, block_size):
    return emb_ND.new_empty(emb_ND.shape)


@torch.library.register_fake(f"{_LIB}::sampled_normalized_linear_margin_softmax_ce_stats")
def _sampled_normalized_linear_stats_fake(emb_ND, centers_CD, kept_S, local_target_N, scale, m1, m2, m3,
                                          interclass_filter, block_size):
    rows = emb_ND.shape[0]
    return (_stat(emb_ND, rows), _stat(emb_ND, rows), _stat(emb_ND, rows), _stat(centers_CD, kept_S.shape[0]),
            centers_CD.new_empty(centers_CD.shape))


@torch.library.register_fake(f"{_LIB}::sampled_normalized_linear_margin_softmax_ce_backward_")
def _sampled_normalized_linear_backward_fake(grad_loss_N, emb_ND, centers_CD, kept_S, local_target_N, row_max_N,
                                             sum_exp_N, inv_norm_S, workspace_CD, scale, m1, m2, m3,
                                             interclass_filter, block_size):
    return emb_ND.new_empty(emb_ND.shape)


@torch.library.register_fake(f"{_LIB}::unicon_loss")
def _unicon_fake(query_BD, keys_KD, query_labels_B, key_labels_K, own_key_B, temperature, margin, block_size):
    rows = query_BD.shape[0]
    return _stat(query_BD, rows), _stat(query_BD, rows), _stat(query_BD, rows)


@torch.library.register_fake(f"{_LIB}::unicon_loss_backward")
def _unicon_backward_fake(grad_loss_B, query_BD, keys_KD, query_labels_B, key_labels_K, own_key_B, lse_negatives_B,
                          lse_positives_B, temperature, margin, block_size, compute_grad_keys):
    grad_keys_shape = keys_KD.shape if compute_grad_keys else (0, keys_KD.shape[1])
    return query_BD.new_empty(query_BD.shape), keys_KD.new_empty(grad_keys_shape)


# ---- autograd ---------------------------------------------------------------------------------------------------

def buffer_is_consumable(cos_NC: torch.Tensor) -> bool:
    """Whether backward may overwrite this cosine buffer: an op's own output, not a user's leaf nor a view
    (a view shares memory with a tensor that may still be needed)."""
    return cos_NC.grad_fn is not None and not cos_NC._is_view()


def gradient_buffer(cos_NC: torch.Tensor, consume: bool) -> torch.Tensor:
    """The tensor the in-place backward writes into: the cosine buffer itself, or a copy.

    When the buffer is consumed its version counter is bumped, so that a second backward through the same
    graph (retain_graph=True) fails with autograd's "modified by an inplace operation" error instead of
    reading gradients as cosines. Under torch.compile the compiler owns the buffers: always a copy (which
    the compiler may turn back into an in-place update).
    """
    if consume and not torch.compiler.is_compiling():
        torch.autograd.graph.increment_version(cos_NC)
        return cos_NC
    return cos_NC.clone()


def _margin_setup_context(ctx, inputs, output):
    cos_NC, local_target_N, *params = inputs
    _, row_max_N, sum_exp_N = output
    ctx.save_for_backward(cos_NC, local_target_N, row_max_N, sum_exp_N)
    ctx.params = params
    ctx.consume_buffer = buffer_is_consumable(cos_NC)
    ctx.mark_non_differentiable(row_max_N, sum_exp_N)


def _margin_backward(ctx, grad_loss_N, _grad_row_max, _grad_sum_exp):
    cos_NC, local_target_N, row_max_N, sum_exp_N = ctx.saved_tensors
    grad_NC = gradient_buffer(cos_NC, ctx.consume_buffer)
    torch.ops.facecl.margin_softmax_ce_backward_(grad_NC, local_target_N, row_max_N, sum_exp_N,
                                                 grad_loss_N.float().contiguous(), *ctx.params)
    return (grad_NC,) + (None,) * 6


torch.library.register_autograd(f"{_LIB}::margin_softmax_ce", _margin_backward, setup_context=_margin_setup_context)


def _linear_setup_context(ctx, inputs, output):
    emb_ND, centers_CD, local_target_N, *params = inputs
    _, row_max_N, sum_exp_N = output
    ctx.save_for_backward(emb_ND, centers_CD, local_target_N, row_max_N, sum_exp_N)
    ctx.params = params
    ctx.mark_non_differentiable(row_max_N, sum_exp_N)


def _linear_backward(ctx, grad_loss_N, _grad_row_max, _grad_sum_exp):
    emb_ND, centers_CD, local_target_N, row_max_N, sum_exp_N = ctx.saved_tensors
    grad_emb_ND, grad_centers_CD = torch.ops.facecl.linear_margin_softmax_ce_backward(
        grad_loss_N.float().contiguous(), emb_ND, centers_CD, local_target_N, row_max_N, sum_exp_N, *ctx.params)
    return (grad_emb_ND, grad_centers_CD) + (None,) * 7


torch.library.register_autograd(f"{_LIB}::linear_margin_softmax_ce", _linear_backward,
                                setup_context=_linear_setup_context)


def _unicon_setup_context(ctx, inputs, output):
    query_BD, keys_KD, query_labels_B, key_labels_K, own_key_B, *params = inputs
    _, lse_negatives_B, lse_positives_B = output
    ctx.save_for_backward(query_BD, keys_KD, query_labels_B, key_labels_K, own_key_B, lse_negatives_B,
                          lse_positives_B)
    ctx.params = params
    ctx.mark_non_differentiable(lse_negatives_B, lse_positives_B)


def _unicon_backward(ctx, grad_loss_B, _grad_lse_negatives, _grad_lse_positives):
    query_BD, keys_KD, query_labels_B, key_labels_K, own_key_B, lse_negatives_B, lse_positives_B = ctx.saved_tensors
    temperature, margin, block_size = ctx.params
    # Keys usually come from the momentum encoder and the queue (no gradient): skip their K x D product then.
    compute_grad_keys = ctx.needs_input_grad[1]
    grad_query_BD, grad_keys_KD = torch.ops.facecl.unicon_loss_backward(
        grad_loss_B.float().contiguous(), query_BD, keys_KD, query_labels_B, key_labels_K, own_key_B,
        lse_negatives_B, lse_positives_B, temperature, margin, block_size, compute_grad_keys)
    return (grad_query_BD, grad_keys_KD if compute_grad_keys else None) + (None,) * 6


torch.library.register_autograd(f"{_LIB}::unicon_loss", _unicon_backward, setup_context=_unicon_setup_context)
