# Training entry point for every launcher: python, torchrun, deepspeed (one node or a hostfile).
"""Reads argv and the launcher's environment, starts the process group, builds the trainer and runs it.

    python launch/train.py --recipe recipes/<name>.yaml [--set k=v ...] [--resume auto | PATH]
    torchrun --nproc_per_node N launch/train.py --recipe ...
    deepspeed [--num_gpus N | --hostfile H] launch/train.py --recipe ...

A run folder (<run.output_dir>/<run.name>) belongs to one run: a second run started into it is refused while
the first lives (a lock), and a folder that holds checkpoints is only continued with `--resume auto` (its
latest checkpoint, or a fresh start when it has none: the flag for job scripts that restart) or `--resume
PATH`. SIGTERM or SIGUSR1 make every rank finish the step in flight, save it and exit with status 75.

User errors (bad recipe, missing file, unknown name, unwritable folder, foreign checkpoint) print one
line `error: ...` on stderr and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
from pathlib import Path

# Running `python launch/train.py` from a checkout works even before `pip install -e .` (in a wheel this file is
# toolkit/launch/train.py and the path is left alone).
if (Path(__file__).resolve().parent.parent / "toolkit" / "__init__.py").is_file():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.command_line import CommandParser  # noqa: E402



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(description="Train a face-recognition model from a YAML recipe.")
    parser.add_argument("--recipe", required=True, help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value (parsed as a YAML scalar); repeatable")
    parser.add_argument("--resume", metavar="auto|PATH",
                        help="'auto': continue from this run folder's latest checkpoint, or start fresh when it has "
                             "none (use it in job scripts that may restart); PATH: a checkpoint (file or folder), "
                             "checkpoints folder or run folder. Default: start fresh (refused if the run folder "
                             "already holds checkpoints)")
    parser.add_argument("--allow-batch-change", action="store_true",
                        help="resuming at another world size: use this recipe's batch at the new world size when the "
                             "checkpoint's global batch cannot be kept (default: refuse)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    # The deepspeed launcher appends --local_rank=N; the same value is in the LOCAL_RANK variable.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from toolkit.quiet import quiet_known_messages

    quiet_known_messages()   # known-harmless library messages (DeepSpeed, torch), each listed with its reason
    args = parse_args(argv)
    from toolkit.distributed import job_errors
    from toolkit.errors import (EXIT_USER_ERROR, ConfigError, RunFolderError, TrainingDivergedError,
                                run_reporting_user_errors)

    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    console_log = None
    if rank == 0 and not args.print_config:
        from toolkit.training.console_log import ConsoleLog

        console_log = ConsoleLog.start()   # RUN/train.log gets what this console shows, once the folder exists

    def report(exc) -> None:
        job_errors.post(str(exc))   # the other ranks end without their own traceback
        # Recipe and run-folder errors are identical on every rank: rank 0 speaks for all. Anything else may be
        # rank-specific, so every rank reports it.
        if rank == 0 or not isinstance(exc, (ConfigError, TrainingDivergedError, RunFolderError)):
            prefix = "error: " if rank == 0 else f"error: [rank {rank}] "
            print(f"{prefix}{exc}", file=sys.stderr, flush=True)

    try:
        status = run_reporting_user_errors(lambda: run(args, console_log), debug=args.debug, report=report)
    except Exception:
        # A collective that failed because a peer ended with an error of its own: that peer said why.
        if world_size > 1 and not args.debug and job_errors.posted() is not None:
            return EXIT_USER_ERROR
        raise
    if status != 0 and world_size > 1:
        # The launcher stops all ranks as soon as one exits; stay a moment so that the others (waiting in a
        # collective) can read this rank's error from the store it may hold.
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
    device = build_device(recipe, launch.local_rank)
    if device.type == "cpu":
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
    if launch.world_size > 1:
        launch = dataclasses.replace(launch, network_address=choose_network(launch, device.type))
    return start_distributed(recipe, launch)


def choose_network(launch, device_type: str) -> str:
    """The interface the collectives use: GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) when set, else the one
    that routes to MASTER_ADDR, which is then set (gloo and NCCL would otherwise take the host name's address,
    a loopback one on many machines). Each node's first rank says which. Returns that interface's address."""
    from toolkit.distributed.network import interface_named, interface_towards

    names = ["GLOO_SOCKET_IFNAME"] + (["NCCL_SOCKET_IFNAME"] if device_type == "cuda" else [])
    given = next((os.environ[name].split(",")[0] for name in names if os.environ.get(name)), None)
    interface = interface_named(given) if given else interface_towards(launch.master_addr)
    chosen = [name for name in names if not os.environ.get(name)]
    for name in chosen:
        os.environ[name] = interface.name
    if launch.local_rank == 0 and chosen and interface.name != "lo":
        print(f"network: {' and '.join(chosen)}={interface.name} ({interface.address}), the interface that routes to "
              f"MASTER_ADDR {launch.master_addr}", flush=True)
    return interface.address


def job_id() -> str:
    """The scheduler's id of this job, the same across its restarts (SLURM requeue; torchrun restarts under one
    --rdzv-id): a restart may take over the run folder's lock from its own earlier start."""
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm:{os.environ['SLURM_JOB_ID']}"
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return f"torchrun:{run_id}" if run_id and run_id != "none" else ""


