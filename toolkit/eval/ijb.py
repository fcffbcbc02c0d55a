# IJB-B / IJB-C: the release layout (loose crops + meta files), template pooling, 1:1 TAR@FAR and 1:N search; kind ijb.
"""Layout of a release folder ROOT (P = ijbc for IJB-C, ijbb for IJB-B; the prefix is detected):

    ROOT/loose_crop/<IMAGE>                  face crops (any format PIL reads)
    ROOT/meta/P_face_tid_mid.txt             "IMAGE TEMPLATE_ID MEDIA_ID" per image
    ROOT/meta/P_name_5pts_score.txt          "IMAGE x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 DETECTOR_SCORE" per image
    ROOT/meta/P_template_pair_label.txt      "T1 T2 LABEL" per 1:1 pair (1 = same subject)
    ROOT/meta/P_1N_gallery_G1.csv            optional, 1:N: CSV with a header holding TEMPLATE_ID and
    ROOT/meta/P_1N_gallery_G2.csv              SUBJECT_ID columns (other columns, such as FILENAME, are
    ROOT/meta/P_1N_probe_mixed.csv             ignored; one row per image or per template)

The two per-image files are joined by IMAGE name (every image of face_tid_mid needs landmarks). The 1:N
CSVs are read for (TEMPLATE_ID, SUBJECT_ID) only: a template's feature is the same pooled feature as in 1:1,
so every 1:N template id must appear in face_tid_mid. This is the layout of the original IJB-C protocol CSVs
(ijbc_1N_gallery_G1.csv ...) copied into meta/; if your copy differs, convert it to these columns. IJB-B's
galleries may be named S1/S2 instead (ijbb_1N_gallery_S1.csv, as insightface's ijb_1n.py reads them). With
some but not all three 1:N files, 1:N is skipped with one warning naming the missing ones (1:1 still runs);
a folder that holds releases (IJB_release/ with IJBB/, IJBC/) is refused with the --benchmark lines to use.

Protocol (1:1): image feature = normalise(f(x) + f(flip(x))) (or, with `keep_image_norm`, f(x) + f(flip(x))
as it is: insightface's use_norm_score=True), times the detector score when `detector_score_weighting`
(insightface's use_detector_score); insightface's eval_ijbc.py / onnx_ijbc.py default is both on. Media feature = mean of its images' features; template feature = sum of its
media features, normalised; score = cosine; TAR at FAR by toolkit.eval.roc's convention. Images that cannot be
used (missing file, landmarks outside the image) are left out of their template and counted; a template
with no usable image has a zero feature, so its pairs score 0 (counted as `num_pairs_with_empty_template`).
The result also holds `tar_at_far_insightface`, the TAR by insightface's script's convention (the ROC corner
nearest each FAR, toolkit.eval.roc.tar_at_far_nearest). tests/eval/test_ijb_insightface.py runs insightface's
own pooling, scoring and TAR code on the same features in every mode and gets the same numbers.

`IJBBenchmark` (end of the module) is the registered benchmark kind `ijb` (toolkit.eval.benchmark); in
training it evaluates through `IJBEvaluator`.

Protocol (1:N), per gallery G1 and G2 and the mean of both: a probe template is mated when its subject has a
template in the gallery. Subject score = best score over the subject's gallery templates. Rank-k accuracy =
share of mated probes whose subject is among the k best-scoring subjects, rank = number of subjects scoring
>= the true subject (so a tie counts against the probe). TPIR at FPIR f: the threshold t is the
k-th largest best-gallery score of the non-mated probes, k = ceil(f * num_non_mated); TPIR = share of mated
probes whose true subject ranks first with score >= t.
"""

from __future__ import annotations

import logging

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from toolkit.errors import FaceCLError
from toolkit.eval.benchmark import Benchmark, TableCell, benchmark_label, register_benchmark, tar_at_far_cells
from toolkit.eval.roc import (DEFAULT_FARS, far_key, far_label, num_accepted_impostors, roc_points, tar_at_far,
                              tar_at_far_nearest, too_few_impostors)

IDENTIFICATION_FPIRS = (1e-2, 1e-1)
IDENTIFICATION_RANKS = (1, 5)
GALLERIES = ("G1", "G2")


logger = logging.getLogger(__name__)


