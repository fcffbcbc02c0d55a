# Training entry point: `python launch/train.py --recipe recipes/<name>.yaml [--set k=v ...] [--resume PATH]`.
"""Reads argv, loads the recipe, builds the trainer and runs it.

User errors (bad recipe, missing file, unknown name, unwritable folder, foreign checkpoint) print one
line `error: ...` on stderr and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# Running `python launch/train.py` from a checkout works even before `pip install -e .`.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

EXIT_USER_ERROR = 2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Train a face-recognition model from a YAML recipe.")
    parser.add_argument("--recipe", required=True, help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value (parsed as a YAML scalar); repeatable")
    parser.add_argument("--resume", metavar="PATH", help="checkpoint file, checkpoints folder or run folder")
    parser.add_argument("--print-config", action="store_true", help="print the resolved recipe and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from toolkit.errors import FaceCLError

    try:
        return run(args)
    except FaceCLError as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR


def run(args: argparse.Namespace) -> int:
    from toolkit.config import dump_recipe, load_config

    recipe = load_config(args.recipe, args.overrides)
    if args.print_config:
        print(dump_recipe(recipe), end="")
        return 0

    import torch

    from toolkit.engine.trainer import Trainer, prepare_run_folder, write_resolved_recipe

    # One process on a CPU machine: let torch use every core unless the user said otherwise.
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(os.cpu_count() or 1)
    run_dir = prepare_run_folder(recipe)
    write_resolved_recipe(recipe, run_dir)
    trainer = Trainer(recipe, run_dir)
    if args.resume:
        trainer.resume(args.resume)
    result = trainer.fit()
    results_path = trainer.write_results()
    final = result.evaluations[-1]
    print(f"results: {results_path}")
    print(f"final verification accuracy: {final['accuracy_mean'] * 100:.2f}% +- {final['accuracy_std'] * 100:.2f}% "
          f"on {final['num_pairs']} held-out pairs after {result.final_step} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
