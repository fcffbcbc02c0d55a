# Memory plan entry point: prints the per-rank memory a recipe needs on N ranks (no GPU, no model allocated).
"""Per-rank memory of a recipe: backbone model states under its engine, center shard, logits buffers.

    python launch/plan.py --recipe recipes/<name>.yaml --world-size N [--num-classes C] [--set k=v ...]

The class count is --num-classes, else the recipe's data.synthetic.num_identities. The backbone is built
on the meta device, so iresnet100/200 cost nothing. User errors (bad recipe, bad numbers) print one line
`error: ...` on stderr and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

# Running `python launch/plan.py` from a checkout works even before `pip install -e .` (in a wheel this file is
# toolkit/launch/plan.py and the path is left alone).
if (Path(__file__).resolve().parent.parent / "toolkit" / "__init__.py").is_file():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.command_line import CommandParser  # noqa: E402



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(description="Print the per-rank memory plan of a recipe on N ranks.")
    parser.add_argument("--recipe", required=True, help="recipe YAML file")
    parser.add_argument("--world-size", type=int, required=True, metavar="N", help="number of ranks (GPUs)")
    parser.add_argument("--num-classes", type=int, default=None, metavar="C",
                        help="training identities (default: the recipe's data: data.synthetic.num_identities, or the "
                             "class count of the shard manifest data.manifest)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a recipe value (parsed as a YAML scalar); repeatable")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    from toolkit.config import load_config
    from toolkit.training.memory_plan import default_num_classes, estimate_activations, format_plan, plan_memory
    from toolkit.errors import FaceCLError

    if args.world_size < 1:
        raise FaceCLError(f"--world-size must be >= 1, got {args.world_size}")
    if args.num_classes is not None and args.num_classes < 2:
        raise FaceCLError(f"--num-classes must be >= 2, got {args.num_classes}")
    # With --num-classes no data path is read, so ${DATA_ROOT} and friends need not be set.
    recipe = load_config(args.recipe, args.overrides, expand_env=args.num_classes is None)
    num_classes = args.num_classes if args.num_classes is not None else default_num_classes(recipe)
    plan = plan_memory(recipe, args.world_size, num_classes)
    print(format_plan(plan, estimate_activations(recipe, args.world_size)))
    return 0


def main(argv: list[str] | None = None) -> int:
    from toolkit.errors import command_main

    return command_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
