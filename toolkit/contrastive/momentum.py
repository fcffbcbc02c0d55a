# The momentum (EMA) update of UniMoCo's key encoder: key = m * key + (1 - m) * query, shard by shard.
from __future__ import annotations

from typing import Callable, Iterable

import torch


@torch.no_grad()
def momentum_update_(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]],
                     local_tensors: Callable[[torch.Tensor], list[torch.Tensor]], momentum: float) -> None:
    """key = m * key + (1 - m) * query for every (query, key) parameter pair, on what this rank stores.

    `local_tensors(param)` is the engine's view of a parameter on this rank (the whole tensor, or its shard
    under ZeRO-3 / FSDP2; query and key encoder are sharded alike), so no parameter is gathered.
    """
    query, key = [], []
    for q, k in pairs:
        query += local_tensors(q)
        key += local_tensors(k)
    torch._foreach_mul_(key, momentum)
    torch._foreach_add_(key, query, alpha=1.0 - momentum)
