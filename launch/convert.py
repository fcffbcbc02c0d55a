# Conversion entry point: inspect a checkpoint, consolidate it, export the backbone (ONNX, ...); arcface_torch configs.
"""After training: see what a checkpoint holds, get a plain backbone out, hand it to deployment tools. Before
training: turn an insightface arcface_torch config into a recipe.

    python launch/convert.py inspect PATH [--json] [--checksums]
    python launch/convert.py consolidate PATH --out FILE.safetensors [--with-head] [--with-key-encoder]
    python launch/convert.py export PATH --format onnx|safetensors|torchscript --out FILE
    python launch/convert.py universal PATH --out FOLDER        # DeepSpeed ZeRO-1/2/3 -> universal checkpoint
    python launch/convert.py from-arcface CONFIG.py --out recipes/NAME.yaml   # arcface_torch config -> recipe

PATH is a run folder, its checkpoints/ folder or one checkpoint of any engine (single, DDP, DeepSpeed
ZeRO 0-3, FSDP2, any world size); `export` and `inspect` also take a consolidated file. Everything runs on
CPU without a process group and reads tensors only. Outputs are written atomically and never over an
existing file unless --overwrite. `from-arcface` reads the config (and configs/base.py) without running them,
writes a recipe that trains the same thing (docs/from-arcface-torch.md) and prints every key it mapped and every
key it could not, with the reason. User errors print one line `error: ...` on stderr and exit with status
2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Running `python launch/convert.py` from a checkout works even before `pip install -e .` (in a wheel this file is
# toolkit/launch/convert.py and the path is left alone; there is no recipes/base.yaml then).
REPO = Path(__file__).resolve().parent.parent
if (REPO / "toolkit" / "__init__.py").is_file():
    sys.path.insert(0, str(REPO))

from toolkit.command_line import CommandParser  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(description="Inspect, consolidate and export FaceCL checkpoints.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    commands = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    inspect = commands.add_parser("inspect", help="what a checkpoint holds and whether it is complete")
    inspect.add_argument("path", help="run folder, checkpoints folder, checkpoint, or consolidated file")
    inspect.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
    inspect.add_argument("--checksums", action="store_true", help="also verify every zip record's CRC (reads all)")

    consolidate = commands.add_parser("consolidate", help="one file: full fp32 backbone (+ centers, key encoder)")
    consolidate.add_argument("path", help="run folder, checkpoints folder or checkpoint")
    consolidate.add_argument("--out", required=True, help="output file: .safetensors (streamed) or .pt")
    consolidate.add_argument("--with-head", action="store_true", help="add the C x D identity centers, in class order")
    consolidate.add_argument("--with-key-encoder", action="store_true",
                             help="UniMoCo runs: add the momentum (key) encoder and the projections")
    consolidate.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    consolidate.add_argument("--no-progress", action="store_true", help="no progress bar")

    export = commands.add_parser("export", help="the backbone alone, for deployment")
    export.add_argument("path", help="run folder, checkpoints folder, checkpoint or consolidated file")
    export.add_argument("--format", required=True, choices=["onnx", "safetensors", "torchscript"],
                        help="output kind")
    export.add_argument("--out", required=True, help="output file")
    export.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    universal = commands.add_parser("universal", help="DeepSpeed ZeRO-1/2/3 checkpoint -> universal (any world size)")
    universal.add_argument("path", help="run folder, checkpoints folder or checkpoint of a DeepSpeed run")
    universal.add_argument("--out", required=True, help="output checkpoint folder (created)")
    universal.add_argument("--overwrite", action="store_true", help="replace an existing output folder")

    arcface = commands.add_parser("from-arcface", help="an insightface arcface_torch config -> a recipe")
    arcface.add_argument("config", help="arcface_torch config file (recognition/arcface_torch/configs/NAME.py)")
    arcface.add_argument("--out", required=True, help="recipe file to write, e.g. recipes/NAME.yaml")
    arcface.add_argument("--base", help="arcface_torch's defaults file (default: base.py next to CONFIG)")
    arcface.add_argument("--data-root", default="${DATA_ROOT}",
                         help="folder that holds the config's rec folder (its last part is kept) on this machine; "
                              "the default leaves it to the DATA_ROOT environment variable")
    arcface.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    for sub in (inspect, consolidate, export, universal, arcface):
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def from_arcface(args: argparse.Namespace) -> int:
    """Convert, check that the recipe loads (before it gets its name), write it, print the report."""
    import os

    from toolkit.config import load_config
    from toolkit.config.from_arcface import convert_arcface_config
    from toolkit.export.files import atomic_output, check_output_path
    from toolkit.models import list_backbones

    out = Path(args.out)
    check_output_path(out, args.overwrite)
    conversion = convert_arcface_config(args.config, base=args.base, data_root=args.data_root,
                                        registered_backbones=list_backbones())
    base_yaml = REPO / "recipes" / "base.yaml"
    folder = out.parent.resolve()
    # inside the checkout a relative `base:` keeps the recipe movable with it; elsewhere the absolute path
    base = (os.path.relpath(base_yaml, folder) if folder.is_relative_to(REPO) else str(base_yaml)) \
        if base_yaml.is_file() else None
    text = conversion.recipe_yaml(base, path=str(out))

    def write(tmp: Path) -> None:
        tmp.write_text(text)
        load_config(tmp, expand_env=False)   # a conversion that does not load is an error, and nothing is written

    atomic_output(out, write)
    print(f"wrote {out}: {conversion.config} (+ {conversion.base}), {len(conversion.mapped)} keys mapped, "
          f"{len(conversion.unmapped)} not")
    print(conversion.report())
    print(f"check it: python launch/train.py --recipe {out} --print-config")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.command == "from-arcface":
        return from_arcface(args)
    from toolkit.export.files import human_bytes

    if args.command == "inspect":
        from toolkit.export.inspect import format_report, inspect_path

        info = inspect_path(args.path, checksums=args.checksums)
        print(json.dumps(info, indent=1, default=str) if args.json else format_report(info))
        return 0 if info["complete"] else 1
    if args.command == "consolidate":
        from toolkit.export.consolidate import consolidate

        result = consolidate(args.path, args.out, with_head=args.with_head, with_key_encoder=args.with_key_encoder,
                             overwrite=args.overwrite, progress=False if args.no_progress else None)
        parts = result.metadata["parts"].replace(",", ", ")
        print(f"wrote {result.out} ({human_bytes(result.num_bytes)}): {parts} of step {result.metadata['step']}, "
              f"{result.metadata['backbone']} from {result.metadata['engine']} on "
              f"{result.metadata['world_size']} rank(s)")
        return 0
    if args.command == "universal":
        from toolkit.export.resize import resize_checkpoint

        result = resize_checkpoint(args.path, args.out, overwrite=args.overwrite)
        print(f"wrote {result.out} ({human_bytes(result.num_bytes)} in {result.num_files} files): universal "
              f"checkpoint of a ZeRO-{result.zero_stage} run on {result.world_size} ranks ({', '.join(result.optimizer_state)} "
              f"state); resume it on any number of ranks with `--resume {result.out}`")
        return 0
    from toolkit.export.deploy import export_model

    result = export_model(args.path, args.format, args.out, overwrite=args.overwrite)
    from toolkit.export.deploy import folding_summary, insightface_routes

    extra = ""
    if args.format == "onnx":
        extra = f"; opset {result.details.get('opset')}, {folding_summary(result.details)}"
    size = int(result.metadata["image_size"])
    print(f"wrote {result.out} ({human_bytes(result.num_bytes)}): {result.metadata['backbone']} "
          f"{args.format}, input N x 3 x {size} x {size} ({result.metadata['input_normalisation']}){extra}")
    if args.format == "onnx" and not insightface_routes(size):
        print(f"warning: insightface's model zoo loads recognition models of square inputs of at least 112 pixels "
              f"that are a multiple of 16; this model takes {size} x {size}, so model_zoo.get_model returns None for "
              f"it (onnxruntime runs it as it is)")
    return 0


def main(argv: list[str] | None = None) -> int:
    from toolkit.errors import command_main

    return command_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
