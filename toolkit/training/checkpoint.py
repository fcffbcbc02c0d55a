# Checkpoint files: atomic writes, a `latest` pointer, keep-last-N retention, and safe loading.
"""Checkpoints of this toolkit are torch.save'd dicts tagged with FORMAT.

Writes go to a temporary file in the same folder, are fsync'ed and then renamed over the final name,
so a crash during a save leaves the previous checkpoint (and the `latest` pointer) intact. Loading goes
through toolkit.serialization (`torch.load(weights_only=True)` with an explicit allowlist): a checkpoint
holds only tensors and plain containers, never pickled objects, so a foreign file cannot run code. The
engines' own files (DeepSpeed's, DCP's) are checked the same way by their strategies before the library
reads them (toolkit/parallel).
"""

from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import CheckpointError
from toolkit.serialization import safe_torch_load

FORMAT = "facecl-checkpoint"
FORMAT_VERSION = 1
LATEST = "latest"
TRAINER_FILE = "trainer.pt"   # inside a checkpoint folder (engines that write their own files)
_STEP_ENTRY = re.compile(r"^step_(\d{8})(\.pt)?$")
# What an interrupted save leaves, and nothing else: atomic_write_bytes's temporary files of a step file
# or of the `latest` pointer (mkstemp: ".NAME.<random>.tmp"), and a folder checkpoint not yet committed.
_STALE_TEMPORARY = re.compile(r"^\.(step_\d{8}\.pt|latest)\.[A-Za-z0-9_]{6,}\.tmp$")
_STALE_PARTIAL = re.compile(r"^\.partial-step_\d{8}$")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(file_object) on a temp file next to `path`, fsync, then rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)


def capture_rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU and CUDA) RNG states as tensors and plain containers."""
    state: dict[str, Any] = {"python": _python_state_to_plain(random.getstate()), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = {"keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "gauss": float(gauss)}
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_plain_to_python_state(state["python"]))
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        np_state = state["numpy"]
        np.random.set_state(("MT19937", np_state["keys"].numpy().astype("uint32"), np_state["pos"],
                             np_state["has_gauss"], np_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _python_state_to_plain(state: tuple) -> list:
    version, internal, gauss_next = state
    return [version, list(internal), gauss_next]


def _plain_to_python_state(plain: list) -> tuple:
    version, internal, gauss_next = plain
    return (version, tuple(internal), gauss_next)


class CheckpointFolder:
    """The checkpoints of one run: step_XXXXXXXX.pt files (or step_XXXXXXXX/ folders for engines with
    per-rank files) plus a `latest` text pointer naming the newest complete one."""

    def __init__(self, folder: str | os.PathLike, keep_last: int = 0):
        self.folder = Path(folder)
        self.keep_last = keep_last

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}.pt"

    def folder_for(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}"

    def partial_folder_for(self, step: int) -> Path:
        """Where the ranks write a folder checkpoint before it is complete (then renamed by commit)."""
        return self.folder / f".partial-step_{step:08d}"

    def save(self, step: int, payload: dict[str, Any]) -> Path:
        """Write the one-file checkpoint of `step`, point `latest` at it, then prune old ones."""
        path = self.path_for(step)
        write_payload(path, step, payload)
        self._point_latest_and_prune(path)
        return path

    def start_folder(self, step: int) -> Path:
        partial = self.partial_folder_for(step)
        if partial.exists():
            shutil.rmtree(partial)
        partial.mkdir(parents=True)
        return partial

    def discard_partial(self, step: int) -> None:
        """Remove what a failed save of `step` wrote (the temporary files of single-file saves remove
        themselves; a folder save leaves its partial folder)."""
        shutil.rmtree(self.partial_folder_for(step), ignore_errors=True)

    def commit_folder(self, step: int) -> Path:
        """Rename a finished partial folder to its final name (atomic), then update `latest`."""
        final = self.folder_for(step)
        if final.exists():
            shutil.rmtree(final)
        os.replace(self.partial_folder_for(step), final)
        _fsync_dir(self.folder)
        self._point_latest_and_prune(final)
        return final

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete what crashed saves of this folder left (only names this class writes); returns them."""
        if not self.folder.is_dir():
            return []
        stale = sorted(p for p in self.folder.iterdir()
                       if (_STALE_TEMPORARY.match(p.name) and p.is_file()) or (_STALE_PARTIAL.match(p.name) and p.is_dir()))
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return stale

    def latest(self) -> Path | None:
        """The checkpoint the `latest` pointer names, or None before the first save."""
        pointer = self.folder / LATEST
        if not pointer.is_file():
            return None
        return self.folder / pointer.read_text().strip()

    def _point_latest_and_prune(self, path: Path) -> None:
        atomic_write_bytes(self.folder / LATEST, lambda handle: handle.write(path.name.encode() + b"\n"))
        if self.keep_last <= 0:
            return
        entries = sorted((int(m.group(1)), p) for p in self.folder.iterdir() if (m := _STEP_ENTRY.match(p.name)))
        for _, old in entries[: -self.keep_last]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)


def write_payload(path: Path, step: int, payload: dict[str, Any]) -> None:
    """Atomically torch.save a tagged checkpoint payload."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, **payload}
    atomic_write_bytes(path, lambda handle: torch.save(payload, handle))


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """A checkpoint (file or folder), a checkpoints folder or a run folder -> the checkpoint to load."""
    path = Path(path)
    if path.is_dir() and (path / TRAINER_FILE).is_file():
        return path  # one folder checkpoint
    for folder in (path, path / "checkpoints"):
        pointer = folder / LATEST
        if folder.is_dir() and pointer.is_file():
            name = pointer.read_text().strip()
            if not _STEP_ENTRY.match(name):
                raise CheckpointError(f"{pointer} does not name a checkpoint file (found {name!r})")
            return folder / name
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder without a '{LATEST}' checkpoint pointer; not a FaceCL run")
    if not path.is_file():
        raise CheckpointError(f"resume path {path} does not exist")
    return path


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and verify a checkpoint of this toolkit; anything else is a one-line CheckpointError."""
    entry = resolve_checkpoint_path(path)
    file = entry / TRAINER_FILE if entry.is_dir() else entry
    if not file.is_file():
        raise CheckpointError(f"{entry} is not a FaceCL checkpoint (no {TRAINER_FILE} inside)")
    payload = read_payload(file, map_location)
    payload["path"] = str(entry)
    return payload


def read_payload(file: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Safe load (tensors and plain containers only) of one tagged file of a checkpoint; CheckpointError otherwise."""
    try:
        payload = safe_torch_load(file, map_location=map_location)
    except CheckpointError as exc:
        raise CheckpointError(f"not a FaceCL checkpoint: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a FaceCL checkpoint (no '{FORMAT}' format tag)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file} has checkpoint format version {payload.get('format_version')}, "
                              f"this toolkit reads version {FORMAT_VERSION}")
    return payload
