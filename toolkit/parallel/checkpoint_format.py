# Checkpoint formats, read without a process group: one owner per engine's files (safe reads, checks, sizes, state).
"""Each engine writes the backbone part of a checkpoint in its own format; the class that knows that format
is the only code that names its files. The training half of a format (writing and loading with a process
group) is the engine's strategy (`save_folder` / `load_folder` / `state_for_file`); the offline half is here:
every tool that reads a checkpoint without training (consolidate, export, evaluate, inspect, init_from, the
world-size converter) asks `format_of(source)` and calls:

    check(source)          complete and safe to hand to the library: every file any library reader may open is
                           read first with the safe loader; CheckpointError (one line) naming what is wrong
    problems(source)       the same findings as a list, for `inspect` (never raises)
    files(source)          the torch files it holds (inspect --checksums)
    part_bytes(source)     {"backbone": ..., "optimizer_state": ...} bytes on disk or in the trainer file
    full_state(source)     the full (unsharded) fp32 state dict of the engine module, on CPU
    describe / details     how inspect labels it ("DeepSpeed ZeRO-2"), extra fields ({"zero_stage": 2})
    resize(source, out)    write a copy that resumes at any world size, where the format needs one

`TrainerFileFormat` is the format of engines whose state travels inside trainer.pt (single process, DDP).
Adding an engine that writes its own folder: one module with its strategy and its format (a subclass with
`name`, `folder` and the calls above), `@register_checkpoint_format`, and its name in the recipe schema.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from toolkit.errors import CheckpointError, FaceCLError

if TYPE_CHECKING:
    from toolkit.checkpoint import CheckpointSource


def tensor_bytes(tree: Any) -> int:
    """Bytes of all tensors inside nested dicts / lists (memory-mapped tensors are not read)."""
    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    if isinstance(tree, (list, tuple)):
        return sum(tensor_bytes(v) for v in tree)
    return 0


class CheckpointFormat:
    """The format of engines whose state is inside the trainer file; folder formats override the calls."""

    name: ClassVar[str] = "file"          # recorded as `engine_format` in every trainer file
    folder: ClassVar[str | None] = None   # its folder inside a step folder (None: inside the trainer file)
    resized_suffix: ClassVar[str] = ".resized"   # the name of a `resize` copy: <step entry name><suffix>

    @classmethod
    def resumes_at_any_world_size(cls, entry: Path) -> bool:
        """Whether the engine loads this entry at another world size as it is (else `resize` makes a copy)."""
        return True

    @classmethod
    def engine(cls, source: "CheckpointSource") -> str:
        """The recipe engine that wrote it (the recipe names it when the files cannot)."""
        recipe_engine = source.recipe_engine
        if recipe_engine in ("single", "ddp"):
            return recipe_engine
        return "single" if source.world_size == 1 else "ddp"

    @classmethod
    def describe(cls, source: "CheckpointSource") -> str:
        return "none (one process)" if cls.engine(source) == "single" else "DDP (replicated backbone)"

    @classmethod
    def details(cls, source: "CheckpointSource") -> dict[str, Any]:
        return {}

    @classmethod
    def check(cls, source: "CheckpointSource") -> None:
        state = (source.trainer.get("engine") or {}).get("backbone")
        if not isinstance(state, dict) or not state:
            raise CheckpointError(f"{source.entry}: the trainer file holds no backbone state (engine "
                                  f"{cls.engine(source)!r})")

    @classmethod
    def problems(cls, source: "CheckpointSource") -> list[str]:
        try:
            cls.check(source)
        except FaceCLError as exc:
            return [str(exc)]
        return []

    @classmethod
    def files(cls, source: "CheckpointSource") -> list[Path]:
        """Its torch (zip) files, whose records `inspect --checksums` verifies."""
        return []

    @classmethod
    def verify_data(cls, source: "CheckpointSource") -> list[str]:
        """Problems found by reading every data record (what `inspect --checksums` adds beyond zip CRCs)."""
        return []

    @classmethod
    def part_bytes(cls, source: "CheckpointSource", problems: list[str]) -> dict[str, int]:
        engine = source.trainer.get("engine") or {}
        return {"backbone": tensor_bytes(engine.get("backbone")), "optimizer_state": tensor_bytes(engine.get("optimizer"))}

    @classmethod
    def bytes_in_trainer_file(cls, source: "CheckpointSource", parts: dict[str, int]) -> int:
        """What of the trainer file's size belongs to the engine part."""
        return parts["backbone"] + parts["optimizer_state"]

    @classmethod
    def full_state(cls, source: "CheckpointSource") -> dict[str, torch.Tensor]:
        cls.check(source)
        return dict(source.trainer["engine"]["backbone"])

    @classmethod
    def metadata(cls, source: "CheckpointSource") -> dict[str, str]:
        """Extra string metadata for consolidated files."""
        return {key: str(value) for key, value in cls.details(source).items() if value is not None}

    @classmethod
    def resize(cls, source: "CheckpointSource", out: Path, *, overwrite: bool = False):
        raise FaceCLError(f"{source.entry} was written by the {cls.engine(source)} engine, whose checkpoints load at "
                          f"any world size as they are (the center shards reshard by class range): nothing to convert")


_FORMATS: dict[str, type[CheckpointFormat]] = {CheckpointFormat.name: CheckpointFormat}


def register_checkpoint_format(cls: type[CheckpointFormat]) -> type[CheckpointFormat]:
    if cls.name in _FORMATS and _FORMATS[cls.name] is not cls:
        raise ValueError(f"checkpoint format {cls.name!r} is already registered by {_FORMATS[cls.name].__qualname__}")
    _FORMATS[cls.name] = cls
    return cls


def format_of(source: "CheckpointSource") -> type[CheckpointFormat]:
    """The format of a checkpoint: a folder format whose folder is in the step folder, else the trainer file's."""
    if source.is_folder:
        for fmt in _FORMATS.values():
            if fmt.folder is not None and (source.entry / fmt.folder).is_dir():
                return fmt
    recorded = _FORMATS.get(source.engine_format or "file")
    if recorded is not None and recorded.folder is not None:
        raise CheckpointError(f"{source.entry} was written by the {recorded.name} engine but its folder "
                              f"{source.entry / recorded.folder} is missing")
    return CheckpointFormat
