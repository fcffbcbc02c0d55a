# UniMoCo objective: keys from the momentum encoder (shuffle-BN across ranks), UniCon loss, enqueue, stats.
"""The UniMoCo step, given the engine that holds the two encoders (contrastive/encoders.py).

Per micro-batch on rank r with B images and W ranks:
1. keys: the key view goes through the momentum encoder. With shuffle-BN (MoCo) the W*B key images are
   gathered, permuted by a permutation every rank derives from the same seed, each rank encodes its slice
   (so batch-norm statistics mix samples of all ranks), and the keys are gathered and un-permuted. The
   result is the global batch's keys in rank order, unit-normalised: N x P with N = W*B.
2. loss: UniCon of this rank's queries against [the global batch's keys, the queue]; query i's own key is
   key r*B + i; positives are the own key and every key with the same label (>= 0).
3. the global batch's keys and labels are enqueued (after the loss, so no key is both in the batch and in
   the queue of the same step).
The gradient needs no correction for W: each rank's loss is its own queries' mean, which the engine
averages like any data-parallel loss.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from toolkit.contrastive.queue import LabelQueue
from toolkit.ops.unicon_reference import unicon_loss_reference
from toolkit.distributed import DistributedContext
from toolkit.distributed.collectives import all_gather_no_grad


def momentum_at(momentum: float, schedule: str, step: int, total_steps: int) -> float:
    """EMA momentum after optimizer step `step` (0-based): 'constant' m, or 'cosine' from m to 1 over the run."""
    if schedule == "constant":
        return momentum
    if schedule != "cosine":
        raise ValueError(f"unknown momentum schedule {schedule!r}; expected 'constant' or 'cosine'")
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - momentum) * (math.cos(math.pi * progress) + 1.0) / 2.0


class UniMoCoObjective:
    """Keys, loss and queue of one rank. shuffle_bn: MoCo's shuffle-BN for the keys across ranks (else each
    rank encodes its own key images, e.g. with SyncBN in the key encoder)."""

    def __init__(self, queue: LabelQueue, ctx: DistributedContext, *, temperature: float, margin: float = 0.0,
                 shuffle_bn: bool = True, seed: int, unicon_fn=unicon_loss_reference):
        self.temperature = temperature
        self.margin = margin
        self.shuffle_bn = shuffle_bn
        self.queue = queue
        self.ctx = ctx
        self.seed = seed
        self.unicon_fn = unicon_fn
        self.last_query_labels: torch.Tensor | None = None

    @torch.no_grad()
    def keys(self, engine, images_k: torch.Tensor, micro_step: int) -> torch.Tensor:
        """The global batch's keys, N x P, rank order, unit norm."""
        group, world, rank = self.ctx.group, self.ctx.world_size, self.ctx.rank
        batch = images_k.shape[0]
        if world > 1 and self.shuffle_bn:
            all_images = all_gather_no_grad(images_k, group)  # N x 3 x H x W
            # Same permutation on every rank, from a seed, without a broadcast.
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + micro_step)
            permutation_N = torch.randperm(all_images.shape[0], generator=gen).to(images_k.device)
            mine = all_images[permutation_N[rank * batch:(rank + 1) * batch]]
            shuffled_keys_NP = all_gather_no_grad(F.normalize(engine.key_forward(mine).float(), dim=1), group)
            keys_NP = torch.empty_like(shuffled_keys_NP)
            keys_NP[permutation_N] = shuffled_keys_NP
            return keys_NP
        return all_gather_no_grad(F.normalize(engine.key_forward(images_k).float(), dim=1), group)

    def loss(self, projection_BP: torch.Tensor, labels_B: torch.Tensor, keys_NP: torch.Tensor,
             labels_N: torch.Tensor) -> torch.Tensor:
        """Mean UniCon loss of this rank's queries against the batch's keys and the queue."""
        query_BP = F.normalize(projection_BP.float(), dim=1)
        all_keys = torch.cat([keys_NP, self.queue.keys_KP])
        all_labels = torch.cat([labels_N, self.queue.labels_K])
        batch = query_BP.shape[0]
        own_key_B = self.ctx.rank * batch + torch.arange(batch, device=query_BP.device)
        self.last_query_labels = labels_B.detach()
        loss_B = self.unicon_fn(query_BP, all_keys, labels_B, all_labels, own_key_B, self.temperature,
                                self.margin)
        return loss_B.mean()

    def enqueue(self, keys_NP: torch.Tensor, labels_N: torch.Tensor) -> None:
        self.queue.enqueue(keys_NP, labels_N)

    def statistics(self) -> dict[str, float]:
        labels = self.last_query_labels if self.last_query_labels is not None else torch.empty(0, dtype=torch.long)
        return self.queue.statistics(labels.to(self.queue.labels_K.device))
