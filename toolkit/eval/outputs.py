# Where evaluation results go: a new folder per evaluation, a `latest` link, no silent overwrite of a given folder.
"""No evaluation replaces an earlier one without being told to.

Default output (no `--output`): a new folder `BASE/<UTC time>[-NAME]` per evaluation, e.g.
`runs/r100/eval/20250301T142501Z-lfw`, and the link `BASE/latest` pointing at the newest one (moved only
after an evaluation has written its results). BASE is `RUN/eval` for a run folder and
`eval_results/<model name>` (in the working directory; .gitignore covers it) for any other model. Two
evaluations started in the same second get `-2`, `-3` ... appended.

Explicit output (`--output DIR`): refused, before any work, when DIR already holds results
(evaluation.json, table.md, roc_*.png; comparison.json or comparison.md for `--compare`) unless `overwrite`;
then the new results replace them and the earlier evaluation's ROC plots that this one did not draw are
removed. The same holds for a `--save-features` file.

`find_report` reads an evaluation back for `--compare`: an evaluation.json, its folder, or a folder whose
`latest` (or whose `eval/latest`) leads to one; a run evaluated before this layout (RUN/eval/evaluation.json)
is found too.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from toolkit.errors import FaceCLError

REPORT_NAME = "evaluation.json"
LATEST = "latest"
NON_RUN_ROOT = Path("eval_results")           # default BASE of a model that is not a run folder: ROOT/<model>
EVALUATION_FILES = (REPORT_NAME, "table.md")  # plus roc_*.png
COMPARISON_FILES = ("comparison.json", "comparison.md")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


# ----- where a new evaluation goes ------------------------------------------------------------------------

def default_output_base(model: str | None, model_name: str) -> Path:
    """RUN/eval for a run folder (or its checkpoints/ folder), so `--compare RUN` finds it; else
    eval_results/<model name> in the working directory."""
    if model is not None and Path(model).is_dir():
        run = Path(model)
        if run.name == "checkpoints":
            run = run.parent
        return run / "eval"
    return NON_RUN_ROOT / model_name


def check_evaluation_name(name: str | None) -> None:
    """`--name` is one plain folder-name part (letters, digits, '.', '_', '-'), not 'latest'."""
    if name is not None and (not _NAME.fullmatch(name) or name == LATEST):
        raise FaceCLError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (not starting with one of the "
                          f"last three), and not {LATEST!r}")


def check_default_base(base: Path) -> None:
    """Before any work: BASE can be written, and BASE/latest is a link this process may move (or absent)."""
    latest = base / LATEST
    if latest.exists() and not latest.is_symlink():
        raise FaceCLError(f"{latest} is not the link to the newest evaluation this toolkit keeps there; move it "
                          f"away or give --output DIR")
    check_writable_folder(base, "default output folder")


def new_evaluation_folder(base: Path, name: str | None = None, now: datetime | None = None) -> Path:
    """Create and return BASE/<UTC time>[-NAME] (with -2, -3 ... when an evaluation took it in the same second)."""
    stamp = (now or datetime.now(timezone.utc)).strftime("%Y%m%dT%H%M%SZ")
    stem = f"{stamp}-{name}" if name else stamp
    base.mkdir(parents=True, exist_ok=True)
    for attempt in itertools.count(1):
        folder = base / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            folder.mkdir()
            return folder
        except FileExistsError:
            continue
    raise AssertionError("unreachable")


def point_latest_at(folder: Path) -> Path:
    """Move FOLDER/../latest to FOLDER (a relative link, replaced in one step); returns the link."""
    latest = folder.parent / LATEST
    staging = folder.parent / f".{LATEST}.{os.getpid()}"
    if staging.is_symlink() or staging.exists():
        staging.unlink()
    staging.symlink_to(folder.name, target_is_directory=True)
    os.replace(staging, latest)
    return latest


# ----- a given output -------------------------------------------------------------------------------------

def earlier_results(folder: Path, names: tuple[str, ...] = EVALUATION_FILES, plots: bool = True) -> list[str]:
    """The result files of an earlier evaluation (or comparison) in FOLDER, sorted."""
    if not folder.is_dir():
        return []
    found = [n for n in names if (folder / n).is_file()]
    if plots:
        found += [p.name for p in folder.glob("roc_*.png")]
    return sorted(found)


def refuse_earlier_results(folder: Path, overwrite: bool, names: tuple[str, ...] = EVALUATION_FILES,
                           plots: bool = True) -> None:
    """One FaceCLError line when FOLDER holds earlier results and `overwrite` is not set."""
    held = earlier_results(folder, names, plots)
    if held and not overwrite:
        shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if len(held) > 3 else "")
        raise FaceCLError(f"--output {folder} already holds results ({shown}); pass --overwrite to replace them, "
                          f"or leave out --output for a new folder per evaluation")


def check_output_folder(out: Path, overwrite: bool = False) -> None:
    """Before any work: --output is a folder this process can write (or create), without earlier results
    unless `overwrite`."""
    if out.exists() and not out.is_dir():
        raise FaceCLError(f"--output {out} exists and is not a folder; give a folder for evaluation.json, table.md "
                          f"and the ROC plots")
    refuse_earlier_results(out, overwrite)
    check_writable_folder(out, "--output")


def remove_stale_plots(folder: Path, earlier: list[str], report: dict) -> None:
    """After an --overwrite: the ROC plots of the replaced evaluation that this one did not draw."""
    drawn = {Path(r["roc_png"]).name for r in report.get("benchmarks", {}).values() if r.get("roc_png")}
    for name in earlier:
        if name.startswith("roc_") and name not in drawn:
            (folder / name).unlink(missing_ok=True)


def check_features_output(path: Path, overwrite: bool = False) -> None:
    """Before any work: --save-features names a .npz file in a writable folder, new unless `overwrite`."""
    if path.suffix != ".npz":
        raise FaceCLError(f"--save-features {path}: feature files are .npz archives")
    if path.is_dir():
        raise FaceCLError(f"--save-features {path} is a folder; give a .npz file name")
    if path.exists() and not overwrite:
        raise FaceCLError(f"--save-features {path} already exists; pass --overwrite to replace it")
    check_writable_folder(path.parent, "--save-features", given=path)


def check_writable_folder(folder: Path, option: str, given: Path | None = None) -> None:
    """`folder` exists as a folder this process can write a file into, or can be created: tried for real (a
    probe file; what the probe created is removed again), since permission bits do not tell about read-only or
    special file systems. A one-line FaceCLError otherwise."""
    missing = []
    probe_root = folder
    while not probe_root.exists() and probe_root != probe_root.parent:
        missing.append(probe_root)
        probe_root = probe_root.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".facecl-write-test."):
            pass
    except OSError as exc:
        reason = "a file is in the way" if isinstance(exc, (FileExistsError, NotADirectoryError)) else \
            (exc.strerror or str(exc)).lower()
        where = f"{given}: cannot write its folder {folder}" if given is not None else f"{folder}: cannot write there"
        raise FaceCLError(f"{option} {where} ({reason})") from None
    finally:
        if missing:
            shutil.rmtree(missing[-1], ignore_errors=True)


def remove_if_empty(folder: Path, up_to: Path | None) -> None:
    """Remove FOLDER and its parents up to (and including) UP_TO while they are empty: what a failed
    evaluation created and left empty."""
    if up_to is None:
        return
    current = folder
    while current.is_dir() and not any(current.iterdir()):
        current.rmdir()
        if current == up_to:
            break
        current = current.parent


def first_missing(folder: Path) -> Path | None:
    """The outermost folder of FOLDER's path that does not exist yet (what creating FOLDER would create)."""
    if folder.exists():
        return None
    current = folder
    while not current.parent.exists() and current.parent != current:
        current = current.parent
    return current


# ----- reading results back -------------------------------------------------------------------------------

def _through_latest(folder: Path) -> Path | None:
    """FOLDER/latest resolved to the evaluation folder it names (FOLDER/<time>), when it leads to a report."""
    latest = folder / LATEST
    if not (latest / REPORT_NAME).is_file():
        return None
    return folder / os.readlink(latest) if latest.is_symlink() else latest


def find_report(path: str | Path) -> Path:
    """An evaluation.json, or a folder holding one directly, through `latest`, through `eval/latest`, or (a run
    evaluated before evaluations had folders of their own) in eval/."""
    path = Path(path)
    if path.is_file():
        return path
    candidates = [path, _through_latest(path), _through_latest(path / "eval"), path / "eval"]
    for folder in candidates:
        if folder is not None and (folder / REPORT_NAME).is_file():
            return folder / REPORT_NAME
    raise FaceCLError(f"no {REPORT_NAME} at {path} (give an evaluation.json, the folder that holds it, or a folder "
                      f"with a {LATEST} link to one)")
