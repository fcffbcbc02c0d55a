# The identity-center head as a training part: same step protocol as the engine's backbone part.
"""The trainer steps two parts per optimizer step through the same calls (see toolkit/parallel/base.py):

    backward hooks / scale -> unscale_() -> found_nonfinite() -> clip_grad_norm_() -> step(skip) -> zero_grad()

`HeadPart` holds this rank's center shard (Partial FC), its own optimizer and schedule, and the rules
that make it one part with the backbone:

- The factor of W between the parts: the engine averages the backbone's gradients over the W ranks, as is
  right for a per-rank mean loss. The sharded head's loss is already the mean over the global batch, so
  its gradient for this rank's embeddings is 1/W of a per-rank mean's. `loss()` multiplies the embedding
  gradient by W so that, after the engine's averaging, the backbone gets exactly the gradient of the
  global-mean loss, the same as a single process on the whole batch.
- fp16 loss scaling: the loss of both parts is scaled once (by the engine); the head's gradients are
  divided by the same factor in `unscale_()`, and a non-finite shard on any rank is a non-finite head.
- Clipping: by the head's own norm over all shards (per-part clipping is the policy every engine can
  implement: DeepSpeed cannot include outside parameters in its norm).
- Checkpoints: each rank saves its shard with its class range (heads/shard_checkpoint.py), so a checkpoint
  reshards to another world size.
"""

from __future__ import annotations

from typing import Any

import torch

from toolkit.distributed import DistributedContext
from toolkit.errors import CheckpointError
from toolkit.heads.partial_fc import ShardedIdentityCenterHead
from toolkit.heads.shard_checkpoint import load_shards_into, shard_payload


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in forward; multiplies the gradient by `factor` in backward."""
    return tensor if factor == 1 else _ScaleGradient.apply(tensor, factor)


class HeadPart:
    """This rank's center shard with its optimizer: the second training part."""

    name = "head"

    def __init__(self, head: ShardedIdentityCenterHead, optimizer: torch.optim.Optimizer, ctx: DistributedContext):
        self.module = head
        self.optimizer = optimizer
        self.ctx = ctx
        self.loss_scale = 1.0

    @property
    def lr_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer

    def loss(self, emb_BD: torch.Tensor, labels_B: torch.Tensor) -> torch.Tensor:
        """Margin-softmax loss of the global batch (x W on the embedding gradient, see the module doc)."""
        return self.module(scale_gradient(emb_BD, self.ctx.world_size), labels_B)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    def _grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.module.parameters() if p.grad is not None]

    def unscale_(self, loss_scale: float = 1.0) -> None:
        """Divide the gradients by the loss scale the engine applied (fp16)."""
        grads = self._grads()
        if loss_scale != 1.0 and grads:
            torch._foreach_div_(grads, loss_scale)

    def found_nonfinite(self) -> torch.Tensor:
        """1.0 when this rank's shard gradient holds inf/nan, else 0.0 (no host sync; the trainer combines
        every part's flag over the ranks with one all-reduce)."""
        grads = self._grads()
        if not grads:
            return torch.zeros((), device=self.ctx.device)
        return (~torch.isfinite(torch.stack([g.float().sum() for g in grads]).sum())).float()

    def weights_finite(self) -> torch.Tensor:
        return torch.isfinite(self.module.centers_CD.detach().sum()).float()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the norm over all shards (0 = measure only); returns that norm before clipping."""
        grads = self._grads()
        norm_sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(
            (), device=self.ctx.device)
        if self.ctx.world_size > 1:
            torch.distributed.all_reduce(norm_sq, group=self.ctx.group)
        norm = norm_sq.sqrt()
        if max_norm > 0:
            coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coefficient)
        return norm

    def step(self, skip: bool = False) -> bool:
        if skip:
            return False
        self.optimizer.step()
        return True

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def count_parameters(self) -> int:
        return self.module.num_classes * self.module.centers_CD.shape[1]

    @torch.no_grad()
    def load_full_centers(self, centers_CD: torch.Tensor, source) -> None:
        """Take this rank's class range from a full C x D center matrix (class order)."""
        shard = self.module.shard
        if tuple(centers_CD.shape) != (self.module.num_classes, self.module.centers_CD.shape[1]):
            raise CheckpointError(f"{source}: identity centers of shape {tuple(centers_CD.shape)}; this run has "
                                  f"{self.module.num_classes} classes x {self.module.centers_CD.shape[1]}")
        self.module.centers_CD.copy_(centers_CD[shard.start:shard.end])

    # ----- checkpoints ------------------------------------------------------------------------------
    def shard_state(self) -> dict[str, Any]:
        """This rank's shard and its optimizer rows, with the class range (written as head_rankNNNNN.pt)."""
        return shard_payload(self.module, self.optimizer)

    def load_shards(self, shards: list[dict[str, Any]], source) -> None:
        """Take this rank's class range from the saved shards of any world size."""
        load_shards_into(self.module, self.optimizer, shards, source)


def part_sizes(strategy, head: HeadPart | None, backbone_name: str, contrastive: bool) -> list[str]:
    """One entry per part for the run's first lines, parameters counted whole (not this rank's shard)."""
    model = strategy.unwrapped()
    sizes = []
    if contrastive:
        query = strategy.count_parameters(model.backbone)
        projection = strategy.count_parameters(model.projection)
        total = strategy.count_parameters()
        sizes.append(f"backbone {backbone_name}: {query / 1e6:.2f}M params")
        sizes.append(f"projection: {projection / 1e6:.2f}M")
        sizes.append(f"momentum key encoder: {(total - query - projection) / 1e6:.2f}M (not trained by the optimizer)")
    else:
        sizes.append(f"backbone {backbone_name}: {strategy.count_parameters() / 1e6:.2f}M params")
    if head is not None:
        sizes.append(f"head: {head.module.num_classes} classes x {head.module.centers_CD.shape[1]} = "
                     f"{head.count_parameters() / 1e6:.2f}M params over {head.ctx.world_size} rank(s)")
    else:
        sizes.append("head: none (head.weight 0: no identity centers)")
    return sizes
