# Finding and reading FaceCL training checkpoints (every engine's layout) without a process group.
"""A FaceCL checkpoint is one of two layouts, written by the trainer:

- one process: `checkpoints/step_XXXXXXXX.pt`, a torch file with the trainer state, the engine state
  (backbone state dict + optimizer) and `head_shards` (one shard holding every identity center);
- several ranks or a folder engine: `checkpoints/step_XXXXXXXX/` with `trainer.pt` (rank 0: run identity,
  schedulers, per-rank RNG, data position; the backbone too for DDP), `head_rankNNNNN.pt` per rank (its
  class range, centers and optimizer rows), and `deepspeed/` (DeepSpeed's tag folder: model states and
  per-rank ZeRO optimizer partitions) or `fsdp/` (torch.distributed.checkpoint: `.metadata` + one
  `__R_0.distcp` per rank).

`checkpoints/latest` names the newest complete entry; the run folder holds `resolved.yaml` (the recipe).
Everything is read through toolkit.serialization (tensors only, never pickled code).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from toolkit.errors import CheckpointError
from toolkit.serialization import safe_torch_load

TRAINING_FORMAT = "facecl-checkpoint"
TRAINER_FILE = "trainer.pt"
LATEST = "latest"
STEP_ENTRY = re.compile(r"^step_(\d{8})(\.pt)?$")
HEAD_FILE = re.compile(r"^head_rank(\d{5})\.pt$")
DEEPSPEED_TAG = "deepspeed"
FSDP_FOLDER = "fsdp"
RECIPE_FILE = "resolved.yaml"
# The normalisation every FaceCL data path applies (synthetic, WebDataset, DALI, verification .bin):
# RGB channel order, x / 127.5 - 1 = (x - 127.5) / 127.5 on 0..255 pixel values.
INPUT_NORMALISATION = "rgb, (x - 127.5) / 127.5"


# Recipe model options passed to the backbone factory when set (as the trainer's builder does): a
# convolutional backbone rejects them by name, a ViT needs patch_size to get its shapes right.
BACKBONE_OPTION_KEYS = ("drop_path", "mask_ratio", "patch_size")


def backbone_options(recipe_model: dict) -> dict:
    return {name: recipe_model[name] for name in BACKBONE_OPTION_KEYS if recipe_model.get(name)}


def head_file_name(rank: int) -> str:
    return f"head_rank{rank:05d}.pt"


def resolve_entry(path: str | Path) -> Path:
    """A run folder, its checkpoints/ folder, a step folder or a step file -> the checkpoint entry."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if path.is_dir() and (path / TRAINER_FILE).is_file():
        return path
    if path.is_dir() and STEP_ENTRY.match(path.name):
        raise CheckpointError(f"{path} is a checkpoint folder without {TRAINER_FILE} (incomplete: rank 0's file "
                              f"is missing)")
    for folder in (path, path / "checkpoints"):
        pointer = folder / LATEST
        if folder.is_dir() and pointer.is_file():
            name = pointer.read_text(errors="replace").strip()
            if not STEP_ENTRY.match(name):
                raise CheckpointError(f"{pointer} does not name a checkpoint (found {name[:80]!r})")
            entry = folder / name
            if not entry.exists():
                raise CheckpointError(f"{pointer} names {name}, which does not exist in {folder}")
            return resolve_entry(entry) if entry.is_dir() else entry
    if path.is_dir():
        raise CheckpointError(f"{path} is not a FaceCL run, checkpoints folder or checkpoint (no '{LATEST}' "
                              f"pointer, no {TRAINER_FILE})")
    return path


def read_training_payload(file: Path, *, mmap: bool = True) -> dict[str, Any]:
    """A tagged FaceCL training file (trainer.pt, head_rank*.pt, step_*.pt), tensors memory-mapped."""
    payload = safe_torch_load(file, mmap=mmap)
    if not isinstance(payload, dict) or payload.get("format") != TRAINING_FORMAT:
        raise CheckpointError(f"{file} is not a FaceCL checkpoint (no '{TRAINING_FORMAT}' format tag; "
                              f"a checkpoint of another tool?)")
    return payload


def _recipe_of(run_dir: Path | None) -> tuple[dict | None, str | None]:
    """resolved.yaml as a plain dict (no schema: any FaceCL version's recipe is readable) and its sha256."""
    if run_dir is None or not (run_dir / RECIPE_FILE).is_file():
        return None, None
    import yaml

    text = (run_dir / RECIPE_FILE).read_bytes()
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise CheckpointError(f"{run_dir / RECIPE_FILE} is not valid YAML ({str(exc).splitlines()[0]})") from None
    return (recipe if isinstance(recipe, dict) else None), hashlib.sha256(text).hexdigest()


