# TAR at FAR from genuine and impostor scores (one convention for IJB and all-to-all), and the ROC plot.
"""The operating point at a target false-accept rate f, used by every 1:1 benchmark of the toolkit.

Convention (exact, no interpolation): with n impostor scores, k = ceil(f * n); the threshold t is the k-th
largest impostor score (counting ties as separate scores); a pair is accepted when score >= t. Then
TAR = #(genuine >= t) / #genuine and the achieved FAR = #(impostor >= t) / n, which is k / n when no other
impostor ties with t (so at most f + 1/n) and larger when some do; it is reported beside every TAR. When
f * n < 1 the set has too few impostor pairs for that FAR and the TAR is None (not 0), so a tiny set never
prints a number it cannot support; the point then carries the `reason` (`too_few_impostors`), which the
results table prints as the footnote of its '-'.

This is the point of sklearn's ``roc_curve(drop_intermediate=False)`` with the smallest FPR >= f (tested).

insightface's IJB scripts (recognition/arcface_torch/eval_ijbc.py, onnx_ijbc.py) use another convention,
given here by `tar_at_far_nearest` so that numbers can be compared with published ones: sklearn's
``roc_curve`` with its default ``drop_intermediate=True`` (only the corners of the ROC are kept), then for
each f the kept point whose FPR is nearest to f, above or below (among points of equal FPR the one with the
largest TPR). That point always exists, so a TAR is given even where f * n < 1 (then it is the TAR at FPR 0,
or at 1 / n), and its FPR can be far from f where the ROC is coarse. Both are tested against insightface's own
code (tests/eval/test_ijb_insightface.py); docs/evaluation.md compares them on an example.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

DEFAULT_FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def num_accepted_impostors(far: float, num_impostors: int) -> int:
    """k = ceil(far * n) computed without the float error of 1e-4 * 10_000 = 1.0000000000000002."""
    if not 0.0 < far <= 1.0:
        raise ValueError(f"FAR must be in (0, 1], got {far}")
    return max(1, math.ceil(round(far * num_impostors, 9)))


def far_label(far: float) -> str:
    """'1e-4' style, for columns and messages (FARs that are not 1 significant digit: '0.00025')."""
    short = f"{far:.0e}"
    if float(short) != far:
        return f"{far:g}"
    mantissa, exponent = short.split("e")
    return f"{mantissa}e{int(exponent)}"


def minimum_impostors(far: float) -> int:
    """The fewest impostor scores n with far * n >= 1: below that the set cannot support FAR `far`."""
    return math.ceil(round(1.0 / far, 6))


def too_few_impostors(far: float, num_impostors: int, *, rate: str = "FAR", what: str = "impostor pairs",
                      where: str = "this set") -> str:
    """Why a TAR at `far` is not measured: 'FAR 1e-5 needs at least 100,000 impostor pairs, this set has 420'."""
    return (f"{rate} {far_label(far)} needs at least {minimum_impostors(far):,} {what}, {where} has "
            f"{num_impostors:,}")


def unmeasured_point(far: float, num_impostors: int) -> dict:
    """The operating point of a FAR the set has too few impostor pairs for: no TAR, and why."""
    return {"tar": None, "threshold": None, "achieved_far": None, "reason": too_few_impostors(far, num_impostors)}


def far_key(far: float) -> str:
    """'1e-04' style key used in JSON results; FARs that are not 1 significant digit keep their repr."""
    short = f"{far:.0e}"
    return short if float(short) == far else repr(far)


def tar_at_far(genuine_G: np.ndarray, impostor_I: np.ndarray, fars: Sequence[float] = DEFAULT_FARS) -> dict:
    """{far_key: {"tar", "threshold", "achieved_far"}} by the module's convention, from scores in memory."""
    genuine_G = np.asarray(genuine_G, dtype=np.float64).ravel()
    impostor_I = np.asarray(impostor_I, dtype=np.float64).ravel()
    if genuine_G.size == 0 or impostor_I.size == 0:
        raise ValueError(f"need genuine and impostor scores, got {genuine_G.size} and {impostor_I.size}")
    impostor_desc_I = np.sort(impostor_I)[::-1]
    genuine_asc_G = np.sort(genuine_G)
    out = {}
    for far in fars:
        out[far_key(far)] = threshold_point(genuine_asc_G, impostor_desc_I, far)
    return out


def threshold_point(genuine_asc_G: np.ndarray, impostor_desc_I: np.ndarray, far: float) -> dict:
    """The operating point for one FAR from sorted scores (genuine ascending, impostor descending)."""
    n = impostor_desc_I.size
    if far * n < 1.0 - 1e-9:
        return unmeasured_point(far, n)
    k = num_accepted_impostors(far, n)
    threshold = float(impostor_desc_I[k - 1])
    return operating_point(genuine_asc_G, threshold,
                           num_impostors_accepted=int(np.searchsorted(-impostor_desc_I, -threshold, side="right")),
                           num_impostors=n)


def operating_point(genuine_asc_G: np.ndarray, threshold: float, *, num_impostors_accepted: int,
                    num_impostors: int) -> dict:
    """TAR of 'score >= threshold' over sorted genuine scores, with the achieved FAR."""
    num_genuine_accepted = genuine_asc_G.size - int(np.searchsorted(genuine_asc_G, threshold, side="left"))
    return {"tar": num_genuine_accepted / genuine_asc_G.size, "threshold": threshold,
            "achieved_far": num_impostors_accepted / num_impostors}


