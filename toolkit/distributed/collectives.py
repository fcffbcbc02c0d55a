# Autograd-aware collectives for model-parallel layers (all-gather whose backward sums into the owner).
"""Collectives with the gradients a model-parallel layer needs.

`all_gather_with_grad` concatenates every rank's rows. Every rank then computes a loss contribution that
depends on all rows, so the gradient of a row is the sum of every rank's gradient for it, and only the
rank that owns the row needs it: backward is a reduce-scatter (sum). There is no extra factor of the
world size: the result is exactly d(loss)/d(row) for a loss that every rank computes identically.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


# torch 2.14 renamed the single-tensor collectives and warns (FutureWarning) at the old names; the toolkit
# supports torch >= 2.6, which only has the old ones. Looked up at each call (benchmarks wrap them to time them).
def _all_gather_single(output: torch.Tensor, local: torch.Tensor, group) -> None:
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(output, local, group=group)


def _reduce_scatter_single(output: torch.Tensor, full: torch.Tensor, group) -> None:
    reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    reduce_scatter(output, full, op=dist.ReduceOp.SUM, group=group)


def _backend_supports_reduce_scatter(group) -> bool:
    return dist.get_backend(group) == "nccl"


class _AllGatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local_ND: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        gathered_WND = torch.empty((world * local_ND.shape[0], *local_ND.shape[1:]), dtype=local_ND.dtype,
                                   device=local_ND.device)
        _all_gather_single(gathered_WND, local_ND.contiguous(), group=group)
        return gathered_WND

    @staticmethod
    def backward(ctx, grad_WND: torch.Tensor):
        group = ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        rows = grad_WND.shape[0] // world
        grad_WND = grad_WND.contiguous()
        if _backend_supports_reduce_scatter(group):
            grad_ND = torch.empty((rows, *grad_WND.shape[1:]), dtype=grad_WND.dtype, device=grad_WND.device)
            _reduce_scatter_single(grad_ND, grad_WND, group=group)
        else:  # gloo has no reduce-scatter: sum everywhere, keep our rows
            summed = grad_WND.clone()
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=group)
            grad_ND = summed[rank * rows:(rank + 1) * rows]
        return grad_ND, None


def all_gather_with_grad(local_ND: torch.Tensor, group) -> torch.Tensor:
    """(W*N) x ... rows of every rank in rank order; backward sums the gradients into each owner's rows."""
    if group is None or dist.get_world_size(group) == 1:
        return local_ND
    return _AllGatherWithGrad.apply(local_ND, group)


def all_gather_no_grad(local_N: torch.Tensor, group) -> torch.Tensor:
    """Rank-ordered concatenation without autograd (labels, indices)."""
    if group is None or dist.get_world_size(group) == 1:
        return local_N
    world = dist.get_world_size(group)
    gathered = torch.empty((world * local_N.shape[0], *local_N.shape[1:]), dtype=local_N.dtype,
                           device=local_N.device)
    _all_gather_single(gathered, local_N.contiguous(), group=group)
    return gathered


def all_reduce_(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor
