# Alignment: the similarity estimate against a direct numpy least-squares (Umeyama) solution, and the warp.
import numpy as np
import pytest

from toolkit.eval.align import ARCFACE_TEMPLATE_112, AlignmentError, align_face, estimate_similarity


def umeyama_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares rotation + uniform scale + translation src -> dst (Umeyama 1991), written from the
    paper's closed form: covariance SVD, reflection guard, scale = trace(D S) / source variance."""
    mu_s, mu_d = src.mean(0), dst.mean(0)
    xs, xd = src - mu_s, dst - mu_d
    cov = xd.T @ xs / len(src)
    u, d, vt = np.linalg.svd(cov)
    s = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        s[1, 1] = -1
    rot = u @ s @ vt
    scale = np.trace(np.diag(d) @ s) / xs.var(0).sum()
    m = np.eye(3)
    m[:2, :2] = scale * rot
    m[:2, 2] = mu_d - scale * rot @ mu_s
    return m


def similarity_by_linear_least_squares(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The same estimate a second way: x' = a x - b y + tx, y' = b x + a y + ty solved with lstsq."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty], [0, 0, 1]])


@pytest.mark.parametrize("seed", range(5))
def test_estimate_matches_umeyama_and_lstsq(seed):
    rng = np.random.default_rng(seed)
    angle, scale = rng.uniform(-0.6, 0.6), rng.uniform(0.3, 3.0)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = (ARCFACE_TEMPLATE_112 @ rot.T) * scale + rng.uniform(0, 200, 2) + rng.normal(0, 2.0, (5, 2))
    ours = estimate_similarity(landmarks)
    np.testing.assert_allclose(ours, umeyama_similarity(landmarks, ARCFACE_TEMPLATE_112), atol=1e-9)
    np.testing.assert_allclose(ours, similarity_by_linear_least_squares(landmarks, ARCFACE_TEMPLATE_112), atol=1e-9)


def test_template_for_other_sizes_scales():
    landmarks = ARCFACE_TEMPLATE_112 * 2 + 10
    m = estimate_similarity(landmarks, size=56)
    mapped = (m @ np.c_[landmarks, np.ones(5)].T).T[:, :2]
    np.testing.assert_allclose(mapped, ARCFACE_TEMPLATE_112 / 2, atol=1e-9)


def test_warp_puts_landmark_spots_on_the_template():
    rng = np.random.default_rng(0)
    angle = 0.3
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    landmarks = (ARCFACE_TEMPLATE_112 - 56) @ rot.T * 1.5 + np.array([100, 110])
    image = np.zeros((220, 200, 3), np.uint8)
    for x, y in landmarks:  # a bright 5 x 5 spot centred on each landmark
        image[int(round(y)) - 2:int(round(y)) + 3, int(round(x)) - 2:int(round(x)) + 3] = 255
    aligned = align_face(image, landmarks)
    assert aligned.shape == (112, 112, 3) and aligned.dtype == np.uint8
    for tx, ty in ARCFACE_TEMPLATE_112:
        # Brightness-weighted centre of the spot around the template point.
        x0, y0 = int(tx) - 6, int(ty) - 6
        patch = aligned[y0:y0 + 13, x0:x0 + 13, 0].astype(float)
        ys, xs = np.mgrid[y0:y0 + 13, x0:x0 + 13]
        cx, cy = (patch * xs).sum() / patch.sum(), (patch * ys).sum() / patch.sum()
        assert abs(cx - tx) < 0.8 and abs(cy - ty) < 0.8


def test_warp_agrees_with_an_independent_bilinear_sampler():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (90, 80, 3)).astype(np.uint8)
    landmarks = ARCFACE_TEMPLATE_112 * 0.6 + np.array([8.3, 12.7])
    aligned = align_face(image, landmarks).astype(float)
    # Reference: map every output pixel centre back with the inverse transform, sample bilinearly (numpy).
    inv = np.linalg.inv(umeyama_similarity(landmarks, ARCFACE_TEMPLATE_112))
    ys, xs = np.mgrid[0:112, 0:112]
    src = inv @ np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
    sx, sy = src[0], src[1]
    x0, y0 = np.floor(sx).astype(int), np.floor(sy).astype(int)
    fx, fy = sx - x0, sy - y0
    inside = (x0 >= 0) & (y0 >= 0) & (x0 + 1 < 80) & (y0 + 1 < 90)
    x0, y0, fx, fy = x0[inside], y0[inside], fx[inside, None], fy[inside, None]
    ref = (image[y0, x0] * (1 - fx) * (1 - fy) + image[y0, x0 + 1] * fx * (1 - fy)
           + image[y0 + 1, x0] * (1 - fx) * fy + image[y0 + 1, x0 + 1] * fx * fy)
    got = aligned.reshape(-1, 3)[inside]
    # OpenCV interpolates with 5-bit fixed-point weights: within a couple of grey levels.
    assert np.abs(got - ref).max() <= 3.0 and np.abs(got - ref).mean() < 0.6


def test_landmarks_outside_the_image_are_refused():
    image = np.zeros((50, 40, 3), np.uint8)
    landmarks = ARCFACE_TEMPLATE_112 * 0.3 + 5
    align_face(image, landmarks)  # inside: fine
    with pytest.raises(AlignmentError, match="outside the 40 x 50 image"):
        align_face(image, landmarks + np.array([30, 0]))
    with pytest.raises(AlignmentError, match="not finite"):
        align_face(image, np.full((5, 2), np.nan))
