# Achieved memory bandwidth of the memory-bound fused kernels, against a device copy measured in the same run.
"""Usage (a GPU; on a CPU it runs too, for a check of the script):
    python benchmarks/bench_bandwidth.py
    python benchmarks/bench_bandwidth.py --rows 4096 --classes 250000 --json out.json

The margin-softmax statistics kernel reads an N x C cosine buffer once and writes O(N); the in-place
gradient kernel reads and writes it once. Neither does a matrix product, so their speed is bounded by memory
bandwidth: bytes moved / time, compared with a plain device copy of a buffer of the same size (read + write)
timed in the same run. A ratio near 1 means the kernel runs at the speed of memory.
Inputs: fp32 and bf16 cosine buffers, CosFace and ArcFace margins. Median of --repeat timed runs after one
warm-up, with CUDA events on a GPU.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from results_file import results_path  # noqa: E402
from toolkit.command_line import CommandParser  # noqa: E402

MARGINS = {"cosface": (64.0, 1.0, 0.0, 0.4, 0.0), "arcface": (64.0, 1.0, 0.5, 0.0, 0.0)}  # s, m1, m2, m3, filter


def seconds(run, device: torch.device, repeat: int) -> float:
    """Median seconds of `run()` over `repeat` runs after one warm-up."""
    times = []
    for _ in range(repeat + 1):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            begin = time.perf_counter()
            run()
            times.append(time.perf_counter() - begin)
    return statistics.median(times[1:])


def main(argv=None) -> int:
    gpu = torch.cuda.is_available()
    parser = CommandParser(description=__doc__)
    parser.add_argument("--device", default="cuda" if gpu else "cpu", choices=["cpu", "cuda"],
                        help="cuda when there is a GPU")
    parser.add_argument("--rows", type=int, default=4096, help="N rows of the cosine buffer")
    parser.add_argument("--classes", type=int, default=None, help="C columns (default 250000 GPU, 20000 CPU)")
    parser.add_argument("--repeat", type=int, default=10, help="timed runs per case (median reported)")
    parser.add_argument("--json", type=Path, default=None,
                        help="output (default benchmarks/results/bandwidth_<device>.json, or a new time-stamped file)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    from toolkit import ops

    if not ops.FUSED_KERNELS_AVAILABLE:
        raise SystemExit(f"error: fused kernels unavailable ({ops.UNAVAILABLE_REASON})")
    device = torch.device(args.device)
    classes = args.classes or (250_000 if device.type == "cuda" else 20_000)
    rows = args.rows
    output = results_path(args.json, f"bandwidth_{device.type}", overwrite=args.overwrite)
    gen = torch.Generator(device=device).manual_seed(0)
    records = []
    for dtype in (torch.float32, torch.bfloat16):
        cos_NC = (torch.rand(rows, classes, device=device, generator=gen) * 2 - 1).to(dtype)
        target_N = torch.randint(0, classes, (rows,), device=device, generator=gen)
        buffer_bytes = cos_NC.numel() * cos_NC.element_size()
        copy_NC = torch.empty_like(cos_NC)
        copy_s = seconds(lambda: copy_NC.copy_(cos_NC), device, args.repeat)  # noqa: B023
        copy_bandwidth = 2 * buffer_bytes / copy_s  # read + write
        for margin_name, params in MARGINS.items():
            stats = torch.ops.facecl.margin_softmax_ce_stats(cos_NC, target_N, *params)
            grad_N = torch.full((rows,), 1.0 / rows, device=device)
            stats_s = seconds(lambda: torch.ops.facecl.margin_softmax_ce_stats(cos_NC, target_N, *params),  # noqa: B023
                              device, args.repeat)
            # The gradient kernel overwrites its buffer, so every timed run after the first works on gradients
            # instead of cosines: the same bytes moved and the same arithmetic, so the same speed.
            scratch_NC = cos_NC.clone()
            grad_s = seconds(lambda: torch.ops.facecl.margin_softmax_ce_backward_(  # noqa: B023
                scratch_NC, target_N, stats[0], stats[1], grad_N, *params), device, args.repeat)
            for kernel, moved, kernel_s in (("margin_softmax_ce_stats (read)", buffer_bytes, stats_s),
                                            ("margin_softmax_ce_backward_ (read + write)", 2 * buffer_bytes, grad_s)):
                record = {"kernel": kernel, "dtype": str(dtype).replace("torch.", ""), "margin": margin_name,
                          "shape": f"{rows} x {classes}", "ms": 1000 * kernel_s, "gb_per_s": moved / kernel_s / 1e9,
                          "copy_gb_per_s": copy_bandwidth / 1e9,
                          "fraction_of_copy": (moved / kernel_s) / copy_bandwidth}
                records.append(record)
                print(f"{kernel:<44}{record['dtype']:<10}{margin_name:<9}{record['ms']:>9.3f} ms "
                      f"{record['gb_per_s']:>8.1f} GB/s = {record['fraction_of_copy']:.2f} x copy "
                      f"({record['copy_gb_per_s']:.1f} GB/s)", flush=True)
    environment = {"device": device.type, "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
                   "torch": torch.__version__, "load_average": os.getloadavg()[0],
                   "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"environment": environment, "args": {k: str(v) for k, v in vars(args).items()},
                                  "results": records}, indent=2) + "\n")
    print(f"written: {output} ({output.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
