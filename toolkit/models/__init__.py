# Face-embedding backbones: registry API plus the model modules that register themselves on import.
"""Backbones: ``create_backbone(name, ...)`` builds any registered network; see ``list_backbones()``."""

from toolkit.models.registry import create_backbone, list_backbones, register_backbone
from toolkit.models import iresnet as iresnet  # noqa: F401  (registers iresnet18..iresnet200)
from toolkit.models import mobilefacenet as mobilefacenet  # noqa: F401  (registers mobilefacenet)

__all__ = ["create_backbone", "list_backbones", "register_backbone"]
