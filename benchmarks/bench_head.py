# Sharded identity-center head (Partial FC): forward+backward time and peak memory per implementation vs bare matmuls.
"""Usage:
    python benchmarks/bench_head.py                                   # CPU: 2 gloo ranks x 1 thread
    python benchmarks/bench_head.py --classes-per-rank 100000 --sample-rates 1.0 --implementations fused_linear
    python benchmarks/bench_head.py --device cuda                     # one GPU, the whole head on it
    python benchmarks/bench_head.py --quick                           # tiny shapes: checks that it runs

Each rank runs the production module (toolkit.heads.ShardedIdentityCenterHead) on its shard of
C_local classes x D: the gathered batch has N rows (N / ranks embeddings per rank, all-gathered), the loss
goes through the cross-rank softmax, and backward produces the gradients of the embeddings and the shard.
The centers' gradient is None before each step (as after `zero_grad(set_to_none=True)`), so its C_local x D
fp32 allocation is part of the peak, and is reported beside it.

Bare matrix products, timed in the same run on the same ranks: the three products of the head's shape and
nothing else: logits = E W^T (N x S), dE = G W (N x D), dW = G^T E (S x D), with S = the sampled columns,
into preallocated outputs. Their time is the floor a head can approach. With sampling (r < 1) the head
also chooses its S columns every step (ShardedIdentityCenterHead.sample_classes: random scores, the
positives forced in by a scatter, top-k, sort, the label remap); that step alone is timed too, and the head
is also reported against bare products + sampling.

Time: the head's step, the bare products and the sampling alone alternate, --repeat rounds after --warmup;
each is the slowest rank's time of that step. Reported: the median of each, and the ratios as the medians of
the per-round ratios (head / bare, head / (bare + sampling)), so a change in the machine's load between the
sides does not enter the ratio. Peak memory (per rank, the largest): on CPU the allocator's running total
from torch.profiler memory events above the starting point (benchmarks/measure.py), on CUDA
torch.cuda.max_memory_allocated above the starting point.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from measure import peak_bytes, silenced_stderr  # noqa: E402
from results_file import QUICK_MODE_NOTE, results_path  # noqa: E402
from toolkit.command_line import CommandParser  # noqa: E402

IMPLEMENTATIONS = ("reference", "fused", "fused_linear")
MIB = 2**20


def parse_args(argv=None) -> argparse.Namespace:
    gpu = torch.cuda.is_available()
    parser = CommandParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if gpu else "cpu", choices=["cpu", "cuda"],
                        help="cuda when there is a GPU")
    parser.add_argument("--ranks", type=int, default=None, help="gloo ranks on CPU (default 2); CUDA runs 1 rank")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per CPU rank")
    parser.add_argument("--classes-per-rank", type=int, nargs="+", default=[10_000, 100_000, 250_000],
                        help="C_local: identity centers on each rank, one case per value")
    parser.add_argument("--rows", type=int, default=512, help="gathered rows N (all ranks together)")
    parser.add_argument("--dim", type=int, default=512, help="embedding size D")
    parser.add_argument("--sample-rates", type=float, nargs="+", default=[1.0, 0.2, 0.3],
                        help="Partial FC sample rates r, one case per value (0.2: the iresnet100 recipes, 0.3: the "
                             "ViTs)")
    parser.add_argument("--implementations", nargs="+", default=list(IMPLEMENTATIONS), choices=IMPLEMENTATIONS,
                        help="heads to time")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per case")
    parser.add_argument("--repeat", type=int, default=3, help="timed steps per case (median reported)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, one repeat: checks that it runs, its timings mean nothing; "
                        "written to a temporary file unless --json")
    parser.add_argument("--json", type=Path, default=None,
                        help="output file (default benchmarks/results/head_<device>.json, or a new time-stamped "
                             "file beside it when that exists)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes_per_rank, args.rows, args.dim, args.warmup, args.repeat = [2000], 64, 64, 0, 1
    args.ranks = 1 if args.device == "cuda" else (args.ranks or 2)
    if args.rows % args.ranks:
        raise SystemExit(f"error: --rows {args.rows} is not a multiple of the {args.ranks} ranks")
    return args


# ---- one rank ------------------------------------------------------------------------------------------------------

def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def largest_over_ranks(value, world: int):
    """The largest of the ranks' values (times: every rank waits for the slowest at the next collective)."""
    if world == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64 if isinstance(value, float) else torch.int64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return type(value)(tensor.item())


