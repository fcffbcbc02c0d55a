# UniMoCo contrastive learning: UniCon loss, label queue, momentum encoder.
from toolkit.contrastive.unicon import unicon_loss_reference, unicon_positive_mask

__all__ = ["unicon_loss_reference", "unicon_positive_mask"]
