# Checkpoints of a run: the shared layout, safe files, the Checkpointer over the parts, and offline reading.
"""Training writes and reads checkpoints through `Checkpointer`; offline tools open them with
`open_checkpoint` and ask the engine's format (toolkit.parallel.format_of) for what the engine wrote."""

from toolkit.checkpoint.checkpointer import Checkpointer, Restored, StateAdapter, Stateful
from toolkit.checkpoint.files import (CheckpointFolder, atomic_write_bytes, load_checkpoint, read_payload,
                                      write_payload)
from toolkit.checkpoint.layout import (CHECKPOINTS_DIR, FORMAT, FORMAT_VERSION, LATEST, RECIPE_FILE, TRAINER_FILE,
                                       head_shard_file, resolve_entry, run_dir_of, step_entries)
from toolkit.checkpoint.rng import capture_rng_state, restore_rng_state
from toolkit.checkpoint.source import (INPUT_NORMALISATION, CheckpointSource, backbone_options, open_checkpoint,
                                       read_training_payload, source_of)

__all__ = ["CHECKPOINTS_DIR", "FORMAT", "FORMAT_VERSION", "INPUT_NORMALISATION", "LATEST", "RECIPE_FILE",
           "TRAINER_FILE", "CheckpointFolder", "CheckpointSource", "Checkpointer", "Restored", "StateAdapter",
           "Stateful", "atomic_write_bytes", "backbone_options", "capture_rng_state", "head_shard_file",
           "load_checkpoint", "open_checkpoint", "read_payload", "read_training_payload", "resolve_entry",
           "restore_rng_state", "run_dir_of", "source_of", "step_entries", "write_payload"]
