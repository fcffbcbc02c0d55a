# The `launch/evaluate.py` pipeline: benchmarks by NAME=PATH, embeddings (model or feature file), metrics, report.
"""A benchmark is given as NAME=PATH; its kind follows from PATH:

- a `.bin` file: pair verification (10-fold accuracy, toolkit.eval.verification);
- a folder with `meta/ijbc_face_tid_mid.txt` or `meta/ijbb_face_tid_mid.txt`: IJB-C / IJB-B 1:1 (and 1:N when
  the 1:N CSVs are there), toolkit.eval.ijb;
- a folder of identity sub-folders of aligned faces (ROOT/IDENTITY/IMAGE), the `manifest.json` of FaceCL
  WebDataset shards (launch/prepare_data.py), or a `.npz` with arrays `features` (N x D) and `labels` (N):
  all-to-all 1:1, the MFR protocol (toolkit.eval.all_to_all).

Embeddings come from `model` (toolkit.eval.models.load_model) or from a feature file written by an earlier
run (`features_in`, toolkit.eval.features). Rank 0 writes `evaluation.json`, `table.md` and one ROC PNG per
IJB benchmark into `output_dir`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from toolkit.errors import FaceCLError
from toolkit.eval.extract import SKIP_MISSING, check_skipped, extract_embeddings, skip_counts, to_model_input

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class BenchmarkSpec:
    name: str
    path: Path
    kind: str  # "verification", "ijb", "all_to_all" (images) or "all_to_all_features" (.npz)


def parse_benchmark(spec: str) -> BenchmarkSpec:
    """NAME=PATH -> BenchmarkSpec, the kind detected from PATH (see the module docstring)."""
    from toolkit.eval.ijb import detect_prefix

    name, sep, raw = spec.partition("=")
    if not sep or not name or not raw:
        raise FaceCLError(f"--benchmark expects NAME=PATH, got {spec!r}")
    if "/" in name:
        raise FaceCLError(f"--benchmark name {name!r} must not contain '/'")
    path = Path(raw)
    if not path.exists():
        raise FaceCLError(f"benchmark {name}: path not found: {path}")
    if path.is_file() and path.suffix == ".bin":
        return BenchmarkSpec(name, path, "verification")
    if path.is_file() and path.suffix == ".npz":
        return BenchmarkSpec(name, path, "all_to_all_features")
    if path.is_file() and path.suffix == ".json":
        return BenchmarkSpec(name, path, "all_to_all_shards")
    if path.is_dir() and detect_prefix(path) is not None:
        return BenchmarkSpec(name, path, "ijb")
    if path.is_dir() and any(p.is_dir() for p in path.iterdir()):
        return BenchmarkSpec(name, path, "all_to_all")
    raise FaceCLError(f"benchmark {name}: {path} is none of: a .bin verification set, an IJB-B/IJB-C release "
                      "folder (meta/ijbc_face_tid_mid.txt), a folder of identity sub-folders, a shard "
                      "manifest.json, a .npz of features and labels")


class LabelledFolder(torch.utils.data.Dataset):
    """ROOT/IDENTITY/IMAGE aligned faces; label = index of IDENTITY in sorted order. Item = (image, status)."""

    def __init__(self, root: Path, image_size: int = 112):
        self.root, self.image_size = Path(root), image_size
        identities = sorted(p for p in self.root.iterdir() if p.is_dir())
        self.files, labels = [], []
        for label, folder in enumerate(identities):
            for file in sorted(folder.iterdir()):
                if file.suffix.lower() in IMAGE_SUFFIXES:
                    self.files.append(file)
                    labels.append(label)
        if not self.files:
            raise FaceCLError(f"{root}: no images in its identity sub-folders ({sorted(IMAGE_SUFFIXES)})")
        self.labels_N = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        from PIL import Image

        try:
            with Image.open(self.files[i]) as image:
                image = image.convert("RGB")
                if image.size != (self.image_size, self.image_size):
                    image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
                rgb = np.asarray(image)
        except (OSError, ValueError, SyntaxError):
            return torch.zeros(3, self.image_size, self.image_size), SKIP_MISSING
        return to_model_input(rgb), 0


class ShardFaces(torch.utils.data.Dataset):
    """Aligned faces of FaceCL WebDataset shards (a manifest.json from launch/prepare_data.py), read by
    offset through each shard's DALI index; labels from the `label.i32` members. Item = (image, status)."""

    def __init__(self, manifest_path: Path, image_size: int = 112):
        from toolkit.data.shards import IMAGE_EXT, LABEL_INT32_EXT, dali_index_path, load_manifest

        try:
            manifest = load_manifest(manifest_path)
        except (FileNotFoundError, ValueError) as exc:
            raise FaceCLError(str(exc)) from None
        self.image_size = image_size
        self.locations: list[tuple[Path, int, int]] = []  # (shard, offset, size) of each JPEG
        labels = []
        for entry in manifest.shards:
            shard = manifest.shard_path(entry)
            index = dali_index_path(shard)
            if not shard.is_file() or not index.is_file():
                raise FaceCLError(f"{manifest_path}: shard {shard} or its index {index} is missing")
            lines = index.read_text().splitlines()[1:]
            with open(shard, "rb") as handle:
                for line_number, line in enumerate(lines, 2):
                    fields = line.split()
                    members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2]))
                               for i in range(0, len(fields) - 3, 4)}
                    if IMAGE_EXT not in members or LABEL_INT32_EXT not in members:
                        raise FaceCLError(f"{index} line {line_number}: expected {IMAGE_EXT} and "
                                          f"{LABEL_INT32_EXT} members, got {sorted(members)}")
                    handle.seek(members[LABEL_INT32_EXT][0])
                    labels.append(int.from_bytes(handle.read(4), "little", signed=True))
                    self.locations.append((shard, *members[IMAGE_EXT]))
        if not self.locations:
            raise FaceCLError(f"{manifest_path}: the shards hold no samples")
        self.labels_N = np.array(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.locations)

    def __getitem__(self, i: int):
        from toolkit.data.jpeg import CorruptImageError, decode_rgb

        shard, offset, size = self.locations[i]
        try:
            with open(shard, "rb") as handle:
                handle.seek(offset)
                rgb = decode_rgb(handle.read(size), "pil")
        except (OSError, CorruptImageError):
            return torch.zeros(3, self.image_size, self.image_size), SKIP_MISSING
        if rgb.shape[:2] != (self.image_size, self.image_size):
            from PIL import Image

            rgb = np.asarray(Image.fromarray(rgb).resize((self.image_size, self.image_size), Image.BILINEAR))
        return to_model_input(rgb), 0