@dataclass
class IJBRelease:
    """Metadata of one IJB release folder; arrays are indexed by image i (I images) or pair p (P pairs)."""

    root: Path
    prefix: str                      # "ijbc" or "ijbb"
    image_names: list[str]           # I
    templates_I: np.ndarray          # I int64
    medias_I: np.ndarray             # I int64
    landmarks_I52: np.ndarray        # I x 5 x 2 float32 (x, y)
    detector_scores_I: np.ndarray    # I float32
    pairs_P2: np.ndarray             # P x 2 int64 template ids
    labels_P: np.ndarray             # P int8 (1 = genuine)
    identification: dict[str, dict[int, int]] = field(default_factory=dict)  # "G1"/"G2"/"probe": template -> subject
    identification_skipped: str | None = None   # why 1:N is not evaluated when some of its files are there

    @property
    def name(self) -> str:
        return {"ijbc": "IJB-C", "ijbb": "IJB-B"}[self.prefix]

    @property
    def num_images(self) -> int:
        return len(self.image_names)


def detect_prefix(root: Path) -> str | None:
    """'ijbc' or 'ijbb' when ROOT/meta holds that release's face_tid_mid file, else None."""
    for prefix in ("ijbc", "ijbb"):
        if (root / "meta" / f"{prefix}_face_tid_mid.txt").is_file():
            return prefix
    return None


# 1:N files of meta/: IJB-C names its galleries G1/G2, IJB-B S1/S2 (as insightface's ijb_1n.py reads them).
GALLERY_FILE_NAMES = {"G1": ("G1", "S1"), "G2": ("G2", "S2")}


def identification_files(meta: Path, prefix: str) -> tuple[dict[str, str], list[str]]:
    """({"G1", "G2", "probe"}: file name found, [expected names not found]) of a release's 1:N CSVs."""
    found, missing = {}, []
    for key, suffixes in GALLERY_FILE_NAMES.items():
        names = [f"{prefix}_1N_gallery_{suffix}.csv" for suffix in suffixes]
        present = [name for name in names if (meta / name).is_file()]
        if present:
            found[key] = present[0]
        else:
            missing.append(" or ".join(names))
    probe = f"{prefix}_1N_probe_mixed.csv"
    if (meta / probe).is_file():
        found["probe"] = probe
    else:
        missing.append(probe)
    return found, missing


def _split_lines(path: Path, num_columns: int, layout: str) -> list[list[str]]:
    if not path.is_file():
        raise FaceCLError(f"missing IJB metadata file {path} (expected lines \"{layout}\")")
    rows = []
    with open(path, "r", encoding="utf-8", errors="replace") as handle:
        for line_number, line in enumerate(handle, 1):
            tokens = line.split()
            if not tokens:
                continue
            if len(tokens) != num_columns:
                raise FaceCLError(f"{path} line {line_number}: expected {num_columns} columns (\"{layout}\"), "
                                  f"got {len(tokens)}: {line.strip()[:120]!r}")
            rows.append(tokens)
    if not rows:
        raise FaceCLError(f"{path} is empty (expected lines \"{layout}\")")
    return rows


