# The smoke recipes end to end: final held-out accuracy, steps, wall and CPU seconds, the figures the docs quote.
"""Runs each smoke recipe as a user would (`python launch/train.py --recipe recipes/smoke_X.yaml`, a fresh
process, its run folder in a scratch directory) and records from its results.json the final verification
accuracy (mean and std over the folds), the number of held-out pairs and the steps trained, and from the
operating system the wall time and the CPU seconds of the whole process tree (getrusage of the children:
user + system), with the load average before and after.

    OMP_NUM_THREADS=2 python benchmarks/bench_smoke.py                        # every smoke recipe
    OMP_NUM_THREADS=2 python benchmarks/bench_smoke.py --recipes smoke_vit

The README and docs quote these figures through markers that tests/unit/test_doc_figures.py checks against
benchmarks/results/smoke_recipes.json; after a new run written there with --overwrite, refresh the quoted
text with `python benchmarks/doc_figures.py --write`.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_file import results_path, write_results  # noqa: E402
from toolkit.command_line import CommandParser  # noqa: E402

SMOKE_RECIPES = ("smoke_synthetic", "smoke_vit", "smoke_unimoco")


def children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_recipe(name: str, scratch: Path, timeout_s: float) -> dict:
    load_before = os.getloadavg()[0]
    cpu_before, start = children_cpu_seconds(), time.perf_counter()
    done = subprocess.run([sys.executable, "launch/train.py", "--recipe", f"recipes/{name}.yaml",
                           "--set", f"run.output_dir={scratch}"], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)
    wall_s, cpu_s = time.perf_counter() - start, children_cpu_seconds() - cpu_before
    if done.returncode != 0:
        raise SystemExit(f"error: {name} ended with exit status {done.returncode}:\n{done.stderr[-2000:]}")
    results = json.loads(next(scratch.glob("*/results.json")).read_text())
    final = results["final_verification"]
    return {"recipe": f"recipes/{name}.yaml", "accuracy_percent": 100 * final["accuracy_mean"],
            "accuracy_std_percent": 100 * final["accuracy_std"], "num_pairs": final["num_pairs"],
            "steps": results["final_step"], "wall_s": wall_s, "cpu_s": cpu_s,
            "load_average_before": load_before, "load_average_after": os.getloadavg()[0],
            "last_line": done.stdout.strip().splitlines()[-1]}


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--recipes", nargs="+", default=list(SMOKE_RECIPES), choices=SMOKE_RECIPES,
                        help="smoke recipes to run")
    parser.add_argument("--timeout-s", type=float, default=1800.0, help="limit per recipe")
    parser.add_argument("--json", type=Path, default=None,
                        help="output (default benchmarks/results/smoke_recipes.json, or a new time-stamped file "
                             "beside it when that exists)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = parser.parse_args(argv)
    output = results_path(args.json, "smoke_recipes", overwrite=args.overwrite)
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print(f"bench_smoke: {', '.join(args.recipes)}; OMP_NUM_THREADS={threads}; {os.cpu_count()} CPUs", flush=True)
    records = {}
    for name in args.recipes:
        with tempfile.TemporaryDirectory(prefix=f"facecl-{name}-") as scratch:
            records[name] = record = run_recipe(name, Path(scratch), args.timeout_s)
        print(f"{name}: {record['accuracy_percent']:.2f}% +- {record['accuracy_std_percent']:.2f}% on "
              f"{record['num_pairs']} pairs after {record['steps']} steps; {record['wall_s']:.0f} s wall, "
              f"{record['cpu_s']:.0f} CPU-s; load {record['load_average_before']:.2f} -> "
              f"{record['load_average_after']:.2f}", flush=True)
    write_results(output, records)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
