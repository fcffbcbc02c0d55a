# The run folder guard: one live run per folder (a lock with host, pid and job id), and no silent reuse of a folder.
"""A run folder belongs to one run. Two things protect it:

- `RunLock`: a lock file `.facecl-run.lock` in the run folder, created atomically (O_EXCL) by rank 0 with the
  host, pid and job id of its holder, and touched every HEARTBEAT_S while the run lives. Another run that
  finds it is refused, unless the lock is stale: its holder's process is gone (same host), its heartbeat is
  older than STALE_AFTER_S (another host that died), or the holder belongs to the same scheduler job (a
  restart of this very job: torchrun's elastic restarts and SLURM's requeue keep the job id). Taking a stale
  lock over is said in one line.
- `resolve_resume`: a run folder that already holds checkpoints is refused unless the run says how to go on
  (`--resume auto` continues from its latest checkpoint, `--resume PATH` from a given one); a fresh start would
  otherwise write next to, and prune, another run's checkpoints.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from toolkit.checkpoint.layout import CHECKPOINTS_DIR, LATEST, LOCK_FILE, read_latest, step_entries, step_of
from toolkit.distributed import DistributedContext
from toolkit.errors import FaceCLError, RunFolderError

HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class RunFolderInUse(RunFolderError):
    """Another live run holds the run folder."""


@dataclass(frozen=True)
class LockHolder:
    host: str
    pid: int
    job_id: str
    since: str
    token: str

    @classmethod
    def read(cls, path: Path) -> "LockHolder | None":
        try:
            data = json.loads(path.read_text())
            return cls(host=str(data["host"]), pid=int(data["pid"]), job_id=str(data.get("job_id", "")),
                       since=str(data.get("since", "?")), token=str(data["token"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def text(self) -> str:
        return json.dumps({"host": self.host, "pid": self.pid, "job_id": self.job_id, "since": self.since,
                           "token": self.token})

    def describe(self) -> str:
        job = f", job {self.job_id}" if self.job_id else ""
        return f"{self.host} pid {self.pid}{job}, since {self.since}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """The lock of one run folder, held by one process (rank 0 of a job)."""

    def __init__(self, run_dir: Path, *, job_id: str = "", heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.job_id = job_id
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.me = LockHolder(host=socket.gethostname(), pid=os.getpid(), job_id=job_id,
                             since=time.strftime("%Y-%m-%d %H:%M:%S"), token=uuid.uuid4().hex)
        self.created_folder = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> str | None:
        """Take the lock (creating the run folder if needed); returns a note when a stale lock was taken over.
        RunFolderInUse (one line: the folder and the holder) when a live run holds it."""
        note = None
        try:
            if not self.run_dir.exists():
                self.run_dir.mkdir(parents=True, exist_ok=True)
                self.created_folder = True
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)   # the umask applies
        except FileExistsError:
            holder = self._read_holder()
            reason = self._stale_reason(holder)
            if reason is None:
                raise RunFolderInUse(f"run folder {self.run_dir} is in use by another run ({holder.describe()}, "
                                     f"last seen {self._age():.0f} s ago); wait for it to end, or choose another "
                                     f"run.name") from None
            self._take_over()
            note = f"took over the lock of {self.run_dir}: {reason}"
        except OSError as exc:
            raise RunFolderError(f"run.output_dir {self.run_dir.parent}: cannot write run folder {self.run_dir} "
                                 f"({exc.strerror or exc})") from None
        else:
            with os.fdopen(fd, "w") as handle:
                handle.write(self.me.text())
        self._thread = threading.Thread(target=self._beat, name="facecl-run-lock", daemon=True)
        self._thread.start()
        return note

    def _read_holder(self) -> LockHolder | None:
        for _ in range(5):   # a lock being written right now reads empty for a moment
            holder = LockHolder.read(self.path)
            if holder is not None:
                return holder
            time.sleep(0.1)
        return None

    def _age(self) -> float:
        try:
            return time.time() - self.path.stat().st_mtime
        except OSError:
            return float("inf")

    def _stale_reason(self, holder: LockHolder | None) -> str | None:
        """Why an existing lock may be taken over, or None when its holder may still be running."""
        if holder is None:
            return "the old lock file was unreadable"
        if self.job_id and holder.job_id == self.job_id:
            return f"it was held by an earlier start of this job ({holder.describe()})"
        if holder.host == self.me.host and not _process_alive(holder.pid):
            return f"its holder ({holder.describe()}) is no longer running"
        if self._age() > self.stale_after_s:
            return f"its holder ({holder.describe()}) sent no heartbeat for {self._age():.0f} s"
        return None

    def _take_over(self) -> None:
        tmp = self.path.with_name(f"{self.path.name}.{self.me.token}")
        tmp.write_text(self.me.text())
        os.replace(tmp, self.path)
        time.sleep(0.2)   # two runs taking over at once: the last rename wins, the other one sees it here
        holder = LockHolder.read(self.path)
        if holder is None or holder.token != self.me.token:
            raise RunFolderInUse(f"run folder {self.run_dir} was just taken by another run "
                                 f"({holder.describe() if holder else 'unknown'}); choose another run.name")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            holder = LockHolder.read(self.path)
            if holder is not None and holder.token == self.me.token:
                try:
                    os.utime(self.path)
                except OSError:
                    pass

    def release(self) -> None:
        """Give the lock back (only if still ours); remove the run folder again if this run created it and
        left nothing in it."""
        self._stop.set()
        holder = LockHolder.read(self.path)
        if holder is not None and holder.token == self.me.token:
            self.path.unlink(missing_ok=True)
        if self.created_folder:
            try:
                self.run_dir.rmdir()   # only when empty
            except OSError:
                pass


def latest_step_found(checkpoints_dir: Path) -> tuple[str, Path | None]:
    """("step N" or "none", the entry `latest` names or else the newest entry) of a checkpoints folder."""
    pointer = checkpoints_dir / LATEST
    if pointer.is_file():
        try:
            entry = checkpoints_dir / read_latest(pointer)
            if entry.exists():
                return f"step {step_of(entry)}", entry
        except FaceCLError:
            pass
    entries = step_entries(checkpoints_dir)
    if entries:
        return f"step {entries[-1][0]}", entries[-1][1]
    return "none", None


def resolve_resume(run_dir: Path, resume: str | None) -> tuple[Path | None, str | None]:
    """(what to resume, a line to say) for `--resume` as given: None (a fresh start: refused when the run folder
    holds checkpoints already), "auto" (the run folder's latest checkpoint, or a fresh start when it has none),
    or a path."""
    checkpoints = run_dir / CHECKPOINTS_DIR
    entries = step_entries(checkpoints)
    if resume is None:
        if entries:
            step, _ = latest_step_found(checkpoints)
            raise RunFolderError(f"run folder {run_dir} already holds checkpoints (latest: {step}); continue that run "
                              f"with --resume auto (or --resume PATH), or start a new one under another run.name")
        return None, None
    if resume != "auto":
        return Path(resume), None
    if not entries:
        return None, f"--resume auto: no checkpoint in {checkpoints}; starting from step 0"
    if not (checkpoints / LATEST).is_file():
        step, newest = latest_step_found(checkpoints)
        raise RunFolderError(f"--resume auto: {checkpoints} holds checkpoints but no '{LATEST}' pointer (the newest is "
                          f"{newest}); pass it with --resume {newest}")
    return run_dir, None


def claim_run_folder(ctx: DistributedContext, lock: RunLock | None, run_dir: Path, resume: str | None
                     ) -> tuple[Path | None, list[str]]:
    """Rank 0 takes the run folder's lock and decides what to resume (`resolve_resume`); every rank learns the
    verdict (a collective), so that a refusal ends the whole job with rank 0's one line. Returns (what to
    resume, lines for rank 0 to say)."""
    verdict = None
    if ctx.is_main:
        try:
            note = lock.acquire()
            path, line = resolve_resume(run_dir, resume)
            verdict = ("ok", str(path) if path is not None else None, [text for text in (note, line) if text])
        except RunFolderError as exc:
            verdict = ("refused", str(exc), [])
    status, value, lines = ctx.broadcast_object(verdict)
    if status == "refused":
        raise RunFolderError(value)
    return (Path(value) if value is not None else None), lines
