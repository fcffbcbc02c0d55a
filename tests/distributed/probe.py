# What the test probes share: their command line, a trainer built as launch/train.py builds it, gathered values, exit.
"""A probe is a small script that torchrun starts on each rank of a job: it builds the recipe's trainer on this
job's engine, does something to it, and rank 0 writes what it saw to --out for the test to compare.

    args = probe_arguments(("--steps", int, 3))      # --recipe, --set, --out, plus the probe's own options
    trainer = start_trainer(args)                    # process group and Trainer, as launch/train.py does
    ...
    finish(trainer.ctx)                              # every rank waits, the group ends, the process exits
"""
import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from launch.train import init_distributed  # noqa: E402
from toolkit.config import load_config  # noqa: E402
from toolkit.training.trainer import Trainer  # noqa: E402


def probe_arguments(*options: tuple) -> argparse.Namespace:
    """--recipe, --set (repeatable), --out and each (flag, type, default) of `options`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--out")
    for flag, kind, default in options:
        parser.add_argument(flag, type=kind, default=default)
    return parser.parse_args()


def start_trainer(args, *, run_dir: Path | None = None) -> Trainer:
    """The recipe's trainer on this job's ranks (quiet), its process group started as launch/train.py does."""
    recipe = load_config(args.recipe, args.overrides)
    ctx = init_distributed(recipe)
    return Trainer(recipe, run_dir or Path(recipe.run.output_dir) / recipe.run.name, ctx=ctx, verbose=False)


def gathered(trainer: Trainer, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """Full values of possibly sharded parameters, on every rank (a collective)."""
    engine = trainer.recipe.parallel.engine
    if engine == "fsdp":
        return [p.full_tensor().detach().clone() for p in params]
    if engine == "deepspeed" and trainer.recipe.parallel.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(params)):
            return [p.detach().clone() for p in params]
    return [p.detach().clone() for p in params]


def finish(ctx) -> None:
    """Every rank done, the process group gone; then the same exit as launch/train.py (no C++ teardown)."""
    ctx.barrier()
    if ctx.is_distributed:
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
