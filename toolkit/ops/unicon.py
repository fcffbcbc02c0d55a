# UniCon (UniMoCo's unified contrastive loss) through the fused kernel, blockwise over the keys.
from __future__ import annotations

import torch

from toolkit.ops import unfused
from toolkit.ops.extension import FUSED_KERNELS_AVAILABLE


def unicon_loss(query_BD: torch.Tensor, keys_KD: torch.Tensor, query_labels_B: torch.Tensor,
                key_labels_K: torch.Tensor, own_key_B: torch.Tensor, temperature: float, margin: float = 0.0, *,
                block_size: int = 0) -> torch.Tensor:
    """Per-query (B) UniCon loss, fp32; the arguments of toolkit.ops.unicon_reference.unicon_loss_reference.

    query_BD, keys_KD: unit vectors (the batch's keys, then the queue); labels -1 = unlabeled;
    own_key_B: the index of each query's own key among the keys (always a positive).
    loss_i = softplus(logsumexp_{n negative}(s_in + margin) + logsumexp_{p positive}(-s_ip)), s = q.k / T,
    0 for a query without negatives. Positives are found from the labels on the fly (no B x K mask);
    block_size keys per block (0: automatic). Gradients flow to query and keys (the keys' only when needed).
    """
    if not FUSED_KERNELS_AVAILABLE:
        return unfused.unicon_loss(query_BD, keys_KD, query_labels_B, key_labels_K, own_key_B, temperature, margin)
    loss_B, _, _ = torch.ops.facecl.unicon_loss(query_BD.contiguous(), keys_KD.contiguous(), query_labels_B,
                                                key_labels_K, own_key_B, float(temperature), float(margin),
                                                int(block_size))
    return loss_B