class _BinImages(torch.utils.data.Dataset):
    """A VerificationBin as (image, status) items; an undecodable image is skipped and counted."""

    def __init__(self, pairs):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        try:
            return self.pairs[i], 0
        except FaceCLError:
            return torch.zeros(3, self.pairs.image_size, self.pairs.image_size), SKIP_MISSING


def _dataset(spec: BenchmarkSpec, image_size: int):
    """(dataset of (image, status), context object the metrics need)."""
    if spec.kind == "verification":
        from toolkit.data.verification_bin import VerificationBin

        pairs = VerificationBin(spec.path, image_size=image_size)
        return _BinImages(pairs), pairs
    if spec.kind == "ijb":
        from toolkit.eval.ijb import IJBImages, load_release

        release = load_release(spec.path)
        return IJBImages(release, image_size), release
    if spec.kind == "all_to_all":
        folder = LabelledFolder(spec.path, image_size)
        return folder, folder
    if spec.kind == "all_to_all_shards":
        shards = ShardFaces(spec.path, image_size)
        return shards, shards
    raise AssertionError(spec.kind)


def _context_without_images(spec: BenchmarkSpec):
    """The metadata needed to score cached features (no image is decoded)."""
    if spec.kind == "verification":
        from toolkit.data.verification_bin import VerificationBin

        return VerificationBin(spec.path)
    if spec.kind == "ijb":
        from toolkit.eval.ijb import load_release

        return load_release(spec.path)
    if spec.kind == "all_to_all":
        return LabelledFolder(spec.path)
    if spec.kind == "all_to_all_shards":
        return ShardFaces(spec.path)
    raise AssertionError(spec.kind)


