# TAR at FAR: hand-computed cases, ties, too-small sets, and sklearn's roc_curve as an independent reference.
import numpy as np
import pytest
from sklearn.metrics import roc_curve

from toolkit.eval.roc import num_accepted_impostors, plot_roc, roc_figure, roc_points, tar_at_far


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
