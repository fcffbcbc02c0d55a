# FSDP2's checkpoint files (torch.distributed.checkpoint): safe reads with and without a process group, checks, sizes.
"""The FSDP2 strategy saves `{"model": ..., "optim": ...}` with DCP into the step folder's `fsdp/`: one
`__R_0.distcp` data file per rank and a `.metadata` file (a pickle) that lists every entry and where its
bytes are. DCP reshards on load, so these checkpoints resume at any world size as they are.

Safety: DCP unpickles `.metadata` freely and loads non-tensor entries of the data files with an unrestricted
torch.load. Here `.metadata` is read by toolkit.serialization's restricted unpickler (`safe_dcp_reader`), and
non-tensor entries with weights_only=True (`safe_load_planner`), in training (`load_dcp_safely`) and offline
(`full_state`, which requests tensor entries only).
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import CheckpointError, FaceCLError
from toolkit.parallel.checkpoint_format import CheckpointFormat, register_checkpoint_format
from toolkit.serialization import pickled_object_message, safe_dcp_metadata

FOLDER = "fsdp"


def safe_dcp_reader(folder: Path):
    """DCP's FileSystemReader with `.metadata` parsed by the restricted unpickler (toolkit.serialization), and a
    damaged or foreign tensor record named in one line: DCP loads tensor records with weights_only=True, whose
    own refusal ends in torch's advice to load unsafely, which FaceCL never shows."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.futures import Future

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = safe_dcp_metadata(folder / ".metadata")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

        def read_data(self, plan, planner):
            per_file: dict[str, list] = {}
            for item in plan.items:
                per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
            for relative_path, items in per_file.items():   # one file at a time: an error names its file
                try:
                    super().read_data(LoadPlan(items, plan.storage_data, plan.planner_data), planner).wait()
                except CheckpointError:
                    raise
                except Exception as exc:  # noqa: BLE001 - torch raises pickle, zip and unpickler errors
                    raise CheckpointError(record_message(folder / relative_path, exc)) from None
            done: Future = Future()
            done.set_result(None)
            return done

    return SafeFileSystemReader(str(folder))


def record_message(path: Path, exc: Exception) -> str:
    """One line for a DCP data record that could not be read."""
    text = str(exc)
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if match:
        return pickled_object_message(path, match.group(1))
    return f"{path} holds a damaged record ({type(exc).__name__}: {text.strip().splitlines()[0][:120] if text.strip() else ''})"


def safe_load_planner(folder: Path):
    """DCP's default load planner, except that non-tensor items (optimizer hyper-parameters and the like,
    stored by torch.save inside the .distcp files) are loaded with weights_only=True instead of DCP's
    unrestricted torch.load."""
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as exc:  # torch raises pickle, zip and unpickler errors
                reason = str(exc).strip().splitlines()
                detail = next((line for line in reason if "Unsupported global" in line), reason[-1] if reason else "")
                raise CheckpointError(f"{folder}: the entry {read_item.dest_index.fqn!r} holds a pickled object "
                                      f"that FaceCL does not load (it could run code): {detail.strip()[:160]}") \
                    from None
            super().load_bytes(read_item, _saved(obj))

    def _saved(obj) -> io.BytesIO:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        return buffer

    return SafeLoadPlanner()


def _unwrapping_dcp_errors(load, *args, **kwargs):
    """Call a DCP loader; a CheckpointError of the safe reader or planner is re-raised as its one line (DCP wraps
    every rank's exception into a CheckpointException with tracebacks)."""
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        return load(*args, **kwargs)
    except CheckpointException as exc:
        for error, _ in exc.failures.values():
            if isinstance(error, CheckpointError):
                raise CheckpointError(str(error)) from None
        raise


def load_dcp_safely(state: dict, folder: Path, **dcp_options) -> None:
    """dcp.load through the safe reader and planner; a refused file is one CheckpointError line."""
    import torch.distributed.checkpoint as dcp

    safe_dcp_metadata(folder / ".metadata")   # refused here with its own line, before DCP wraps the error
    _unwrapping_dcp_errors(dcp.load, state, storage_reader=safe_dcp_reader(folder), planner=safe_load_planner(folder),
                           **dcp_options)


def storage_problems(folder: Path, metadata) -> list[str]:
    """Files that DCP's metadata refers to but which are missing or shorter than the data they must hold."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    problems = []
    for name, end in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif path.stat().st_size < end:
            problems.append(f"{name} truncated ({path.stat().st_size} of at least {end} bytes)")
    return problems


def _flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@register_checkpoint_format
class DcpCheckpointFormat(CheckpointFormat):
    name = "fsdp"
    folder = FOLDER

    @classmethod
    def engine(cls, source) -> str:
        return "fsdp"

    @classmethod
    def describe(cls, source) -> str:
        return "FSDP2 (DCP)"

    @classmethod
    def problems(cls, source) -> list[str]:
        folder = source.entry / FOLDER
        try:
            metadata = safe_dcp_metadata(folder / ".metadata")
        except FaceCLError as exc:
            return [str(exc)]
        problems = [f"{folder} is incomplete: {p}" for p in storage_problems(folder, metadata)]
        missing = [f"__{r}_0.distcp" for r in range(source.world_size) if not (folder / f"__{r}_0.distcp").is_file()]
        if missing:
            problems.append(f"{folder}: rank file(s) missing: {', '.join(missing[:4])}")
        return problems

    @classmethod
    def check(cls, source) -> None:
        problems = cls.problems(source)
        if problems:
            raise CheckpointError(problems[0])

    @classmethod
    def part_bytes(cls, source, problems: list[str]) -> dict[str, int]:
        parts = {"backbone": 0, "optimizer_state": 0}
        try:
            metadata = safe_dcp_metadata(source.entry / FOLDER / ".metadata")
        except FaceCLError:
            return parts
        for key, info in metadata.storage_data.items():
            parts["backbone" if key.fqn.startswith("model.") else "optimizer_state"] += int(info.length)
        return parts

    @classmethod
    def bytes_in_trainer_file(cls, source, parts) -> int:
        return 0

    @classmethod
    def verify_data(cls, source) -> list[str]:
        """Read every tensor record (model and optimizer) through the safe reader: a record that is damaged or
        holds a pickled object is named (what `inspect --checksums` adds to the completeness check)."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        folder = source.entry / FOLDER
        try:
            metadata = safe_dcp_metadata(folder / ".metadata")
            keys = {key for key, meta in metadata.state_dict_metadata.items()
                    if isinstance(meta, TensorStorageMetadata)}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _unwrapping_dcp_errors(_load_state_dict_from_keys, keys, storage_reader=safe_dcp_reader(folder))
        except FaceCLError as exc:
            return [str(exc)]
        return []

    @classmethod
    def full_state(cls, source) -> dict[str, Any]:
        """Tensor entries under `model.`, read with a safe reader and no process group."""
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

        folder = source.entry / FOLDER
        metadata = safe_dcp_metadata(folder / ".metadata")
        problems = storage_problems(folder, metadata)
        if problems:
            raise CheckpointError(f"{folder} is incomplete: {'; '.join(problems[:4])}")
        keys = {key for key, meta in metadata.state_dict_metadata.items()
                if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
        if not keys:
            raise CheckpointError(f"{folder} holds no model tensors (no 'model.' entries in its metadata)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "loading without a process group" is the intent here
            loaded = _unwrapping_dcp_errors(_load_state_dict_from_keys, keys, storage_reader=safe_dcp_reader(folder))
        model = loaded["model"] if "model" in loaded else {k[len("model."):]: v for k, v in loaded.items()}
        return _flatten(model)
