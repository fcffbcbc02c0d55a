# Model-parallel identity-center layer (Partial FC): centers sharded over ranks, margin softmax across ranks.
"""The identity-center layer at WebFace42M scale.

Rank r of the model-parallel group owns a contiguous range of classes (`shard_range`). Per step:

1. embeddings (B x D per rank) are all-gathered to N = W*B rows (backward: reduce-scatter, exact gradients);
   labels are all-gathered;
2. sampling (sample_rate < 1): every class of this shard that is a positive in the gathered batch is kept,
   random negatives fill up to int(sample_rate * num_local) columns (min(N, num_local) if more: a size fixed by
   the shapes, so no host sync); labels are remapped to the kept columns;
3. local cosine logits N x S against the (kept, normalised) local centers; optional inter-class filtering zeroes
   negative cosines above a threshold; the margin goes on the target entries this rank owns; times scale;
4. softmax cross-entropy across ranks: row max by all-reduce(MAX), sum of exp by all-reduce(SUM), target
   logit from the owner (all-reduce SUM of the owner's value); loss = mean over the N rows, the same
   value on every rank. Steps 3-4 run unfused in plain PyTorch (toolkit/ops/unfused.py, which also derives
   the sharded softmax) or in the fused kernels (toolkit/ops), as `implementation` says.

The gradients are exactly those of that loss: the centers' gradient is this shard's part of the full
gradient, and each rank's embedding rows get their full gradient (summed over shards, no factor of W).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from toolkit import ops
from toolkit.distributed.collectives import all_gather_no_grad, all_gather_with_grad
from toolkit.errors import ConfigError
from toolkit.ops import unfused
from toolkit.ops.margins import Margin

IMPLEMENTATIONS = ("auto", "reference", "fused", "fused_linear")


def resolve_implementation(requested: str) -> str:
    """What `head.implementation` runs: 'auto' is 'fused_linear' (the fastest and leanest path, see
    benchmarks/bench_head.py) when the kernels are built, else 'reference' (toolkit.ops then warned once at
    import); 'fused' and 'fused_linear' without the kernels are an error, not a silent fallback."""
    if requested not in IMPLEMENTATIONS:
        raise ValueError(f"unknown head implementation {requested!r}; expected one of {', '.join(IMPLEMENTATIONS)}")
    if requested == "auto":
        return "fused_linear" if ops.FUSED_KERNELS_AVAILABLE else "reference"
    if requested != "reference" and not ops.FUSED_KERNELS_AVAILABLE:
        raise ConfigError(f"head.implementation {requested!r} needs the fused kernels, which are not available "
                          f"({ops.UNAVAILABLE_REASON}); rebuild them with `pip install -e .`, or use 'auto' or 'reference'")
    return requested


@dataclass(frozen=True)
class ShardRange:
    """Classes [start, start + count) of `num_classes`, owned by one rank."""

    start: int
    count: int
    num_classes: int

    @property
    def end(self) -> int:
        return self.start + self.count


def shard_range(num_classes: int, world_size: int, rank: int) -> ShardRange:
    """Contiguous split; the first num_classes % world_size ranks own one class more."""
    if num_classes < world_size:
        raise ValueError(f"{num_classes} classes cannot be split over {world_size} ranks")
    base, extra = divmod(num_classes, world_size)
    count = base + (1 if rank < extra else 0)
    start = rank * base + min(rank, extra)
    return ShardRange(start, count, num_classes)


class ShardedIdentityCenterHead(nn.Module):
    """This rank's shard of the class centers (count x D, fp32, N(0, 0.01)) and the distributed margin loss."""

    def __init__(self, num_classes: int, embedding_size: int, margin: Margin, *, rank: int = 0, world_size: int = 1,
                 group=None, sample_rate: float = 1.0, interclass_filter: float = 0.0,
                 implementation: str = "auto"):
        super().__init__()
        # reference: unfused plain PyTorch (toolkit/ops/unfused.py); fused: kernel on the cosine buffer, gradient
        # written in place; fused_linear: kernel over blocks of classes on the raw centers (normalisation fused),
        # no N x S logits and no normalised copy of the centers.
        self.implementation = resolve_implementation(implementation)
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.shard = shard_range(num_classes, world_size, rank)
        self.num_classes = num_classes
        self.margin = margin
        self.group = group if world_size > 1 else None
        self.sample_rate = sample_rate
        self.interclass_filter = interclass_filter
        self.num_sampled = max(1, int(sample_rate * self.shard.count))
        self.centers_CD = nn.Parameter(torch.empty(self.shard.count, embedding_size).normal_(0.0, 0.01))
        self.last_sampled_classes: torch.Tensor | None = None  # global ids of the kept columns (for tests, plans)

    def num_kept_columns(self, num_rows: int) -> int:
        """Columns S kept per step, from shapes only (no host sync): int(sample_rate x count), or min(N, count)
        when that is more, so that every positive of the N gathered rows always fits (at most min(N, count)
        distinct classes of this shard can be positives)."""
        return min(self.shard.count, max(self.num_sampled, num_rows))

    def sample_classes(self, labels_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept local column indices S, sorted, local target column per row or -1): every positive and random
        negatives, S = num_kept_columns(N) in all.

        Fixed-size device-side work (no torch.unique, no nonzero): the step never waits for the device here."""
        in_shard_N = (labels_N >= self.shard.start) & (labels_N < self.shard.end)
        local_label_N = torch.where(in_shard_N, labels_N - self.shard.start, torch.full_like(labels_N, -1))
        num_keep = self.num_kept_columns(labels_N.numel())
        if num_keep >= self.shard.count:
            return torch.arange(self.shard.count, device=labels_N.device), local_label_N
        # Random scores in [0, 1) for every local class, 2 for positives: top-k keeps all positives first. Rows of
        # other shards scatter -1 into column 0, which the max leaves unchanged.
        scores_C = torch.rand(self.shard.count, device=labels_N.device)
        positive_scores_N = torch.where(in_shard_N, 2.0, -1.0).to(scores_C.dtype)
        scores_C.scatter_reduce_(0, local_label_N.clamp(min=0), positive_scores_N, reduce="amax")
        # Sorted (the fused kernel's cosine cache relies on it): a stable sort of integers is a radix sort on
        # CPU, and a positive's column is found by binary search in the sorted indices (no C-sized remap
        # table); benchmarks/bench_sampling.py times the alternatives.
        kept_S = torch.topk(scores_C, k=num_keep, sorted=False).indices.sort(stable=True).values
        local_target_N = torch.where(in_shard_N, torch.searchsorted(kept_S, local_label_N.clamp(min=0)),
                                     local_label_N)
        return kept_S, local_target_N

    def forward(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """Mean margin-softmax loss over the gathered batch; identical on every rank of the group.

        Rows labeled -1 (unlabeled data, trained by the contrastive objective only) are left out."""
        with torch.autocast(device_type=emb_BD.device.type, enabled=False):
            emb_ND = all_gather_with_grad(emb_BD.float(), self.group)
            labels_N = all_gather_no_grad(labels_B, self.group)
            kept_S, local_target_N = self.sample_classes(labels_N)
            self.last_sampled_classes = kept_S + self.shard.start
            sampled = kept_S.numel() < self.shard.count
            emb_ND = F.normalize(emb_ND, dim=1)
            row_weight_N = (labels_N >= 0).float()  # unlabeled rows (-1) take no part
            options = dict(interclass_filter=self.interclass_filter, row_weight_N=row_weight_N)
            if self.implementation == "fused_linear":  # the kernels normalise the raw centers on the fly and,
                # sampling, read the kept rows in place and write the dense gradient (no S x D copy, no scatter)
                return ops.distributed_normalized_linear_margin_softmax_ce(
                    emb_ND, self.centers_CD, local_target_N, self.margin, self.group,
                    kept_S=kept_S if sampled else None, **options)
            centers_SD = self.centers_CD[kept_S] if sampled else self.centers_CD
            cos_NS = emb_ND @ F.normalize(centers_SD, dim=1).t()
            if self.implementation == "fused":  # backward writes the gradient over cos_NS (consumed)
                return ops.distributed_margin_softmax_ce(cos_NS, local_target_N, self.margin, self.group, **options)
            return unfused.distributed_margin_softmax_ce(cos_NS, local_target_N, self.margin, self.group, **options)

    def extra_repr(self) -> str:
        return (f"classes [{self.shard.start}, {self.shard.end}) of {self.num_classes}, "
                f"embedding_size={self.centers_CD.shape[1]}, sample_rate={self.sample_rate}, margin={self.margin}")
