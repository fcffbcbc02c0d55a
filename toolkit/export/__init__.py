# Checkpoint conversion and model export: load_backbone, consolidate, export, inspect, init-from loading.
"""After training: read any engine's checkpoint without a process group, write plain files, export models.

    from toolkit.export import load_backbone
    model, meta = load_backbone("runs/NAME")   # registry backbone in eval mode + backbone/sizes/normalisation/step
"""

from toolkit.export.consolidate import consolidate
from toolkit.export.load import load_backbone, read_consolidated

__all__ = ["consolidate", "load_backbone", "read_consolidated"]
