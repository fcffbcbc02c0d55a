# Evaluation entry point: a model (or cached features) on verification sets, IJB-B/C and all-to-all benchmarks.
"""Evaluate a model the way papers report it, or compare earlier evaluations.

    python launch/evaluate.py --model MODEL --benchmark NAME=PATH [--benchmark NAME=PATH ...]
    python launch/evaluate.py --features FILE.npz --benchmark NAME=PATH ...     # re-score cached features
    python launch/evaluate.py --compare runs/a runs/b eval_results/m             # results table side by side
    python launch/evaluate.py --compare runs/a --columns "LFW,IJB-C 1e-4"       # chosen columns
    torchrun --nproc_per_node 8 launch/evaluate.py --model MODEL --benchmark ... # each rank embeds a slice

MODEL: a run folder, a checkpoint, an exported .safetensors/.pt backbone, or an .onnx file. NAME=PATH: a
.bin verification set, an IJB-B/IJB-C release folder, a folder of identity sub-folders or a .npz of
features + labels (all-to-all). Each evaluation writes a new folder (RUN/eval/<UTC time> for a run folder,
else eval_results/<model name>/<UTC time>) and moves the link `latest` beside it there; an --output DIR that
holds results is refused unless --overwrite. See toolkit/eval/runner.py, toolkit/eval/outputs.py and
docs/evaluation.md. User errors print one
line `error: ...` on stderr and exit with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

# Running `python launch/evaluate.py` from a checkout works even before `pip install -e .` (in a wheel this file is
# toolkit/launch/evaluate.py and the path is left alone).
if (Path(__file__).resolve().parent.parent / "toolkit" / "__init__.py").is_file():
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from toolkit.command_line import CommandParser  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = CommandParser(description="Evaluate a face-recognition model on standard benchmarks.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="run folder, checkpoint, exported .safetensors/.pt backbone or .onnx file "
                        "(default: none; one of --model, --features and --compare is needed)")
    source.add_argument("--features", metavar="FILE",
                        help="re-score the features saved by --save-features (default: none)")
    source.add_argument("--compare", nargs="+", metavar="EVAL", help="print the results table of several "
                        "evaluation.json files (or folders holding one) side by side (default: none)")
    parser.add_argument("--columns", metavar="NAMES", help="with --compare: the table's columns, in this order, "
                        "by name as the table heads them, e.g. 'LFW,IJB-C 1e-4' (default: every metric the "
                        "evaluations measured, in the order of docs/evaluation.md)")
    parser.add_argument("--benchmark", action="append", default=[], metavar="NAME=PATH",
                        help="a benchmark: .bin verification set, IJB release folder, identity folder, shard "
                        "manifest.json or features .npz; repeatable")
    parser.add_argument("--output", metavar="DIR", help="where evaluation.json, table.md and ROC PNGs go; refused "
                        "when DIR holds results, unless --overwrite (default: a new folder RUN/eval/<UTC time> for a "
                        "run folder, else eval_results/<model name>/<UTC time>, and a link 'latest' beside it)")
    parser.add_argument("--name", help="label of the default output's new folder: <UTC time>-NAME (default: none)")
    parser.add_argument("--overwrite", action="store_true", help="replace the results held by --output DIR, the "
                        "--save-features file or --compare's --output files (default: refuse them)")
    parser.add_argument("--save-features", metavar="FILE.npz",
                        help="also write the extracted features here (default: not written)")
    parser.add_argument("--no-flip", action="store_true", help="embed images only, not also their mirror image")
    parser.add_argument("--batch-size", type=int, default=128, help="images per forward (default 128)")
    parser.add_argument("--num-workers", type=int, default=2, help="data-loading worker processes (default 2)")
    parser.add_argument("--device", help="torch device for checkpoints (default: cuda when present, else cpu)")
    parser.add_argument("--detector-score-weighting", action="store_true",
                        help="IJB: multiply each image feature by its detector score before pooling")
    parser.add_argument("--keep-image-norm", action="store_true",
                        help="IJB: pool the flip-summed image embeddings without normalising each first; with "
                             "--detector-score-weighting this is insightface's default mode (use_norm_score, "
                             "use_detector_score), see docs/evaluation.md")
    parser.add_argument("--max-skipped-fraction", type=float, default=0.01,
                        help="fail when more than this share of a benchmark's images is unusable (default 0.01)")
    parser.add_argument("--compute-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="all-to-all: round embeddings to this type for the score matmul (fp32 accumulation)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    import torch

    from toolkit.errors import FaceCLError

    if args.compare:
        return run_compare(args)
    if args.columns is not None:
        raise FaceCLError("--columns selects the columns of a --compare table; after this evaluation, run "
                          "--compare OUTPUT --columns ... on it")
    if args.model is None and args.features is None and not args.benchmark:
        raise FaceCLError("give --model MODEL or --features FILE, and --benchmark NAME=PATH (or --compare EVAL ...)")
    if args.batch_size < 1 or args.num_workers < 0:
        raise FaceCLError(f"--batch-size must be >= 1 and --num-workers >= 0, got {args.batch_size} and "
                          f"{args.num_workers}")
    from toolkit.eval.runner import run_evaluation, summary_lines

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = 0
    if world_size > 1:  # started by torchrun: each rank embeds a slice, rank 0 reports
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        torch.distributed.init_process_group(backend)
        rank = torch.distributed.get_rank()
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.compute_dtype]
    try:
        device = args.device
        if device is None and world_size > 1 and torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"
        report = run_evaluation(
            model=args.model, benchmarks=args.benchmark, features_in=args.features,
            save_features=args.save_features, output_dir=args.output, flip=not args.no_flip,
            batch_size=args.batch_size, num_workers=args.num_workers, device=device,
            detector_score_weighting=args.detector_score_weighting, keep_image_norm=args.keep_image_norm,
            max_skipped_fraction=args.max_skipped_fraction, compute_dtype=dtype, rank=rank,
            world_size=world_size, progress=not args.no_progress, overwrite=args.overwrite, name=args.name)
    finally:
        if world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        from toolkit.eval.table import evaluation_markdown

        for line in summary_lines(report):
            print(line)
        print()
        print(evaluation_markdown(report))
        latest = f" ({report['latest']} points here)" if report.get("latest") else ""
        print(f"\nwritten: {report['output_dir']}/evaluation.json{latest}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    """--compare: the results table of earlier evaluations; with --output also as comparison.json / .md."""
    from toolkit.eval.table import compare, format_markdown, parse_columns, table_json

    columns = parse_columns(args.columns) if args.columns is not None else None
    if args.output:
        check_comparison_output(Path(args.output), args.overwrite)
    table = compare(args.compare, columns)
    markdown = format_markdown(table)
    print(markdown)
    if args.output:  # the table as JSON too: columns, {row: {column: percent or null}}, {row: {column: reason}}
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "comparison.json").write_text(json.dumps(table_json(table), indent=2) + "\n")
        (out / "comparison.md").write_text(markdown + "\n")
        print(f"\nwritten: {out}/comparison.json")
    return 0


def check_comparison_output(out: Path, overwrite: bool) -> None:
    """Before reading any report: --compare's --output is a writable folder without an earlier comparison
    (unless --overwrite)."""
    from toolkit.errors import FaceCLError
    from toolkit.eval.outputs import COMPARISON_FILES, check_writable_folder, refuse_earlier_results

    if out.exists() and not out.is_dir():
        raise FaceCLError(f"--output {out} exists and is not a folder; give a folder for comparison.json and "
                          f"comparison.md")
    refuse_earlier_results(out, overwrite, COMPARISON_FILES, plots=False)
    check_writable_folder(out, "--output")


def main(argv: list[str] | None = None) -> int:
    from toolkit.errors import command_main

    return command_main(parse_args, run, argv)


if __name__ == "__main__":
    sys.exit(main())