@dataclass
class CheckpointSource:
    """One training checkpoint: where its files are and what its trainer file says."""

    entry: Path                  # step_XXXXXXXX.pt or step_XXXXXXXX/
    trainer: dict[str, Any]      # the safe-loaded trainer payload (tensors memory-mapped)
    run_dir: Path | None
    recipe: dict | None
    recipe_sha256: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def is_folder(self) -> bool:
        return self.entry.is_dir()

    @property
    def step(self) -> int:
        return int(self.trainer.get("step", -1))

    @property
    def identity(self) -> dict[str, Any]:
        return self.trainer.get("run", {}) or {}

    @property
    def world_size(self) -> int:
        return int(self.trainer.get("world_size", 1))

    @cached_property
    def engine(self) -> str:
        """single, ddp, deepspeed or fsdp: from the files present (the recipe only to name 'file' engines)."""
        if self.is_folder and (self.entry / DEEPSPEED_TAG).is_dir():
            return "deepspeed"
        if self.is_folder and (self.entry / FSDP_FOLDER).is_dir():
            return "fsdp"
        fmt = self.identity.get("engine_format")
        if fmt in ("deepspeed", "fsdp"):
            raise CheckpointError(f"{self.entry} was written by the {fmt} engine but its {fmt} folder "
                                  f"{self.entry / (DEEPSPEED_TAG if fmt == 'deepspeed' else FSDP_FOLDER)} is missing")
        recipe_engine = ((self.recipe or {}).get("parallel") or {}).get("engine")
        if recipe_engine in ("single", "ddp"):
            return recipe_engine
        return "single" if self.world_size == 1 else "ddp"

    @property
    def parallel(self) -> dict:
        return (self.recipe or {}).get("parallel") or {}

    @property
    def contrastive(self) -> bool:
        return bool(self.identity.get("contrastive", False))

    @property
    def model_config(self) -> dict[str, Any]:
        """backbone, embedding_size, image_size (the trainer file is the authority; the recipe fills gaps)."""
        recipe_model = (self.recipe or {}).get("model") or {}
        recipe_data = (self.recipe or {}).get("data") or {}
        backbone = self.identity.get("backbone", recipe_model.get("backbone"))
        if backbone is None:
            raise CheckpointError(f"{self.entry}: neither the trainer file nor a resolved.yaml names the backbone")
        return {"backbone": backbone,
                "embedding_size": int(self.identity.get("embedding_size", recipe_model.get("embedding_size", 512))),
                "image_size": int(self.identity.get("image_size", recipe_data.get("image_size", 112))),
                "options": backbone_options(recipe_model)}

    @property
    def num_classes(self) -> int | None:
        value = self.identity.get("num_classes")
        return int(value) if value is not None else None

    @property
    def has_head(self) -> bool:
        """False for runs without an identity-center head (head.weight 0: the trainer records no head
        optimizer and writes no shards)."""
        identity = self.identity
        if "head_optimizer" in identity and identity["head_optimizer"] is None:
            return False
        if not self.is_folder:
            return bool(self.trainer.get("head_shards"))
        return True

    def head_files(self) -> list[Path]:
        if not self.is_folder:
            return []
        return sorted(p for p in self.entry.iterdir() if HEAD_FILE.match(p.name))

    def expected_head_files(self) -> list[Path]:
        return [self.entry / head_file_name(rank) for rank in range(self.world_size)] if self.is_folder else []

    def head_shards(self) -> list[dict[str, Any]]:
        """Every rank's center shard (tensors memory-mapped), checked to be present and complete."""
        if not self.has_head:
            raise CheckpointError(f"{self.entry} holds no identity centers (the run trained without a head)")
        if not self.is_folder:
            shards = self.trainer.get("head_shards")
            return list(shards)
        missing = [p.name for p in self.expected_head_files() if not p.is_file()]
        if missing:
            raise CheckpointError(f"{self.entry} is incomplete: {len(missing)} of {self.world_size} center shard "
                                  f"files missing ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
        return [read_training_payload(p) for p in self.expected_head_files()]


def open_checkpoint(path: str | Path) -> CheckpointSource:
    """Locate and safely read the trainer file of a checkpoint (and the run's recipe, if present)."""
    entry = resolve_entry(path)
    trainer_file = entry / TRAINER_FILE if entry.is_dir() else entry
    if not trainer_file.is_file():
        raise CheckpointError(f"{entry} is not a FaceCL checkpoint (no {TRAINER_FILE})")
    trainer = read_training_payload(trainer_file)
    if "run" not in trainer:
        raise CheckpointError(f"{trainer_file} is a FaceCL file but not a trainer checkpoint (no run identity)")
    run_dir = _run_dir_of(entry)
    recipe, sha = _recipe_of(run_dir)
    return CheckpointSource(entry=entry, trainer=trainer, run_dir=run_dir, recipe=recipe, recipe_sha256=sha)


def _run_dir_of(entry: Path) -> Path | None:
    """<run>/checkpoints/<entry> -> <run>, when that layout is recognisable."""
    parent = entry.parent
    if parent.name == "checkpoints":
        return parent.parent
    return None
