# Console progress lines and TensorBoard scalars for the training loop.
"""Progress reporting: one console line per logging step and TensorBoard scalars of the same values."""

from __future__ import annotations

import sys
import time
from pathlib import Path


def format_duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class ProgressReporter:
    """Prints `step/total epoch loss lr samples/s ETA` and mirrors scalars to TensorBoard (rank 0 only)."""

    def __init__(self, total_steps: int, global_batch_size: int, tensorboard_dir: Path | None, *,
                 enabled: bool = True, stream=None):
        self.total_steps = total_steps
        self.global_batch_size = global_batch_size
        self.enabled = enabled
        self.stream = stream or sys.stdout
        self.writer = None
        if enabled and tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(tensorboard_dir))
        self._window_start = time.perf_counter()
        self._window_steps = 0
        self._run_start = self._window_start

    def restart_clock(self) -> None:
        """Exclude time outside training steps (evaluation, checkpointing) from throughput."""
        self._window_start = time.perf_counter()
        self._window_steps = 0

    def step_done(self) -> None:
        self._window_steps += 1

    def log(self, step: int, epoch: float, scalars: dict[str, float]) -> None:
        now = time.perf_counter()
        elapsed = max(now - self._window_start, 1e-9)
        samples_per_s = self._window_steps * self.global_batch_size / elapsed
        step_time = elapsed / max(self._window_steps, 1)
        eta = step_time * (self.total_steps - step)
        self._window_start, self._window_steps = now, 0
        if not self.enabled:
            return
        parts = [f"step {step}/{self.total_steps}", f"epoch {epoch:.2f}"]
        parts += [f"{name} {value:.4g}" for name, value in scalars.items()]
        parts += [f"{samples_per_s:.1f} samples/s", f"ETA {format_duration(eta)}"]
        print(" | ".join(parts), file=self.stream, flush=True)
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, step)
            self.writer.add_scalar("train/samples_per_s", samples_per_s, step)

    def log_eval(self, step: int, name: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        text = ", ".join(f"{k} {v:.4f}" for k, v in values.items())
        print(f"step {step}/{self.total_steps} | eval {name}: {text}", file=self.stream, flush=True)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"eval/{name}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
