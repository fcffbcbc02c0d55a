# TAR at FAR: hand-computed cases, ties, too-small sets, and sklearn's roc_curve as an independent reference.
import numpy as np
import pytest
from sklearn.metrics import roc_curve

from toolkit.eval.roc import (num_accepted_impostors, plot_roc, roc_curve_points, roc_figure, roc_points, tar_at_far,
                              tar_at_far_nearest)


def test_hand_computed_operating_points():
    impostor = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0])
    genuine = np.array([0.95, 0.85, 0.75, 0.65])
    out = tar_at_far(genuine, impostor, (0.1, 0.2, 0.35))
    # FAR 0.1: k = 1, threshold 0.9, genuine >= 0.9: 1 of 4.
    assert out["1e-01"] == {"tar": 0.25, "threshold": 0.9, "achieved_far": 0.1}
    # FAR 0.2: k = 2, threshold 0.8: 0.95, 0.85 -> 0.5.
    assert out["2e-01"]["tar"] == 0.5 and out["2e-01"]["threshold"] == 0.8
    # FAR 0.35: k = ceil(3.5) = 4, threshold 0.6: 0.95, 0.85, 0.75, 0.65 -> 1.0; achieved FAR 0.4.
    assert out["0.35"]["tar"] == 1.0 and out["0.35"]["achieved_far"] == pytest.approx(0.4)


def test_ties_accept_every_equal_score():
    impostor = np.array([0.5, 0.5, 0.5, 0.1])
    genuine = np.array([0.5, 0.4])
    point = tar_at_far(genuine, impostor, (0.25,))["0.25"]
    # k = 1, threshold 0.5, score >= 0.5 accepts the 3 tied impostors (FAR 0.75) and the genuine 0.5.
    assert point == {"tar": 0.5, "threshold": 0.5, "achieved_far": 0.75}


def test_too_few_impostors_gives_none():
    out = tar_at_far(np.ones(3), np.zeros(1000), (1e-3, 1e-4))
    assert out["1e-03"]["tar"] == 1.0
    assert out["1e-04"] == {"tar": None, "threshold": None, "achieved_far": None,
                            "reason": "FAR 1e-4 needs at least 10,000 impostor pairs, this set has 1,000"}
    assert tar_at_far(np.ones(3), np.zeros(9_999), (1e-4,))["1e-04"]["tar"] is None      # one short
    assert tar_at_far(np.ones(3), np.zeros(10_000), (1e-4,))["1e-04"]["tar"] == 1.0      # exactly enough