def _num_images(spec: BenchmarkSpec, context) -> int:
    return context.num_images if spec.kind == "ijb" else len(context)


def score_benchmark(spec: BenchmarkSpec, context, emb_ND: np.ndarray, status_N: np.ndarray, *,
                    output_dir: Path | None, detector_score_weighting: bool, compute_dtype, fars,
                    labels_N: np.ndarray | None = None, rank: int = 0, world_size: int = 1, group=None,
                    progress: bool = False) -> dict:
    """Metrics of one benchmark from its raw embeddings (every rank calls this; all-to-all splits work)."""
    result: dict = {"kind": "all_to_all" if spec.kind.startswith("all_to_all") else spec.kind,
                    "path": str(spec.path), "num_images": int(len(status_N)),
                    "num_skipped": int(np.count_nonzero(status_N)), "skipped": skip_counts(status_N)}
    if spec.kind == "verification":
        from toolkit.eval.verification import verification_accuracy

        emb = torch.nn.functional.normalize(torch.as_tensor(emb_ND), dim=1)
        dist_P = (emb[0::2] - emb[1::2]).pow(2).sum(dim=1)
        result.update(verification_accuracy(dist_P, context.is_same_P, 10).as_dict())
    elif spec.kind == "ijb":
        from toolkit.eval.ijb import identification_report, verification_1to1
        from toolkit.eval.roc import plot_roc

        verification, extras = verification_1to1(context, emb_ND, status_N,
                                                 detector_score_weighting=detector_score_weighting, fars=fars)
        result["benchmark"] = context.name
        result["verification"] = verification
        result["identification"] = identification_report(context, extras["template_ids"],
                                                         extras["template_features"])
        if output_dir is not None and rank == 0:
            png = plot_roc({spec.name: extras["roc"]}, output_dir / f"roc_{spec.name}.png",
                           title=f"{context.name} 1:1 ROC ({spec.name})")
            result["roc_png"] = str(png)
    else:
        from toolkit.eval.all_to_all import MFR_FARS, all_to_all_tar_at_far

        usable = np.asarray(status_N) == 0
        device = "cuda" if torch.cuda.is_available() else "cpu"
        result.update(all_to_all_tar_at_far(torch.as_tensor(emb_ND[usable]), labels_N[usable], MFR_FARS,
                                            device=device, compute_dtype=compute_dtype, rank=rank,
                                            world_size=world_size, group=group, progress=progress))
    return result


def default_output_dir(model: str | None, model_name: str) -> Path:
    """RUN/eval for a run folder (or RUN/checkpoints), so `--compare RUN_A RUN_B` finds it; else
    eval/<model name> in the working directory."""
    if model is not None and Path(model).is_dir():
        run = Path(model)
        if run.name == "checkpoints":
            run = run.parent
        return run / "eval"
    return Path("eval") / model_name


