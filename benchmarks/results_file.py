# Where a benchmark writes its JSON: never over a committed result unless the user asks for it.
from __future__ import annotations

import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def results_path(requested: Path | None, default_name: str, *, overwrite: bool = False) -> Path:
    """`requested` when given (an existing file only with overwrite=True); otherwise results/<default_name>.json,
    or results/<default_name>-<UTC time>.json when that file exists already (e.g. the committed figures)."""
    if requested is not None:
        if requested.exists() and not overwrite:
            raise SystemExit(f"error: {requested} exists; pass --overwrite to replace it")
        return requested
    path = RESULTS_DIR / f"{default_name}.json"
    if path.exists() and not overwrite:
        path = RESULTS_DIR / f"{default_name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    return path
