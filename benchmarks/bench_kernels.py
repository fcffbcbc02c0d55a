# Fused loss kernels vs the plain-PyTorch references: time per forward+backward and peak memory, table + JSON.
"""Usage:
    python benchmarks/bench_kernels.py                       # CPU, or the GPU when there is one
    python benchmarks/bench_kernels.py --device cpu --rows 1024 --classes 5000
    python benchmarks/bench_kernels.py --quick               # tiny shapes: checks that everything runs

Cases (synthetic unit vectors, CosFace s=64 m3=0.4 on the head cases):
- margin_softmax_ce:        emb (N x D), centers (C x D) -> cosines N x C -> fused loss with the in-place
                            backward, vs the sharded head's reference path (margin logits, distributed CE);
- linear_margin_softmax_ce: the same loss from emb and centers, blockwise (no N x C tensor), vs the same reference;
- unicon_loss:              B queries against K keys (labels with repeats, unlabeled keys), vs
                            unicon_loss_reference; keys without gradient, as in MoCo.

Time: median wall time of forward + backward over --repeat runs after one warm-up. Peak memory: on a GPU
torch.cuda.max_memory_allocated above what was allocated before; on a CPU the peak of the allocator's running
total during one forward + backward, read from torch.profiler's memory events (profile_memory=True). Inputs
and their gradients existing before the step are not counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from toolkit.command_line import CommandParser  # noqa: E402
import toolkit.ops as ops  # noqa: E402
from toolkit.heads.margin import Margin  # noqa: E402
from toolkit.ops import unfused as reference  # noqa: E402
from measure import peak_bytes, silenced_stderr  # noqa: E402
from results_file import QUICK_MODE_NOTE, results_path  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MARGIN = Margin(scale=64.0, m1=1.0, m2=0.0, m3=0.4)


def parse_args() -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = CommandParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if gpu else "cpu", choices=["cpu", "cuda"],
                        help="cuda when there is a GPU")
    parser.add_argument("--rows", type=int, default=None, help="head rows N (default 4096)")
    parser.add_argument("--classes", type=int, default=None,
                        help="head classes C on this rank (default 20000 on CPU, 250000 on GPU)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size D of the head cases")
    parser.add_argument("--queries", type=int, default=None, help="UniCon queries B (default 256 CPU, 1024 GPU)")
    parser.add_argument("--keys", type=int, default=65536, help="UniCon keys K (queue length)")
    parser.add_argument("--unicon-dim", type=int, default=128, help="UniCon projection size")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per case (median reported)")
    parser.add_argument("--cases", default="margin_softmax_ce,linear_margin_softmax_ce,unicon_loss",
                        help="comma-separated kernels to time")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat: checks that it runs, its timings mean nothing; "
                        "written to a temporary file unless --json")
    parser.add_argument("--json", type=Path, default=None,
                        help="output file (default benchmarks/results/kernels_<device>.json, or a new time-stamped "
                             "file beside it when that exists)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args()
    on_gpu = args.device == "cuda"
    if args.quick:
        args.rows, args.classes, args.dim, args.queries, args.keys, args.repeat = 64, 1000, 64, 16, 2000, 1
    args.rows = args.rows or 4096
    args.classes = args.classes or (250_000 if on_gpu else 20_000)
    args.queries = args.queries or (1024 if on_gpu else 256)
    return args


# ---- the cases: (make inputs, fused step, reference step) ------------------------------------------------------

def head_inputs(args, device):
    gen = torch.Generator().manual_seed(0)
    emb_ND = torch.randn(args.rows, args.dim, generator=gen)
    centers_CD = torch.randn(args.classes, args.dim, generator=gen)
    labels_N = torch.randint(0, args.classes, (args.rows,), generator=gen)
    return {"emb_ND": emb_ND.to(device).requires_grad_(True), "centers_CD": centers_CD.to(device).requires_grad_(True),
            "local_target_N": labels_N.to(device)}


def cosine_step(loss_fn):
    def step(emb_ND, centers_CD, local_target_N):
        cos_NC = F.normalize(emb_ND, dim=1) @ F.normalize(centers_CD, dim=1).t()
        loss_fn(cos_NC, local_target_N, MARGIN).backward()
    return step


def linear_step(emb_ND, centers_CD, local_target_N):
    ops.distributed_linear_margin_softmax_ce(F.normalize(emb_ND, dim=1), F.normalize(centers_CD, dim=1),
                                             local_target_N, MARGIN).backward()


def unicon_inputs(args, device):
    gen = torch.Generator().manual_seed(1)
    query_BD = F.normalize(torch.randn(args.queries, args.unicon_dim, generator=gen), dim=1)
    keys_KD = F.normalize(torch.randn(args.queries + args.keys, args.unicon_dim, generator=gen), dim=1)
    query_labels_B = torch.randint(-1, args.queries // 2, (args.queries,), generator=gen)
    key_labels_K = torch.cat([query_labels_B, torch.randint(-1, 10 * args.queries, (args.keys,), generator=gen)])
    return {"query_BD": query_BD.to(device).requires_grad_(True), "keys_KD": keys_KD.to(device),
            "query_labels_B": query_labels_B.to(device), "key_labels_K": key_labels_K.to(device),
            "own_key_B": torch.arange(args.queries, device=device)}


def unicon_step(loss_fn):
    def step(query_BD, keys_KD, query_labels_B, key_labels_K, own_key_B):
        loss_fn(query_BD, keys_KD, query_labels_B, key_labels_K, own_key_B, 0.07, 0.0).mean().backward()
    return step


CASES = {
    "margin_softmax_ce": (head_inputs, cosine_step(ops.distributed_margin_softmax_ce),
                          cosine_step(reference.distributed_margin_softmax_ce)),
    "linear_margin_softmax_ce": (head_inputs, linear_step, cosine_step(reference.distributed_margin_softmax_ce)),
    "unicon_loss": (unicon_inputs, unicon_step(ops.unicon_loss), unicon_step(reference.unicon_loss)),
}


# ---- measurement --------------------------------------------------------------------------------------------------

def clear_grads(inputs: dict) -> None:
    for tensor in inputs.values():
        tensor.grad = None


def timed(step, inputs: dict, device: str, repeat: int) -> float:
    """Median seconds of one forward + backward."""
    times = []
    for _ in range(repeat + 1):  # the first run warms up
        clear_grads(inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step(**inputs)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    args = parse_args()
    if not ops.FUSED_KERNELS_AVAILABLE:
        raise SystemExit(f"fused kernels unavailable ({ops.UNAVAILABLE_REASON}): nothing to compare")
    device = args.device
    shapes = {"margin_softmax_ce": f"N={args.rows} C={args.classes} D={args.dim}",
              "linear_margin_softmax_ce": f"N={args.rows} C={args.classes} D={args.dim}",
              "unicon_loss": f"B={args.queries} K={args.queries + args.keys} D={args.unicon_dim}"}
    records = []
    for name in [case.strip() for case in args.cases.split(",") if case.strip()]:
        make_inputs, fused_step, reference_step = CASES[name]
        inputs = make_inputs(args, device)
        row = {"case": name, "shape": shapes[name]}
        for label, step in (("fused", fused_step), ("reference", reference_step)):
            row[f"{label}_ms"] = 1000 * timed(step, inputs, device, args.repeat)
            clear_grads(inputs)
            with silenced_stderr():  # the profiler's start/stop chatter
                row[f"{label}_peak_mb"] = peak_bytes(lambda step=step, inputs=inputs: step(**inputs), device) / 2**20
        row["time_ratio"] = row["fused_ms"] / row["reference_ms"]
        row["memory_ratio"] = row["fused_peak_mb"] / max(row["reference_peak_mb"], 1e-9)
        records.append(row)
        del inputs

    header = (f"{'case':<26}{'shape':<26}{'fused ms':>10}{'ref ms':>10}{'time x':>8}"
              f"{'fused MB':>10}{'ref MB':>10}{'mem x':>8}")
    print(f"device: {device} ({torch.get_num_threads()} threads)" if device == "cpu"
          else f"device: {torch.cuda.get_device_name()}")
    print(header)
    for row in records:
        print(f"{row['case']:<26}{row['shape']:<26}{row['fused_ms']:>10.1f}{row['reference_ms']:>10.1f}"
              f"{row['time_ratio']:>8.2f}{row['fused_peak_mb']:>10.1f}{row['reference_peak_mb']:>10.1f}"
              f"{row['memory_ratio']:>8.3f}")
    if args.quick:
        print(QUICK_MODE_NOTE)
    output = results_path(args.json, f"kernels_{device}{'_quick' if args.quick else ''}", overwrite=args.overwrite,
                          quick=args.quick)
    output.parent.mkdir(parents=True, exist_ok=True)
    environment = {"device": device, "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "gpu": torch.cuda.get_device_name() if device == "cuda" else None}
    if args.quick:
        environment["note"] = QUICK_MODE_NOTE
    output.write_text(json.dumps({"environment": environment, "args": {k: str(v) for k, v in vars(args).items()},
                                  "results": records}, indent=2) + "\n")
    print(f"written: {output}")


if __name__ == "__main__":
    main()