def run_evaluation(*, model: str | None, benchmarks: Sequence[str], features_in: str | None = None,
                   save_features: str | None = None, output_dir: str | Path | None = None, flip: bool = True,
                   batch_size: int = 128, num_workers: int = 2, device: str | None = None,
                   detector_score_weighting: bool = False, max_skipped_fraction: float = 0.01,
                   compute_dtype: torch.dtype | None = None, fars=None, rank: int = 0, world_size: int = 1,
                   group=None, progress: bool = True) -> dict:
    """Evaluate one model (or cached features) on every benchmark; returns the report (rank 0 writes it).
    Every input and output is checked before any image is embedded: a bad one is one FaceCLError line and
    leaves nothing behind."""
    from toolkit.eval.features import load_features
    from toolkit.eval.roc import DEFAULT_FARS

    fars = tuple(fars or DEFAULT_FARS)
    if model is not None and features_in is not None:
        raise FaceCLError("give one of --model and --features, not both")
    if not 0.0 <= max_skipped_fraction <= 1.0:
        raise FaceCLError(f"--max-skipped-fraction must be in [0, 1], got {max_skipped_fraction}")
    specs = [parse_benchmark(s) for s in benchmarks]
    if not specs:
        raise FaceCLError("give at least one --benchmark NAME=PATH")
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise FaceCLError(f"benchmark names must be unique, got {names}")
    # A .npz of features and labels carries its own embeddings: it needs no model.
    needs_embeddings = [s.name for s in specs if s.kind != "all_to_all_features"]
    if needs_embeddings and model is None and features_in is None:
        raise FaceCLError(f"benchmark(s) {', '.join(needs_embeddings)} need embeddings: give --model MODEL or "
                          f"--features FILE")
    if save_features is not None:
        check_features_output(Path(save_features))

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
        model_name = "+".join(Path(s.path).stem for s in specs)
    out = Path(output_dir) if output_dir is not None else default_output_dir(model, model_name)
    check_output_folder(out)
    created = rank == 0 and not out.exists()
    try:
        if rank == 0:
            out.mkdir(parents=True, exist_ok=True)
        return _evaluate(specs, embedder, cached, features_in, save_features, out, model, model_name, flip,
                         batch_size, num_workers, detector_score_weighting, max_skipped_fraction, compute_dtype,
                         fars, rank, world_size, group, progress)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()   # an evaluation that failed leaves no empty output folder behind
        raise


def _check_writable_folder(folder: Path, option: str, given: Path | None = None) -> None:
    """`folder` exists as a folder this process can write a file into, or can be created: tried for real (a
    probe file; what the probe created is removed again), since permission bits do not tell about read-only or
    special file systems. A one-line FaceCLError otherwise."""
    import shutil
    import tempfile

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


def check_output_folder(out: Path) -> None:
    """Before any work: the output folder is a folder this process can write (or create)."""
    if out.exists() and not out.is_dir():
        raise FaceCLError(f"--output {out} exists and is not a folder; give a folder for evaluation.json, table.md "
                          f"and the ROC plots")
    _check_writable_folder(out, "--output")


def check_features_output(path: Path) -> None:
    """Before any work: --save-features names a .npz file in a writable folder."""
    if path.suffix != ".npz":
        raise FaceCLError(f"--save-features {path}: feature files are .npz archives")
    if path.is_dir():
        raise FaceCLError(f"--save-features {path} is a folder; give a .npz file name")
    _check_writable_folder(path.parent, "--save-features", given=path)


