# Test helper: a strategy's full_state_dict / load_full_state_dict on a live (possibly sharded) engine.
"""Builds the trainer of the recipe on this job's ranks, then writes (rank 0) to --out:
- "initial": full_state_dict() right after wrapping;
- "loaded": full_state_dict() after load_full_state_dict() of a known state (every float tensor + 1, in
  a fixed order), and one training step, so that the loaded values are the ones the engine trains with.
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.probe import finish, probe_arguments, start_trainer  # noqa: E402

args = probe_arguments()
trainer = start_trainer(args)
initial = trainer.backbone.full_state_dict()
target = {key: (value + 1.0 if value.is_floating_point() else value) for key, value in initial.items()}
trainer.backbone.load_full_state_dict(target)
loaded = trainer.backbone.full_state_dict()
if trainer.ctx.is_main:
    torch.save({"initial": initial, "target": target, "loaded": loaded}, args.out)
finish(trainer.ctx)