def test_k_is_exact_at_round_numbers():
    assert num_accepted_impostors(1e-4, 10_000) == 1  # 1e-4 * 1e4 is 1.0000000000000002 in floats
    assert num_accepted_impostors(1e-4, 10_001) == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_sklearn_roc_curve(seed):
    rng = np.random.default_rng(seed)
    # Quantised scores: many ties between and within the classes.
    genuine = np.round(rng.normal(0.6, 0.2, 700), 2)
    impostor = np.round(rng.normal(0.0, 0.2, 20_000), 2)
    labels = np.r_[np.ones(genuine.size), np.zeros(impostor.size)]
    fpr, tpr, _ = roc_curve(labels, np.r_[genuine, impostor], drop_intermediate=False)
    ours = tar_at_far(genuine, impostor, (1e-4, 1e-3, 1e-2, 1e-1))
    for far in (1e-4, 1e-3, 1e-2, 1e-1):
        first = int(np.nonzero(fpr >= far - 1e-12)[0][0])  # the ROC point with the smallest FPR >= far
        point = ours[f"{far:.0e}"]
        assert point["tar"] == pytest.approx(tpr[first], abs=1e-12)
        assert point["achieved_far"] == pytest.approx(fpr[first], abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("drop_intermediate", [True, False])
def test_roc_curve_points_are_sklearns_roc_curve(seed, drop_intermediate):
    rng = np.random.default_rng(seed)
    dtype = (np.float32, np.float64)[seed % 2]
    decimals = 2 + seed % 3    # ties within and between the classes
    genuine = np.round(rng.normal(0.6, 0.2, 300 + 100 * seed), decimals).astype(dtype)
    impostor = np.round(rng.normal(0.0, 0.2, 5_000 * (seed + 1)), decimals).astype(dtype)
    labels = np.r_[np.ones(genuine.size), np.zeros(impostor.size)]
    expected = roc_curve(labels, np.r_[genuine, impostor], drop_intermediate=drop_intermediate)
    got = roc_curve_points(genuine, impostor, drop_intermediate=drop_intermediate)
    for theirs, ours in zip(expected, got):
        assert theirs.shape == ours.shape and np.array_equal(theirs, ours)


def insightface_nearest_tpr(genuine, impostor, fars):
    """The TPR that insightface's eval_ijbc.py prints for each FAR, its loop re-stated (the real script runs in
    tests/eval/test_ijb_insightface.py)."""
    labels = np.r_[np.ones(genuine.size), np.zeros(impostor.size)]
    fpr, tpr, _ = roc_curve(labels, np.r_[genuine, impostor])
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return [tpr[min(zip(abs(fpr - far), range(len(fpr))))[1]] for far in fars]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_convention_is_insightfaces_loop(seed):
    rng = np.random.default_rng(seed)
    genuine = np.round(rng.normal(0.6, 0.2, 700), 3)
    impostor = np.round(rng.normal(0.0, 0.2, 30_000), 3)
    fars = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
    got = tar_at_far_nearest(genuine, impostor, fars)
    assert [got[f"{far:.0e}"]["tar"] for far in fars] == insightface_nearest_tpr(genuine, impostor, fars)
    # Below 1 / n the exact convention has no TAR; the nearest corner is then the point above every impostor.
    assert tar_at_far(genuine, impostor, (1e-5,))["1e-05"]["tar"] is None
    assert got["1e-05"]["achieved_far"] == 0.0 and got["1e-05"]["tar"] == np.mean(genuine > impostor.max())


def test_at_the_same_fpr_the_exact_threshold_takes_the_lowest_tar_and_the_nearest_corner_the_highest():
    # 10 impostors 0.9 ... 0.0, genuine 0.95, 0.85, 0.55. sklearn's corners (drop_intermediate):
    # (0, 0) (0, 1/3)@0.95 (0.1, 1/3)@0.9 (0.1, 2/3)@0.85 (0.4, 2/3)@0.6 (0.4, 1)@0.55 (1, 1)@0.
    impostor = np.round(np.arange(9, -1, -1) / 10, 1)
    genuine = np.array([0.95, 0.85, 0.55])
    exact = tar_at_far(genuine, impostor, (0.1, 0.4))
    nearest = tar_at_far_nearest(genuine, impostor, (0.1, 0.4))
    # FAR 0.1: k = 1, threshold = the largest impostor 0.9 -> TAR 1/3. Every threshold in (0.8, 0.9] has FAR 0.1;
    # the nearest corner is the last of them, 0.85, which also accepts the genuine 0.85 -> 2/3.
    assert exact["1e-01"] == {"tar": pytest.approx(1 / 3), "threshold": 0.9, "achieved_far": 0.1}
    assert nearest["1e-01"] == {"tar": pytest.approx(2 / 3), "threshold": 0.85, "achieved_far": 0.1}
    # FAR 0.4: k = 4, threshold 0.6 -> 2/3; the corner at FPR 0.4 with the largest TPR: 0.55 -> 1.
    assert exact["4e-01"]["tar"] == pytest.approx(2 / 3)
    assert nearest["4e-01"] == {"tar": 1.0, "threshold": 0.55, "achieved_far": pytest.approx(0.4)}
    # FAR 0.3: no corner there; the nearest one is above it, FPR 0.4 with TPR 1, where the exact threshold is the
    # 3rd impostor 0.7 (achieved FAR 0.3) with TAR 2/3.
    assert tar_at_far_nearest(genuine, impostor, (0.3,))["3e-01"] == {"tar": 1.0, "threshold": 0.55,
                                                                     "achieved_far": pytest.approx(0.4)}
    assert tar_at_far(genuine, impostor, (0.3,))["3e-01"] == {"tar": pytest.approx(2 / 3), "threshold": 0.7,
                                                            "achieved_far": pytest.approx(0.3)}


def test_roc_plot_is_a_png(tmp_path):
    rng = np.random.default_rng(0)
    far, tar = roc_points(rng.normal(1, 1, 500), rng.normal(0, 1, 50_000))
    assert np.all(np.diff(far) > 0) and np.all(np.diff(tar) >= 0)
    path = plot_roc({"model": (far, tar)}, tmp_path / "roc.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_roc_figure_names_the_model_steps_marks_operating_points_and_the_lowest_far():
    rng = np.random.default_rng(1)
    genuine, impostor = rng.normal(1.5, 1, 400), rng.normal(0, 1, 3_360)
    far, tar = roc_points(genuine, impostor)
    points = tar_at_far(genuine, impostor, fars=(1e-4, 1e-3, 1e-2))
    figure = roc_figure({"r50-run": (far, tar)}, "IJB-C 1:1 ROC (ijbc)", operating_points={"r50-run": points},
                        num_impostors=impostor.size)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "r50-run", "lowest measurable FAR: 1 / 3,360 impostor pairs"]
    curve, *markers, lowest = ax.get_lines()
    assert curve.get_drawstyle() == "steps-post" and np.array_equal(curve.get_xdata(), far)
    assert points["1e-04"]["tar"] is None  # 1e-4 x 3,360 < 1: not measurable, so not marked
    marked = sorted((float(m.get_xdata()[0]), float(m.get_ydata()[0])) for m in markers)
    assert marked == sorted((points[k]["achieved_far"], points[k]["tar"]) for k in ("1e-03", "1e-02"))
    labels = sorted(text.get_text() for text in ax.texts)
    assert labels == sorted(f"{k}: {100 * points[key]['tar']:.1f}%" for k, key in (("1e-3", "1e-03"), ("1e-2", "1e-02")))
    assert float(lowest.get_xdata()[0]) == pytest.approx(1 / 3_360)
