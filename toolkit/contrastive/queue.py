# The UniMoCo label queue: K past keys with their identity labels, filled from every rank each step.
"""A ring buffer of keys (K x P, unit vectors) and labels (K, -1 = unlabeled or never filled).

Every rank holds the same queue: each step enqueues the keys and labels gathered from all ranks, in rank
order, at the same pointer. K must be a multiple of the global batch so a step never wraps mid-batch.
The buffers are part of the checkpoint (module state), so a resumed run continues with the same queue.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LabelQueue(nn.Module):
    def __init__(self, size: int, dim: int, global_batch_size: int, *, seed: int = 0):
        super().__init__()
        if size <= 0 or size % global_batch_size:
            raise ValueError(f"contrastive.queue_size {size} must be a positive multiple of the global batch "
                             f"{global_batch_size}")
        gen = torch.Generator().manual_seed(seed)
        # Random unit keys to start with (as MoCo): label -1, so they are only ever negatives.
        self.register_buffer("keys_KP", F.normalize(torch.randn(size, dim, generator=gen), dim=1))
        self.register_buffer("labels_K", torch.full((size,), -1, dtype=torch.long))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_filled", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys_KP.shape[0]

    @torch.no_grad()
    def enqueue(self, keys_NP: torch.Tensor, labels_N: torch.Tensor) -> None:
        """Write the gathered keys (N = global batch, rank order) at the pointer and advance it."""
        num = keys_NP.shape[0]
        # Slots from the pointer, computed on the device: the host never waits for the pointer's value.
        slots_N = (self.pointer + torch.arange(num, device=self.pointer.device)) % self.size
        self.keys_KP.index_copy_(0, slots_N, keys_NP.to(self.keys_KP.dtype))
        self.labels_K.index_copy_(0, slots_N, labels_N.to(self.labels_K.dtype))
        self.pointer.copy_((self.pointer + num) % self.size)
        self.num_filled.copy_((self.num_filled + num).clamp(max=self.size))

    @torch.no_grad()
    def statistics(self, query_labels_B: torch.Tensor) -> dict[str, float]:
        """For logging steps: identities present, labeled share, the largest identity's share, and the
        mean number of queued positives per labeled query (the own key comes on top)."""
        filled = self.labels_K[: int(self.num_filled)] if int(self.num_filled) < self.size else self.labels_K
        labeled = filled[filled >= 0]
        counts = torch.bincount(labeled) if labeled.numel() else torch.zeros(1, dtype=torch.long)
        labeled_queries = query_labels_B[query_labels_B >= 0]
        if labeled_queries.numel() and labeled.numel():
            positives = (labeled_queries[:, None] == labeled[None, :]).sum(dim=1).float().mean()
        else:
            positives = torch.zeros(())
        return {
            "queue_identities": float((counts > 0).sum()),
            "queue_labeled_share": float(labeled.numel() / max(1, filled.numel())),
            "queue_top_identity_share": float(counts.max() / max(1, labeled.numel())),
            "positives_per_query": 1.0 + float(positives),
        }
