# Consecutive non-finite steps: counted, reported, and turned into a stop (exit status 3) past a limit.
from __future__ import annotations

from typing import Callable

from toolkit.errors import TrainingDivergedError


class NonfiniteSteps:
    """Counts steps whose loss or gradients were not finite (skipped by the trainer on every part)."""

    def __init__(self, max_consecutive: int, say: Callable[[str], None]):
        self.max_consecutive = max_consecutive
        self.say = say
        self.total = 0
        self.consecutive = 0

    def record(self, nonfinite: bool, step: int, last_checkpoint) -> None:
        """Note optimizer step `step` (1-based); raise TrainingDivergedError at the limit."""
        if not nonfinite:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        self.say(f"warning: step {step}: loss or gradients not finite (inf/nan); the step is skipped on every part "
                 f"({self.consecutive} in a row, {self.total} in all; the run stops at {self.max_consecutive} in a row)")
        if self.consecutive >= self.max_consecutive:
            raise TrainingDivergedError(
                f"training diverged at step {step}: the loss or gradients were not finite for {self.max_consecutive} "
                f"consecutive steps (train.max_nonfinite_steps); the last checkpoint, written from finite weights, "
                f"is {last_checkpoint or 'none'}; lower optim.lr or set parallel.clip_grad_norm (exit status 3)")
