# The names every checkpoint format shares: run folder files, step entries, the latest pointer, center shards.
"""One place for the layout of a run folder, so that training (which writes it), the engines' checkpoint
formats (toolkit/parallel) and the offline tools (toolkit/export) agree on every name:

    <output_dir>/<run.name>/             the run folder
        resolved.yaml                    the recipe as the run resolved it
        .facecl-run.lock                 held while a run trains here (host, pid, job id)
        checkpoints/
            latest                       text: the name of the newest complete entry
            step_00001000.pt             one process: one file (trainer state, engine state, centers)
            step_00002000/               several ranks or a folder engine:
                trainer.pt                 rank 0: run identity, schedulers, per-rank RNG, data position
                head_rank00000.pt          each rank's center shard (class range, centers, optimizer rows)
                <engine folder>/           the engine's own files (e.g. deepspeed/, fsdp/), named by its format

Each file FaceCL writes itself is a torch.save'd dict tagged with FORMAT and FORMAT_VERSION.
"""

from __future__ import annotations

import re
from pathlib import Path

from toolkit.errors import CheckpointError

FORMAT = "facecl-checkpoint"
FORMAT_VERSION = 1

RECIPE_FILE = "resolved.yaml"
LOCK_FILE = ".facecl-run.lock"
CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
TRAINER_FILE = "trainer.pt"
STEP_ENTRY = re.compile(r"^step_(\d{8})(\.pt)?$")
HEAD_SHARD_FILE = re.compile(r"^head_rank(\d{5})\.pt$")
# What an interrupted save leaves, and nothing else: the temporary files of a step file or of the `latest`
# pointer (mkstemp: ".NAME.<random>.tmp"), and a folder checkpoint not yet committed.
STALE_TEMPORARY = re.compile(r"^\.(step_\d{8}\.pt|latest)\.[A-Za-z0-9_]{6,}\.tmp$")
STALE_PARTIAL = re.compile(r"^\.partial-step_\d{8}$")


def step_file_name(step: int) -> str:
    return f"step_{step:08d}.pt"


def step_folder_name(step: int) -> str:
    return f"step_{step:08d}"


def partial_folder_name(step: int) -> str:
    """Where the ranks write a folder checkpoint before it is complete (renamed when committed)."""
    return f".partial-step_{step:08d}"


def head_shard_file(rank: int) -> str:
    return f"head_rank{rank:05d}.pt"


def step_of(entry: Path) -> int | None:
    match = STEP_ENTRY.match(entry.name)
    return int(match.group(1)) if match else None


def step_entries(folder: Path) -> list[tuple[int, Path]]:
    """(step, entry) of every step file or folder in a checkpoints folder, oldest first."""
    if not folder.is_dir():
        return []
    return sorted((step, path) for path in folder.iterdir() if (step := step_of(path)) is not None)


def read_latest(pointer: Path) -> str:
    """The entry name a `latest` pointer holds; a one-line CheckpointError for anything else."""
    data = pointer.read_bytes()[:4096]
    try:
        name = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{pointer} holds binary bytes, not a checkpoint name (damaged pointer?)") from None
    if not STEP_ENTRY.match(name):
        raise CheckpointError(f"{pointer} does not name a checkpoint (found {name[:80]!r})")
    return name


def _newest_hint(folder: Path) -> str:
    entries = step_entries(folder)
    if not entries:
        return ""
    return f"; the newest checkpoint there is {entries[-1][1]}: pass it as the path to use it"


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
    for folder in (path, path / CHECKPOINTS_DIR):
        if not folder.is_dir():
            continue
        pointer = folder / LATEST
        if pointer.is_file():
            name = read_latest(pointer)
            entry = folder / name
            if not entry.exists():
                raise CheckpointError(f"{pointer} names {name}, which does not exist in {folder}{_newest_hint(folder)}")
            return resolve_entry(entry) if entry.is_dir() else entry
        if step_entries(folder):
            raise CheckpointError(f"{folder} has no '{LATEST}' pointer but holds {len(step_entries(folder))} "
                                  f"checkpoint(s){_newest_hint(folder)}")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder without a '{LATEST}' checkpoint pointer and no {TRAINER_FILE}: "
                              f"not a FaceCL run, checkpoints folder or checkpoint")
    return path


def run_dir_of(entry: Path) -> Path | None:
    """<run>/checkpoints/<entry> -> <run>, when that layout is recognisable."""
    parent = entry.parent
    return parent.parent if parent.name == CHECKPOINTS_DIR else None
