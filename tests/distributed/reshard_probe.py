# Test helper: resume a checkpoint at this job's world size, then write the gathered center matrix and state.
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.probe import finish, probe_arguments, start_trainer  # noqa: E402
from toolkit.heads.shard_checkpoint import gather_full_centers  # noqa: E402

args = probe_arguments(("--resume", str, None))
trainer = start_trainer(args)
trainer.resume(args.resume)
shards = trainer.gather_head_shards()
if trainer.ctx.is_main:
    centers, state = gather_full_centers(shards)
    torch.save({"centers": centers, "state": state, "class_ranges": [(s["class_start"], s["class_count"])
                                                                      for s in shards]}, args.out)
finish(trainer.ctx)
