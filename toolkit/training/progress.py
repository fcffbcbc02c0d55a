# Console progress lines and tracker scalars (TensorBoard, W&B, MLflow) for the training loop.
"""Progress reporting: one console line per logging step, and the same values and more to the run's trackers
(training/trackers.py).

The line holds loss (with its parts), lr, grad norms, throughput and ETA and fits in 160 characters; statistics
that would make it longer (UniMoCo's queue) go to the trackers only. Loss, loss parts and grad norms are means
over the steps since the previous line (training/interval_means.py), as are samples/s and the ETA's step time.
"""

from __future__ import annotations

import sys
import time

from toolkit.training.trackers import Tracker


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def loss_text(means: dict[str, float]) -> str:
    """`loss 58.01 (id 50.57, con 7.433)`: the loss with its parts (loss_<part>) when there are any."""
    parts = [f"{name.removeprefix('loss_')} {value:.4g}" for name, value in means.items() if name.startswith("loss_")]
    return f"loss {means['loss']:.4g}" + (f" ({', '.join(parts)})" if parts else "")


def grad_norm_text(means: dict[str, float]) -> str | None:
    """`grad norm backbone 11.78, head 6.235` (grad_norm_<part>); None when no norm was measured."""
    norms = [f"{name.removeprefix('grad_norm_')} {value:.4g}" for name, value in means.items()
             if name.startswith("grad_norm_")]
    return f"grad norm {', '.join(norms)}" if norms else None


class ProgressReporter:
    """Prints `step/total epoch loss lr grad-norm samples/s ETA` (when `enabled`) and writes those and more scalars
    to the trackers (rank 0 passes its trackers, the other ranks none)."""

    def __init__(self, total_steps: int, global_batch_size: int, trackers: list[Tracker] = (), *,
                 enabled: bool = True, stream=None):
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.trackers = list(trackers)
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._run_start = self._window_start

    def restart_clock(self) -> None:
        """Exclude time outside training steps (evaluation, checkpointing) from throughput."""
        self._window_start = time.perf_counter()
        self._window_steps = 0

    def step_done(self) -> None:
        self._window_steps += 1

    def print_header(self, log_every: int, trackers_only: str = "") -> None:
        """One line at start saying what the progress lines hold and where the other scalars go."""
        if not self.enabled:
            return
        names = ", ".join(tracker.name for tracker in self.trackers)
        where = f"{names} only" if names else "not shown (run.trackers is empty)"
        print(f"progress every {log_every} steps (loss, loss parts, grad norms: means since the previous line)"
              + (f"; {trackers_only}: {where}" if trackers_only else ""), file=self.stream, flush=True)

    def log(self, step: int, epoch: float, *, lr: float, means: dict[str, float], counters: dict[str, float],
            trackers_only: dict[str, float] | None = None) -> None:
        """`means`: loss, loss_<part>, grad_norm_<part> over the interval; `counters`: totals so far (skipped
        inputs, non-finite steps), usually none."""
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        samples_per_s = self._window_steps * self.global_batch_size / elapsed
        step_time = elapsed / max(self._window_steps, 1)
        eta = step_time * (self.total_steps - step)
        self._window_start, self._window_steps = now, 0
        scalars = {f"train/{name}": value for name, value in
                   {**means, "lr": lr, **counters, **(trackers_only or {})}.items()}
        self._to_trackers({**scalars, "train/samples_per_s": samples_per_s}, step)
        if not self.enabled:
            return
        parts = [f"step {step}/{self.total_steps}", f"epoch {epoch:.2f}", loss_text(means), f"lr {lr:.4g}",
                 grad_norm_text(means), *(f"{name} {value:g}" for name, value in counters.items()),
                 f"{samples_per_s:.1f} samples/s", f"ETA {format_duration(eta)}"]
        print(" | ".join(part for part in parts if part), file=self.stream, flush=True)

    def log_eval(self, step: int, name: str, values: dict[str, float]) -> None:
        self._to_trackers({f"eval/{name}/{key}": value for key, value in values.items()}, step)
        if not self.enabled:
            return
        text = ", ".join(f"{k} {v:.4f}" for k, v in values.items())
        print(f"step {step}/{self.total_steps} | eval {name}: {text}", file=self.stream, flush=True)

    def _to_trackers(self, scalars: dict[str, float], step: int) -> None:
        for tracker in self.trackers:
            tracker.log(scalars, step)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
