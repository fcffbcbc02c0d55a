# Test helper: train N steps on this job's engine, save a checkpoint, and write the full parameters and centers held then.
"""The reference for "the consolidated backbone equals what the trainer held at the save step": each
parameter's full value gathered from the live engine right after `save()` (ZeRO-3 GatheredParameters,
FSDP2 full_tensor, the module itself otherwise), plus the buffers, written by rank 0 as {name: tensor}."""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from launch.train import init_distributed  # noqa: E402
from toolkit.config import load_config  # noqa: E402
from toolkit.training.run_files import prepare_run_folder, write_run_files  # noqa: E402
from toolkit.training.trainer import Trainer  # noqa: E402


def full_named_state(trainer) -> dict:
    module = trainer.backbone.unwrapped()
    names, params = zip(*module.named_parameters())
    engine = trainer.recipe.parallel.engine
    if engine == "fsdp":
        values = [p.full_tensor().detach().clone() for p in params]
    elif engine == "deepspeed" and trainer.recipe.parallel.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params)):
            values = [p.detach().clone() for p in params]
    else:
        values = [p.detach().clone() for p in params]
    state = {name: value.float().cpu() for name, value in zip(names, values)}
    for name, buffer in module.named_buffers():
        buffer = buffer.full_tensor() if hasattr(buffer, "full_tensor") else buffer
        state[name] = buffer.detach().clone().cpu()
    return state


parser = argparse.ArgumentParser()
parser.add_argument("--recipe")
parser.add_argument("--set", dest="overrides", action="append", default=[])
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--out")
args = parser.parse_args()

recipe = load_config(args.recipe, args.overrides)
ctx = init_distributed(recipe)
run_dir = prepare_run_folder(recipe)
trainer = Trainer(recipe, run_dir, ctx=ctx, verbose=False)
if ctx.is_main:
    write_run_files(trainer.run_dir, recipe, trainer.backbone.run_files())
for _ in range(args.steps):
    trainer.train_step()
    trainer.step += 1
trainer.save()
state = full_named_state(trainer)
shards = ctx.all_gather_objects(trainer.head.shard_state()) if trainer.head is not None else []
if ctx.is_main:
    centers = torch.cat([s["centers"] for s in sorted(shards, key=lambda s: s["class_start"])]) if shards else None
    torch.save({"step": trainer.step, "state": state, "centers": centers}, args.out)
ctx.barrier()
if ctx.is_distributed:
    torch.distributed.destroy_process_group()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
