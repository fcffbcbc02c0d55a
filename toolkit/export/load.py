# load_backbone: the registry backbone with trained weights, from a run, a checkpoint or a consolidated file.
"""One entry point for evaluation and deployment code: whatever the user points at (a run folder, its
checkpoints/ folder, one checkpoint of any engine, or a consolidated .safetensors / .pt), return the
registry model in eval mode with the weights, plus metadata (backbone, embedding_size, image_size,
input_normalisation, step). All reads are tensors-only (safetensors, or torch files via safe_torch_load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import CheckpointError
from toolkit.export.checkpoints import INPUT_NORMALISATION, TRAINING_FORMAT, open_checkpoint
from toolkit.export.consolidate import (EXTRA_PREFIX, FORMAT_NAME, FORMAT_VERSION, build_registry_backbone,
                                        check_backbone_keys, source_metadata)
from toolkit.export.engine_state import encoder_parts
from toolkit.serialization import safe_torch_load


def read_consolidated(path: str | Path, *, extras: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a consolidated file; without `extras` only the backbone's tensors are read
    (a 4 GB center matrix in the same file costs nothing then)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                tensors = {key: handle.get_tensor(key) for key in handle.keys()
                           if extras or not key.startswith(EXTRA_PREFIX)}
        except Exception as exc:
            raise CheckpointError(f"{path} is truncated or not a .safetensors file "
                                  f"({str(exc).splitlines()[0][:120]})") from None
    else:
        payload = safe_torch_load(path, mmap=True)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_NAME:
            raise CheckpointError(f"{path} is not a FaceCL consolidated file (no '{FORMAT_NAME}' format tag)")
        metadata, tensors = dict(payload.get("metadata") or {}), dict(payload.get("tensors") or {})
    if metadata.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path} is not a FaceCL consolidated file (metadata format "
                              f"{metadata.get('format')!r}, expected {FORMAT_NAME!r})")
    if str(metadata.get("format_version")) != str(FORMAT_VERSION):
        raise CheckpointError(f"{path} has consolidated format version {metadata.get('format_version')}, this "
                              f"toolkit reads version {FORMAT_VERSION}")
    return metadata, tensors


def _is_consolidated_file(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    if path.suffix != ".pt" or not path.is_file():
        return False
    payload = safe_torch_load(path, mmap=True)
    return isinstance(payload, dict) and payload.get("format") == FORMAT_NAME


def model_config_of(metadata: dict[str, str]) -> dict[str, Any]:
    return {"backbone": metadata["backbone"], "embedding_size": int(metadata["embedding_size"]),
            "image_size": int(metadata["image_size"]),
            "options": json.loads(metadata["backbone_options"]) if metadata.get("backbone_options") else {}}


def public_metadata(metadata: dict[str, str]) -> dict[str, Any]:
    """The metadata load_backbone returns: typed values, the five documented keys first."""
    step = metadata.get("step", "")
    out: dict[str, Any] = {"backbone": metadata["backbone"], "embedding_size": int(metadata["embedding_size"]),
                           "image_size": int(metadata["image_size"]),
                           "input_normalisation": metadata.get("input_normalisation", INPUT_NORMALISATION),
                           "step": int(step) if str(step).lstrip("-").isdigit() else None}
    for key in ("num_classes", "recipe_sha256", "engine", "world_size", "zero_stage"):
        if metadata.get(key):
            out[key] = int(metadata[key]) if metadata[key].isdigit() else metadata[key]
    return out


def backbone_state_and_metadata(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The backbone state dict (registry keys) and string metadata from any supported input."""
    path = Path(path)
    if path.is_file() and _is_consolidated_file(path):
        metadata, tensors = read_consolidated(path, extras=False)
        return {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}, metadata
    source = open_checkpoint(path)
    return encoder_parts(source)["backbone"], source_metadata(source)


def load_backbone(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """(registry backbone in eval mode with the trained weights, metadata) for a run folder, checkpoints/
    folder, one checkpoint (any engine) or a consolidated .safetensors / .pt file.

    metadata holds backbone, embedding_size, image_size, input_normalisation and step (plus num_classes,
    recipe_sha256, engine, world_size when known).
    """
    state, metadata = backbone_state_and_metadata(path)
    model = build_registry_backbone(model_config_of(metadata))
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}
    check_backbone_keys(state, model, str(path))
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), public_metadata(metadata)


__all__ = ["load_backbone", "read_consolidated", "backbone_state_and_metadata", "TRAINING_FORMAT"]
