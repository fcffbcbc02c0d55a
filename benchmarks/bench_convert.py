# Benchmark: peak memory and speed of `convert.py consolidate --with-head` on a WebFace42M-size head (2,059,906 x 512).
"""Writes a synthetic folder checkpoint (DDP layout: trainer.pt with a 112x112 backbone, plus W center
shards of 2,059,906 x 512 fp32 = 4.2 GB in all) into a scratch folder, consolidates it with the centers in
a fresh process, and reports that process's peak resident set (ru_maxrss), the output size, throughput and
a spot check of the merged rows. The target: peak RSS < output size + 1.5 GB (streaming, not holding the
matrix); a streaming conversion in fact stays far below the output size.

    python benchmarks/bench_convert.py [--num-classes 2059906] [--world-size 8] [--scratch /tmp] [--output FILE]

Results go to a NEW file benchmarks/results/bench_convert_<UTC time>.json unless --output names one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from toolkit.command_line import CommandParser  # noqa: E402

WEBFACE42M_CLASSES = 2_059_906
EMBEDDING = 512


def shard_rows(rank: int, world: int, num_classes: int) -> tuple[int, int]:
    """(start, count) of a rank's classes: the first C % W ranks hold one extra (the toolkit's split)."""
    base, extra = divmod(num_classes, world)
    return base * rank + min(rank, extra), base + int(rank < extra)


def synthetic_rows(rank: int, count: int) -> torch.Tensor:
    return torch.randn(count, EMBEDDING, generator=torch.Generator().manual_seed(1000 + rank))


def write_checkpoint(root: Path, num_classes: int, world: int) -> Path:
    """A run folder in the trainer's folder layout (DDP engine): what consolidate reads."""
    from toolkit.models import create_backbone

    run = root / "run"
    entry = run / "checkpoints" / "step_00000100"
    entry.mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step_00000100\n")
    (run / "resolved.yaml").write_text("model:\n  backbone: mobilefacenet\n  embedding_size: 512\ndata:\n"
                                       "  image_size: 112\nparallel:\n  engine: ddp\n  precision: bf16\n")
    tag = {"format": "facecl-checkpoint", "format_version": 1, "step": 100}
    backbone = create_backbone("mobilefacenet", embedding_size=EMBEDDING, input_size=112)
    torch.save({**tag, "run": {"backbone": "mobilefacenet", "embedding_size": EMBEDDING, "image_size": 112,
                               "num_classes": num_classes, "contrastive": False, "engine_format": "file"},
                "world_size": world, "engine": {"backbone": backbone.state_dict()}}, entry / "trainer.pt")
    for rank in range(world):
        start, count = shard_rows(rank, world, num_classes)
        torch.save({**tag, "class_start": start, "class_count": count, "num_classes": num_classes,
                    "centers": synthetic_rows(rank, count), "optimizer_state": {}, "optimizer_param_groups": []},
                   entry / f"head_rank{rank:05d}.pt")
    return run


CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from toolkit.export import consolidate
start = time.perf_counter()
result = consolidate({run!r}, {out!r}, with_head=True, progress=False)
print(time.perf_counter() - start, result.num_bytes)
"""

BASELINE = """
import sys
sys.path.insert(0, {repo!r})
import toolkit.export, toolkit.models, safetensors
"""


def run_child(code: str) -> tuple[int, str]:
    # ru_maxrss of RUSAGE_CHILDREN is the maximum over all waited-for children so far: run each
    # measurement in its own short-lived helper so the numbers do not mix.
    helper = ("import resource, subprocess, sys\n"
              f"proc = subprocess.run([sys.executable, '-c', {code!r}], capture_output=True, text=True)\n"
              "sys.stderr.write(proc.stderr)\n"
              "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024\n"
              "print(proc.returncode, peak)\nprint(proc.stdout, end='')\n")
    out = subprocess.run([sys.executable, "-c", helper], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    first, _, rest = out.stdout.partition("\n")
    status, peak = first.split()
    if int(status):
        raise SystemExit(f"measured child failed:\n{out.stderr[-3000:]}")
    return int(peak), rest


def main() -> int:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--num-classes", type=int, default=WEBFACE42M_CLASSES,
                        help="identity centers of the synthetic checkpoint (WebFace42M's count)")
    parser.add_argument("--world-size", type=int, default=8, help="ranks the centers are sharded over")
    parser.add_argument("--scratch", type=Path, default=Path(tempfile.gettempdir()),
                        help="folder for the synthetic checkpoint and the output (needs ~2.2x the head size)")
    parser.add_argument("--output", type=Path, default=None, help="JSON result file (default: a new file)")
    args = parser.parse_args()

    head_bytes = args.num_classes * EMBEDDING * 4
    free = shutil.disk_usage(args.scratch).free
    if free < 2.3 * head_bytes:
        raise SystemExit(f"{args.scratch} has {free / 2**30:.1f} GiB free; needs {2.3 * head_bytes / 2**30:.1f} GiB")
    root = Path(tempfile.mkdtemp(prefix="bench_convert_", dir=args.scratch))
    try:
        start = time.perf_counter()
        run = write_checkpoint(root, args.num_classes, args.world_size)
        write_s = time.perf_counter() - start
        out = root / "consolidated.safetensors"
        baseline_rss, _ = run_child(BASELINE.format(repo=str(REPO)))
        peak_rss, stdout = run_child(CHILD.format(repo=str(REPO), run=str(run), out=str(out)))
        seconds, num_bytes = stdout.split()[-2:]   # the last line (imports may print warnings)
        seconds, num_bytes = float(seconds), int(num_bytes)
        # Spot check: first and last row of every shard, read back from the output.
        from safetensors import safe_open

        with safe_open(str(out), framework="pt") as handle:
            centers = handle.get_slice("facecl_head.centers")
            shape = centers.get_shape()
            ok = shape == [args.num_classes, EMBEDDING]
            for rank in range(args.world_size):
                start_row, count = shard_rows(rank, args.world_size, args.num_classes)
                expected = synthetic_rows(rank, count)
                ok &= torch.equal(centers[start_row:start_row + 1], expected[:1])
                ok &= torch.equal(centers[start_row + count - 1:start_row + count], expected[-1:])
                del expected
        load1, load5, load15 = os.getloadavg()
        result = {
            "benchmark": "consolidate --with-head, synthetic WebFace42M-size head",
            "num_classes": args.num_classes, "embedding_size": EMBEDDING, "world_size": args.world_size,
            "head_bytes": head_bytes, "output_bytes": num_bytes,
            "peak_rss_bytes": peak_rss, "import_baseline_rss_bytes": baseline_rss,
            "peak_rss_minus_output_bytes": peak_rss - num_bytes,
            "target": "peak RSS < output size + 1.5 GB", "target_met": peak_rss < num_bytes + 1.5e9,
            "consolidate_seconds": round(seconds, 2), "throughput_mb_s": round(num_bytes / seconds / 1e6, 1),
            "write_synthetic_seconds": round(write_s, 2), "rows_spot_checked_equal": bool(ok),
            "load_average_1_5_15": [round(load1, 2), round(load5, 2), round(load15, 2)],
            "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    output = args.output or (REPO / "benchmarks" / "results" /
                             f"bench_convert_{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json")
    if args.output is None and output.exists():
        raise SystemExit(f"{output} exists; pass --output to choose a file")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
