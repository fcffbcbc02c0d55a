# load_backbone: the registry backbone with trained weights, from a run, a checkpoint or a consolidated file.
"""One entry point for evaluation and deployment code: whatever the user points at (a run folder, its
checkpoints/ folder, one checkpoint of any engine, or a consolidated .safetensors / .pt), return the
registry model in eval mode with the weights, plus metadata (backbone, embedding_size, image_size,
input_normalisation, step). All reads are tensors-only (safetensors, or torch files via safe_torch_load).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import CheckpointError
from toolkit.checkpoint import FORMAT as TRAINING_FORMAT
from toolkit.checkpoint import FORMAT_VERSION as TRAINING_FORMAT_VERSION
from toolkit.checkpoint import INPUT_NORMALISATION, CheckpointSource, open_checkpoint, source_of
from toolkit.export.consolidate import (EXTRA_PREFIX, FORMAT_NAME, FORMAT_VERSION, METADATA_FORMAT,
                                        build_registry_backbone, check_backbone_keys, source_metadata)
from toolkit.export.engine_state import encoder_parts
from toolkit.export.files import toolkit_metadata
from toolkit.serialization import safe_torch_load


@dataclass
class WeightsFile:
    """A path whose kind was read once: a consolidated file, a training checkpoint, or another torch file."""

    kind: str                                   # CONSOLIDATED, CHECKPOINT or OTHER
    path: Path
    metadata: dict[str, str] | None = None      # consolidated: its string metadata
    tensors: dict[str, torch.Tensor] | None = None    # consolidated: its tensors (memory-mapped or lazy)
    source: CheckpointSource | None = None      # checkpoint
    payload: Any = None                         # other: what the torch file holds (e.g. an arcface_torch state dict)


CONSOLIDATED, CHECKPOINT, OTHER = "consolidated", "checkpoint", "other"


def read_weights(path: str | Path, *, extras: bool = True) -> WeightsFile:
    """Open `path` once and tell what it is: a folder is a run, checkpoints folder or step folder; a
    .safetensors file is a consolidated file; a torch file is told by its format tag (a consolidated file, a
    one-file training checkpoint, or anything else, e.g. another tool's state dict). Without `extras` a
    .safetensors file's extra tensors (a 4 GB center matrix) are not read."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir():
        return WeightsFile(CHECKPOINT, path, source=open_checkpoint(path))
    if path.suffix == ".safetensors":
        metadata, tensors = _read_safetensors(path, extras)
        return WeightsFile(CONSOLIDATED, path, metadata=_checked_metadata(metadata, path), tensors=tensors)
    payload = safe_torch_load(path, mmap=True)
    fmt = payload.get("format") if isinstance(payload, dict) else None
    if fmt == FORMAT_NAME:
        metadata = _checked_metadata(dict(payload.get("metadata") or {}), path)
        return WeightsFile(CONSOLIDATED, path, metadata=metadata, tensors=dict(payload.get("tensors") or {}))
    if fmt == TRAINING_FORMAT:
        return WeightsFile(CHECKPOINT, path, source=source_of(path, read_payload_checked(payload, path)))
    return WeightsFile(OTHER, path, payload=payload)


def read_payload_checked(payload: dict, path: Path) -> dict:
    if payload.get("format_version") != TRAINING_FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {payload.get('format_version')}, this toolkit "
                              f"reads version {TRAINING_FORMAT_VERSION}")
    return payload


def _read_safetensors(path: Path, extras: bool) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = toolkit_metadata(dict(handle.metadata() or {}))
            tensors = {key: handle.get_tensor(key) for key in handle.keys()
                       if extras or not key.startswith(EXTRA_PREFIX)}
    except Exception as exc:
        raise CheckpointError(f"{path} is truncated or not a .safetensors file "
                              f"({str(exc).splitlines()[0][:120]})") from None
    return metadata, tensors


def _checked_metadata(metadata: dict[str, str], path: Path) -> dict[str, str]:
    if metadata.get("format") not in (METADATA_FORMAT, FORMAT_NAME):   # FORMAT_NAME: files of earlier versions
        raise CheckpointError(f"{path} is not a FaceCL consolidated file (its FaceCL metadata format is "
                              f"{metadata.get('format')!r}, expected {METADATA_FORMAT!r})")
    if str(metadata.get("format_version")) != str(FORMAT_VERSION):
        raise CheckpointError(f"{path} has consolidated format version {metadata.get('format_version')}, this "
                              f"toolkit reads version {FORMAT_VERSION}")
    return metadata


def read_consolidated(path: str | Path, *, extras: bool = True) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """(metadata, tensors) of a consolidated file; without `extras` only the backbone's tensors are read
    (a 4 GB center matrix in the same file costs nothing then)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    weights = read_weights(path, extras=extras)
    if weights.kind != CONSOLIDATED:
        raise CheckpointError(f"{path} is not a FaceCL consolidated file (no '{FORMAT_NAME}' format tag)")
    return weights.metadata, weights.tensors


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
    # The rest as written (engine, world size and what the engine's format adds, e.g. the ZeRO stage).
    internal = {"format", "format_version", "parts", "backbone_options", *out}
    for key, value in metadata.items():
        if key not in internal and value:
            out[key] = int(value) if value.isdigit() else value
    return out


def backbone_state_and_metadata(path: str | Path | WeightsFile) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The backbone state dict (registry keys) and string metadata from any supported input."""
    weights = path if isinstance(path, WeightsFile) else read_weights(path, extras=False)
    if weights.kind == CONSOLIDATED:
        return {k: v for k, v in weights.tensors.items() if not k.startswith(EXTRA_PREFIX)}, weights.metadata
    if weights.kind == CHECKPOINT:
        return encoder_parts(weights.source)["backbone"], source_metadata(weights.source)
    raise CheckpointError(f"{weights.path} is not a FaceCL checkpoint (no '{TRAINING_FORMAT}' format tag; a "
                          f"checkpoint of another tool?)")


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


__all__ = ["load_backbone", "read_consolidated", "read_weights", "backbone_state_and_metadata", "TRAINING_FORMAT"]
