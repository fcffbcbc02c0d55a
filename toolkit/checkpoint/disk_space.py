# Free space around checkpoint saves: an early warning, and a one-line error when a save runs out of disk.
"""A full disk during a save used to end in a long traceback whose last line did not mention the cause
(DeepSpeed: "basic_ios::clear: iostream error"). `checked_save` turns it into

    error: no space left on /mnt/ckpt (/dev/sdb1) while saving checkpoint step 400 (needs about 1.20 GB, 0.31 GB free)

after removing what the failed save wrote; the previous checkpoints are never touched (saves are atomic).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path
from typing import Callable

from toolkit.errors import FaceCLError


class DiskFullError(FaceCLError):
    """A checkpoint save ran out of disk space."""


def folder_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def mount_of(path: Path) -> tuple[str, str]:
    """(mount point, device) of the file system holding `path`, from /proc/mounts (best effort)."""
    path = path.resolve()
    best = ("/", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount = line.split()[:2]
            if (str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best[0]):
                best = (mount, device)
    except OSError:
        pass
    return best


def _is_out_of_space(exc: BaseException, folder: Path, needed: int) -> bool:
    """ENOSPC anywhere in the exception chain, or (libraries that hide errno, like DeepSpeed's C++ writer)
    less free space left than the save needed."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(folder).free < max(needed // 10, 1 << 20)
    except OSError:
        return False


def checked_save(folder: Path, step: int, needed: int, save: Callable[[], Path | None],
                 cleanup: Callable[[], None], say: Callable[[str], None]) -> Path | None:
    """Run `save()`; warn first when `needed` bytes look larger than the free space; on running out of
    space call `cleanup()` (remove the partial save) and raise DiskFullError."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    mount, device = mount_of(folder)
    if free < needed:
        say(f"warning: checkpoint step {step} needs about {needed / 1e9:.2f} GB, {mount} has {free / 1e9:.2f} GB free")
    try:
        return save()
    except Exception as exc:  # noqa: BLE001 - any library's error; re-raised unless it is a full disk
        if not _is_out_of_space(exc, folder, needed):
            raise
        cleanup()
        free = shutil.disk_usage(folder).free
        raise DiskFullError(f"no space left on {mount} ({device}) while saving checkpoint step {step} (needs about "
                            f"{needed / 1e9:.2f} GB, {free / 1e9:.2f} GB free)") from None


def expected_checkpoint_bytes(last_checkpoint: Path | None, tensor_bytes: int) -> int:
    """About what the next checkpoint takes: the last one's size, else the model state's tensor bytes."""
    if last_checkpoint is not None and last_checkpoint.exists():
        return folder_bytes(last_checkpoint)
    return tensor_bytes
