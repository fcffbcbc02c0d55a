# Test helper: train N steps on this job's engine, save a checkpoint, and write the full parameters and centers held then.
"""The reference for "the consolidated backbone equals what the trainer held at the save step": each
parameter's full value gathered from the live engine right after `save()` (ZeRO-3 GatheredParameters,
FSDP2 full_tensor, the module itself otherwise), plus the buffers, written by rank 0 as {name: tensor}.
With `--resume PATH --steps 0` it writes what the trainer holds right after resuming instead (nothing saved),
plus, under ZeRO-3, how many of every rank's parameter partitions differ from their slice of the full value.
With `--full-state-out FILE` (not with --resume) the same job also serves the full-state tests
(tests/distributed/test_full_state.py): "initial", full_state_dict() right after wrapping, then at the end
"loaded", full_state_dict() after load_full_state_dict() of "target" (every float tensor of "initial" + 1)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from tests.distributed.probe import finish, gathered, probe_arguments, start_trainer  # noqa: E402
from toolkit.training.run_files import prepare_run_folder, write_run_files  # noqa: E402


def full_named_state(trainer) -> dict:
    module = trainer.backbone.unwrapped()
    names, params = zip(*module.named_parameters())
    state = {name: value.float().cpu() for name, value in zip(names, gathered(trainer, list(params)))}
    for name, buffer in module.named_buffers():
        buffer = buffer.full_tensor() if hasattr(buffer, "full_tensor") else buffer
        state[name] = buffer.detach().clone().cpu()
    return state


def zero3_partition_mismatches(trainer, state: dict) -> list[str]:
    """ZeRO-3: names of parameters whose local partition (ds_tensor, what the optimizer and the EMA update)
    is not this rank's slice of the gathered full value (zero padded at the end)."""
    module = trainer.backbone.unwrapped()
    rank, world = trainer.ctx.rank, trainer.ctx.world_size
    wrong = []
    for name, param in module.named_parameters():
        if not hasattr(param, "ds_tensor"):
            continue
        size = param.ds_tensor.numel()
        full = torch.nn.functional.pad(state[name].flatten(), (0, size * world - state[name].numel()))
        if not torch.equal(param.ds_tensor.detach().float().cpu().flatten(), full[rank * size:(rank + 1) * size]):
            wrong.append(name)
    return wrong


args = probe_arguments(("--steps", int, 3), ("--resume", str, None), ("--full-state-out", str, None))
trainer = start_trainer(args)
initial = trainer.backbone.full_state_dict() if args.full_state_out else None   # collective
ctx, recipe = trainer.ctx, trainer.recipe
prepare_run_folder(recipe)
if ctx.is_main:
    write_run_files(trainer.run_dir, recipe, trainer.backbone.run_files())
if args.resume:
    trainer.resume(args.resume)
for _ in range(args.steps):
    trainer.train_step()
    trainer.step += 1
if not args.resume:
    trainer.save()
state = full_named_state(trainer)
# Every rank gathers the full values (GatheredParameters is collective), so each checks its own partitions.
zero3 = trainer.recipe.parallel.engine == "deepspeed" and trainer.recipe.parallel.zero_stage == 3
wrong = zero3_partition_mismatches(trainer, state) if zero3 else []
wrong = sorted({name for names in ctx.all_gather_objects(wrong) for name in names})
shards = ctx.all_gather_objects(trainer.head.shard_state()) if trainer.head is not None else []
if ctx.is_main:
    centers = torch.cat([s["centers"] for s in sorted(shards, key=lambda s: s["class_start"])]) if shards else None
    torch.save({"step": trainer.step, "state": state, "centers": centers, "partition_mismatches": wrong},
               args.out)
if args.full_state_out:   # after everything above: the checkpoint and the probe hold the trained values
    target = {key: (value + 1.0 if value.is_floating_point() else value) for key, value in initial.items()}
    trainer.backbone.load_full_state_dict(target)
    loaded = trainer.backbone.full_state_dict()
    if ctx.is_main:
        torch.save({"initial": initial, "target": target, "loaded": loaded}, args.full_state_out)
finish(ctx)
