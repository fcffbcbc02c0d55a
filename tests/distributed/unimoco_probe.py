# Test helper: one UniMoCo step on this job's engine; writes full query/key parameters and the queue (rank 0).
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from launch.train import init_distributed  # noqa: E402
from toolkit.config import load_config  # noqa: E402
from toolkit.training.trainer import Trainer  # noqa: E402


def full_copies(trainer, params):
    """Full values of possibly sharded parameters, on every rank."""
    engine = trainer.recipe.parallel.engine
    if engine == "fsdp":
        return [p.full_tensor().detach().clone() for p in params]
    if engine == "deepspeed" and trainer.recipe.parallel.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


parser = argparse.ArgumentParser()
parser.add_argument("--recipe")
parser.add_argument("--set", dest="overrides", action="append", default=[])
parser.add_argument("--out")
args = parser.parse_args()

recipe = load_config(args.recipe, args.overrides)
ctx = init_distributed(recipe)
trainer = Trainer(recipe, Path(recipe.run.output_dir) / recipe.run.name, ctx=ctx, verbose=False)
pairs = trainer.backbone.unwrapped().momentum_pairs()
query_before = full_copies(trainer, [q for q, _ in pairs])
key_before = full_copies(trainer, [k for _, k in pairs])
momentum = trainer.momentum
trainer.train_step()
query_after = full_copies(trainer, [q for q, _ in pairs])
key_after = full_copies(trainer, [k for _, k in pairs])
if ctx.is_main:
    torch.save({"momentum": momentum, "query_before": query_before, "key_before": key_before,
                "query_after": query_after, "key_after": key_after,
                "queue_labels": trainer.unimoco.queue.labels_K.cpu(), "queue_keys": trainer.unimoco.queue.keys_KP.cpu(),
                "world_size": ctx.world_size}, args.out)
queue_labels = ctx.all_gather_objects(trainer.unimoco.queue.labels_K.cpu())
queue_keys = ctx.all_gather_objects(trainer.unimoco.queue.keys_KP.cpu())
if ctx.is_main:
    payload = torch.load(args.out, weights_only=True)
    payload["queue_labels_per_rank"] = queue_labels
    payload["queue_keys_per_rank"] = queue_keys
    torch.save(payload, args.out)
ctx.barrier()
if ctx.is_distributed:
    torch.distributed.destroy_process_group()
# Same exit as launch/train.py: skip the C++ teardown that can abort a finished rank.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
