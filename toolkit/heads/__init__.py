# Identity-center heads: the sharded production head (Partial FC), its checkpoint shards, and the references.
from toolkit.heads.identity_centers import ReferenceIdentityCenterHead
from toolkit.heads.margin import Margin, apply_margin_to_target, cosine_logits, margin_logits, margin_softmax_ce_reference
from toolkit.heads.partial_fc import ShardedIdentityCenterHead, ShardRange, resolve_implementation, shard_range

__all__ = ["ShardedIdentityCenterHead", "ShardRange", "shard_range", "resolve_implementation",
           "ReferenceIdentityCenterHead", "Margin", "apply_margin_to_target", "cosine_logits", "margin_logits",
           "margin_softmax_ce_reference"]
