# UniCon as the contrastive package names it: the loss formula lives with the kernels in toolkit/ops.
from toolkit.ops.unicon_reference import unicon_loss_reference, unicon_positive_mask

__all__ = ["unicon_loss_reference", "unicon_positive_mask"]
