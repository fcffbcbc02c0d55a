# Probe run by torchrun on 2 gloo ranks: a backbone trained under FSDP2 or ZeRO-3 vs the same steps in one process.
"""Every rank trains the backbone on its half of a fixed global batch for a few SGD steps through the
production strategy (toolkit.parallel: its process-group start, `parallelize` for FSDP2 per ``fsdp_units()``
block, the rendered DeepSpeed config for ZeRO-3, its forward / backward / step protocol and its gathered full
state dict), with activation checkpointing applied from outside. Rank 0 then replays the same steps in one process with a
plain model: per step, each rank's half goes through the model separately (BatchNorm statistics are per
rank in the sharded run too), with the random state each rank had (token masking, drop path), and the two
half-batch gradients are averaged, which is what the engines' gradient averaging computes. Rank 0 writes
the two loss sequences and the largest parameter difference to --out as JSON.

    torchrun --nproc_per_node 2 tests/distributed/backbone_parity_probe.py --engine fsdp --backbone vit_t --out r.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from toolkit.config.schema import ParallelConfig  # noqa: E402
from toolkit.models import apply_activation_checkpointing, create_backbone  # noqa: E402
from toolkit.parallel import BatchShape, LaunchEnvironment, get_strategy  # noqa: E402

BACKBONE_OPTIONS = {
    "vit_t": dict(input_size=16, patch_size=4, mask_ratio=0.25, drop_path=0.1),  # 16 tokens, 12 kept
    "mobilefacenet_large": dict(input_size=16),
    "iresnet18": dict(input_size=16),
}
PER_RANK_BATCH = 4
NUM_CLASSES = 10
EMBEDDING = 16
LR = 0.05


def build(backbone: str) -> torch.nn.Module:
    torch.manual_seed(0)  # identical initial weights on every rank and in the reference
    return create_backbone(backbone, embedding_size=EMBEDDING, **BACKBONE_OPTIONS[backbone]).train()


def global_batch(step: int, world_size: int, image_size: int):
    gen = torch.Generator().manual_seed(100 + step)
    images = torch.randn(world_size * PER_RANK_BATCH, 3, image_size, image_size, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (world_size * PER_RANK_BATCH,), generator=gen)
    return images, labels


def classifier() -> torch.Tensor:
    """A fixed (untrained) projection to a few classes: gives the embeddings a loss with real gradients."""
    return torch.randn(EMBEDDING, NUM_CLASSES, generator=torch.Generator().manual_seed(7))


def loss_of(embeddings: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(embeddings @ weights, labels)


def rng_seed(step: int, rank: int) -> int:
    return 1000 * step + rank


def settings(args) -> ParallelConfig:
    """The recipe section the builders would pass: fp32, no clipping, ZeRO-3 without persistent parameters."""
    if args.engine == "fsdp":
        return ParallelConfig(engine="fsdp", precision="fp32", timeout_s=120)
    return ParallelConfig(engine="deepspeed", zero_stage=3, precision="fp32", timeout_s=120,
                          deepspeed_config=str(Path(__file__).with_name("zero3_no_persistence.yaml")))


def run_sharded(args, strategy_class, par, ctx):
    model = build(args.backbone)
    if args.checkpointing:
        apply_activation_checkpointing(model)
    image_size = BACKBONE_OPTIONS[args.backbone]["input_size"]
    weights = classifier()
    rank, world_size = ctx.rank, ctx.world_size
    strategy = strategy_class.create(par, model, lambda module: torch.optim.SGD(module.parameters(), lr=LR,
                                                                                momentum=0.9),
                                     ctx, BatchShape(micro_batch_size=PER_RANK_BATCH, grad_accum_steps=1,
                                                     global_batch_size=world_size * PER_RANK_BATCH))
    losses = []
    for step in range(args.steps):
        images, labels = global_batch(step, world_size, image_size)
        rows = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
        torch.manual_seed(rng_seed(step, rank))
        loss = loss_of(strategy.forward(images[rows]), labels[rows], weights)
        strategy.backward(loss, is_last_micro=True)
        strategy.unscale_()
        strategy.step()
        strategy.zero_grad()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        losses.append(mean_loss.item() / world_size)
    return strategy, losses


def full_parameters(strategy) -> dict[str, torch.Tensor]:
    """Every parameter in full on every rank (the strategy's own gathering, as export uses it)."""
    state = strategy.full_state_dict()
    return {name: state[name] for name, _ in strategy.unwrapped().named_parameters()}


def run_reference(args, world_size: int):
    model = build(args.backbone)
    image_size = BACKBONE_OPTIONS[args.backbone]["input_size"]
    weights = classifier()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    losses = []
    for step in range(args.steps):
        images, labels = global_batch(step, world_size, image_size)
        total = 0.0
        for rank in range(world_size):
            rows = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
            torch.manual_seed(rng_seed(step, rank))
            loss = loss_of(model(images[rows]), labels[rows], weights)
            (loss / world_size).backward()  # the engines average the ranks' gradients
            total += loss.item()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total / world_size)
    return model, losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["fsdp", "zero3"], required=True)
    parser.add_argument("--backbone", choices=sorted(BACKBONE_OPTIONS), required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--checkpointing", type=int, default=1, help="activation checkpointing per block (1/0)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    par = settings(args)
    strategy_class = get_strategy(par.engine)
    ctx = strategy_class.start(par, torch.device("cpu"), LaunchEnvironment.from_env(os.environ))
    rank, world_size = ctx.rank, ctx.world_size
    strategy, losses = run_sharded(args, strategy_class, par, ctx)
    sharded = full_parameters(strategy)
    if rank == 0:
        reference_model, reference_losses = run_reference(args, world_size)
        reference = dict(reference_model.named_parameters())
        max_diff = max((sharded[name] - reference[name].detach()).abs().max().item() for name in reference)
        initial = dict(build(args.backbone).named_parameters())  # built once (a build per parameter took minutes)
        moved = max((reference[name].detach() - initial[name].detach()).abs().max().item() for name in reference)
        Path(args.out).write_text(json.dumps({"losses": losses, "reference_losses": reference_losses,
                                              "max_param_diff": max_diff, "max_param_change": moved,
                                              "num_params": len(reference)}))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # DeepSpeed leaves threads behind; the result is written


if __name__ == "__main__":
    main()
