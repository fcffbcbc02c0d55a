# DistributedDataParallel: full replicas, gradients averaged across ranks in backward.
from __future__ import annotations

import contextlib

from torch import nn

from toolkit.parallel.base import ParallelStrategy, register_strategy


@register_strategy("ddp")
class DistributedDataParallel(ParallelStrategy):
    """torch DDP; no_sync on all micro-batches but the last; rank 0 saves the unwrapped module in the trainer file."""

    def __init__(self, par, model, optimizer, ctx, *, grad_accum_steps):
        super().__init__(par, model, optimizer, ctx, grad_accum_steps=grad_accum_steps)
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        self.module = nn.parallel.DistributedDataParallel(model, device_ids=device_ids, process_group=ctx.group)

    def _sync_context(self, is_last_micro: bool):
        return contextlib.nullcontext() if is_last_micro else self.module.no_sync()

    def unwrapped(self) -> nn.Module:
        return self.module.module
