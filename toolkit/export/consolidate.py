# Consolidation: one plain file (backbone state dict + metadata, optionally centers and key encoder) from any checkpoint.
"""`consolidate(checkpoint, out)` writes what deployment, evaluation and fine-tuning need from a training
checkpoint of any engine and world size, on CPU, without a process group:

- the backbone's full fp32 state dict, keys exactly those of `toolkit.models.create_backbone(name)`, so
  `model.load_state_dict(state, strict=True)` works;
- string metadata: format (consolidated) + version, backbone, embedding_size, image_size, input_normalisation,
  step, recipe_sha256, num_classes, engine, world_size;
- with `with_head`, `facecl_head.centers`: the C x D identity-center matrix merged from every rank's
  shard in class order (streamed shard by shard, chunk by chunk);
- with `with_key_encoder` (UniMoCo runs), the momentum encoder and both projections under
  `facecl_key_backbone.`, `facecl_key_projection.` and `facecl_projection.`.

Every extra key starts with EXTRA_PREFIX, which no backbone parameter does; `load_backbone` ignores them.
`.safetensors` (default) is streamed, its metadata under facecl_ next to `format: pt` (toolkit.export.files);
`.pt` is a torch.save'd dict (tensors only, tagged FORMAT_NAME) and is built in memory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from toolkit.errors import CheckpointError, FaceCLError
from toolkit.checkpoint import INPUT_NORMALISATION, CheckpointSource, open_checkpoint
from toolkit.export.engine_state import encoder_parts
from toolkit.parallel import format_of
from toolkit.export.files import (Progress, TensorEntry, atomic_output, check_output_path, row_chunks,
                                  tensor_entry, write_safetensors)

FORMAT_NAME = "facecl-consolidated"   # tag of a consolidated .pt file; the metadata format of earlier versions
METADATA_FORMAT = "consolidated"       # metadata `format` (in a .safetensors file: facecl_format, next to format: pt)
FORMAT_VERSION = 1
EXTRA_PREFIX = "facecl_"
HEAD_KEY = "facecl_head.centers"
ENCODER_EXTRA_PREFIXES = {"key_backbone": "facecl_key_backbone.", "key_projection": "facecl_key_projection.",
                          "projection": "facecl_projection."}
METADATA_KEYS = ("format", "format_version", "backbone", "embedding_size", "image_size", "input_normalisation",
                 "step", "recipe_sha256", "num_classes")


@dataclass
class ConsolidateResult:
    out: Path
    num_bytes: int
    metadata: dict[str, str]
    tensors: dict[str, tuple[int, ...]]   # name -> shape of every tensor written


def build_registry_backbone(model_config: dict[str, Any]) -> torch.nn.Module:
    """The registry's model for a checkpoint's backbone name and sizes (weights not loaded)."""
    from toolkit.models import create_backbone

    return create_backbone(model_config["backbone"], embedding_size=int(model_config["embedding_size"]),
                           input_size=int(model_config["image_size"]), **dict(model_config.get("options") or {}))


def check_backbone_keys(state: dict[str, torch.Tensor], model: torch.nn.Module, where: str) -> None:
    """The state dict must have exactly the registry model's keys and shapes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{where}: backbone keys do not match the registry model ({len(missing)} missing, e.g. "
                              f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]})")
    for key, value in expected.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise CheckpointError(f"{where}: backbone tensor {key} has shape {tuple(state[key].shape)}, the registry "
                                  f"model has {tuple(value.shape)}")


def _fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in state.items()}


def check_shards(shards: list[dict[str, Any]], where: str) -> tuple[list[dict[str, Any]], int, int]:
    """Shards sorted by class_start, covering [0, num_classes) exactly once; returns (shards, C, D)."""
    num_classes = {int(s["num_classes"]) for s in shards}
    if len(num_classes) != 1:
        raise CheckpointError(f"{where}: center shards disagree on the class count ({sorted(num_classes)})")
    total = num_classes.pop()
    shards = sorted(shards, key=lambda s: int(s["class_start"]))
    dims = set()
    cursor = 0
    for shard in shards:
        start, count = int(shard["class_start"]), int(shard["class_count"])
        centers = shard["centers"]
        if start != cursor:
            raise CheckpointError(f"{where}: center shards leave classes [{cursor}, {start}) uncovered or overlap")
        if centers.dim() != 2 or centers.shape[0] != count:
            raise CheckpointError(f"{where}: the shard of classes [{start}, {start + count}) holds a centers tensor "
                                  f"of shape {tuple(centers.shape)}")
        dims.add(int(centers.shape[1]))
        cursor = start + count
    if cursor != total:
        raise CheckpointError(f"{where}: center shards cover {cursor} of {total} classes")
    if len(dims) != 1:
        raise CheckpointError(f"{where}: center shards have different widths {sorted(dims)}")
    return shards, total, dims.pop()


def merged_centers_entry(name: str, shards: list[dict[str, Any]], num_classes: int, dim: int) -> TensorEntry:
    """The C x D matrix as one streamed tensor: each shard's rows in class order, in fp32."""

    def chunks() -> Iterator[torch.Tensor]:
        for shard in shards:
            for piece in row_chunks(shard["centers"], release=True):   # shards are memory-mapped
                yield piece.float() if piece.dtype != torch.float32 else piece

    return TensorEntry(name, torch.float32, (num_classes, dim), chunks)


