# Data benchmark: JPEG decoders, shard conversion, the webdataset stream and (if installed) DALI on CPU.
"""Prints images/s and writes benchmarks/results/bench_data.json.

    OMP_NUM_THREADS=2 python benchmarks/bench_data.py [--images 6000] [--batch-size 128] [--out PATH] [--overwrite]

The results record the date and the machine's load average (1, 5, 15 minutes) before and after the run,
since other processes on the machine slow every figure. The in-process one-view and two-view figures are
measured in alternating windows, so their ratio (also recorded) holds even when the load changes.

The data are 112x112 synthetic faces (toolkit.data.synthetic, with their pixel noise) encoded as JPEG
quality 95, written as an image folder and converted to shards; every figure is decoded + augmented
images per second over a measured window after a warm-up.
"""

from __future__ import annotations

import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from toolkit.command_line import CommandParser  # noqa: E402
from toolkit.data.dali_stream import DaliOptions  # noqa: E402
from toolkit.data.transforms import ViewAugmentation  # noqa: E402
from toolkit.data import SyntheticFaces  # noqa: E402
from toolkit.data.converters import ConvertSettings, ImageFolderSource, convert  # noqa: E402
from toolkit.data.jpeg import decode_rgb  # noqa: E402
from toolkit.data.shard_stream import ShardBatchStream, ShardedTrainSet  # noqa: E402
from results_file import results_path  # noqa: E402


def face_jpegs(num_identities: int, per_identity: int) -> list[list[bytes]]:
    faces = SyntheticFaces(image_size=112, seed=0)
    out = []
    for identity in range(num_identities):
        row = []
        for sample in range(per_identity):
            pixels = ((faces.render(identity, sample) + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0)
            buffer = io.BytesIO()
            Image.fromarray(pixels.numpy()).save(buffer, format="JPEG", quality=95)
            row.append(buffer.getvalue())
        out.append(row)
    return out


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1)


def bench_decoders(jpegs: list[bytes]) -> dict:
    results = {}
    for name in ("pil", "simplejpeg"):
        try:
            decode_rgb(jpegs[0], name)
        except (TypeError, AttributeError):
            continue
        start = time.perf_counter()
        for data in jpegs:
            decode_rgb(data, name)
        results[name] = rate(len(jpegs), time.perf_counter() - start)
    return results


def make_stream(manifest: Path, batch_size: int, num_workers: int, views: bool) -> ShardBatchStream:
    stream = ShardBatchStream(ShardedTrainSet(manifest), batch_size, seed=0, num_workers=num_workers,
                              views=ViewAugmentation() if views else None, window_shards=2, image_size=112)
    for _ in range(2 * max(1, num_workers)):  # warm-up: workers started, first windows read
        stream.next_batch()
    return stream


def bench_stream(manifest: Path, batch_size: int, num_workers: int, views: bool, seconds: float) -> float:
    stream = make_stream(manifest, batch_size, num_workers, views)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += stream.next_batch()[1].numel()
    return rate(count, time.perf_counter() - start)


def bench_streams_in_process(manifest: Path, batch_size: int, seconds: float, rounds: int = 6) -> dict[str, float]:
    """One view (flip) and two views, in process, measured in alternating windows of seconds / rounds each, so
    that a change of the machine's load during the run weighs on both figures alike (their ratio is the point)."""
    streams = {name: make_stream(manifest, batch_size, 0, views) for name, views in (("flip", False), ("two_views", True))}
    counts, elapsed = dict.fromkeys(streams, 0), dict.fromkeys(streams, 0.0)
    for _ in range(rounds):
        for name, stream in streams.items():
            start = time.perf_counter()
            while time.perf_counter() - start < seconds / rounds:
                counts[name] += stream.next_batch()[1].numel()
            elapsed[name] += time.perf_counter() - start
    return {f"workers=0 {name}": rate(counts[name], elapsed[name]) for name in streams}


def bench_dali(manifest: Path, batch_size: int, num_threads: int, seconds: float) -> float | None:
    try:
        from toolkit.data.dali_stream import DaliBatchStream, dali_available
    except ImportError:
        return None
    if not dali_available():
        return None
    stream = DaliBatchStream(ShardedTrainSet(manifest), batch_size, seed=0, image_size=112,
                             config=DaliOptions(decode_device="cpu", num_threads=num_threads, shuffle_buffer=1024))
    for _ in range(3):
        stream.next_batch()
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        count += stream.next_batch()[1].numel()
    return rate(count, time.perf_counter() - start)


def main() -> int:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--images", type=int, default=6000, help="images in the benchmark set (20 per identity)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured window per figure")
    parser.add_argument("--out", type=Path, default=None,
                        help="output JSON (default: results/bench_data.json, or a new time-stamped file beside it "
                             "when that exists)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args()
    args.out = results_path(args.out, "bench_data", overwrite=args.overwrite)

    load_before = os.getloadavg()
    per_identity = 20
    jpegs = face_jpegs(max(1, args.images // per_identity), per_identity)
    flat = [data for row in jpegs for data in row]
    results = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                           "python": platform.python_version()},
               "images": len(flat), "mean_jpeg_bytes": int(np.mean([len(d) for d in flat])),
               "batch_size": args.batch_size}
    results["decode_one_core_images_per_s"] = bench_decoders(flat[:2000])
    print(f"JPEG decode 112x112, one core: {results['decode_one_core_images_per_s']} images/s")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for identity, row in enumerate(jpegs):
            (root / "src" / f"{identity:05d}").mkdir(parents=True)
            for sample, data in enumerate(row):
                (root / "src" / f"{identity:05d}" / f"{sample}.jpg").write_bytes(data)
        start = time.perf_counter()
        convert(ImageFolderSource(root / "src"), root / "shards",
                ConvertSettings(shard_size=1000, group_size=2, num_workers=2), progress=False, log=lambda *a: None)
        results["convert_folder_2_workers_images_per_s"] = rate(len(flat), time.perf_counter() - start)
        print(f"conversion (image folder -> shards, 2 workers): {results['convert_folder_2_workers_images_per_s']} "
              "images/s")
        manifest = root / "shards" / "manifest.json"
        stream_results = {}
        stream_results.update(bench_streams_in_process(manifest, args.batch_size, args.seconds))
        for views in (False, True):
            key = f"workers=2 {'two_views' if views else 'flip'}"
            stream_results[key] = bench_stream(manifest, args.batch_size, 2, views, args.seconds)
        for key, value in stream_results.items():
            print(f"webdataset stream, {key}: {value} images/s")
        results["webdataset_stream_images_per_s"] = stream_results
        ratio = round(stream_results["workers=0 two_views"] / stream_results["workers=0 flip"], 3)
        results["two_views_over_one_view_in_process"] = ratio
        print(f"two views / one view, in process: {ratio}")
        dali = bench_dali(manifest, args.batch_size, 2, args.seconds)
        results["dali_cpu_2_threads_flip_images_per_s"] = dali
        print(f"DALI CPU pipeline, 2 threads, flip: {dali if dali is not None else 'not installed'} images/s")

    results["load_average"] = {"before": [round(v, 2) for v in load_before],
                               "after": [round(v, 2) for v in os.getloadavg()]}
    print(f"load average (1, 5, 15 min): before {results['load_average']['before']}, "
          f"after {results['load_average']['after']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