def run(args: argparse.Namespace, console_log=None) -> int:
    from toolkit.config import dump_recipe, load_config

    recipe = load_config(args.recipe, args.overrides)
    if args.print_config:
        from toolkit.training.builders import check_names

        check_names(recipe)   # as training would: a misspelled backbone or engine fails here too
        print(dump_recipe(recipe), end="")
        return 0

    import torch

    from toolkit.checkpoint.run_folder import RunLock, claim_run_folder
    from toolkit.distributed.signals import EXIT_PREEMPTED, StopSignals
    from toolkit.training.run_files import prepare_run_folder, write_run_files
    from toolkit.training.trainer import Trainer

    stop = StopSignals.install()   # from here on SIGTERM / SIGUSR1 stop the run after a step, saved
    ctx = init_distributed(recipe)
    run_dir = Path(recipe.run.output_dir) / recipe.run.name
    lock = RunLock(run_dir, job_id=job_id()) if ctx.is_main else None
    status = 0
    try:
        resume, lines = claim_run_folder(ctx, lock, run_dir, args.resume)
        for line in lines if ctx.is_main else []:
            print(line, flush=True)
        trainer = Trainer(recipe, run_dir, ctx=ctx, resume_from=resume, allow_batch_change=args.allow_batch_change)
        if resume is not None:
            trainer.resume(resume)
        # Only now, with the model built and the checkpoint accepted, is anything written.
        prepare_run_folder(recipe)
        if console_log is not None:
            console_log.attach(trainer.run_dir)   # the lines so far, then every line until the process ends
        if ctx.is_main:
            write_run_files(trainer.run_dir, recipe, trainer.backbone.run_files())
        result = trainer.fit(stop=stop)
        results_path = trainer.write_results()
        if ctx.is_main:
            final = trainer.final_verification()
            print(f"results: {results_path}")
            if result.stopped_by is not None:
                print(f"stopped by {result.stopped_by} at step {result.final_step} (checkpoint saved); exit status "
                      f"{EXIT_PREEMPTED}: run the same command with --resume auto to continue", flush=True)
            elif final is None:
                print(f"no verification result: eval.sets is empty (nothing was evaluated) after "
                      f"{result.final_step} steps; run completed (exit status 0)", flush=True)
            else:
                print(f"final verification accuracy: {final['accuracy_mean'] * 100:.2f}% +- "
                      f"{final['accuracy_std'] * 100:.2f}% on {final['num_pairs']} held-out pairs of {final['set']} "
                      f"after {result.final_step} steps; run completed (exit status 0)", flush=True)
        if result.stopped_by is not None:
            status = EXIT_PREEMPTED
        trainer.stream.close()
        # Everyone finishes the last collective work before the group goes away; tearing it down while a
        # peer still uses it can abort the peer at exit.
        ctx.barrier()
    finally:
        if lock is not None:
            lock.release()
        if ctx.is_distributed and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return status


def console_main() -> None:
    """The facecl-train console script of an installed wheel: main(), then exit_now."""
    exit_now(main())


def exit_now(status: int) -> None:
    """Leave without the interpreter's teardown. Every file is closed and the process group destroyed by
    now; what remains is destructor order in C++ (process-group threads), which aborted a finished rank
    at exit ('terminate called without an active exception') about once in a few hundred jobs on CPU."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    exit_now(main())
