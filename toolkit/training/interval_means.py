# Means of per-step scalars (loss, loss parts, grad norms) over a logging interval, summed on the device.
"""The progress line and TensorBoard show the mean of each scalar over the steps since the previous line, not
one step's value. Each step adds its values to per-name sums and counts that stay on the device (no host sync
per step); `take()` averages them over the ranks with one all-reduce and one host copy on logging steps.

Only finite values are counted: a skipped non-finite step does not turn the interval's mean into nan (the
progress line counts such steps separately as nonfinite_steps).
"""

from __future__ import annotations

import math

import torch


class IntervalMeans:
    """Per-name sums and counts since the last `take()`, on `device` (float64: long intervals stay exact)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        """Count one value of `name` (a 0-d tensor on any device, or a float); no host sync."""
        value = torch.as_tensor(value).detach().to(self.device, torch.float64).reshape(())
        finite = torch.isfinite(value)
        if name not in self._sums:
            self._sums[name] = torch.zeros((), dtype=torch.float64, device=self.device)
            self._counts[name] = torch.zeros((), dtype=torch.float64, device=self.device)
        self._sums[name].add_(torch.where(finite, value, 0.0))
        self._counts[name].add_(finite.to(torch.float64))

    def take(self, all_reduce_mean_) -> dict[str, float]:
        """The mean of each name over this interval's values of every rank, then start a new interval.

        `all_reduce_mean_` averages a tensor over the ranks in place (a collective: every rank calls `take` at
        the same step, having added the same names in the same order). A name without a finite value gives nan.
        """
        names = list(self._sums)
        if not names:
            return {}
        sums_and_counts = torch.stack([*(self._sums[name] for name in names),
                                       *(self._counts[name] for name in names)])
        values = all_reduce_mean_(sums_and_counts).tolist()   # the mean of sums over mean of counts: a ratio
        self._sums.clear()
        self._counts.clear()
        counts = values[len(names):]
        return {name: values[i] / counts[i] if counts[i] else math.nan for i, name in enumerate(names)}
