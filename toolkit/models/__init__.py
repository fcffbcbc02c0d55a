# Face-embedding backbones: registry API plus the model modules that register themselves on import.
"""Backbones: ``create_backbone(name, ...)`` builds any registered network; see ``list_backbones()``."""

from toolkit.models.registry import check_backbone_name, create_backbone, list_backbones, register_backbone
from toolkit.models import iresnet as iresnet  # noqa: F401  (registers iresnet18..iresnet200)
from toolkit.models import mobilefacenet as mobilefacenet  # noqa: F401  (registers mobilefacenet)
from toolkit.models import mobilefacenet_large as mobilefacenet_large  # noqa: F401  (registers mobilefacenet_large)
from toolkit.models import vit as vit  # noqa: F401  (registers vit_t, vit_s, vit_b, vit_l, vit_h)
from toolkit.models.wrapping import apply_activation_checkpointing, prepare_backbone

__all__ = ["apply_activation_checkpointing", "check_backbone_name", "create_backbone", "list_backbones", "prepare_backbone",
           "register_backbone"]
