# Training entry point for every launcher: python, torchrun, deepspeed (one node or a hostfile).
"""Reads argv and the launcher's environment, starts the process group, builds the trainer and runs it.

    python launch/train.py --recipe recipes/<name>.yaml [--set k=v ...] [--resume PATH]
    torchrun --nproc_per_node N launch/train.py --recipe ...
    deepspeed [--num_gpus N | --hostfile H] launch/train.py --recipe ...

User errors (bad recipe, missing file, unknown name, unwritable folder, foreign checkpoint) print one
line `error: ...` on stderr and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

# Running `python launch/train.py` from a checkout works even before `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a face-recognition model from a YAML recipe.")
    parser.add_argument("--recipe", required=True, help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value (parsed as a YAML scalar); repeatable")
    parser.add_argument("--resume", metavar="PATH", help="checkpoint (file or folder), checkpoints folder or run folder")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    # The deepspeed launcher appends --local_rank=N; the same value is in the LOCAL_RANK variable.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from toolkit.errors import ConfigError, TrainingDivergedError, run_reporting_user_errors

    rank = int(os.environ.get("RANK", "0"))

    def report(exc) -> None:
        # Recipe errors are identical on every rank: rank 0 speaks for all. Anything else may be
        # rank-specific, so every rank reports it.
        if rank == 0 or not isinstance(exc, (ConfigError, TrainingDivergedError)):
            prefix = "error: " if rank == 0 else f"error: [rank {rank}] "
            print(f"{prefix}{exc}", file=sys.stderr, flush=True)

    status = run_reporting_user_errors(lambda: run(args), debug=args.debug, report=report)
    if status != 0 and rank != 0:
        # Rank 0 prints the error that every rank hit; the launcher stops all ranks as soon as one exits, so
        # leave it a moment to do so.
        import time

        time.sleep(2.0)
    return status


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def init_distributed(recipe):
    """Read the launcher's environment; the recipe's engine starts (or joins) the process group."""
    import torch

    from toolkit.parallel import LaunchEnvironment
    from toolkit.training.builders import build_device, start_distributed

    launch = LaunchEnvironment.from_env(os.environ)
    if build_device(recipe, launch.local_rank).type == "cpu":
        # Each rank gets its share of the cores: N ranks x all cores would oversubscribe the machine.
        # FACECL_NUM_THREADS overrides the share (e.g. several "nodes" simulated on one machine).
        threads = int(os.environ.get("FACECL_NUM_THREADS", "0")) or max(1, _cpu_cores() // launch.local_world_size)
        torch.set_num_threads(threads)
    if launch.world_size == 1 and not launch.has_rendezvous:  # plain `python launch/train.py`: a group of one
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(_free_port())
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
    return start_distributed(recipe, launch)


def run(args: argparse.Namespace) -> int:
    from toolkit.config import dump_recipe, load_config

    recipe = load_config(args.recipe, args.overrides)
    if args.print_config:
        print(dump_recipe(recipe), end="")
        return 0

    import torch

    from toolkit.training.run_files import prepare_run_folder, write_run_files
    from toolkit.training.trainer import Trainer

    ctx = init_distributed(recipe)
    try:
        run_dir = Path(recipe.run.output_dir) / recipe.run.name
        trainer = Trainer(recipe, run_dir, ctx=ctx)
        if args.resume:
            trainer.resume(args.resume)
        # Only now, with the model built and the checkpoint accepted, is anything written.
        prepare_run_folder(recipe)
        if ctx.is_main:
            write_run_files(trainer.run_dir, recipe, trainer.backbone.run_files())
        result = trainer.fit()
        results_path = trainer.write_results()
        if ctx.is_main:
            final = trainer.final_verification()
            print(f"results: {results_path}")
            if final is None:
                print(f"no verification result: eval.sets is empty (nothing was evaluated) after "
                      f"{result.final_step} steps", flush=True)
            else:
                print(f"final verification accuracy: {final['accuracy_mean'] * 100:.2f}% +- "
                      f"{final['accuracy_std'] * 100:.2f}% on {final['num_pairs']} held-out pairs of {final['set']} "
                      f"after {result.final_step} steps", flush=True)
        trainer.stream.close()
        # Everyone finishes the last collective work before the group goes away; tearing it down while a
        # peer still uses it can abort the peer at exit.
        ctx.barrier()
    finally:
        if ctx.is_distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


def exit_now(status: int) -> None:
    """Leave without the interpreter's teardown. Every file is closed and the process group destroyed by
    now; what remains is destructor order in C++ (process-group threads), which aborted a finished rank
    at exit ('terminate called without an active exception') about once in a few hundred jobs on CPU."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_now(main())