def _read_pairs(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(pairs P x 2, labels P): numpy's C parser, because IJB-C has 15.7M lines."""
    layout = "T1 T2 LABEL"
    if not path.is_file():
        raise FaceCLError(f"missing IJB metadata file {path} (expected lines \"{layout}\")")
    try:
        table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise FaceCLError(f"{path}: expected 3 integer columns (\"{layout}\") on every line: "
                          f"{str(exc).splitlines()[0]}") from None
    if table.shape[0] == 0 or table.shape[1] != 3:
        raise FaceCLError(f"{path}: expected 3 columns (\"{layout}\"), got {table.shape[1]}")
    labels = table[:, 2]
    if not np.isin(labels, (0, 1)).all():
        bad = int(labels[~np.isin(labels, (0, 1))][0])
        raise FaceCLError(f"{path}: LABEL must be 0 or 1, got {bad}")
    return table[:, :2].copy(), labels.astype(np.int8)


def _read_identification_csv(path: Path) -> dict[int, int]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = [h.strip().upper() for h in next(reader, [])]
        if "TEMPLATE_ID" not in header or "SUBJECT_ID" not in header:
            raise FaceCLError(f"{path}: expected a CSV header with TEMPLATE_ID and SUBJECT_ID, got {header}")
        t_col, s_col = header.index("TEMPLATE_ID"), header.index("SUBJECT_ID")
        mapping: dict[int, int] = {}
        for line_number, row in enumerate(reader, 2):
            if not row:
                continue
            try:
                template, subject = int(row[t_col]), int(row[s_col])
            except (ValueError, IndexError):
                raise FaceCLError(f"{path} line {line_number}: expected integer TEMPLATE_ID and SUBJECT_ID, "
                                  f"got {row[:4]}") from None
            if mapping.setdefault(template, subject) != subject:
                raise FaceCLError(f"{path} line {line_number}: template {template} listed with subjects "
                                  f"{mapping[template]} and {subject}")
    if not mapping:
        raise FaceCLError(f"{path} has no rows")
    return mapping


def load_release(root: str | Path) -> IJBRelease:
    """Read and cross-check the metadata of a release folder (see the module docstring for the layout)."""
    root = Path(root)
    if not root.is_dir():
        raise FaceCLError(f"IJB release folder not found: {root}")
    prefix = detect_prefix(root)
    if prefix is None:
        raise FaceCLError(f"{root} is not an IJB-B/IJB-C release: no meta/ijbc_face_tid_mid.txt or "
                          "meta/ijbb_face_tid_mid.txt")
    meta = root / "meta"
    tid_rows = _split_lines(meta / f"{prefix}_face_tid_mid.txt", 3, "IMAGE TEMPLATE_ID MEDIA_ID")
    lmk_rows = _split_lines(meta / f"{prefix}_name_5pts_score.txt", 12,
                            "IMAGE x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 DETECTOR_SCORE")
    try:
        image_names = [r[0] for r in tid_rows]
        templates_I = np.array([int(r[1]) for r in tid_rows], dtype=np.int64)
        medias_I = np.array([int(r[2]) for r in tid_rows], dtype=np.int64)
    except ValueError as exc:
        raise FaceCLError(f"{meta / f'{prefix}_face_tid_mid.txt'}: TEMPLATE_ID and MEDIA_ID must be "
                          f"integers ({exc})") from None
    landmarks_by_name = {}
    for r in lmk_rows:
        try:
            landmarks_by_name[r[0]] = [float(x) for x in r[1:]]
        except ValueError as exc:
            raise FaceCLError(f"{meta / f'{prefix}_name_5pts_score.txt'}: image {r[0]}: landmarks and score must "
                              f"be numbers ({exc})") from None
    missing = [n for n in image_names if n not in landmarks_by_name]
    if missing:
        raise FaceCLError(f"{meta / f'{prefix}_name_5pts_score.txt'} has no landmarks for {len(missing)} images "
                          f"of {prefix}_face_tid_mid.txt (first: {missing[0]})")
    values = np.array([landmarks_by_name[n] for n in image_names], dtype=np.float32)  # I x 11
    pairs_P2, labels_P = _read_pairs(meta / f"{prefix}_template_pair_label.txt")
    unknown = np.setdiff1d(np.unique(pairs_P2), np.unique(templates_I))
    if unknown.size:
        raise FaceCLError(f"{meta / f'{prefix}_template_pair_label.txt'}: {unknown.size} template ids are not in "
                          f"{prefix}_face_tid_mid.txt (first: {int(unknown[0])})")
    release = IJBRelease(root=root, prefix=prefix, image_names=image_names, templates_I=templates_I,
                         medias_I=medias_I, landmarks_I52=values[:, :10].reshape(-1, 5, 2),
                         detector_scores_I=values[:, 10].copy(), pairs_P2=pairs_P2, labels_P=labels_P)
    files, missing_1n = identification_files(meta, prefix)
    if missing_1n and len(missing_1n) < 3:
        release.identification_skipped = (f"1:N skipped: {meta} lacks {', '.join(missing_1n)} (1:1 still "
                                          f"evaluated)")
        logger.warning("%s", release.identification_skipped)
    if not missing_1n:
        known = set(np.unique(templates_I).tolist())
        for key, filename in files.items():
            mapping = _read_identification_csv(meta / filename)
            absent = [t for t in mapping if t not in known]
            if absent:
                raise FaceCLError(f"{meta / filename}: {len(absent)} template ids are not in "
                                  f"{prefix}_face_tid_mid.txt (first: {absent[0]})")
            release.identification[key] = mapping
    return release


class IJBImages(torch.utils.data.Dataset):
    """Aligned images of a release: item i = (3 x S x S float32 in [-1, 1], status), status 0 when usable,
    SKIP_MISSING for a missing or undecodable file, SKIP_LANDMARKS for landmarks that cannot be used."""

    def __init__(self, release: IJBRelease, image_size: int = 112, indices: Sequence[int] | None = None):
        self.root = release.root / "loose_crop"
        self.names = release.image_names
        self.landmarks_I52 = release.landmarks_I52
        self.image_size = image_size
        self.indices = np.arange(release.num_images) if indices is None else np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int):
        from PIL import Image

        from toolkit.eval.align import AlignmentError, align_face
        from toolkit.eval.extract import SKIP_LANDMARKS, SKIP_MISSING, to_model_input

        i = int(self.indices[item])
        try:
            with Image.open(self.root / self.names[i]) as image:
                rgb = np.asarray(image.convert("RGB"))
        except (OSError, ValueError, SyntaxError):
            return torch.zeros(3, self.image_size, self.image_size), SKIP_MISSING
        try:
            aligned = align_face(rgb, self.landmarks_I52[i], self.image_size)
        except AlignmentError:
            return torch.zeros(3, self.image_size, self.image_size), SKIP_LANDMARKS
        return to_model_input(aligned), 0


