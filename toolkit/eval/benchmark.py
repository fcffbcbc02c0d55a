# The benchmark protocol and its registry: one class per kind, found from a path, used by evaluate.py and the trainer.
"""A benchmark kind is one `Benchmark` subclass registered with `@register_benchmark("kind")`. It knows

- whether a path is one of its inputs (`detect`, a class method); `benchmark_for(path)` asks every
  registered kind once, in a fixed order (`order`, then registration), and takes the first that says yes;
- what to embed: `images(image_size)`, a dataset of (image 3 x S x S in [-1, 1], status) items, and
  `num_images`, read from the metadata without decoding an image (to check cached features); a kind whose
  input already holds embeddings (`carries_embeddings`) returns them from `own_embeddings()` instead;
- how to score raw flip-summed embeddings (`score`, the dict of evaluation.json, whose "kind" is the
  registered kind), turn that into console lines (`summary_lines`) and results-table cells (`table_cells`:
  one `TableCell` per metric the entry holds, in the kind's order, named after `benchmark_label(name)`; a
  metric the entry could not measure is a cell without value that says why);
- how to evaluate the model being trained (`evaluate`, the fields of the trainer's entry in results.json)
  and which of those numbers the training log and TensorBoard show (`scalars`).

`launch/evaluate.py` (toolkit.eval.runner) and the trainer (toolkit.training.builders.build_val_sets) hold
the same objects; neither names a kind. Metadata is read on first use (`load()` reads it now), so that
parsing the command line stays cheap and every input error comes before an image is embedded.

Adding a kind: a module with the protocol and a `@register_benchmark` subclass, and its import in
`_load_builtin_kinds` below (the built-in kinds register themselves when imported).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar, TypeVar

import numpy as np
import torch

from toolkit.errors import FaceCLError
from toolkit.eval.roc import DEFAULT_FARS


@dataclass(frozen=True)
class EvalSettings:
    """How benchmarks embed and score: launch/evaluate.py's flags, or the recipe's eval section in training.
    Each kind reads the fields it needs."""

    image_size: int = 112             # training: the recipe's (launch/evaluate.py takes the model's)
    batch_size: int = 128
    num_workers: int = 2
    flip: bool = True                 # embed f(x) + f(flip(x))
    num_folds: int = 10               # pair verification
    fars: tuple[float, ...] = DEFAULT_FARS   # TAR at these FARs (IJB 1:1)
    detector_score_weighting: bool = False   # IJB
    keep_image_norm: bool = False            # IJB: insightface's use_norm_score mode (toolkit.eval.ijb)
    max_pairs: int | None = None      # IJB in training: a seeded subset of the pairs (None: every pair)
    seed: int = 0
    compute_dtype: torch.dtype | None = None  # all-to-all score matmul
    max_skipped_fraction: float = 0.01
    progress: bool = False


Embed = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class TableCell:
    """One results-table cell: `value` in percent, or None and the `reason` (the footnote of its '-')."""

    column: str
    value: float | None
    reason: str | None = None

    @classmethod
    def of_fraction(cls, column: str, fraction: float | None, reason: str | None = None) -> "TableCell":
        """A cell from a fraction in [0, 1] (None: not measured, for `reason`)."""
        if fraction is None:
            return cls(column, None, reason or "not measured (the results give no reason)")
        return cls(column, 100.0 * fraction)


def tar_at_far_cells(label: str, tar_at_far: dict, num_impostors: int | None) -> list[TableCell]:
    """Cells 'LABEL 1e-4' of TAR at FAR points (toolkit.eval.roc), in their order. A point without TAR gives its
    `reason`; one written before points carried it gets it from `num_impostors`."""
    from toolkit.eval.roc import far_label, too_few_impostors

    cells = []
    for key, point in tar_at_far.items():
        far = float(key)
        reason = point.get("reason") or (too_few_impostors(far, num_impostors) if num_impostors is not None else None)
        cells.append(TableCell.of_fraction(f"{label} {far_label(far)}", point.get("tar"), reason))
    return cells


# Benchmarks papers name: the table shows these spellings, and in this order before any other of the same kind.
KNOWN_BENCHMARKS = ("LFW", "CFP-FP", "CFP-FF", "AgeDB-30", "CALFW", "CPLFW", "VGG2-FP", "IJB-B", "IJB-C")
_KNOWN_BY_KEY = {label.lower().replace("-", ""): label for label in KNOWN_BENCHMARKS}


def benchmark_label(name: str) -> str:
    """The results table's name of benchmark `name`: a known one's usual spelling (lfw, cfp_fp, agedb_30, ijbc ->
    LFW, CFP-FP, AgeDB-30, IJB-C; case, '-' and '_' ignored), else `name` as given."""
    return _KNOWN_BY_KEY.get(name.lower().replace("-", "").replace("_", ""), name)


class Benchmark(ABC):
    """One benchmark input (see the module docstring). `name` labels it in reports and logs."""

    kind: ClassVar[str] = ""                   # set by @register_benchmark
    order: ClassVar[int] = 50                  # detection order: lower is asked first
    description: ClassVar[str] = ""            # what its inputs are, for the error when no kind matches
    # True when the trainer's result carries accuracy_mean / accuracy_std / num_pairs (the 10-fold pair
    # protocol): the first such set is results.json's final_verification and launch/train.py's last line.
    reports_verification_accuracy: ClassVar[bool] = False

    def __init__(self, name: str | None, path: Path | None, settings: EvalSettings | None = None):
        self.path = Path(path) if path is not None else None
        self.name = name if name is not None else self.default_name(self.path)
        self.settings = settings or EvalSettings()

    # ----- finding the kind ------------------------------------------------------------------------------
    @classmethod
    @abstractmethod
    def detect(cls, path: Path) -> bool:
        """Whether `path` (which exists) is an input of this kind; cheap, reads no more than a directory."""

    @classmethod
    def default_name(cls, path: Path) -> str:
        """The name of a benchmark given without one (the trainer's eval.sets): the file or folder name."""
        return path.stem

    # ----- what to embed ---------------------------------------------------------------------------------
    def load(self) -> "Benchmark":
        """Read the metadata now (errors surface here instead of at the first evaluation); returns self."""
        return self

    @property
    def carries_embeddings(self) -> bool:
        """The input holds its embeddings (no model needed); then own_embeddings() returns them."""
        return False

    def own_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        """(embeddings N x D, status N) of an input that carries them."""
        raise NotImplementedError(f"{type(self).__name__} takes a model's embeddings")

    @property
    @abstractmethod
    def num_images(self) -> int:
        """Images to embed, from the metadata (no image decoded)."""

    @abstractmethod
    def images(self, image_size: int) -> torch.utils.data.Dataset:
        """The images to embed, in order: item i = (3 x S x S float32 in [-1, 1], status), status 0 = usable."""

    def saved_arrays(self) -> dict[str, np.ndarray]:
        """Arrays stored beside the features and statuses by --save-features (e.g. the labels)."""
        return {}

    @property
    def saved_kind(self) -> str:
        """The kind a feature file records for this benchmark."""
        return self.kind

    # ----- scoring (launch/evaluate.py) ------------------------------------------------------------------
    def result_head(self, status_N: np.ndarray) -> dict:
        """The fields every report entry starts with: kind, path, image and skip counts."""
        from toolkit.eval.extract import skip_counts

        return {"kind": self.kind, "path": str(self.path), "num_images": int(len(status_N)),
                "num_skipped": int(np.count_nonzero(status_N)), "skipped": skip_counts(status_N)}

    @abstractmethod
    def score(self, emb_ND: np.ndarray, status_N: np.ndarray, *, output_dir: Path | None = None, rank: int = 0,
              world_size: int = 1, group=None, model_name: str = "model") -> dict:
        """The report entry (evaluation.json) from raw flip-summed embeddings; every rank calls it. Starts with
        `result_head(status_N)`. Files (plots, whose legends name `model_name`) go into `output_dir` on rank 0."""

    @classmethod
    @abstractmethod
    def summary_lines(cls, name: str, result: dict) -> list[str]:
        """Console lines of launch/evaluate.py for one report entry."""

    @classmethod
    @abstractmethod
    def table_cells(cls, name: str, result: dict) -> list["TableCell"]:
        """The results-table cells of one report entry: one per metric it holds, in the kind's order; column
        names start with `benchmark_label(name)`."""

    @staticmethod
    def percent(value: float | None, digits: int = 2) -> str:
        """A fraction as percent for console lines; '-' for None (a FAR the set is too small for)."""
        return "-" if value is None else f"{100 * value:.{digits}f}"

    @staticmethod
    def skipped_note(result: dict) -> str:
        """' (N skipped: {reason: count})' when images were skipped, else ''."""
        return f" ({result['num_skipped']} skipped: {result['skipped']})" if result.get("num_skipped") else ""

    # ----- during training ---------------------------------------------------------------------------------
    def evaluate(self, embed: Embed, *, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                 group=None) -> dict:
        """The model being trained on this benchmark: the fields of its entry in results.json (every rank calls
        this; `embed` maps N x 3 x S x S on `device` to N x D, the caller puts the model in eval mode).
        By default: embed `images()` (each rank a slice), check the skipped share, `score`."""
        from toolkit.eval.extract import check_skipped, extract_embeddings

        if self.carries_embeddings:
            raise FaceCLError(f"{self.path} holds its own features: it cannot evaluate the model being trained")
        device = torch.device(device)
        s = self.settings
        emb_ND, status_N = extract_embeddings(lambda x: embed(x.to(device, non_blocking=True)).float().cpu(),
                                              self.images(s.image_size), batch_size=s.batch_size,
                                              num_workers=s.num_workers, flip=s.flip, rank=rank,
                                              world_size=world_size, group=group, progress=False)
        check_skipped(status_N, s.max_skipped_fraction, f"benchmark {self.name} ({self.path})")
        return self.score(emb_ND, status_N, rank=rank, world_size=world_size, group=group)

    @classmethod
    @abstractmethod
    def scalars(cls, result: dict) -> dict[str, float]:
        """What the training log line and TensorBoard show of one `evaluate` result."""


# ----- the registry --------------------------------------------------------------------------------------

_REGISTRY: dict[str, type[Benchmark]] = {}
B = TypeVar("B", bound=type[Benchmark])


def register_benchmark(kind: str, *, order: int = 50) -> Callable[[B], B]:
    """Class decorator: register a Benchmark subclass under `kind` (the "kind" of its report entries).
    `order` places it in the detection order (lower first): a kind that accepts any folder of sub-folders
    comes after the kinds with a more specific layout."""
    if not kind or not isinstance(kind, str):
        raise ValueError(f"benchmark kind must be a non-empty string, got {kind!r}")

    def decorate(cls: B) -> B:
        if not (isinstance(cls, type) and issubclass(cls, Benchmark)):
            raise TypeError(f"@register_benchmark({kind!r}) decorates a Benchmark subclass, got {cls!r}")
        registered = _REGISTRY.get(kind)
        if registered is not None and registered is not cls:
            # Two classes under one kind is a programming error, not a user error.
            raise ValueError(f"benchmark kind {kind!r} is already registered by "
                             f"{registered.__module__}.{registered.__qualname__}")
        cls.kind, cls.order = kind, order
        _REGISTRY[kind] = cls
        return cls

    return decorate


def _load_builtin_kinds() -> None:
    # Each module registers its kind on import; a new built-in kind adds its module here.
    from toolkit.eval import all_to_all, ijb, verification  # noqa: F401


def registered_kinds() -> list[type[Benchmark]]:
    """The registered kinds in detection order."""
    _load_builtin_kinds()
    position = {kind: i for i, kind in enumerate(_REGISTRY)}
    return sorted(_REGISTRY.values(), key=lambda cls: (cls.order, position[cls.kind]))


def benchmark_class(kind: str) -> type[Benchmark] | None:
    """The class registered under `kind` (a report entry's "kind"), or None."""
    _load_builtin_kinds()
    return _REGISTRY.get(kind)


def benchmark_for(path: str | Path, name: str | None = None, settings: EvalSettings | None = None, *,
                  source: str | None = None) -> Benchmark:
    """The benchmark of `path`: the first registered kind (in detection order) whose `detect` says yes; its
    metadata is read on first use. A missing path, or one that no kind takes, is one FaceCLError line
    starting with `source` (default: "benchmark NAME")."""
    path = Path(path)
    source = source or f"benchmark {name}"
    if not path.exists():
        raise FaceCLError(f"{source}: path not found: {path}")
    kinds = registered_kinds()
    for cls in kinds:
        if cls.detect(path):
            return cls(name, path, settings)
    tried = ", ".join(f"not {cls.description} ({cls.kind})" for cls in kinds)
    raise FaceCLError(f"{source}: {path} is no benchmark input: {tried}")
