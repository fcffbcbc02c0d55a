# A step watchdog: a rank that makes no progress for parallel.timeout_s ends the job, naming the stalled rank.
"""Collectives wait for every rank. A rank that is frozen rather than dead (SIGSTOP, a hung file system,
a stuck driver call) is not noticed by the launcher, and a collective's own timeout is not reliable either:
DeepSpeed creates process groups of its own, which get the library's 30-minute default, and a DDP job
ended only after about twice the timeout. So every rank runs this thread:

- the trainer calls `beat(step)` after each optimizer step, evaluation and save;
- the thread publishes this rank's last step and time in the job's key-value store (the rendezvous store every
  rank already has) right after each beat, and every `interval` seconds otherwise, so the ranks see each other's
  progress (a stall report names the last step the frozen rank finished);
- when this rank has made no progress for `timeout_s`, it reads the others' heartbeats, prints one line
  naming the rank(s) whose heartbeat stopped (or this rank's own step when nothing else is known), ends
  frozen ranks on its own host (a stopped process ignores the launcher's SIGTERM, which would add the
  launcher's 30 s grace period), and ends itself with status 4; the launcher stops the remaining ranks.

A frozen rank cannot report itself (its threads are frozen too); the waiting ranks do it for it.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time
from typing import Callable

import torch.distributed as dist

from toolkit.distributed import job_errors

EXIT_STALLED = 4
EXIT_PEER_ERROR = 2          # another rank ended with a user error (it printed the line)
JOB_ERROR_POLL_S = 0.5       # how often the thread looks for such an error


class StepWatchdog:
    def __init__(self, timeout_s: float, rank: int, world_size: int, *, interval: float | None = None,
                 abort: Callable[[int], None] = os._exit, store=None,
                 on_stall: Callable[[str], None] | None = None,
                 on_peer_error: Callable[[str], None] | None = None):
        self.timeout_s = float(timeout_s)
        self.rank = rank
        self.world_size = world_size
        self.interval = interval or max(0.5, min(5.0, self.timeout_s / 10))
        self.abort = abort
        self.store = store if store is not None else _default_store()
        self.on_stall = on_stall   # called with the report before the process ends (e.g. to write results.json)
        self.on_peer_error = on_peer_error   # likewise, with the error another rank posted
        self.step = 0
        self.last_progress = time.monotonic()
        self._stop = threading.Event()
        self._progressed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="facecl-step-watchdog", daemon=True)

    def start(self) -> "StepWatchdog":
        self._publish()
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        self.step = step
        self.last_progress = time.monotonic()
        self._progressed.set()   # published by the thread right away: a stall report names the real last step

    def stop(self) -> None:
        self._stop.set()

    def _publish(self) -> None:
        if self.store is not None:
            try:
                self.store.set(f"facecl/heartbeat/{self.rank}",
                               f"{self.step} {time.time():.3f} {os.getpid()} {socket.gethostname()}")
            except Exception:  # noqa: BLE001 - a store that went away is reported when the stall is
                pass

    def _heartbeats(self) -> dict[int, tuple[int, float]]:
        beats = {}
        if self.store is None:
            return beats
        for rank in range(self.world_size):
            try:
                step, stamp, pid, host = self.store.get(f"facecl/heartbeat/{rank}").decode().split()
                beats[rank] = (int(step), float(stamp), int(pid), host)
            except Exception:  # noqa: BLE001 - unknown rank: left out of the report
                continue
        return beats

    def describe_stall(self) -> tuple[str, list[int]]:
        """The one-line report, and the process ids of frozen ranks on this host (to be ended with the job)."""
        idle = time.monotonic() - self.last_progress
        now = time.time()
        beats = self._heartbeats()
        stale = sorted(rank for rank, (_, stamp, _, _) in beats.items()
                       if rank != self.rank and now - stamp > self.timeout_s)
        local_pids = [beats[rank][2] for rank in stale if beats[rank][3] == socket.gethostname()]
        head = (f"error: [rank {self.rank}] no progress for {idle:.0f} s after step {self.step} "
                f"(parallel.timeout_s={self.timeout_s:g})")
        if stale:
            who = ", ".join(f"rank {rank} (last at step {beats[rank][0]}, {now - beats[rank][1]:.0f} s ago)"
                            for rank in stale)
            return f"{head}: {who} stopped responding; ending the job", local_pids
        if len(beats) < self.world_size:
            missing = sorted(set(range(self.world_size)) - set(beats) - {self.rank})
            return f"{head}: no heartbeat from rank(s) {missing}; ending the job", []
        return f"{head}: waiting in a collective for another rank; ending the job", []

    def _run(self) -> None:
        next_publish = 0.0
        while not self._stop.is_set():
            progressed = self._progressed.wait(min(self.interval / 2, JOB_ERROR_POLL_S))
            if self._stop.is_set():
                return
            peer_error = job_errors.posted_by_a_peer()
            if peer_error is not None:
                # Another rank ended with an error it reported; this one is likely blocked in a collective
                # with it: end without a traceback of our own.
                if self.on_peer_error is not None:
                    try:
                        self.on_peer_error(peer_error)
                    except Exception:  # noqa: BLE001 - the job ends whatever happens here
                        pass
                sys.stderr.flush()
                self.abort(EXIT_PEER_ERROR)
                return
            now = time.monotonic()
            if progressed or now >= next_publish:
                self._progressed.clear()
                self._publish()
                next_publish = now + self.interval
            if now - self.last_progress > self.timeout_s:
                report, frozen_pids = self.describe_stall()
                print(report, file=sys.stderr, flush=True)
                sys.stdout.flush()
                if self.on_stall is not None:
                    try:
                        self.on_stall(report.removeprefix("error: "))
                    except Exception:  # noqa: BLE001 - the job ends whatever happens here
                        pass
                for pid in frozen_pids:   # a frozen process ignores the launcher's SIGTERM; end it now
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                self.abort(EXIT_STALLED)
                return


def _default_store():
    """The default process group's key-value store (the launcher's rendezvous store), or None."""
    try:
        return dist.distributed_c10d._get_default_store() if dist.is_initialized() else None
    except Exception:  # noqa: BLE001 - private API: without it the report just names no rank
        return None
