# The distributed context: rank, world, device and process group, created once by the launcher.
"""Library code never reads the environment: launch/ builds a DistributedContext and passes it down."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistributedContext:
    """Where this process sits in the job. `group` is None for a single process without a process group."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    group: dist.ProcessGroup | None = None

    @property
    def is_distributed(self) -> bool:
        return self.group is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier(group=self.group)

    def all_reduce_mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place mean over ranks (identity for one process)."""
        if self.is_distributed and self.world_size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
            tensor.div_(self.world_size)
        return tensor

    def all_gather_objects(self, obj) -> list:
        """Every rank's `obj` (picklable, produced by this job only), in rank order."""
        if not self.is_distributed or self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj, group=self.group)
        return gathered

    def broadcast_object(self, obj, src: int = 0):
        if not self.is_distributed or self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, group=self.group)
        return box[0]