def source_metadata(source: CheckpointSource) -> dict[str, str]:
    config = source.model_config
    fmt = format_of(source)
    meta = {"format": METADATA_FORMAT, "format_version": str(FORMAT_VERSION), "backbone": config["backbone"],
            "embedding_size": str(config["embedding_size"]), "image_size": str(config["image_size"]),
            "input_normalisation": INPUT_NORMALISATION, "step": str(source.step),
            "recipe_sha256": source.recipe_sha256 or "", "num_classes": str(source.num_classes or ""),
            "engine": fmt.engine(source), "world_size": str(source.world_size), **fmt.metadata(source)}
    if config.get("options"):
        meta["backbone_options"] = json.dumps(config["options"], sort_keys=True)
    return meta


def consolidate(path: str | Path, out: str | Path, *, with_head: bool = False, with_key_encoder: bool = False,
                overwrite: bool = False, progress: bool | None = None) -> ConsolidateResult:
    """Write the consolidated file of the checkpoint at `path` to `out` (.safetensors or .pt)."""
    out = Path(out)
    if out.suffix not in (".safetensors", ".pt"):
        raise FaceCLError(f"output {out}: use a .safetensors (default) or .pt file name")
    check_output_path(out, overwrite)
    source = open_checkpoint(path)
    target, entry = out.resolve(), source.entry.resolve()
    if target == entry or (entry.is_dir() and target.is_relative_to(entry)):
        raise FaceCLError(f"output {out} would overwrite the checkpoint being read ({source.entry})")
    parts = encoder_parts(source)
    model = build_registry_backbone(source.model_config)
    backbone = _fp32(parts["backbone"])
    check_backbone_keys(backbone, model, str(source.entry))
    entries = [tensor_entry(key, backbone[key]) for key in model.state_dict()]
    if with_key_encoder:
        if not source.contrastive:
            raise FaceCLError(f"{source.entry} is not a UniMoCo run: it has no key encoder (drop --with-key-encoder)")
        for part, prefix in ENCODER_EXTRA_PREFIXES.items():
            entries += [tensor_entry(prefix + key, value) for key, value in _fp32(parts[part]).items()]
    metadata = source_metadata(source)
    if with_head:
        shards, num_classes, dim = check_shards(source.head_shards(), str(source.entry))
        entries.append(merged_centers_entry(HEAD_KEY, shards, num_classes, dim))
    metadata["parts"] = ",".join(["backbone", *(["head"] if with_head else []),
                                  *(["key_encoder"] if with_key_encoder else [])])
    total = sum(e.nbytes for e in entries)
    bar = Progress(total, f"consolidate -> {out.name}", enabled=progress)
    try:
        if out.suffix == ".safetensors":
            size = atomic_output(out, lambda tmp: write_safetensors(tmp, entries, metadata, bar))
        else:
            size = atomic_output(out, lambda tmp: _write_pt(tmp, entries, metadata, bar))
    finally:
        bar.close()
    return ConsolidateResult(out=out, num_bytes=size, metadata=metadata,
                             tensors={e.name: e.shape for e in entries})


def _write_pt(tmp: Path, entries: list[TensorEntry], metadata: dict[str, str], bar: Progress) -> None:
    tensors = {}
    for entry in entries:
        pieces = list(entry.chunks())
        tensors[entry.name] = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
        bar.advance(entry.nbytes)
    torch.save({"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "metadata": metadata,
                "tensors": tensors}, tmp)


def save_consolidated(out: str | Path, backbone: torch.nn.Module, model_config: dict[str, Any], *,
                      step: int = 0, num_classes: int | None = None, head_centers: torch.Tensor | None = None,
                      overwrite: bool = False) -> ConsolidateResult:
    """A consolidated file from an in-memory registry backbone (e.g. built or fine-tuned outside a run)."""
    out = Path(out)
    check_output_path(out, overwrite)
    state = _fp32(backbone.state_dict())
    metadata = {"format": METADATA_FORMAT, "format_version": str(FORMAT_VERSION), "backbone": model_config["backbone"],
                "embedding_size": str(model_config["embedding_size"]), "image_size": str(model_config["image_size"]),
                "input_normalisation": INPUT_NORMALISATION, "step": str(step), "recipe_sha256": "",
                "num_classes": str(num_classes or ""), "engine": "none", "world_size": "1",
                "parts": "backbone" + (",head" if head_centers is not None else "")}
    if model_config.get("options"):
        metadata["backbone_options"] = json.dumps(model_config["options"], sort_keys=True)
    entries = [tensor_entry(k, v) for k, v in state.items()]
    if head_centers is not None:
        entries.append(tensor_entry(HEAD_KEY, head_centers.detach().float().contiguous()))
    if out.suffix == ".safetensors":
        size = atomic_output(out, lambda tmp: write_safetensors(tmp, entries, metadata))
    else:
        size = atomic_output(out, lambda tmp: _write_pt(tmp, entries, metadata, Progress(0, "", enabled=False)))
    return ConsolidateResult(out=out, num_bytes=size, metadata=metadata, tensors={e.name: e.shape for e in entries})
