# Benchmark of the all-to-all (MFR-style) exact TAR@FAR: time, peak memory, pair throughput, 1.6M projection.
"""Synthetic unit embeddings (identity centres plus noise, so genuine pairs score higher) go through
toolkit.eval.all_to_all.all_to_all_tar_at_far; the JSON records wall time, peak resident memory, the pair
throughput (pairs scored per second, counting every pass) and, from a second timed run of the two-pass
(histogram) path on --projection-images images, the time projected for MFR-ALL's 1.6M images (which take
that path: with FAR 1e-4 in the list, k = 2.6e8 scores are too many to keep in one pass). Peak memory is the
process's maximum resident set, torch's own ~0.7 GB included. Results go to a new file
benchmarks/results/all_to_all_<host>_<time>.json unless --output names one (committed results are never
overwritten by default).

    python benchmarks/bench_all_to_all.py                          # N = 100,000, d = 512, this machine
    python benchmarks/bench_all_to_all.py --num-images 20000 --threads 1
    python benchmarks/bench_all_to_all.py --device cuda --compute-dtype bf16
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from toolkit.command_line import CommandParser  # noqa: E402

MFR_ALL_IMAGES = 1_624_305


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--num-images", type=int, default=100_000, help="synthetic images of the gallery")
    parser.add_argument("--dim", type=int, default=512, help="feature size")
    parser.add_argument("--images-per-identity", type=int, default=7, help="MFR-ALL has ~6.7")
    parser.add_argument("--fars", type=float, nargs="+", default=[1e-6, 1e-5, 1e-4],
                        help="false accept rates whose TAR is measured")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the scores are computed (cuda when there is a GPU)")
    parser.add_argument("--compute-dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="dtype of the score products")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--row-block", type=int, default=2048, help="query rows per score block")
    parser.add_argument("--col-block", type=int, default=8192, help="gallery columns per score block")
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic features")
    parser.add_argument("--projection-images", type=int, default=30_000,
                        help="also time the two-pass (histogram) path on this many images: MFR-ALL with FAR 1e-4 "
                             "in the list takes that path, so its throughput gives the 1.6M projection (0: skip)")
    parser.add_argument("--output", help="JSON file to write (default: a new file in benchmarks/results/)")
    args = parser.parse_args(argv)

    from toolkit.eval.all_to_all import all_to_all_tar_at_far

    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(args.seed)
    num_ids = max(2, args.num_images // args.images_per_identity)
    labels_N = torch.randint(0, num_ids, (args.num_images,), generator=gen)
    # Noise as large as the centres, so that genuine cosines sit around 0.5 and impostors around 0. Built in
    # chunks so that generating the data does not set the peak memory.
    centres_KD = torch.randn(num_ids, args.dim, generator=gen)
    emb_ND = torch.empty(args.num_images, args.dim)
    for start in range(0, args.num_images, 8192):
        chunk_CD = centres_KD[labels_N[start:start + 8192]]
        chunk_CD += torch.randn(chunk_CD.shape, generator=gen)
        emb_ND[start:start + 8192] = torch.nn.functional.normalize(chunk_CD, dim=1)
    del centres_KD, chunk_CD
    rss_before = peak_rss_mib()
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.compute_dtype]
    load_before = os.getloadavg()
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = all_to_all_tar_at_far(emb_ND, labels_N, tuple(args.fars), device=args.device, compute_dtype=dtype,
                                   row_block=args.row_block, col_block=args.col_block, progress=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    num_pairs = args.num_images * (args.num_images - 1) // 2
    throughput = num_pairs * result["num_passes"] / seconds
    mfr_pairs = MFR_ALL_IMAGES * (MFR_ALL_IMAGES - 1) // 2
    two_pass = None
    if args.projection_images:
        # The histogram path, as MFR-ALL takes it: two passes, the first histogramming every score.
        small_N = min(args.projection_images, args.num_images)
        start2 = time.perf_counter()
        small = all_to_all_tar_at_far(emb_ND[:small_N], labels_N[:small_N], tuple(args.fars), device=args.device,
                                      compute_dtype=dtype, row_block=args.row_block, col_block=args.col_block,
                                      sample_floor=False)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds2 = time.perf_counter() - start2
        small_pairs = small_N * (small_N - 1) // 2
        two_pass = {"num_images": small_N, "seconds": round(seconds2, 2), "num_passes": small["num_passes"],
                    "pairs_per_second": round(small_pairs / seconds2),
                    "projected_seconds_mfr_all_1_6M": round(mfr_pairs / (small_pairs / seconds2))}
    record = {
        "benchmark": "all_to_all_tar_at_far",
        "num_images": args.num_images, "dim": args.dim, "num_identities": result["num_identities"],
        "num_pairs": num_pairs, "num_genuine": result["num_genuine"], "num_impostor": result["num_impostor"],
        "device": args.device, "compute_dtype": args.compute_dtype, "threads": torch.get_num_threads(),
        "row_block": args.row_block, "col_block": args.col_block,
        "seconds": round(seconds, 2), "num_passes": result["num_passes"],
        "pairs_per_second_per_pass": round(throughput),
        "peak_rss_mib": round(peak_rss_mib(), 1), "peak_rss_before_mib": round(rss_before, 1),
        "embeddings_mib": round(emb_ND.numel() * 4 / 2**20, 1),
        "two_pass_path": two_pass,
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "host": platform.node(), "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "tar_at_far": result["tar_at_far"],
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if args.device.startswith("cuda"):
        record["gpu"] = torch.cuda.get_device_name()
        record["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if args.output:
        path = Path(args.output)
    else:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        path = Path(__file__).resolve().parent / "results" / f"all_to_all_{platform.node()}_{stamp}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("num_images", "seconds", "num_passes", "peak_rss_mib",
                                             "pairs_per_second_per_pass", "two_pass_path",
                                             "load_average_before", "load_average_after")}))
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
