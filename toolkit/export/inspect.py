# inspect: what a checkpoint (any engine) or consolidated file holds, its sizes per part, and whether it is complete.
"""`inspect_path(path)` returns a plain dict (the `--json` output) and `format_report` the table for people.

Bytes per part are what the files hold for that part: the backbone (model weights; for DeepSpeed the fp32
size of its parameters and buffers), optimizer state (ZeRO partition files with their fp32 masters and
moments, DCP `optim.` entries, or the torch optimizer state),
center shards (every rank's centers and their optimizer rows) and the trainer state (data position, per-rank
RNG, schedulers, history). Completeness: every rank's files present and readable (torch zip directories
intact, tensors-only), the center shards covering every class once with the embedding width, DCP data
files as long as its metadata says; with `checksums` every zip record's CRC is verified too (reads all).
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import FaceCLError
from toolkit.export.checkpoints import (DEEPSPEED_TAG, FSDP_FOLDER, TRAINER_FILE, CheckpointSource, open_checkpoint,
                                        read_training_payload)
from toolkit.export.consolidate import EXTRA_PREFIX, HEAD_KEY, check_shards
from toolkit.export.engine_state import dcp_storage_problems, deepspeed_files, deepspeed_zero_stage
from toolkit.export.files import human_bytes
from toolkit.parallel.deepspeed_zero import deepspeed_folder_files, unexpected_deepspeed_files, unexpected_files_message
from toolkit.serialization import safe_dcp_metadata, safe_torch_load


def tensor_bytes(tree: Any) -> int:
    """Bytes of all tensors inside nested dicts / lists (memory-mapped tensors are not read)."""
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


def _zip_crc_problems(files: list[Path]) -> list[str]:
    problems = []
    for file in files:
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
            if bad is not None:
                problems.append(f"{file.name}: record {bad} fails its CRC check")
        except (zipfile.BadZipFile, OSError) as exc:
            problems.append(f"{file.name}: {exc}")
    return problems


def _try(problems: list[str], action, *args):
    try:
        return action(*args)
    except FaceCLError as exc:
        problems.append(str(exc))
        return None


def inspect_path(path: str | Path, *, checksums: bool = False) -> dict[str, Any]:
    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        return _inspect_consolidated(path)
    if path.is_file() and path.suffix == ".pt":
        payload = safe_torch_load(path, mmap=True)
        if isinstance(payload, dict) and payload.get("format") == "facecl-consolidated":
            return _inspect_consolidated(path)
    return _inspect_checkpoint(open_checkpoint(path), checksums)


def _inspect_consolidated(path: Path) -> dict[str, Any]:
    from toolkit.export.load import read_consolidated

    metadata, tensors = read_consolidated(path)
    backbone = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    return {"path": str(path), "kind": "consolidated", "engine": metadata.get("engine"),
            "zero_stage": int(metadata["zero_stage"]) if metadata.get("zero_stage") else None,
            "world_size": int(metadata["world_size"]) if metadata.get("world_size", "").isdigit() else None,
            "step": int(metadata["step"]) if metadata.get("step", "").lstrip("-").isdigit() else None,
            "backbone": metadata.get("backbone"), "embedding_size": int(metadata["embedding_size"]),
            "image_size": int(metadata["image_size"]),
            "num_classes": int(metadata["num_classes"]) if metadata.get("num_classes") else None,
            "precision": "fp32", "input_normalisation": metadata.get("input_normalisation"),
            "bytes": {"backbone": tensor_bytes(backbone),
                      "center_shards": tensor_bytes(tensors.get(HEAD_KEY)) if HEAD_KEY in tensors else 0,
                      "key_encoder": tensor_bytes({k: v for k, v in tensors.items()
                                                   if k.startswith(EXTRA_PREFIX) and k != HEAD_KEY})},
            "file_bytes": path.stat().st_size, "complete": True, "problems": [], "metadata": metadata}


def _inspect_checkpoint(source: CheckpointSource, checksums: bool) -> dict[str, Any]:
    problems: list[str] = []
    world = source.world_size
    config = source.model_config
    trainer = source.trainer
    engine_section = trainer.get("engine") or {}
    torch_files: list[Path] = [source.entry / TRAINER_FILE if source.is_folder else source.entry]
    parts = {"backbone": tensor_bytes(engine_section.get("backbone")),
             "optimizer_state": tensor_bytes(engine_section.get("optimizer")),
             "center_shards": 0, "trainer_state": 0}
    trainer_file_bytes = torch_files[0].stat().st_size
    zero_stage = None
    if source.engine == "deepspeed":
        tag_dir = source.entry / DEEPSPEED_TAG
        model_files, optim_files = deepspeed_files(tag_dir)
        zero_stage = deepspeed_zero_stage(source)
        torch_files += [*model_files, *optim_files]
        parts["backbone"] = _deepspeed_model_bytes(model_files[0], problems) if model_files else 0
        parts["optimizer_state"] = sum(p.stat().st_size for p in optim_files)
        expected_optim = world if zero_stage >= 1 else 0
        if len(optim_files) != expected_optim:
            problems.append(f"{tag_dir}: {len(optim_files)} ZeRO optimizer files for {world} ranks")
        if zero_stage == 3 and len(model_files) != world:
            problems.append(f"{tag_dir}: {len(model_files)} ZeRO-3 model-state files for {world} ranks")
        if not model_files:
            problems.append(f"{tag_dir}: no model-state file")
        for file in deepspeed_folder_files(tag_dir):   # every file DeepSpeed's readers might open
            _try(problems, lambda f: safe_torch_load(f, mmap=True), file)
        unexpected = unexpected_deepspeed_files(tag_dir)
        if unexpected:
            problems.append(unexpected_files_message(tag_dir, unexpected))
    elif source.engine == "fsdp":
        folder = source.entry / FSDP_FOLDER
        metadata = _try(problems, safe_dcp_metadata, folder / ".metadata")
        if metadata is not None:
            problems += [f"{folder}: {p}" for p in dcp_storage_problems(folder, metadata)]
            for info_key, info in metadata.storage_data.items():
                part = "backbone" if info_key.fqn.startswith("model.") else "optimizer_state"
                parts[part] += int(info.length)
        missing = [f"__{r}_0.distcp" for r in range(world) if not (folder / f"__{r}_0.distcp").is_file()]
        if missing:
            problems.append(f"{folder}: rank file(s) missing: {', '.join(missing[:4])}")
    # center shards
    if not source.has_head:
        shards = []
    elif source.is_folder:
        head_files = source.expected_head_files()
        torch_files += [p for p in head_files if p.is_file()]
        missing = [p.name for p in head_files if not p.is_file()]
        extra = [p.name for p in source.head_files() if p not in head_files]
        if missing:
            problems.append(f"{source.entry}: center shard file(s) missing: {', '.join(missing[:4])}")
        if extra:
            problems.append(f"{source.entry}: center shard file(s) of ranks beyond the world size {world}: "
                            f"{', '.join(extra[:4])}")
        shards = [s for s in (_try(problems, read_training_payload, p) for p in head_files if p.is_file()) if s]
        parts["center_shards"] = sum(p.stat().st_size for p in head_files if p.is_file())
    else:
        shards = list(trainer.get("head_shards") or [])
        parts["center_shards"] = tensor_bytes(shards)
    if not source.has_head:
        parts["center_shards"] = 0
    if shards and not missing_any(problems):
        checked = _try(problems, check_shards, shards, str(source.entry))
        if checked is not None:
            _, num_classes, dim = checked
            if source.num_classes is not None and num_classes != source.num_classes:
                problems.append(f"center shards hold {num_classes} classes, the trainer file says {source.num_classes}")
            if dim != config["embedding_size"]:
                problems.append(f"center shards are {dim} wide, the embedding size is {config['embedding_size']}")
    inside_trainer = parts["backbone"] + parts["optimizer_state"] if source.engine in ("single", "ddp") else 0
    inside_trainer += parts["center_shards"] if not source.is_folder else 0
    parts["trainer_state"] = max(0, trainer_file_bytes - inside_trainer)
    if checksums:
        problems += _zip_crc_problems([f for f in torch_files if f.is_file()])
    total = sum(p.stat().st_size for p in source.entry.rglob("*") if p.is_file()) if source.is_folder \
        else source.entry.stat().st_size
    return {"path": str(source.entry), "kind": "checkpoint", "engine": source.engine, "zero_stage": zero_stage,
            "sharding": _sharding(source.engine, zero_stage), "world_size": world, "step": source.step,
            "backbone": config["backbone"], "embedding_size": config["embedding_size"],
            "image_size": config["image_size"], "num_classes": source.num_classes,
            "precision": source.parallel.get("precision", "unknown"), "contrastive": source.contrastive,
            "bytes": parts, "file_bytes": total, "recipe_sha256": source.recipe_sha256,
            "complete": not problems, "problems": problems}


def _deepspeed_model_bytes(model_file: Path, problems: list[str]) -> int:
    """fp32 bytes of the model's parameters (DeepSpeed's param_shapes, frozen ones too) and its buffers.

    The model-state files themselves say little: ZeRO-3 keeps only placeholders there, the fp32 values
    live in the optimizer partitions."""
    states = _try(problems, lambda f: safe_torch_load(f, mmap=True), model_file)
    if not isinstance(states, dict):
        return 0
    numel = 0
    for group in states.get("param_shapes") or []:
        numel += sum(int(torch.Size(shape).numel()) for shape in group.values())
    numel += sum(int(torch.Size(shape).numel()) for shape in (states.get("frozen_param_shapes") or {}).values())
    buffers = set(states.get("buffer_names") or [])
    module = states.get("module") or {}
    return numel * 4 + tensor_bytes({k: v for k, v in module.items() if k in buffers})


def missing_any(problems: list[str]) -> bool:
    return any("missing" in p for p in problems)


def _sharding(engine: str, zero_stage: int | None) -> str:
    if engine == "deepspeed":
        return f"DeepSpeed ZeRO-{zero_stage}"
    return {"fsdp": "FSDP2 (DCP)", "ddp": "DDP (replicated backbone)", "single": "none (one process)"}[engine]


def format_report(info: dict[str, Any]) -> str:
    rows = [("path", info["path"]), ("kind", info["kind"])]
    if info["kind"] == "checkpoint":
        rows += [("engine", info["sharding"]), ("world size", info["world_size"])]
    elif info.get("engine"):
        rows += [("trained with", f"{info['engine']} on {info.get('world_size')} rank(s)")]
    rows += [("step", info["step"]), ("backbone", info["backbone"]), ("embedding size", info["embedding_size"]),
             ("image size", info["image_size"]), ("classes", info["num_classes"]), ("precision", info["precision"])]
    if info.get("contrastive"):
        rows.append(("UniMoCo", "yes (key encoder in the engine part)"))
    for part, size in info["bytes"].items():
        rows.append((f"bytes: {part.replace('_', ' ')}", f"{human_bytes(size)} ({size})"))
    rows.append(("bytes: total on disk", f"{human_bytes(info['file_bytes'])} ({info['file_bytes']})"))
    rows.append(("complete", "yes" if info["complete"] else "NO"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{key:<{width}}  {value}" for key, value in rows]
    lines += [f"{'':<{width}}  problem: {p}" for p in info["problems"]]
    return "\n".join(lines)
