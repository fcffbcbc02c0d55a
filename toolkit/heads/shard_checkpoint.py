# Center-shard checkpoints: each rank's rows with their class range, and resharding to another world size.
"""A center shard is saved as {class_start, class_count, num_classes, centers, optimizer state rows}.

Loading at another world size (or sample rate) takes, for the new shard's class range, the rows from
whichever saved shards cover it, for the centers and for every per-row optimizer state tensor
(SGD momentum, AdamW moments); scalar optimizer state (AdamW's step) is copied.
"""

from __future__ import annotations

from typing import Any

import torch

from toolkit.errors import CheckpointError
from toolkit.heads.partial_fc import ShardedIdentityCenterHead


def shard_payload(head: ShardedIdentityCenterHead, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shard and its optimizer state (one parameter: the centers)."""
    state = optimizer.state_dict()
    param_state = state["state"].get(0, {})
    return {
        "class_start": head.shard.start,
        "class_count": head.shard.count,
        "num_classes": head.num_classes,
        "centers": head.centers_CD.detach().cpu(),
        "optimizer_state": {key: (value.cpu() if torch.is_tensor(value) else value)
                            for key, value in param_state.items()},
        "optimizer_param_groups": state["param_groups"],
    }


def _rows(shards: list[dict[str, Any]], start: int, end: int, pick) -> torch.Tensor:
    """Rows [start, end) of the global matrix that `pick(shard)` returns for each saved shard."""
    pieces = []
    for shard in sorted(shards, key=lambda s: s["class_start"]):
        lo = max(start, shard["class_start"])
        hi = min(end, shard["class_start"] + shard["class_count"])
        if lo < hi:
            offset = shard["class_start"]
            pieces.append(pick(shard)[lo - offset: hi - offset])
    rows = torch.cat(pieces) if pieces else torch.empty(0)
    if rows.shape[0] != end - start:
        raise CheckpointError(f"the saved center shards cover {rows.shape[0]} of classes [{start}, {end})")
    return rows


def load_shards_into(head: ShardedIdentityCenterHead, optimizer: torch.optim.Optimizer,
                     shards: list[dict[str, Any]], source: str) -> None:
    """Fill this rank's shard (and its optimizer state) from saved shards of any world size."""
    saved_classes = {s["num_classes"] for s in shards}
    if saved_classes != {head.num_classes}:
        raise CheckpointError(f"checkpoint {source} has {sorted(saved_classes)} identity classes, this recipe's "
                              f"data has {head.num_classes}; center shards cannot be reused")
    start, end = head.shard.start, head.shard.end
    with torch.no_grad():
        head.centers_CD.copy_(_rows(shards, start, end, lambda s: s["centers"]))
    saved_state = shards[0]["optimizer_state"]
    param_state = {}
    for key, value in saved_state.items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == shards[0]["class_count"]:
            param_state[key] = _rows(shards, start, end, lambda s, k=key: s["optimizer_state"][k]).to(
                head.centers_CD.device)
        else:
            param_state[key] = value
    optimizer.load_state_dict({"state": {0: param_state} if param_state else {},
                               "param_groups": shards[0]["optimizer_param_groups"]})


def gather_full_centers(shards: list[dict[str, Any]]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The global center matrix and per-row optimizer state from saved shards (for tests and export)."""
    num_classes = shards[0]["num_classes"]
    centers = _rows(shards, 0, num_classes, lambda s: s["centers"])
    state = {key: _rows(shards, 0, num_classes, lambda s, k=key: s["optimizer_state"][k])
             for key, value in shards[0]["optimizer_state"].items()
             if torch.is_tensor(value) and value.dim() >= 1}
    return centers, state
