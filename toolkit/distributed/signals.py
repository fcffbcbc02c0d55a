# Graceful stop on a scheduler's signal: finish the step in flight, save it, and end the run with EXIT_PREEMPTED.
"""Schedulers end jobs with SIGTERM (SLURM: also a chosen signal some time before, `--signal=USR1@120`); a
preempted run would lose the work since its last periodic checkpoint. `StopSignals.install()` (called by
launch/train.py, the process's entry point) makes those signals set a flag instead of ending the process:

- the trainer reads the flag once per step, in the flags it already all-reduces (non-finite loss, fp16
  overflow), so every rank learns of a signal that reached any rank without an extra host sync;
- after that step every rank saves the step's checkpoint (the same step everywhere), the run writes its
  results.json (`"stopped_by": "SIGTERM"`) and the process exits with EXIT_PREEMPTED (75, EX_TEMPFAIL: try
  again); `--resume auto` in the same command line continues from there;
- a second signal while stopping is noted and ignored: the checkpoint being written is not cut short (saves
  are atomic anyway: an interrupted one never replaces `latest`).
"""

from __future__ import annotations

import signal
import sys

EXIT_PREEMPTED = 75
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class StopSignals:
    """Which stop signal this process received (None: none); the handlers only record it."""

    def __init__(self):
        self.received: str | None = None
        self.count = 0

    @property
    def code(self) -> int:
        """0 without a signal, else 1 + the signal's index in STOP_SIGNALS (what the ranks all-reduce)."""
        return STOP_SIGNALS.index(self.received) + 1 if self.received in STOP_SIGNALS else 0

    @staticmethod
    def name_of(code: int) -> str | None:
        return STOP_SIGNALS[code - 1] if 0 < code <= len(STOP_SIGNALS) else None

    @classmethod
    def install(cls, names=STOP_SIGNALS) -> "StopSignals":
        stop = cls()
        for name in names:
            signal.signal(getattr(signal, name), stop._handle)
        return stop

    def _handle(self, signum, frame) -> None:
        self.count += 1
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            print(f"{name} received: stopping after the step in flight (and saving it)", file=sys.stderr, flush=True)
        else:
            print(f"{name} received again: already stopping; the checkpoint is being written", file=sys.stderr,
                  flush=True)

    @property
    def requested(self) -> bool:
        return self.received is not None


def ignore_stop_signals_in_worker(_worker_id: int = 0) -> None:
    """For data-loading worker processes: a scheduler signals every process of the job, and a worker that died
    of it would fail the training process's next batch; workers end when the training process stops them."""
    for name in STOP_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
