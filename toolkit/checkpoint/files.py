# Checkpoint files on disk: atomic writes, the `latest` pointer, retention of this run's own entries, safe reads.
"""Writes go to a temporary file in the same folder, are fsync'ed and then renamed over the final name, so a
crash during a save leaves the previous checkpoint (and the `latest` pointer) intact. A folder checkpoint is
written under a hidden partial name and renamed when every rank has finished.

A checkpoints folder may also hold entries this run did not write (another run under the same name, an
earlier run resumed elsewhere): `CheckpointFolder` only prunes or replaces entries it owns, that is entries
it wrote itself or adopted (the run's own earlier entries, recognised by their run id). Loading goes through
toolkit.serialization (`torch.load(weights_only=True)` with an explicit allowlist): a checkpoint holds only
tensors and plain containers, never pickled objects, so a foreign file cannot run code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch

from toolkit.checkpoint.layout import (FORMAT, FORMAT_VERSION, LATEST, STALE_PARTIAL, STALE_TEMPORARY, TRAINER_FILE,
                                       partial_folder_name, resolve_entry, step_entries, step_file_name,
                                       step_folder_name)
from toolkit.errors import CheckpointError
from toolkit.serialization import safe_torch_load


def fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask_mode(mode: int = 0o666) -> int:
    """`mode` as the user's umask leaves it: what open() would give a new file (mkstemp always gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return mode & ~mask


def atomic_write_bytes(path: Path, write) -> None:
    """Call write(file_object) on a temp file next to `path`, fsync, then rename it to `path` (with the mode the
    user's umask gives new files, so colleagues on a shared cluster can read checkpoints as they can the rest)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, umask_mode())
        os.replace(tmp_name, path)
    except BaseException:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
        raise
    fsync_dir(path.parent)


def write_payload(path: Path, step: int, payload: dict[str, Any]) -> None:
    """Atomically torch.save a tagged checkpoint payload."""
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, **payload}
    atomic_write_bytes(path, lambda handle: torch.save(payload, handle))


def read_payload(file: Path, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict[str, Any]:
    """Safe load (tensors and plain containers only) of one tagged file of a checkpoint; CheckpointError otherwise."""
    try:
        payload = safe_torch_load(file, map_location=map_location, mmap=mmap)
    except CheckpointError as exc:
        raise CheckpointError(f"not a FaceCL checkpoint: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file} is not a FaceCL checkpoint (no '{FORMAT}' format tag; a checkpoint of "
                              f"another tool?)")
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{file} has checkpoint format version {payload.get('format_version')}, "
                              f"this toolkit reads version {FORMAT_VERSION}")
    return payload


def trainer_file_of(entry: Path) -> Path:
    return entry / TRAINER_FILE if entry.is_dir() else entry


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The trainer payload of a checkpoint of this toolkit (plus "path": the entry); CheckpointError otherwise."""
    entry = resolve_entry(path)
    file = trainer_file_of(entry)
    if not file.is_file():
        raise CheckpointError(f"{entry} is not a FaceCL checkpoint (no {TRAINER_FILE} inside)")
    payload = read_payload(file, map_location)
    payload["path"] = str(entry)
    return payload


class CheckpointFolder:
    """The checkpoints of one run: step_XXXXXXXX.pt files (or step_XXXXXXXX/ folders for engines with per-rank
    files) plus a `latest` text pointer naming the newest complete one.

    `keep_last` > 0 keeps that many of this run's own entries (the one just written and the newest older
    ones); entries of other runs are never pruned, and never replaced (a save over one is refused)."""

    def __init__(self, folder: str | os.PathLike, keep_last: int = 0):
        self.folder = Path(folder)
        self.keep_last = keep_last
        self.owned: set[str] = set()

    def adopt(self, names: Iterable[str]) -> None:
        """Entries written by this run before (a resumed run's own earlier checkpoints): prunable and replaceable."""
        self.owned.update(names)

    def path_for(self, step: int) -> Path:
        return self.folder / step_file_name(step)

    def folder_for(self, step: int) -> Path:
        return self.folder / step_folder_name(step)

    def partial_folder_for(self, step: int) -> Path:
        return self.folder / partial_folder_name(step)

    def entries(self) -> list[tuple[int, Path]]:
        return step_entries(self.folder)

    def _check_replaceable(self, final: Path) -> None:
        if final.exists() and final.name not in self.owned:
            raise CheckpointError(f"{final} exists and was written by another run; FaceCL does not overwrite "
                                  f"checkpoints it did not write (use another run.name, or move that checkpoint)")

    def save(self, step: int, payload: dict[str, Any]) -> Path:
        """Write the one-file checkpoint of `step`, point `latest` at it, then prune old ones."""
        path = self.path_for(step)
        self._check_replaceable(path)
        write_payload(path, step, payload)
        self.owned.add(path.name)
        self._point_latest_and_prune(path, step)
        return path

    def start_folder(self, step: int) -> Path:
        self._check_replaceable(self.folder_for(step))
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
        self._check_replaceable(final)
        if final.exists():
            shutil.rmtree(final)
        os.replace(self.partial_folder_for(step), final)
        fsync_dir(self.folder)
        self.owned.add(final.name)
        self._point_latest_and_prune(final, step)
        return final

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete what crashed saves of this folder left (only names this class writes); returns them."""
        if not self.folder.is_dir():
            return []
        stale = sorted(p for p in self.folder.iterdir()
                       if (STALE_TEMPORARY.match(p.name) and p.is_file()) or (STALE_PARTIAL.match(p.name) and p.is_dir()))
        for path in stale:
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        return stale

    def latest(self) -> Path | None:
        """The checkpoint the `latest` pointer names, or None before the first save."""
        pointer = self.folder / LATEST
        if not pointer.is_file():
            return None
        return self.folder / pointer.read_text(errors="replace").strip()

    def _point_latest_and_prune(self, path: Path, step: int) -> None:
        atomic_write_bytes(self.folder / LATEST, lambda handle: handle.write(path.name.encode() + b"\n"))
        fsync_dir(self.folder)
        if self.keep_last <= 0:
            return
        older = [p for s, p in self.entries() if s < step and p.name in self.owned]
        for old in older[: max(0, len(older) - (self.keep_last - 1))]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
            self.owned.discard(old.name)
