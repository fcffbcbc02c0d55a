# Test helper: a strategy's full_state_dict / load_full_state_dict on a live (possibly sharded) engine.
"""Builds the trainer of the recipe on this job's ranks, then writes (rank 0) to --out:
- "initial": full_state_dict() right after wrapping;
- "loaded": full_state_dict() after load_full_state_dict() of a known state (every float tensor + 1, in
  a fixed order), and one training step, so that the loaded values are the ones the engine trains with.
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launch.train import init_distributed  # noqa: E402
from toolkit.config import load_config  # noqa: E402
from toolkit.training.trainer import Trainer  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--recipe")
parser.add_argument("--set", dest="overrides", action="append", default=[])
parser.add_argument("--out")
args = parser.parse_args()

recipe = load_config(args.recipe, args.overrides)
ctx = init_distributed(recipe)
trainer = Trainer(recipe, Path(recipe.run.output_dir) / recipe.run.name, ctx=ctx, verbose=False)
initial = trainer.backbone.full_state_dict()
target = {key: (value + 1.0 if value.is_floating_point() else value) for key, value in initial.items()}
trainer.backbone.load_full_state_dict(target)
loaded = trainer.backbone.full_state_dict()
if ctx.is_main:
    torch.save({"initial": initial, "target": target, "loaded": loaded}, args.out)
ctx.barrier()
torch.distributed.destroy_process_group()
