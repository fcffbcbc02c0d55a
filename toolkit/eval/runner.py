# The `launch/evaluate.py` pipeline: benchmarks by NAME=PATH, embeddings (model or feature file), metrics, report.
"""A benchmark is given as NAME=PATH; its kind follows from PATH, asked of every registered kind in a fixed
order (toolkit.eval.benchmark.benchmark_for). The built-in kinds:

- `verification` (toolkit.eval.verification): a `.bin` file, 10-fold pair accuracy;
- `ijb` (toolkit.eval.ijb): a folder with `meta/ijbc_face_tid_mid.txt` or `meta/ijbb_face_tid_mid.txt`,
  IJB-C / IJB-B 1:1 (and 1:N when the 1:N CSVs are there);
- `all_to_all` (toolkit.eval.all_to_all): a folder of identity sub-folders of aligned faces
  (ROOT/IDENTITY/IMAGE), the `manifest.json` of FaceCL WebDataset shards (launch/prepare_data.py), or a
  `.npz` with arrays `features` (N x D) and `labels` (N); all-to-all 1:1, the MFR protocol.

Embeddings come from `model` (toolkit.eval.models.load_model), from a feature file written by an earlier
run (`features_in`, toolkit.eval.features), or from the benchmark's input itself (a .npz of features). Each
benchmark scores them and words its console lines and table cells; this module names no kind. Rank 0
writes `evaluation.json`, `table.md` and one ROC PNG per IJB benchmark into `output_dir`, or by default into a
new folder per evaluation (toolkit.eval.outputs: no evaluation replaces another unless told to).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from toolkit.errors import FaceCLError
from toolkit.eval.benchmark import Benchmark, EvalSettings, benchmark_class, benchmark_for, benchmark_label
from toolkit.eval.extract import check_skipped, extract_embeddings
from toolkit.eval.outputs import (check_default_base, check_evaluation_name, check_features_output, check_output_folder,
                                  default_output_base, earlier_results, first_missing, new_evaluation_folder,
                                  point_latest_at, remove_if_empty, remove_stale_plots)


def parse_benchmark(spec: str, settings: EvalSettings | None = None) -> Benchmark:
    """NAME=PATH -> the Benchmark of PATH (toolkit.eval.benchmark.benchmark_for; no metadata read yet)."""
    name, sep, raw = spec.partition("=")
    if not sep or not name or not raw:
        raise FaceCLError(f"--benchmark expects NAME=PATH, got {spec!r}")
    if "/" in name:
        raise FaceCLError(f"--benchmark name {name!r} must not contain '/'")
    return benchmark_for(Path(raw), name, settings)


def run_evaluation(*, model: str | None, benchmarks: Sequence[str], features_in: str | None = None,
                   save_features: str | None = None, output_dir: str | Path | None = None, flip: bool = True,
                   batch_size: int = 128, num_workers: int = 2, device: str | None = None,
                   detector_score_weighting: bool = False, keep_image_norm: bool = False,
                   max_skipped_fraction: float = 0.01,
                   compute_dtype: torch.dtype | None = None, fars=None, rank: int = 0, world_size: int = 1,
                   group=None, progress: bool = True, overwrite: bool = False, name: str | None = None) -> dict:
    """Evaluate one model (or cached features) on every benchmark; returns the report (rank 0 writes it).
    Every input and output is checked before any image is embedded: a bad one is one FaceCLError line and
    leaves nothing behind. Without `output_dir` the results go into a new folder (`name` labels it) of the
    model's default output base, and its `latest` link moves there (toolkit.eval.outputs); an `output_dir`
    that holds results is refused unless `overwrite`."""
    from toolkit.eval.features import load_features
    from toolkit.eval.roc import DEFAULT_FARS

    if model is not None and features_in is not None:
        raise FaceCLError("give one of --model and --features, not both")
    if not 0.0 <= max_skipped_fraction <= 1.0:
        raise FaceCLError(f"--max-skipped-fraction must be in [0, 1], got {max_skipped_fraction}")
    settings = EvalSettings(batch_size=batch_size, num_workers=num_workers, flip=flip, fars=tuple(fars or DEFAULT_FARS),
                            detector_score_weighting=detector_score_weighting, keep_image_norm=keep_image_norm,
                            compute_dtype=compute_dtype,
                            max_skipped_fraction=max_skipped_fraction, progress=progress)
    parsed = [parse_benchmark(s, settings) for s in benchmarks]
    if not parsed:
        raise FaceCLError("give at least one --benchmark NAME=PATH")
    check_unique_names([b.name for b in parsed])
    # A benchmark whose input holds its embeddings (a .npz of features and labels) needs no model.
    needs_embeddings = [b.name for b in parsed if not b.carries_embeddings]
    if needs_embeddings and model is None and features_in is None:
        raise FaceCLError(f"benchmark(s) {', '.join(needs_embeddings)} need embeddings: give --model MODEL or "
                          f"--features FILE")
    check_given_outputs(output_dir, save_features, name, overwrite)

    embedder, cached, cached_meta = None, {}, {}
    if features_in is not None:
        cached_meta, cached = load_features(features_in)
        model_name = cached_meta.get("model") or Path(features_in).stem
        flip = bool(cached_meta.get("flip", flip))
    elif model is not None:
        from toolkit.eval.models import load_model

        embedder = load_model(model, device)
        model_name = embedder.name
    else:
        model_name = "+".join(Path(b.path).stem for b in parsed)
    base = None if output_dir is not None else default_output_base(model, model_name)
    if base is not None:
        check_default_base(base)
    out, created = _open_output(output_dir, base, name, rank)
    earlier = earlier_results(out) if output_dir is not None and rank == 0 else []
    try:
        report = _evaluate(parsed, embedder, cached, features_in, save_features, out, model, model_name, flip,
                           settings, rank, world_size, group)
    except BaseException:
        if out is not None:
            remove_if_empty(out, created)   # an evaluation that failed leaves no empty output folder behind
        raise
    if rank == 0:
        remove_stale_plots(out, earlier, report)
        if base is not None:
            report["latest"] = str(point_latest_at(out))
    return report


def check_unique_names(names: list[str]) -> None:
    """Benchmark names are unique, also as the results table spells them (lfw and LFW are both its LFW)."""
    if len(set(names)) != len(names):
        raise FaceCLError(f"benchmark names must be unique, got {names}")
    labels = [benchmark_label(name) for name in names]
    clashing = sorted({name for name, label in zip(names, labels) if labels.count(label) > 1})
    if clashing:
        raise FaceCLError(f"benchmark names {', '.join(clashing)} are one column name of the results table "
                          f"({benchmark_label(clashing[0])}); rename one")


def check_given_outputs(output_dir: str | Path | None, save_features: str | None, name: str | None,
                        overwrite: bool) -> None:
    """Before the model is loaded: --name, --output and --save-features (no earlier results unless overwrite)."""
    check_evaluation_name(name)
    if output_dir is not None:
        if name is not None:
            raise FaceCLError("--name labels the new folder of the default output; with --output DIR, name DIR itself")
        check_output_folder(Path(output_dir), overwrite)
    if save_features is not None:
        check_features_output(Path(save_features), overwrite)


def _open_output(output_dir: str | Path | None, base: Path | None, name: str | None,
                 rank: int) -> tuple[Path | None, Path | None]:
    """(the folder rank 0 writes into, the outermost folder created for it, to remove when the evaluation fails
    and leaves it empty). Other ranks write nothing: (the given folder or None, None)."""
    if output_dir is not None:
        out = Path(output_dir)
        if rank != 0:
            return out, None
        created = first_missing(out)
        out.mkdir(parents=True, exist_ok=True)
        return out, created
    if rank != 0:
        return None, None
    created = first_missing(base)
    folder = new_evaluation_folder(base, name)
    return folder, created or folder


def _embeddings(benchmark: Benchmark, embedder, cached: dict, features_in, flip: bool, settings: EvalSettings,
                rank: int, world_size: int, group) -> tuple[np.ndarray, np.ndarray]:
    """(raw embeddings N x D, status N) of one benchmark: its own, the feature file's, or the model's."""
    if benchmark.carries_embeddings:
        return benchmark.own_embeddings()
    if embedder is None:
        name = benchmark.name
        if name not in cached:
            raise FaceCLError(f"{features_in} has no features for benchmark {name!r} (it has {sorted(cached)})")
        benchmark.load()   # the metadata only: no image is decoded
        emb_ND, status_N = cached[name]["features"], cached[name]["status"]
        if len(emb_ND) != benchmark.num_images:
            raise FaceCLError(f"{features_in}: benchmark {name!r} has {len(emb_ND)} feature rows but "
                              f"{benchmark.path} has {benchmark.num_images} images")
        return emb_ND, status_N
    benchmark.load()
    return extract_embeddings(embedder, benchmark.images(embedder.image_size), batch_size=settings.batch_size,
                              num_workers=settings.num_workers, flip=flip, rank=rank, world_size=world_size,
                              group=group, progress=settings.progress, desc=benchmark.name)


def _evaluate(benchmarks: list[Benchmark], embedder, cached, features_in, save_features, out, model, model_name,
              flip, settings: EvalSettings, rank, world_size, group) -> dict:
    """Embed (or read) and score every benchmark; rank 0 writes the report into `out`."""
    from toolkit.eval.features import save_features as write_features
    from toolkit.eval.table import evaluation_markdown, table_notes, table_row

    report: dict = {"model": model_name, "model_path": model, "features": features_in, "flip": flip,
                    "benchmarks": {}}
    to_save: dict[str, dict[str, np.ndarray]] = {}
    kinds: dict[str, str] = {}
    embedding_size = None
    for benchmark in benchmarks:
        name = benchmark.name
        emb_ND, status_N = _embeddings(benchmark, embedder, cached, features_in, flip, settings, rank, world_size,
                                       group)
        check_skipped(status_N, settings.max_skipped_fraction, f"benchmark {name} ({benchmark.path})")
        if embedding_size is not None and emb_ND.shape[1] != embedding_size:
            raise FaceCLError(f"benchmark {name}: embeddings of dimension {emb_ND.shape[1]}, but the others "
                              f"have {embedding_size}")
        embedding_size = emb_ND.shape[1]
        if save_features is not None and not benchmark.carries_embeddings:
            to_save[name] = {"features": emb_ND, "status": status_N, **benchmark.saved_arrays()}
            kinds[name] = benchmark.saved_kind
        report["benchmarks"][name] = benchmark.score(emb_ND, status_N, output_dir=out, rank=rank,
                                                     world_size=world_size, group=group, model_name=model_name)
    report["embedding_size"] = embedding_size
    report["table_row"] = table_row(report)
    report["table_notes"] = table_notes(report)
    if rank == 0:
        if save_features is not None:
            report["saved_features"] = str(write_features(save_features, to_save, kinds=kinds, model=model_name,
                                                          flip=flip))
        (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "table.md").write_text(evaluation_markdown(report) + "\n")
        report["output_dir"] = str(out)
    return report


def summary_lines(report: dict) -> list[str]:
    """Human-readable lines for the console: each benchmark's own (toolkit.eval.benchmark, summary_lines)."""
    lines = []
    for name, result in report["benchmarks"].items():
        kind = benchmark_class(result["kind"])
        if kind is not None:
            lines.extend(kind.summary_lines(name, result))
    return lines
