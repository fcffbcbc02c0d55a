# A copy of a checkpoint that resumes at any number of ranks, where the engine's format needs one.
"""`resize_checkpoint(path, out)` asks the checkpoint's format (toolkit.parallel.format_of) to write a copy that
loads at any world size: for DeepSpeed ZeRO-1/2/3, DeepSpeed's universal format (one file per parameter and
optimizer state instead of per-rank partitions). Formats that reshard as they are (single, DDP, FSDP2's DCP
files; the center shards always reshard by class range) say so and write nothing. `--resume` also converts by
itself when it meets a ZeRO checkpoint of another world size (toolkit/training), so this is for doing it ahead
of time, e.g. once for many jobs.
"""

from __future__ import annotations

from pathlib import Path

from toolkit.checkpoint import open_checkpoint
from toolkit.parallel import format_of


def resize_checkpoint(path: str | Path, out: str | Path, *, overwrite: bool = False):
    """Write the any-world-size copy of the checkpoint at `path` (run, checkpoints folder or step) to `out`."""
    source = open_checkpoint(path)
    return format_of(source).resize(source, Path(out), overwrite=overwrite)
