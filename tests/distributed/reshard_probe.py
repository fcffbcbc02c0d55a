# Test helper: resume a checkpoint at this job's world size, then write the gathered center matrix and state.
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from launch.train import init_distributed  # noqa: E402
from toolkit.config import load_config  # noqa: E402
from toolkit.training.trainer import Trainer  # noqa: E402
from toolkit.heads.shard_checkpoint import gather_full_centers  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("--recipe")
parser.add_argument("--set", dest="overrides", action="append", default=[])
parser.add_argument("--resume")
parser.add_argument("--out")
args = parser.parse_args()

recipe = load_config(args.recipe, args.overrides)
ctx = init_distributed(recipe)
trainer = Trainer(recipe, Path(recipe.run.output_dir) / recipe.run.name, ctx=ctx, verbose=False)
trainer.resume(args.resume)
shards = trainer.gather_head_shards()
if ctx.is_main:
    centers, state = gather_full_centers(shards)
    torch.save({"centers": centers, "state": state, "class_ranges": [(s["class_start"], s["class_count"])
                                                                      for s in shards]}, args.out)
if ctx.is_distributed:
    ctx.barrier()
    torch.distributed.destroy_process_group()
# Same exit as launch/train.py: skip the C++ teardown that can abort a finished rank.
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
