# Partial FC class sampling per step: the head's sample_classes and cheaper equivalent selections, timed alone.
"""Usage:
    python benchmarks/bench_sampling.py                     # CPU, 1 thread (or the GPU when there is one)
    python benchmarks/bench_sampling.py --classes-per-rank 250000 --sample-rates 0.3
    python benchmarks/bench_sampling.py --quick             # tiny shapes: checks that it runs

Each step the sharded head (toolkit/heads/partial_fc.py, ShardedIdentityCenterHead.sample_classes) keeps
every class of its shard that is a positive of the N gathered rows plus random negatives, S columns in all
(a size fixed by the shapes), as S sorted local indices (the fused kernel's cosine cache needs them sorted),
and remaps the labels to the kept columns, with no host sync. Selections timed (same random scores, so
the same kept set; the script checks that every variant returns exactly what the first one returns):

- topk_sort_table:            uniform scores, positives forced to 2 by a scatter (amax), top-k, sort, and
                              a C-sized table from class to kept column for the remap (what the head did);
- topk_stable_sort_table:     the same with a stable sort (a radix sort for integers on CPU);
- topk_stable_sort_search:    stable sort, and the remap by binary search in the sorted kept indices
                              (searchsorted: N log S, no C-sized table; what the head does now);
- rand:                       drawing the C uniform scores alone (in every variant above as well).

Time: the variants alternate, --repeat rounds after a warm-up; reported: the median per variant (ms).
"""

from __future__ import annotations

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

from results_file import QUICK_MODE_NOTE, results_path  # noqa: E402
from toolkit.command_line import CommandParser  # noqa: E402


