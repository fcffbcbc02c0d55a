# Feature files: the extracted embeddings of each benchmark, cached in a .npz (no pickle) for re-scoring.
"""A feature file is a numpy .npz archive read with allow_pickle=False (it cannot run code when loaded):

    __meta__                JSON text: {"format": "facecl-features-1", "model", "flip", "embedding_size",
                            "benchmarks": {NAME: {"kind", "num_images"}}}
    NAME/features           N x D float32, raw flip-summed embeddings (not normalised)
    NAME/status             N int8, 0 = usable, else why the image was skipped
    NAME/labels             N int64 identity labels (all-to-all benchmarks only)

Every array is checked against the metadata when read: a file whose features have another dimension,
another image count, or arrays missing, is refused with an error naming the benchmark and the numbers.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from toolkit.errors import FaceCLError

FORMAT = "facecl-features-1"


def save_features(path: str | Path, benchmarks: dict[str, dict[str, np.ndarray]], *, kinds: dict[str, str],
                  model: str, flip: bool) -> Path:
    """Write {name: {"features", "status"[, "labels"]}} with its metadata; returns the path written."""
    path = Path(path)
    if path.suffix != ".npz":
        raise FaceCLError(f"feature files are .npz archives, got {path}")
    dims = {arrays["features"].shape[1] for arrays in benchmarks.values()}
    if len(dims) > 1:
        raise FaceCLError(f"benchmarks have embeddings of different dimensions {sorted(dims)}")
    meta = {"format": FORMAT, "model": model, "flip": flip, "embedding_size": dims.pop() if dims else None,
            "benchmarks": {name: {"kind": kinds[name], "num_images": int(arrays["features"].shape[0])}
                           for name, arrays in benchmarks.items()}}
    arrays = {"__meta__": np.array(json.dumps(meta))}
    for name, entry in benchmarks.items():
        for key, value in entry.items():
            arrays[f"{name}/{key}"] = np.asarray(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)
    return path


def load_features(path: str | Path) -> tuple[dict, dict[str, dict[str, np.ndarray]]]:
    """(metadata, {name: arrays}) of a feature file, validated (see the module docstring)."""
    path = Path(path)
    if not path.is_file():
        raise FaceCLError(f"feature file not found: {path}")
    try:
        archive = np.load(path, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError):
        raise FaceCLError(f"{path} is not a valid feature file (not a .npz archive of arrays)") from None
    if not isinstance(archive, np.lib.npyio.NpzFile) or "__meta__" not in archive.files:
        raise FaceCLError(f"{path} is not a FaceCL feature file: no __meta__ entry")
    try:
        with archive:
            meta = json.loads(str(archive["__meta__"]))
            entries: dict[str, dict[str, np.ndarray]] = {}
            for key in archive.files:
                if key == "__meta__":
                    continue
                name, _, array = key.rpartition("/")
                entries.setdefault(name, {})[array] = archive[key]
    except (ValueError, json.JSONDecodeError) as exc:
        raise FaceCLError(f"{path}: unreadable feature file ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise FaceCLError(f"{path} is not a valid feature file: format {found!r}, expected {FORMAT!r}")
    _check_meta(meta, path)
    dim = meta.get("embedding_size")
    for name, info in meta["benchmarks"].items():
        entry = entries.get(name, {})
        for required in ("features", "status"):
            if required not in entry:
                raise FaceCLError(f"{path}: benchmark {name!r} has no {required} array")
        feats = entry["features"]
        if feats.ndim != 2 or feats.shape[1] != dim:
            raise FaceCLError(f"{path}: benchmark {name!r} features have shape {feats.shape}, expected "
                              f"N x {dim} (the file's embedding_size)")
        if feats.shape[0] != info["num_images"] or entry["status"].shape != (info["num_images"],):
            raise FaceCLError(f"{path}: benchmark {name!r} has {feats.shape[0]} feature rows and "
                              f"{entry['status'].shape} statuses, expected {info['num_images']}")
        entry["features"] = feats.astype(np.float32, copy=False)
    return meta, entries


def _check_meta(meta: dict, path: Path) -> None:
    """The metadata's shape: {"benchmarks": {NAME: {"kind": str, "num_images": int}}, "embedding_size": int}."""
    benchmarks = meta.get("benchmarks")
    problem = None
    if not isinstance(benchmarks, dict):
        problem = f"its benchmarks entry is a {type(benchmarks).__name__}, not a table of benchmarks"
    elif not isinstance(meta.get("embedding_size"), int) and benchmarks:
        problem = f"its embedding_size is {meta.get('embedding_size')!r}"
    else:
        for name, info in benchmarks.items():
            if not isinstance(info, dict) or not isinstance(info.get("num_images"), int) or \
                    not isinstance(info.get("kind"), str):
                problem = f"benchmark {name!r} has no kind or no num_images in its metadata"
                break
    if problem:
        raise FaceCLError(f"{path} is not a valid feature file: {problem}")


def load_labelled_features(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(features N x D, labels N) of a plain .npz with arrays `features` and `labels` (all-to-all input
    computed elsewhere), or of a feature file holding exactly one all-to-all benchmark."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "features" in archive.files and "labels" in archive.files:
                feats, labels = archive["features"], archive["labels"]
                if feats.ndim != 2 or labels.shape != (feats.shape[0],):
                    raise FaceCLError(f"{path}: features {feats.shape} and labels {labels.shape} do not match "
                                      "(expected N x D and N)")
                return feats.astype(np.float32), labels.astype(np.int64)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError):
        raise FaceCLError(f"{path} is not a valid feature file (not a .npz archive of arrays)") from None
    meta, entries = load_features(path)
    labelled = [(n, e) for n, e in entries.items() if "labels" in e]
    if len(labelled) != 1:
        raise FaceCLError(f"{path}: expected arrays 'features' and 'labels', or one all-to-all benchmark")
    entry = labelled[0][1]
    usable = entry["status"] == 0
    return entry["features"][usable], entry["labels"][usable].astype(np.int64)
