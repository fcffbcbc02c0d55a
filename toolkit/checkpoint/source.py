# Reading a training checkpoint without a process group: where its files are and what its trainer file says.
"""`open_checkpoint(path)` locates a checkpoint entry (run folder, checkpoints folder, step folder or step file),
reads its trainer file safely and the run's resolved.yaml when present. What the engine wrote (its own folder,
or its state inside the trainer file) is read by the engine's checkpoint format (toolkit/parallel), which
every offline tool asks: `toolkit.parallel.format_of(source)`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from toolkit.checkpoint.files import read_payload, trainer_file_of
from toolkit.checkpoint.layout import HEAD_SHARD_FILE, RECIPE_FILE, TRAINER_FILE, head_shard_file, resolve_entry, \
    run_dir_of
from toolkit.errors import CheckpointError

# The normalisation every FaceCL data path applies (synthetic, WebDataset, DALI, verification .bin):
# RGB channel order, x / 127.5 - 1 = (x - 127.5) / 127.5 on 0..255 pixel values.
INPUT_NORMALISATION = "rgb, (x - 127.5) / 127.5"
# Recipe model options passed to the backbone factory when set (as the trainer's builder does): a
# convolutional backbone rejects them by name, a ViT needs patch_size to get its shapes right.
BACKBONE_OPTION_KEYS = ("drop_path", "mask_ratio", "patch_size")


def backbone_options(recipe_model: dict) -> dict:
    return {name: recipe_model[name] for name in BACKBONE_OPTION_KEYS if recipe_model.get(name)}


def read_training_payload(file: Path, *, mmap: bool = True) -> dict[str, Any]:
    """A tagged FaceCL training file (trainer.pt, head_rank*.pt, step_*.pt), tensors memory-mapped."""
    return read_payload(file, mmap=mmap)


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
    def trainer_file(self) -> Path:
        return trainer_file_of(self.entry)

    @property
    def step(self) -> int:
        return int(self.trainer.get("step", -1))

    @property
    def identity(self) -> dict[str, Any]:
        return self.trainer.get("run", {}) or {}

    @property
    def engine_format(self) -> str | None:
        """The name of the format the engine wrote (recorded in the trainer file), e.g. "file"."""
        return self.identity.get("engine_format")

    @property
    def world_size(self) -> int:
        return int(self.trainer.get("world_size", 1))

    @property
    def recipe_engine(self) -> str | None:
        return self.parallel.get("engine")

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
        return sorted(p for p in self.entry.iterdir() if HEAD_SHARD_FILE.match(p.name))

    def expected_head_files(self) -> list[Path]:
        return [self.entry / head_shard_file(rank) for rank in range(self.world_size)] if self.is_folder else []

    def head_shards(self) -> list[dict[str, Any]]:
        """Every rank's center shard (tensors memory-mapped), checked to be present and complete."""
        if not self.has_head:
            raise CheckpointError(f"{self.entry} holds no identity centers (the run trained without a head)")
        if not self.is_folder:
            return list(self.trainer.get("head_shards"))
        missing = [p.name for p in self.expected_head_files() if not p.is_file()]
        if missing:
            raise CheckpointError(f"{self.entry} is incomplete: {len(missing)} of {self.world_size} center shard "
                                  f"files missing ({', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''})")
        return [read_training_payload(p) for p in self.expected_head_files()]


def open_checkpoint(path: str | Path) -> CheckpointSource:
    """Locate and safely read the trainer file of a checkpoint (and the run's recipe, if present)."""
    entry = resolve_entry(path)
    trainer_file = trainer_file_of(entry)
    if not trainer_file.is_file():
        raise CheckpointError(f"{entry} is not a FaceCL checkpoint (no {TRAINER_FILE})")
    return source_of(entry, read_training_payload(trainer_file))


def source_of(entry: Path, trainer: dict[str, Any]) -> CheckpointSource:
    """The CheckpointSource of an entry whose trainer payload has been read already (by whoever opened it)."""
    if "run" not in trainer:
        raise CheckpointError(f"{trainer_file_of(entry)} is a FaceCL file but not a trainer checkpoint (no run "
                              f"identity)")
    run_dir = run_dir_of(entry)
    recipe, sha = _recipe_of(run_dir)
    return CheckpointSource(entry=entry, trainer=trainer, run_dir=run_dir, recipe=recipe, recipe_sha256=sha)
