# UniCon, the unified contrastive loss of UniMoCo, in plain PyTorch: every key of the query's identity is a positive.
"""Plain-PyTorch UniCon: the ground truth for the fused kernel (toolkit/ops/unicon.py) and its fallback.

For query i with unit vector q_i and keys k_j (the batch's own keys, then the queue), s_ij = q_i . k_j / T.
Positives P(i): the query's own key (always, so unlabeled queries train as MoCo) and every key whose
label equals the query's label (labels >= 0; -1 means unlabeled and matches nothing). Negatives N(i):
every other key.

    L_i = log(1 + sum_{n in N(i)} exp(s_in + margin) * sum_{p in P(i)} exp(-s_ip))
        = softplus(logsumexp_{n in N(i)}(s_in + margin) + logsumexp_{p in P(i)}(-s_ip))

With exactly one positive and margin 0 this is InfoNCE: -log(exp(s_ip) / (exp(s_ip) + sum_n exp(s_in))).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def unicon_positive_mask(query_labels_B: torch.Tensor, key_labels_K: torch.Tensor,
                         own_key_B: torch.Tensor) -> torch.Tensor:
    """B x K bool: key j is a positive of query i (own key, or same label >= 0)."""
    same_label_BK = (query_labels_B[:, None] == key_labels_K[None, :]) & (query_labels_B[:, None] >= 0)
    own_BK = torch.zeros_like(same_label_BK)
    own_BK[torch.arange(own_key_B.numel(), device=own_key_B.device), own_key_B] = True
    return same_label_BK | own_BK


def unicon_loss_reference(query_BD: torch.Tensor, keys_KD: torch.Tensor, query_labels_B: torch.Tensor,
                          key_labels_K: torch.Tensor, own_key_B: torch.Tensor, temperature: float,
                          margin: float = 0.0) -> torch.Tensor:
    """Per-query UniCon loss, shape B. query and keys are expected unit-norm (not normalised here)."""
    sim_BK = (query_BD.float() @ keys_KD.float().t()) / temperature
    positive_BK = unicon_positive_mask(query_labels_B, key_labels_K, own_key_B)
    neg_inf = torch.finfo(sim_BK.dtype).min
    lse_negatives_B = torch.logsumexp(torch.where(positive_BK, neg_inf, sim_BK + margin), dim=1)
    lse_positives_B = torch.logsumexp(torch.where(positive_BK, -sim_BK, neg_inf), dim=1)
    # A query whose every key is a positive has no negatives: its loss is softplus(-inf) = 0.
    no_negatives_B = positive_BK.all(dim=1)
    loss_B = F.softplus(lse_negatives_B + lse_positives_B)
    return torch.where(no_negatives_B, torch.zeros_like(loss_B), loss_B)
