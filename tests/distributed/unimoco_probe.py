# Test helper: one UniMoCo step on this job's engine; writes full query/key parameters and the queue (rank 0).
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from tests.distributed.probe import finish, gathered, probe_arguments, start_trainer  # noqa: E402

args = probe_arguments()
trainer = start_trainer(args)
ctx = trainer.ctx
pairs = trainer.backbone.unwrapped().momentum_pairs()
query_before = gathered(trainer, [q for q, _ in pairs])
key_before = gathered(trainer, [k for _, k in pairs])
momentum = trainer.momentum
trainer.train_step()
query_after = gathered(trainer, [q for q, _ in pairs])
key_after = gathered(trainer, [k for _, k in pairs])
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
finish(ctx)
