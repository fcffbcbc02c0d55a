# The single-process engine: plain autograd, autocast for bf16/fp16, a GradScaler for fp16.
from __future__ import annotations

import datetime

from toolkit.distributed import DistributedContext
from toolkit.parallel.base import LaunchEnvironment, ParallelStrategy, register_strategy


@register_strategy("single")
class SingleProcess(ParallelStrategy):
    """One process, no process group; the backbone and its optimizer travel inside the trainer file."""

    multi_rank = False

    @classmethod
    def start(cls, par, device, launch: LaunchEnvironment) -> DistributedContext:
        cls.check_world_size(launch.world_size, "the launcher started {} ranks")
        return DistributedContext(device=device)

    @classmethod
    def _init_process_group(cls, backend: str, timeout: datetime.timedelta, launch: LaunchEnvironment) -> None:
        raise AssertionError("the single engine starts no process group")