def timed_once(run, device: torch.device, world: int) -> float:
    """Seconds of one run, the slowest rank's (every rank waits for it at the next collective)."""
    if world > 1:
        dist.barrier()
    synchronize(device)
    start = time.perf_counter()
    run()
    synchronize(device)
    return largest_over_ranks(time.perf_counter() - start, world)


def timed_pairs(head_step, bare_step, sampling_step, device: torch.device, world: int, warmup: int, repeat: int):
    """Medians over `repeat` alternating rounds (head, bare products, sampling alone): (head seconds, bare
    seconds, sampling seconds, per-round head / bare, per-round head / (bare + sampling))."""
    head_times, bare_times, sampling_times = [], [], []
    for index in range(warmup + repeat):
        head_seconds = timed_once(head_step, device, world)
        bare_seconds = timed_once(bare_step, device, world)
        sampling_seconds = timed_once(sampling_step, device, world)
        if index >= warmup:
            head_times.append(head_seconds)
            bare_times.append(bare_seconds)
            sampling_times.append(sampling_seconds)
    ratios = [h / b for h, b in zip(head_times, bare_times)]
    ratios_with_sampling = [h / (b + s) for h, b, s in zip(head_times, bare_times, sampling_times)]
    return (statistics.median(head_times), statistics.median(bare_times), statistics.median(sampling_times),
            statistics.median(ratios), statistics.median(ratios_with_sampling))


