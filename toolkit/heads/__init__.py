# Identity-center heads: margins and the (reference, single-process) margin softmax layer.
from toolkit.heads.identity_centers import IdentityCenterHead
from toolkit.heads.margin import Margin, apply_margin_to_target, cosine_logits, margin_logits, margin_softmax_ce_reference

__all__ = ["IdentityCenterHead", "Margin", "apply_margin_to_target", "cosine_logits", "margin_logits",
           "margin_softmax_ce_reference"]
