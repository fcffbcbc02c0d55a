# Fused loss kernels (torch.ops.facecl.*) with plain-PyTorch fallbacks: margin softmax CE and UniCon.
"""Public API (all losses fp32; inputs fp32, bf16 or fp16):

- margin_softmax_ce(cos_NC, local_target_N, margin)                 per-row loss, backward in place over cos_NC
- linear_margin_softmax_ce(emb_ND, centers_CD, local_target_N, margin)  per-row loss, no N x C logits
- distributed_margin_softmax_ce / distributed_linear_margin_softmax_ce   the sharded head's (row-weighted) mean loss
- distributed_normalized_linear_margin_softmax_ce   the same on raw centers, normalisation fused (the head's default)
- combine_partial_stats                                              all-reduce of the per-rank statistics
- unicon_loss(query_BD, keys_KD, query_labels_B, key_labels_K, own_key_B, temperature, margin)  per-query loss

The kernels live in the extension toolkit._C (kernels/csrc, built by `pip install -e .`). When it is
missing, or FACECL_FORCE_REFERENCE=1, every function runs its twin in toolkit.ops.unfused instead and
one FusedKernelsUnavailableWarning says so at import.
"""

from toolkit.ops.extension import (FORCE_REFERENCE_ENV, FUSED_KERNELS_AVAILABLE, UNAVAILABLE_REASON,
                                   FusedKernelsUnavailableWarning)

if FUSED_KERNELS_AVAILABLE:
    from toolkit.ops import registration  # noqa: F401  (fake functions and autograd of torch.ops.facecl.*)

from toolkit.ops.margin_softmax import (combine_partial_stats, distributed_linear_margin_softmax_ce,
                                        distributed_margin_softmax_ce, distributed_normalized_linear_margin_softmax_ce,
                                        linear_margin_softmax_ce, margin_softmax_ce)
from toolkit.ops.unicon import unicon_loss

__all__ = ["FORCE_REFERENCE_ENV", "FUSED_KERNELS_AVAILABLE", "UNAVAILABLE_REASON", "FusedKernelsUnavailableWarning",
           "combine_partial_stats", "distributed_linear_margin_softmax_ce", "distributed_margin_softmax_ce",
           "distributed_normalized_linear_margin_softmax_ce",
           "linear_margin_softmax_ce", "margin_softmax_ce", "unicon_loss"]