def head_case(args, device, world, rank, group, classes_per_rank: int, sample_rate: float, implementation: str):
    """(one forward+backward step of the production head, its column sampling alone, the number of columns
    it samples)."""
    from toolkit.distributed.collectives import all_gather_no_grad
    from toolkit.heads import ShardedIdentityCenterHead
    from toolkit.ops.margins import Margin

    torch.manual_seed(rank)
    head = ShardedIdentityCenterHead(classes_per_rank * world, args.dim, Margin(scale=64.0, m1=1.0, m2=0.5, m3=0.0),
                                     rank=rank, world_size=world, group=group, sample_rate=sample_rate,
                                     implementation=implementation).to(device)
    emb_BD = torch.randn(args.rows // world, args.dim, device=device, requires_grad=True)  # B = N / ranks
    labels_B = torch.randint(0, classes_per_rank * world, (args.rows // world,), device=device)

    def step():
        head.centers_CD.grad = None
        emb_BD.grad = None
        head(emb_BD, labels_B).backward()

    labels_N = all_gather_no_grad(labels_B, group)  # what the head samples from, every step

    def sampling():
        head.sample_classes(labels_N)

    step()  # the sampled column count is fixed by the shapes: known after one step
    head.centers_CD.grad = None
    emb_BD.grad = None
    return step, sampling, int(head.last_sampled_classes.numel())


def bare_case(args, device, columns: int):
    """The three matrix products of the head's shape (N x D embeddings, S x D centers), into preallocated outputs."""
    gen = torch.Generator(device=device).manual_seed(0)
    emb_ND = torch.randn(args.rows, args.dim, device=device, generator=gen)
    centers_SD = torch.randn(columns, args.dim, device=device, generator=gen)
    grad_NS = torch.randn(args.rows, columns, device=device, generator=gen)
    logits_NS, grad_emb_ND, grad_centers_SD = torch.empty_like(grad_NS), torch.empty_like(emb_ND), \
        torch.empty_like(centers_SD)

    def products():
        torch.mm(emb_ND, centers_SD.t(), out=logits_NS)
        torch.mm(grad_NS, centers_SD, out=grad_emb_ND)
        torch.mm(grad_NS.t(), emb_ND, out=grad_centers_SD)

    return products


def measure_case(args, device, world, rank, group, classes: int, rate: float, implementation: str):
    """(head s, bare s, sampling s, head / bare, head / (bare + sampling), head peak bytes, sampled columns)."""
    step, sampling, columns = head_case(args, device, world, rank, group, classes, rate, implementation)
    products = bare_case(args, device, columns)
    timings = timed_pairs(step, products, sampling, device, world, args.warmup, args.repeat)
    del products  # free its N x S buffers before the head's peak is measured
    if world > 1:
        dist.barrier()
    with silenced_stderr():  # the profiler's start/stop chatter
        peak = largest_over_ranks(peak_bytes(step, device.type), world)
    return (*timings, peak, columns)


def run_rank(rank: int, args, port: int, queue) -> None:
    world = args.ranks
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    group = None
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        group = dist.group.WORLD
    records = []
    for classes in args.classes_per_rank:
        for rate in args.sample_rates:
            for implementation in args.implementations:
                seconds, bare_seconds, sampling_seconds, ratio, ratio_with_sampling, peak, columns = measure_case(
                    args, device, world, rank, group, classes, rate, implementation)
                grad_bytes = classes * args.dim * 4
                record = {"classes_per_rank": classes, "sample_rate": rate, "implementation": implementation,
                          "sampled_columns": columns, "ms": 1000 * seconds,
                          "bare_matmuls_ms": 1000 * bare_seconds,
                          "time_vs_bare_matmuls": ratio,
                          "sampling_ms": 1000 * sampling_seconds,
                          "time_vs_bare_matmuls_plus_sampling": ratio_with_sampling,
                          "peak_increase_mib": peak / MIB, "center_grad_mib": grad_bytes / MIB,
                          "peak_vs_center_grad": peak / grad_bytes}
                records.append(record)
                if rank == 0:
                    print(f"  C_local={classes:>7,} r={rate:<4g} {implementation:<13}{record['ms']:>9.1f} ms "
                          f"({record['time_vs_bare_matmuls']:.2f}x bare {record['bare_matmuls_ms']:.1f} ms, "
                          f"{record['time_vs_bare_matmuls_plus_sampling']:.2f}x bare + sampling "
                          f"{record['sampling_ms']:.2f} ms)"
                          f"{record['peak_increase_mib']:>9.1f} MiB ({record['peak_vs_center_grad']:.2f}x grad)",
                          flush=True)
    if rank == 0:
        queue.put(records)
    if world > 1:
        dist.destroy_process_group()


# ---- driver --------------------------------------------------------------------------------------------------------

def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def markdown(records: list[dict]) -> str:
    lines = ["| C_local | r | implementation | ms | bare matmuls ms | time / bare | sampling ms | "
             "time / (bare + sampling) | peak MiB | center grad MiB | peak / grad |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in records:
        lines.append(f"| {row['classes_per_rank']:,} | {row['sample_rate']:g} | {row['implementation']} | "
                     f"{row['ms']:.1f} | {row['bare_matmuls_ms']:.1f} | {row['time_vs_bare_matmuls']:.2f} | "
                     f"{row['sampling_ms']:.2f} | {row['time_vs_bare_matmuls_plus_sampling']:.2f} | "
                     f"{row['peak_increase_mib']:.1f} | {row['center_grad_mib']:.1f} | "
                     f"{row['peak_vs_center_grad']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    from toolkit import ops

    if not ops.FUSED_KERNELS_AVAILABLE:
        print(f"warning: fused kernels unavailable ({ops.UNAVAILABLE_REASON}): 'fused' rows run the reference",
              file=sys.stderr)
    output = results_path(args.json, f"head_{args.device}{'_quick' if args.quick else ''}", overwrite=args.overwrite,
                          quick=args.quick)
    load_before = os.getloadavg()
    where = (f"{args.ranks} gloo ranks x {args.threads} thread(s)" if args.device == "cpu"
             else torch.cuda.get_device_name())
    print(f"bench_head: N={args.rows} gathered rows, D={args.dim}, {where}; load average {load_before[0]:.2f}",
          flush=True)
    if args.quick:
        print(QUICK_MODE_NOTE, flush=True)
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    port = free_port()
    processes = [context.Process(target=run_rank, args=(rank, args, port, queue)) for rank in range(args.ranks)]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    failed = [index for index, process in enumerate(processes) if process.exitcode != 0]
    if failed:
        raise SystemExit(f"error: rank(s) {failed} failed (exit codes {[processes[i].exitcode for i in failed]})")
    records = queue.get()
    table = markdown(records) + (f"\n\n{QUICK_MODE_NOTE}" if args.quick else "")
    print(table)
    environment = {"device": args.device, "where": where, "torch": torch.__version__, "host": platform.node(),
                   "cpus": os.cpu_count(), "fused_kernels": ops.FUSED_KERNELS_AVAILABLE,
                   "load_average_before": load_before[0], "load_average_after": os.getloadavg()[0],
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.quick:
        environment["note"] = QUICK_MODE_NOTE
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"environment": environment, "args": {k: str(v) for k, v in vars(args).items()},
                                  "results": records}, indent=2) + "\n")
    output.with_suffix(".md").write_text(table + "\n")
    print(f"written: {output} ({output.stat().st_size:,} bytes) and {output.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
