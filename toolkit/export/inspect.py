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


from toolkit.checkpoint import TRAINER_FILE, CheckpointSource, open_checkpoint, read_training_payload
from toolkit.errors import CheckpointError, FaceCLError
from toolkit.export.consolidate import EXTRA_PREFIX, HEAD_KEY, check_shards
from toolkit.export.files import human_bytes
from toolkit.parallel import CheckpointFormat, format_of
from toolkit.parallel.checkpoint_format import tensor_bytes


def _zip_crc_problems(files: list[Path]) -> tuple[list[str], int]:
    """(problems, number of zip records whose CRC was verified) of torch's zip files."""
    problems, records = [], 0
    for file in files:
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
                records += len(archive.infolist())
            if bad is not None:
                problems.append(f"{file.name}: record {bad} fails its CRC check")
        except (zipfile.BadZipFile, OSError) as exc:
            problems.append(f"{file.name}: {exc}")
    return problems, records


def _try(problems: list[str], action, *args):
    try:
        return action(*args)
    except FaceCLError as exc:
        problems.append(str(exc))
        return None


def inspect_path(path: str | Path, *, checksums: bool = False) -> dict[str, Any]:
    from toolkit.export.load import CONSOLIDATED, OTHER, read_weights

    path = Path(path)
    if path.is_dir():   # a run, checkpoints folder or step folder (read_weights would read it whole)
        return _inspect_checkpoint(open_checkpoint(path), checksums)
    weights = read_weights(path)
    if weights.kind == CONSOLIDATED:
        return _inspect_consolidated(path, weights.metadata, weights.tensors)
    if weights.kind == OTHER:
        raise CheckpointError(f"{path} is not a FaceCL checkpoint or consolidated file (no FaceCL format tag; a file "
                              f"of another tool?)")
    return _inspect_checkpoint(weights.source, checksums)


def _inspect_consolidated(path: Path, metadata: dict[str, str], tensors: dict) -> dict[str, Any]:
    backbone = {k: v for k, v in tensors.items() if not k.startswith(EXTRA_PREFIX)}
    return {"path": str(path), "kind": "consolidated", "engine": metadata.get("engine"),
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
    fmt = _try(problems, format_of, source)
    torch_files: list[Path] = [source.entry / TRAINER_FILE if source.is_folder else source.entry]
    parts = {"backbone": 0, "optimizer_state": 0, "center_shards": 0, "trainer_state": 0}
    if fmt is not None:
        problems += fmt.problems(source)
        parts.update(fmt.part_bytes(source, problems))
        torch_files += fmt.files(source)
    trainer_file_bytes = torch_files[0].stat().st_size
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
        shards = list(source.trainer.get("head_shards") or [])
        parts["center_shards"] = tensor_bytes(shards)
    if shards and not missing_any(problems):
        checked = _try(problems, check_shards, shards, str(source.entry))
        if checked is not None:
            _, num_classes, dim = checked
            if source.num_classes is not None and num_classes != source.num_classes:
                problems.append(f"center shards hold {num_classes} classes, the trainer file says {source.num_classes}")
            if dim != config["embedding_size"]:
                problems.append(f"center shards are {dim} wide, the embedding size is {config['embedding_size']}")
    inside_trainer = fmt.bytes_in_trainer_file(source, parts) if fmt is not None else 0
    inside_trainer += parts["center_shards"] if not source.is_folder else 0
    parts["trainer_state"] = max(0, trainer_file_bytes - inside_trainer)
    verified = None
    if checksums:
        checked_files = [f for f in torch_files if f.is_file()]
        crc_problems, records = _zip_crc_problems(checked_files)
        data_problems = fmt.verify_data(source) if fmt is not None else []
        problems += crc_problems + data_problems
        verified = {"files": len(checked_files), "zip_records": records,
                    "data_records_read": fmt is not None and
                    fmt.verify_data.__func__ is not CheckpointFormat.verify_data.__func__,
                    "problems": len(crc_problems) + len(data_problems)}
    total = sum(p.stat().st_size for p in source.entry.rglob("*") if p.is_file()) if source.is_folder \
        else source.entry.stat().st_size
    details = fmt.details(source) if fmt is not None else {}
    return {"path": str(source.entry), "kind": "checkpoint", "engine": fmt.engine(source) if fmt else "unknown",
            **details, "sharding": fmt.describe(source) if fmt else "unknown",
            "world_size": world, "step": source.step,
            "backbone": config["backbone"], "embedding_size": config["embedding_size"],
            "image_size": config["image_size"], "num_classes": source.num_classes,
            "precision": source.parallel.get("precision", "unknown"), "contrastive": source.contrastive,
            "bytes": parts, "file_bytes": total, "recipe_sha256": source.recipe_sha256,
            "unexpected_files": [str(p) for p in _unexpected_entries(source, fmt)], "checksums": verified,
            "complete": not problems, "problems": problems}


def _unexpected_entries(source: CheckpointSource, fmt) -> list[Path]:
    """Files and folders at the top of a step folder that no FaceCL writer puts there (nothing reads them)."""
    if not source.is_folder:
        return []
    known = {TRAINER_FILE, *(p.name for p in source.head_files()), *([fmt.folder] if fmt and fmt.folder else [])}
    return sorted(p for p in source.entry.iterdir() if p.name not in known)


def missing_any(problems: list[str]) -> bool:
    return any("missing" in p for p in problems)


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
    verified = info.get("checksums")
    if verified:
        also = "; every data record read" if verified["data_records_read"] else ""
        rows.append(("checksums", f"{verified['zip_records']} zip records in {verified['files']} files verified{also}: "
                                  f"{verified['problems'] or 'no'} problem(s)"))
    if info.get("unexpected_files"):
        rows.append(("not FaceCL's (ignored)", ", ".join(Path(p).name for p in info["unexpected_files"][:6])))
    rows.append(("complete", "yes" if info["complete"] else "NO"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{key:<{width}}  {value}" for key, value in rows]
    lines += [f"{'':<{width}}  problem: {p}" for p in info["problems"]]
    return "\n".join(lines)