def image_features(emb_ID: np.ndarray, usable_I: np.ndarray, detector_scores_I: np.ndarray | None, *,
                   keep_norm: bool = False) -> np.ndarray:
    """normalise(flip-summed embedding) [x detector score]; unusable images become zero rows: I x D. With
    `keep_norm` the flip-summed embedding keeps its length (insightface's use_norm_score=True): a sharper
    image, whose embedding is longer, weighs more in its media's mean."""
    feats = torch.as_tensor(np.asarray(emb_ID, dtype=np.float32))
    feats_ID = (feats if keep_norm else F.normalize(feats, dim=1)).numpy()
    if detector_scores_I is not None:
        feats_ID = feats_ID * np.asarray(detector_scores_I, dtype=np.float32)[:, None]
    return np.where(np.asarray(usable_I, dtype=bool)[:, None], feats_ID, 0.0).astype(np.float32)


def pool_templates(feats_ID: np.ndarray, templates_I: np.ndarray, medias_I: np.ndarray,
                   usable_I: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(template ids T sorted, normalised template features T x D): sum over media of the media's mean.

    Unusable images are left out of their media's mean; a template without usable images is all zeros.
    """
    feats_ID = np.asarray(feats_ID, dtype=np.float32)
    usable_I = np.ones(len(feats_ID), dtype=bool) if usable_I is None else np.asarray(usable_I, dtype=bool)
    template_ids_T, template_of_I = np.unique(templates_I, return_inverse=True)
    _, media_of_I = np.unique(np.stack([templates_I, medias_I], axis=1), axis=0, return_inverse=True)
    media_of_I = media_of_I.reshape(-1)
    num_media = int(media_of_I.max()) + 1
    feats = torch.as_tensor(feats_ID)
    keep = torch.as_tensor(usable_I)
    media_sum_MD = torch.zeros(num_media, feats.shape[1]).index_add_(0, torch.as_tensor(media_of_I)[keep], feats[keep])
    media_count_M = torch.bincount(torch.as_tensor(media_of_I)[keep], minlength=num_media).float()
    media_mean_MD = media_sum_MD / media_count_M.clamp(min=1)[:, None]
    media_template_M = torch.zeros(num_media, dtype=torch.long)
    media_template_M[torch.as_tensor(media_of_I)] = torch.as_tensor(template_of_I.reshape(-1))
    template_TD = torch.zeros(len(template_ids_T), feats.shape[1]).index_add_(0, media_template_M, media_mean_MD)
    return template_ids_T, F.normalize(template_TD, dim=1).numpy()


def score_pairs(template_ids_T: np.ndarray, template_TD: np.ndarray, pairs_P2: np.ndarray,
                chunk: int = 1 << 17) -> np.ndarray:
    """Cosine of the two (normalised) template features of each pair: P float32."""
    rows_P2 = np.searchsorted(template_ids_T, pairs_P2)
    feats = torch.as_tensor(template_TD)
    scores = np.empty(len(pairs_P2), dtype=np.float32)
    for start in range(0, len(pairs_P2), chunk):
        a = feats[torch.as_tensor(rows_P2[start:start + chunk, 0])]
        b = feats[torch.as_tensor(rows_P2[start:start + chunk, 1])]
        scores[start:start + chunk] = (a * b).sum(dim=1).numpy()
    return scores


def verification_1to1(release: IJBRelease, emb_ID: np.ndarray, status_I: np.ndarray, *,
                      detector_score_weighting: bool = False, fars: Sequence[float] = DEFAULT_FARS,
                      pair_indices: np.ndarray | None = None, keep_image_norm: bool = False) -> tuple[dict, dict]:
    """(result dict, extras with template features, pair scores and ROC points) for the release's 1:1 pairs."""
    usable_I = np.asarray(status_I) == 0
    feats_ID = image_features(emb_ID, usable_I, release.detector_scores_I if detector_score_weighting else None,
                              keep_norm=keep_image_norm)
    template_ids_T, template_TD = pool_templates(feats_ID, release.templates_I, release.medias_I, usable_I)
    pairs_P2, labels_P = release.pairs_P2, release.labels_P
    if pair_indices is not None:
        pairs_P2, labels_P = pairs_P2[pair_indices], labels_P[pair_indices]
    scores_P = score_pairs(template_ids_T, template_TD, pairs_P2)
    empty_T = ~np.any(template_TD != 0, axis=1)
    rows_P2 = np.searchsorted(template_ids_T, pairs_P2)
    num_empty_pairs = int(np.count_nonzero(empty_T[rows_P2].any(axis=1)))
    genuine, impostor = scores_P[labels_P == 1], scores_P[labels_P == 0]
    if genuine.size == 0 or impostor.size == 0:
        raise FaceCLError(f"{release.root}: the pair file needs genuine and impostor pairs, got {genuine.size} "
                          f"and {impostor.size}")
    result = {"benchmark": release.name, "num_pairs": int(len(pairs_P2)), "num_genuine": int(genuine.size),
              "num_impostor": int(impostor.size), "num_templates": int(len(template_ids_T)),
              "num_pairs_with_empty_template": num_empty_pairs,
              "detector_score_weighting": detector_score_weighting, "keep_image_norm": keep_image_norm,
              "tar_at_far": tar_at_far(genuine, impostor, fars),
              # insightface's eval_ijbc.py convention (nearest ROC corner), to compare with published numbers
              "tar_at_far_insightface": tar_at_far_nearest(genuine, impostor, fars)}
    return result, {"template_ids": template_ids_T, "template_features": template_TD, "scores": scores_P,
                    "roc": roc_points(genuine, impostor)}


def identification_1toN(gallery: dict[int, int], probes: dict[int, int], template_ids_T: np.ndarray,
                        template_TD: np.ndarray, *, ranks: Sequence[int] = IDENTIFICATION_RANKS,
                        fpirs: Sequence[float] = IDENTIFICATION_FPIRS) -> dict:
    """Rank-k accuracy and TPIR at FPIR of `probes` against `gallery` (template id -> subject id)."""
    g_ids = np.array(sorted(gallery), dtype=np.int64)
    p_ids = np.array(sorted(probes), dtype=np.int64)
    g_feat = torch.as_tensor(template_TD[np.searchsorted(template_ids_T, g_ids)])
    p_feat = torch.as_tensor(template_TD[np.searchsorted(template_ids_T, p_ids)])
    g_subjects = np.array([gallery[t] for t in g_ids], dtype=np.int64)
    subjects_S, subject_of_G = np.unique(g_subjects, return_inverse=True)
    p_subjects = np.array([probes[t] for t in p_ids], dtype=np.int64)
    # Subject score = best over its gallery templates: P x S.
    scores_PG = p_feat @ g_feat.T
    scores_PS = torch.full((len(p_ids), len(subjects_S)), -float("inf"))
    scores_PS = scores_PS.scatter_reduce(1, torch.as_tensor(subject_of_G).expand(len(p_ids), -1), scores_PG,
                                         reduce="amax")
    true_col_P = np.searchsorted(subjects_S, p_subjects)
    mated_P = (true_col_P < len(subjects_S)) & (subjects_S[np.minimum(true_col_P, len(subjects_S) - 1)] == p_subjects)
    result: dict = {"num_probes": int(len(p_ids)), "num_mated": int(mated_P.sum()),
                    "num_non_mated": int((~mated_P).sum()), "num_gallery_templates": int(len(g_ids)),
                    "num_gallery_subjects": int(len(subjects_S))}
    mated = torch.as_tensor(np.nonzero(mated_P)[0])
    if mated.numel():
        true_score = scores_PS[mated, torch.as_tensor(true_col_P[mated_P])]
        # Ties go against the probe: every other subject scoring >= the true one ranks above it.
        rank_M = (scores_PS[mated] >= true_score[:, None]).sum(dim=1)  # includes the true subject itself
        for k in ranks:
            result[f"rank{k}"] = float((rank_M <= k).double().mean())
    else:
        for k in ranks:
            result[f"rank{k}"] = None
    non_mated = torch.as_tensor(np.nonzero(~mated_P)[0])
    tpir = {}
    for fpir in fpirs:
        n = non_mated.numel()
        if _tpir_unmeasured(fpir, n, mated.numel()) is not None:
            tpir[far_key(fpir)] = None
            continue
        best_non_mated = scores_PS[non_mated].max(dim=1).values.sort(descending=True).values
        threshold = float(best_non_mated[num_accepted_impostors(fpir, n) - 1])
        hits = (rank_M == 1) & (true_score >= threshold)
        tpir[far_key(fpir)] = float(hits.double().mean())
    result["tpir_at_fpir"] = tpir
    not_measured = gallery_not_measured(result)
    if not_measured:
        result["not_measured"] = not_measured
    return result


_NO_MATED = "no probe template's subject has a template in the gallery"


def _tpir_unmeasured(fpir: float, num_non_mated: int, num_mated: int) -> str | None:
    """Why TPIR at `fpir` cannot be measured (None when it can)."""
    if num_mated == 0:
        return _NO_MATED
    if fpir * num_non_mated < 1.0 - 1e-9:
        return too_few_impostors(fpir, num_non_mated, rate="FPIR", what="non-mated probe templates",
                                 where="the gallery")
    return None


def identification_report(release: IJBRelease, template_ids_T: np.ndarray, template_TD: np.ndarray) -> dict | None:
    """1:N results for G1, G2 and their mean, or None when the release has no 1:N files."""
    if not release.identification:
        return None
    report = {g: identification_1toN(release.identification[g], release.identification["probe"], template_ids_T,
                                     template_TD) for g in GALLERIES}
    mean: dict = {}
    for key in [f"rank{k}" for k in IDENTIFICATION_RANKS]:
        values = [report[g][key] for g in GALLERIES]
        mean[key] = None if None in values else float(np.mean(values))
    mean["tpir_at_fpir"] = {}
    for fk in report["G1"]["tpir_at_fpir"]:
        values = [report[g]["tpir_at_fpir"][fk] for g in GALLERIES]
        mean["tpir_at_fpir"][fk] = None if None in values else float(np.mean(values))
    not_measured = mean_not_measured(report, mean)
    if not_measured:
        mean["not_measured"] = not_measured
    report["mean"] = mean
    return report


def gallery_not_measured(result: dict) -> dict:
    """Why the None numbers of one gallery's 1:N result are None, from its counts:
    {"rank1": reason, ..., "tpir_at_fpir": {fpir key: reason}} (only the None ones)."""
    reasons: dict = {f"rank{k}": _NO_MATED for k in IDENTIFICATION_RANKS if result.get(f"rank{k}", 0) is None}
    for fk, value in result["tpir_at_fpir"].items():
        if value is None:
            reasons.setdefault("tpir_at_fpir", {})[fk] = _tpir_unmeasured(float(fk), result["num_non_mated"],
                                                                          result["num_mated"])
    return reasons


def mean_not_measured(report: dict, mean: dict) -> dict:
    """Why the None numbers of the mean over the galleries are None: each gallery's reason, 'G1: ...; G2: ...'
    ('G1 and G2: ...' when they agree)."""
    per_gallery = {g: gallery_not_measured(report[g]) for g in GALLERIES}
    reasons: dict = {}
    for key in [f"rank{k}" for k in IDENTIFICATION_RANKS]:
        if mean.get(key, 0) is None:
            reasons[key] = _joined({g: r.get(key) for g, r in per_gallery.items()})
    for fk, value in mean["tpir_at_fpir"].items():
        if value is None:
            reasons.setdefault("tpir_at_fpir", {})[fk] = _joined(
                {g: r.get("tpir_at_fpir", {}).get(fk) for g, r in per_gallery.items()})
    return reasons


def _joined(reason_of_gallery: dict[str, str | None]) -> str:
    reasons = {g: reason for g, reason in reason_of_gallery.items() if reason}
    if len(set(reasons.values())) == 1:
        return f"{' and '.join(reasons)}: {next(iter(reasons.values()))}"
    return "; ".join(f"{g}: {reason}" for g, reason in reasons.items())


class IJBEvaluator:
    """IJB-B/IJB-C 1:1 during training: `evaluate(embed_fn, device=...)` -> {"TAR@FAR=1e-04": ..., ...}.

    `max_pairs` keeps a seeded subset of the pairs (every genuine pair up to half of it, impostors for the
    rest) and embeds only the images of their templates, so an evaluation fits in a training run; numbers
    on a subset track progress and are not the benchmark's. Images are aligned on every call by DataLoader
    workers (the aligned IJB-C would take 18 GB to cache). Under several ranks each embeds a slice.
    `release`: an IJBRelease already read from `root` (the `ijb` benchmark's), instead of reading it again.
    """

    def __init__(self, root: str | Path, *, max_pairs: int | None = None, image_size: int = 112,
                 batch_size: int = 128, num_workers: int = 2, flip: bool = True,
                 detector_score_weighting: bool = False, fars: Sequence[float] = (1e-5, 1e-4, 1e-3),
                 max_skipped_fraction: float = 0.01, seed: int = 0, release: IJBRelease | None = None):
        self.release = release if release is not None else load_release(root)
        self.name = self.release.name
        self.image_size, self.batch_size, self.num_workers = image_size, batch_size, num_workers
        self.flip, self.detector_score_weighting, self.fars = flip, detector_score_weighting, tuple(fars)
        self.max_skipped_fraction = max_skipped_fraction
        self.pair_indices = None
        image_indices = np.arange(self.release.num_images)
        if max_pairs is not None and max_pairs < len(self.release.labels_P):
            rng = np.random.default_rng(seed)
            genuine = np.nonzero(self.release.labels_P == 1)[0]
            impostor = np.nonzero(self.release.labels_P == 0)[0]
            genuine = rng.permutation(genuine)[: max_pairs // 2]
            impostor = rng.permutation(impostor)[: max_pairs - len(genuine)]
            self.pair_indices = np.sort(np.concatenate([genuine, impostor]))
            wanted = np.unique(self.release.pairs_P2[self.pair_indices])
            image_indices = np.nonzero(np.isin(self.release.templates_I, wanted))[0]
        self.image_indices = image_indices

    @torch.no_grad()
    def evaluate(self, embed_fn, *, device: torch.device | str = "cpu", rank: int = 0, world_size: int = 1,
                 group=None) -> dict:
        """Embed (flip-summed), pool, score; `embed_fn` maps N x 3 x S x S in [-1, 1] on `device` to N x D
        (the caller puts the model in eval mode). Every rank must call this (each embeds a slice, with equal
        batch counts). Returns {"TAR@FAR=<f>": tar or None, ..., "num_pairs", "num_skipped"} on every rank."""
        from toolkit.eval.extract import check_skipped, extract_embeddings

        device = torch.device(device)
        dataset = IJBImages(self.release, self.image_size, self.image_indices)
        emb_SD, status_S = extract_embeddings(lambda x: embed_fn(x.to(device, non_blocking=True)).float().cpu(),
                                              dataset, batch_size=self.batch_size, num_workers=self.num_workers,
                                              flip=self.flip, rank=rank, world_size=world_size, group=group,
                                              progress=False)
        check_skipped(status_S, self.max_skipped_fraction, f"{self.name} at {self.release.root}")
        emb_ID = np.zeros((self.release.num_images, emb_SD.shape[1]), dtype=np.float32)
        status_I = np.full(self.release.num_images, 1, dtype=np.int8)  # images outside the subset are unused
        emb_ID[self.image_indices] = emb_SD
        status_I[self.image_indices] = status_S
        result, _ = verification_1to1(self.release, emb_ID, status_I, fars=self.fars,
                                      detector_score_weighting=self.detector_score_weighting,
                                      pair_indices=self.pair_indices)
        out = {f"TAR@FAR={k}": v["tar"] for k, v in result["tar_at_far"].items()}
        out.update(num_pairs=result["num_pairs"], num_skipped=int(np.count_nonzero(status_S)))
        return out


# ----- the benchmark kind ----------------------------------------------------------------------------------

_RELEASE_NAMES = {"ijbc": "IJB-C", "ijbb": "IJB-B"}


def _identification_cells(label: str, identification: dict) -> list[TableCell]:
    """'LABEL rank-1', 'LABEL rank-5', 'LABEL TPIR 1e-2' ... of the 1:N mean over the galleries (the reasons of
    results written before they were recorded: from the galleries' counts)."""
    mean = identification["mean"]
    reasons = mean.get("not_measured") or mean_not_measured(identification, mean)
    cells = [TableCell.of_fraction(f"{label} rank-{k}", mean.get(f"rank{k}"), reasons.get(f"rank{k}"))
             for k in IDENTIFICATION_RANKS if f"rank{k}" in mean]
    for key, value in mean.get("tpir_at_fpir", {}).items():
        cells.append(TableCell.of_fraction(f"{label} TPIR {far_label(float(key))}", value,
                                           reasons.get("tpir_at_fpir", {}).get(key)))
    return cells


@register_benchmark("ijb", order=20)
class IJBBenchmark(Benchmark):
    """An IJB-B / IJB-C release folder: 1:1 TAR at FAR (and 1:N when the CSVs are there) in reports; in
    training, `IJBEvaluator`'s TAR@FAR on a seeded subset of `settings.max_pairs` pairs (None: every pair)."""

    description = "an IJB-B/IJB-C release folder with meta/ijbc_face_tid_mid.txt or meta/ijbb_face_tid_mid.txt"

    def __init__(self, name, path, settings=None):
        super().__init__(name, path, settings)
        self._release: IJBRelease | None = None
        self._evaluator: IJBEvaluator | None = None

    @classmethod
    def detect(cls, path: Path) -> bool:
        if not path.is_dir():
            return False
        if detect_prefix(path) is not None:
            return True
        releases = [child for child in sorted(path.iterdir()) if child.is_dir() and detect_prefix(child)]
        if releases:   # e.g. IJB_release/ holding IJBB/ and IJBC/: not an identity folder either
            example = " ".join(f"--benchmark {detect_prefix(child)}={child}" for child in releases)
            raise FaceCLError(f"{path} is not an IJB release but holds {len(releases)} "
                              f"({', '.join(child.name for child in releases)}): give each its own benchmark, "
                              f"e.g. {example}")
        return False

    @classmethod
    def default_name(cls, path: Path) -> str:
        """IJB-C or IJB-B (the trainer's name of the set)."""
        return _RELEASE_NAMES[detect_prefix(path)]

    @property
    def release(self) -> IJBRelease:
        if self._release is None:
            self._release = load_release(self.path)
        return self._release

    def load(self) -> "IJBBenchmark":
        self.release
        return self

    @property
    def num_images(self) -> int:
        return self.release.num_images

    def images(self, image_size: int):
        return IJBImages(self.release, image_size)

    def score(self, emb_ND, status_N, *, output_dir=None, rank=0, world_size=1, group=None,
              model_name: str = "model") -> dict:
        from toolkit.eval.roc import plot_roc

        release, s = self.release, self.settings
        result = self.result_head(status_N)
        verification, extras = verification_1to1(release, emb_ND, status_N,
                                                 detector_score_weighting=s.detector_score_weighting, fars=s.fars,
                                                 keep_image_norm=s.keep_image_norm)
        result["benchmark"] = release.name
        result["verification"] = verification
        result["identification"] = identification_report(release, extras["template_ids"],
                                                         extras["template_features"])
        if release.identification_skipped:
            result["identification_skipped"] = release.identification_skipped
        if output_dir is not None and rank == 0:
            png = plot_roc({model_name: extras["roc"]}, Path(output_dir) / f"roc_{self.name}.png",
                           title=f"{release.name} 1:1 ROC ({self.name})",
                           operating_points={model_name: verification["tar_at_far"]},
                           num_impostors=verification.get("num_impostor"))
            result["roc_png"] = str(png)
        return result

    @classmethod
    def summary_lines(cls, name: str, result: dict) -> list[str]:
        tars = ", ".join(f"{k}: {cls.percent(v['tar'])}" for k, v in result["verification"]["tar_at_far"].items())
        lines = [f"{name} ({result['benchmark']} 1:1) TAR% at FAR {tars}{cls.skipped_note(result)}"]
        nearest = result["verification"].get("tar_at_far_insightface")
        if nearest:   # results written before the field existed have none
            tars = ", ".join(f"{k}: {cls.percent(v['tar'])}" for k, v in nearest.items())
            lines.append(f"{name} ({result['benchmark']} 1:1) TAR% at FAR by insightface's eval_ijbc.py convention "
                         f"(nearest ROC corner) {tars}")
        ident = result.get("identification")
        if ident:
            m = ident["mean"]
            tpir = ", ".join(f"{k}: {cls.percent(v)}" for k, v in m["tpir_at_fpir"].items())
            lines.append(f"{name} ({result['benchmark']} 1:N, mean of G1/G2) rank-1 {cls.percent(m['rank1'])}% "
                         f"rank-5 {cls.percent(m['rank5'])}% TPIR% at FPIR {tpir}")
        elif result.get("identification_skipped"):
            lines.append(f"{name}: {result['identification_skipped']}")
        return lines

    @classmethod
    def table_cells(cls, name: str, result: dict) -> list[TableCell]:
        """1:1 TAR at every FAR of the entry ('IJB-C 1e-4'); with 1:N results, then the mean over G1 and G2 of
        rank-1, rank-5 and TPIR at every FPIR ('IJB-C rank-1', 'IJB-C TPIR 1e-2')."""
        label = benchmark_label(name)
        verification = result["verification"]
        cells = tar_at_far_cells(label, verification["tar_at_far"], verification.get("num_impostor"))
        if result.get("identification"):
            cells += _identification_cells(label, result["identification"])
        return cells

    def evaluate(self, embed, *, device="cpu", rank=0, world_size=1, group=None) -> dict:
        """{"TAR@FAR=<f>": tar or None, ..., "num_pairs", "num_skipped"} (IJBEvaluator.evaluate)."""
        if self._evaluator is None:
            s = self.settings
            self._evaluator = IJBEvaluator(self.path, max_pairs=s.max_pairs, image_size=s.image_size,
                                           batch_size=s.batch_size, num_workers=s.num_workers, flip=s.flip,
                                           detector_score_weighting=s.detector_score_weighting, fars=s.fars,
                                           max_skipped_fraction=s.max_skipped_fraction, seed=s.seed,
                                           release=self.release)
        return self._evaluator.evaluate(embed, device=device, rank=rank, world_size=world_size, group=group)

    @classmethod
    def scalars(cls, result: dict) -> dict[str, float]:
        return {key: value for key, value in result.items() if key.startswith("TAR@FAR=") and value is not None}