def parse_args(argv=None):
    parser = CommandParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                        help="cuda when there is a GPU")
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU (bench_head's ranks use 1)")
    parser.add_argument("--classes-per-rank", type=int, nargs="+", default=[100_000, 250_000],
                        help="C_local: classes of the shard, one case per value")
    parser.add_argument("--sample-rates", type=float, nargs="+", default=[0.2, 0.3],
                        help="Partial FC sample rates r, one case per value")
    parser.add_argument("--rows", type=int, default=512, help="gathered rows N (labels)")
    parser.add_argument("--repeat", type=int, default=21, help="timed rounds per case (median reported)")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats: checks that it runs, its "
                        "timings mean nothing; written to a temporary file unless --json")
    parser.add_argument("--json", type=Path, default=None,
                        help="output file (default benchmarks/results/sampling_<device>.json, or a new time-stamped "
                             "file beside it when that exists)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes_per_rank, args.rows, args.repeat = [5000], 64, 3
    return args


# ---- the selections: (labels_N in [0, C) or -1, S, scores_C) -> (kept_S sorted, local target column or -1) ----

def _forced_scores(labels_N, scores_C):
    in_shard_N = labels_N >= 0
    local_label_N = labels_N.clamp(min=0)
    scores_C = scores_C.clone()
    scores_C.scatter_reduce_(0, local_label_N, torch.where(in_shard_N, 2.0, -1.0).to(scores_C.dtype), reduce="amax")
    return in_shard_N, local_label_N, scores_C


def _remap_by_table(kept_S, in_shard_N, local_label_N, num_classes):
    remap_C = torch.full((num_classes,), -1, dtype=torch.long, device=kept_S.device)
    remap_C[kept_S] = torch.arange(kept_S.numel(), device=kept_S.device)
    return torch.where(in_shard_N, remap_C[local_label_N], -1)


def topk_sort_table(labels_N, num_keep, scores_C):
    in_shard_N, local_label_N, scores_C = _forced_scores(labels_N, scores_C)
    kept_S = torch.topk(scores_C, k=num_keep, sorted=False).indices.sort().values
    return kept_S, _remap_by_table(kept_S, in_shard_N, local_label_N, scores_C.numel())


def topk_stable_sort_table(labels_N, num_keep, scores_C):
    in_shard_N, local_label_N, scores_C = _forced_scores(labels_N, scores_C)
    kept_S = torch.topk(scores_C, k=num_keep, sorted=False).indices.sort(stable=True).values
    return kept_S, _remap_by_table(kept_S, in_shard_N, local_label_N, scores_C.numel())


def topk_stable_sort_search(labels_N, num_keep, scores_C):
    in_shard_N, local_label_N, scores_C = _forced_scores(labels_N, scores_C)
    kept_S = torch.topk(scores_C, k=num_keep, sorted=False).indices.sort(stable=True).values
    return kept_S, torch.where(in_shard_N, torch.searchsorted(kept_S, local_label_N), -1)


VARIANTS = (topk_sort_table, topk_stable_sort_table, topk_stable_sort_search)


def timed(run, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure_case(args, device, classes: int, rate: float) -> dict:
    gen = torch.Generator(device=device).manual_seed(0)
    labels_N = torch.randint(0, classes, (args.rows,), device=device, generator=gen)
    labels_N[::7] = -1  # rows owned by other ranks' shards
    num_keep = min(classes, max(1, int(rate * classes), args.rows))  # the head's num_kept_columns
    scores_C = torch.rand(classes, device=device, generator=gen)
    expected = VARIANTS[0](labels_N, num_keep, scores_C)
    for variant in VARIANTS[1:]:
        got = variant(labels_N, num_keep, scores_C)
        if not (torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])):
            raise SystemExit(f"error: {variant.__name__} selects differently from {VARIANTS[0].__name__}")
    runs = {variant.__name__: (lambda v=variant: v(labels_N, num_keep, torch.rand(classes, device=device)))
            for variant in VARIANTS}
    runs["rand"] = lambda: torch.rand(classes, device=device)
    times = {name: [] for name in runs}
    for index in range(args.repeat + 1):
        for name, run in runs.items():
            seconds = timed(run, device)
            if index:
                times[name].append(seconds)
    return {"classes_per_rank": classes, "sample_rate": rate, "sampled_columns": num_keep, "rows": args.rows,
            **{f"{name}_ms": 1000 * statistics.median(values) for name, values in times.items()}}


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    output = results_path(args.json, f"sampling_{device.type}{'_quick' if args.quick else ''}",
                          overwrite=args.overwrite, quick=args.quick)
    load_before = os.getloadavg()[0]
    where = f"{args.threads} thread(s)" if device.type == "cpu" else torch.cuda.get_device_name()
    print(f"bench_sampling: N={args.rows} gathered labels, {where}; load average {load_before:.2f}", flush=True)
    records = []
    for classes in args.classes_per_rank:
        for rate in args.sample_rates:
            record = measure_case(args, device, classes, rate)
            records.append(record)
            print("  C_local={:>7,} r={:<4g} S={:>6,}  ".format(classes, rate, record["sampled_columns"])
                  + "  ".join(f"{variant.__name__} {record[variant.__name__ + '_ms']:.2f} ms" for variant in VARIANTS)
                  + f"  rand {record['rand_ms']:.2f} ms", flush=True)
    names = [variant.__name__ for variant in VARIANTS] + ["rand"]
    table = "\n".join(["| C_local | r | S | " + " | ".join(f"{name} ms" for name in names) + " |",
                       "|---:|---:|---:|" + "---:|" * len(names)]
                      + [f"| {r['classes_per_rank']:,} | {r['sample_rate']:g} | {r['sampled_columns']:,} | "
                         + " | ".join(f"{r[name + '_ms']:.2f}" for name in names) + " |" for r in records])
    if args.quick:
        table += f"\n\n{QUICK_MODE_NOTE}"
    print(table)
    environment = {"device": device.type, "where": where, "torch": torch.__version__, "host": platform.node(),
                   "cpus": os.cpu_count(), "load_average_before": load_before,
                   "load_average_after": os.getloadavg()[0], "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"environment": environment, "args": {k: str(v) for k, v in vars(args).items()},
                                  "results": records}, indent=2) + "\n")
    output.with_suffix(".md").write_text(table + "\n")
    print(f"written: {output} ({output.stat().st_size:,} bytes) and {output.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
