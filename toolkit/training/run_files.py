# The run folder: its creation check, resolved.yaml and engine files, and results.json as strict JSON.
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.config import Recipe, dump_recipe
from toolkit.errors import FaceCLError


@dataclass
class TrainResult:
    """What a finished run reports; also written to <run>/results.json."""

    final_step: int
    losses: list[tuple[int, float]] = field(default_factory=list)   # (optimizer step, mean loss of the step)
    evaluations: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0
    stopped_by: str | None = None   # the stop signal that ended the run early (see toolkit/distributed/signals.py)
    status: str = "completed"       # completed | stopped | diverged | stalled | failed (see RUN_STATUSES)
    message: str = ""               # why it ended early (the error line)


# How a run ended -> the exit status launch/train.py gives it (the launchers may report their own instead:
# torchrun reports 1 for any failed rank; the run's own status is always in results.json).
RUN_STATUSES = {"completed": 0, "failed": 2, "diverged": 3, "stalled": 4, "stopped": 75}


def prepare_run_folder(recipe: Recipe) -> Path:
    """Create <output_dir>/<name> and check it is writable; a one-line error otherwise."""
    run_dir = Path(recipe.run.output_dir) / recipe.run.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{os.getpid()}"  # one per process: ranks may share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise FaceCLError(f"run.output_dir {recipe.run.output_dir!r}: cannot write run folder {run_dir} "
                          f"({exc.strerror or exc})") from None
    return run_dir


def write_run_files(run_dir: Path, recipe: Recipe, engine_files: dict[str, str]) -> list[Path]:
    """resolved.yaml and the engine's own files (e.g. the rendered DeepSpeed config), rank 0 only."""
    written = [run_dir / "resolved.yaml"]
    written[0].write_text(dump_recipe(recipe))
    for name, text in engine_files.items():
        written.append(run_dir / name)
        written[-1].write_text(text)
    return written


def strict_json_values(value):
    """(value with every non-finite float replaced by None, how many were replaced): JSON has no inf/nan."""
    if isinstance(value, float):
        return (value, 0) if math.isfinite(value) else (None, 1)
    if isinstance(value, dict):
        items = [(key, *strict_json_values(item)) for key, item in value.items()]
        return {key: item for key, item, _ in items}, sum(count for _, _, count in items)
    if isinstance(value, (list, tuple)):
        items = [strict_json_values(item) for item in value]
        return [item for item, _ in items], sum(count for _, count in items)
    return value, 0


def write_results_json(path: Path, payload: dict) -> Path:
    """results.json that strict parsers accept: inf/nan become null and `has_nonfinite_values` says so."""
    payload, replaced = strict_json_values(payload)
    payload["has_nonfinite_values"] = replaced > 0
    path.write_text(json.dumps(payload, indent=1, allow_nan=False))
    return path
