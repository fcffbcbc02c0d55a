# Where a benchmark writes its JSON: never over a committed result unless the user asks for it.
from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
QUICK_MODE_NOTE = ("quick mode: tiny shapes and one repeat check that the benchmark runs; its timings and ratios "
                   "mean nothing (run without --quick for figures)")


def results_path(requested: Path | None, default_name: str, *, overwrite: bool = False, quick: bool = False) -> Path:
    """`requested` when given (an existing file only with overwrite=True); otherwise results/<default_name>.json,
    or results/<default_name>-<UTC time>.json when that file exists already (e.g. the committed figures).
    A quick-mode run's figures mean nothing: without `requested` they go to a new temporary folder."""
    if requested is not None:
        if requested.exists() and not overwrite:
            raise SystemExit(f"error: {requested} exists; pass --overwrite to replace it")
        return requested
    if quick:
        return Path(tempfile.mkdtemp(prefix="facecl-bench-")) / f"{default_name}.json"
    path = RESULTS_DIR / f"{default_name}.json"
    if path.exists() and not overwrite:
        path = RESULTS_DIR / f"{default_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    return path


def environment_record() -> dict:
    """Where and when figures were measured: host, CPUs, OMP_NUM_THREADS, Python, UTC date."""
    return {"host": platform.node(), "cpus": os.cpu_count(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS", "unset"),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write_results(output: Path, results: dict) -> None:
    """{"environment": ..., "results": results} as indented JSON at `output` (from results_path); says where."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps({"environment": environment_record(), "results": results}, indent=2) + "\n")
    print(f"written: {output}")