def roc_curve_points(genuine_G: np.ndarray, impostor_I: np.ndarray, *,
                     drop_intermediate: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) exactly as sklearn.metrics.roc_curve(labels, scores, drop_intermediate=...) gives
    them for genuine label 1 (tested), without needing scikit-learn: one point per distinct score, highest
    first, accepting score >= threshold, after a first point (0, 0) at threshold inf; `drop_intermediate`
    drops the points between collinear neighbours (only the ROC's corners stay)."""
    genuine_G = np.asarray(genuine_G).ravel()
    impostor_I = np.asarray(impostor_I).ravel()
    if genuine_G.size == 0 or impostor_I.size == 0:
        raise ValueError(f"need genuine and impostor scores, got {genuine_G.size} and {impostor_I.size}")
    scores = np.concatenate([genuine_G, impostor_I])
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    is_genuine = order < genuine_G.size
    last_of_value = np.r_[np.nonzero(np.diff(sorted_scores))[0], sorted_scores.size - 1]
    tps = np.cumsum(is_genuine, dtype=np.int64)[last_of_value]
    fps = last_of_value + 1 - tps
    thresholds = sorted_scores[last_of_value].astype(np.float64)
    if drop_intermediate and fps.size > 2:
        corner = np.r_[True, (np.diff(fps, 2) != 0) | (np.diff(tps, 2) != 0), True]
        fps, tps, thresholds = fps[corner], tps[corner], thresholds[corner]
    fps, tps = np.r_[0, fps].astype(np.float64), np.r_[0, tps].astype(np.float64)
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds]


def tar_at_far_nearest(genuine_G: np.ndarray, impostor_I: np.ndarray, fars: Sequence[float] = DEFAULT_FARS) -> dict:
    """{far_key: {"tar", "threshold", "achieved_far"}} by insightface's IJB convention (module docstring): the
    corner of the ROC (roc_curve with drop_intermediate) whose FPR is nearest to each FAR, ties to the larger
    TPR. `threshold` is None for the point (0, 0) above every score."""
    fpr, tpr, thresholds = roc_curve_points(genuine_G, impostor_I, drop_intermediate=True)
    fpr, tpr, thresholds = fpr[::-1], tpr[::-1], thresholds[::-1]   # as the script does: the largest TPR first
    out = {}
    for far in fars:
        nearest = int(np.argmin(np.abs(fpr - far)))   # the first of equal distances, as the script's min()
        threshold = float(thresholds[nearest])
        out[far_key(far)] = {"tar": float(tpr[nearest]), "threshold": threshold if np.isfinite(threshold) else None,
                             "achieved_far": float(fpr[nearest])}
    return out


def roc_points(genuine_G: np.ndarray, impostor_I: np.ndarray, max_points: int = 2000) -> tuple[np.ndarray, np.ndarray]:
    """(far, tar) at up to `max_points` thresholds spaced evenly in log FAR: enough for a plot."""
    genuine_asc_G = np.sort(np.asarray(genuine_G, dtype=np.float64).ravel())
    impostor_desc_I = np.sort(np.asarray(impostor_I, dtype=np.float64).ravel())[::-1]
    n = impostor_desc_I.size
    ks = np.unique(np.geomspace(1, n, num=max_points).astype(np.int64))
    thresholds = impostor_desc_I[ks - 1]
    far = ks / n
    tar = (genuine_asc_G.size - np.searchsorted(genuine_asc_G, thresholds, side="left")) / genuine_asc_G.size
    return far, tar


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str = "ROC", *,
               operating_points: dict[str, dict] | None = None, num_impostors: int | None = None):
    """The ROC as a matplotlib figure (Agg backend, no display): TAR against FAR on a log axis, one step line
    per model (a threshold's TAR holds until the next impostor is accepted, so points are joined by steps,
    not diagonals), each model's TAR@FAR operating points marked and labelled, and a dotted line at the
    lowest FAR the set can measure (1 / impostor pairs): the curve cannot start further left."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=120)
    for name, (far, tar) in curves.items():
        line, = ax.step(far, tar, where="post", label=name)
        measured = [(point["achieved_far"], point["tar"], key) for key, point in
                    (operating_points or {}).get(name, {}).items() if point.get("tar") is not None]
        for achieved, value, key in measured:
            ax.plot([achieved], [value], marker="o", color=line.get_color(), linestyle="none")
            ax.annotate(f"{far_label(float(key))}: {100 * value:.1f}%", (achieved, value), textcoords="offset points",
                        xytext=(4, -10), fontsize=7, color=line.get_color())
    if num_impostors:
        ax.axvline(1.0 / num_impostors, color="grey", linestyle=":",
                   label=f"lowest measurable FAR: 1 / {num_impostors:,} impostor pairs")
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel("False accept rate (log scale)")
    ax.set_ylabel("True accept rate")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)  # a ROC rises to the right: the upper left stays empty
    fig.tight_layout()
    return fig


def plot_roc(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "ROC", *,
             operating_points: dict[str, dict] | None = None, num_impostors: int | None = None) -> Path:
    """PNG of `roc_figure` (see there)."""
    import matplotlib.pyplot as plt

    fig = roc_figure(curves, title, operating_points=operating_points, num_impostors=num_impostors)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