def _evaluate(specs, embedder, cached, features_in, save_features, out, model, model_name, flip, batch_size,
              num_workers, detector_score_weighting, max_skipped_fraction, compute_dtype, fars, rank, world_size,
              group, progress) -> dict:
    """Embed (or read) and score every benchmark; rank 0 writes the report into `out`."""
    from toolkit.eval.features import load_labelled_features
    from toolkit.eval.features import save_features as write_features
    from toolkit.eval.table import format_markdown, table_row

    report: dict = {"model": model_name, "model_path": model, "features": features_in, "flip": flip,
                    "benchmarks": {}}
    to_save: dict[str, dict[str, np.ndarray]] = {}
    kinds: dict[str, str] = {}
    embedding_size = None
    for spec in specs:
        labels_N = None
        if spec.kind == "all_to_all_features":
            emb_ND, labels_N = load_labelled_features(spec.path)
            status_N = np.zeros(len(labels_N), dtype=np.int8)
            context = None
        elif embedder is None:
            if spec.name not in cached:
                raise FaceCLError(f"{features_in} has no features for benchmark {spec.name!r} "
                                  f"(it has {sorted(cached)})")
            context = _context_without_images(spec)
            entry = cached[spec.name]
            emb_ND, status_N = entry["features"], entry["status"]
            if len(emb_ND) != _num_images(spec, context):
                raise FaceCLError(f"{features_in}: benchmark {spec.name!r} has {len(emb_ND)} feature rows but "
                                  f"{spec.path} has {_num_images(spec, context)} images")
            labels_N = entry.get("labels")
        else:
            dataset, context = _dataset(spec, embedder.image_size)
            emb_ND, status_N = extract_embeddings(embedder, dataset, batch_size=batch_size,
                                                  num_workers=num_workers, flip=flip, rank=rank,
                                                  world_size=world_size, group=group, progress=progress,
                                                  desc=spec.name)
            if spec.kind in ("all_to_all", "all_to_all_shards"):
                labels_N = context.labels_N
        check_skipped(status_N, max_skipped_fraction, f"benchmark {spec.name} ({spec.path})")
        if embedding_size is not None and emb_ND.shape[1] != embedding_size:
            raise FaceCLError(f"benchmark {spec.name}: embeddings of dimension {emb_ND.shape[1]}, but the others "
                              f"have {embedding_size}")
        embedding_size = emb_ND.shape[1]
        if save_features is not None and spec.kind != "all_to_all_features":
            to_save[spec.name] = {"features": emb_ND, "status": status_N}
            if labels_N is not None:
                to_save[spec.name]["labels"] = labels_N
            kinds[spec.name] = spec.kind
        report["benchmarks"][spec.name] = score_benchmark(
            spec, context, emb_ND, status_N, output_dir=out, detector_score_weighting=detector_score_weighting,
            compute_dtype=compute_dtype, fars=fars, labels_N=labels_N, rank=rank, world_size=world_size,
            group=group, progress=progress)
    report["embedding_size"] = embedding_size
    report["table_row"] = table_row(report)
    if rank == 0:
        if save_features is not None:
            report["saved_features"] = str(write_features(save_features, to_save, kinds=kinds, model=model_name,
                                                          flip=flip))
        (out / "evaluation.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "table.md").write_text(format_markdown({model_name: report["table_row"]}) + "\n")
        report["output_dir"] = str(out)
    return report


def _pct(value, digits: int = 2) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def summary_lines(report: dict) -> list[str]:
    """Human-readable lines for the console: one per benchmark (two for IJB with 1:N)."""
    lines = []
    for name, r in report["benchmarks"].items():
        skipped = f" ({r['num_skipped']} skipped: {r['skipped']})" if r.get("num_skipped") else ""
        if r["kind"] == "verification":
            lines.append(f"{name}: accuracy {_pct(r['accuracy_mean'])}% +- {_pct(r['accuracy_std'])}% "
                         f"on {r['num_pairs']} pairs{skipped}")
        elif r["kind"] == "ijb":
            tars = ", ".join(f"{k}: {_pct(v['tar'])}" for k, v in r["verification"]["tar_at_far"].items())
            lines.append(f"{name} ({r['benchmark']} 1:1) TAR% at FAR {tars}{skipped}")
            ident = r.get("identification")
            if ident:
                m = ident["mean"]
                tpir = ", ".join(f"{k}: {_pct(v)}" for k, v in m["tpir_at_fpir"].items())
                lines.append(f"{name} ({r['benchmark']} 1:N, mean of G1/G2) rank-1 {_pct(m['rank1'])}% "
                             f"rank-5 {_pct(m['rank5'])}% TPIR% at FPIR {tpir}")
        else:
            tars = ", ".join(f"{k}: {_pct(v['tar'], 3)}" for k, v in r["tar_at_far"].items())
            lines.append(f"{name} (all-to-all over {r['num_images']} images, {r['num_genuine']} genuine / "
                         f"{r['num_impostor']} impostor pairs) TAR% at FAR {tars}{skipped}")
    return lines
