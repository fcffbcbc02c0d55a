# 5-point face alignment to the ArcFace 112x112 template: least-squares similarity transform and warp.
"""The recognition models of this toolkit (and insightface's) are trained on faces warped so that five
landmarks (left eye, right eye, nose tip, left and right mouth corners, in image x/y pixels) land on fixed
points of a 112 x 112 image. Benchmarks that ship loose crops and landmarks (IJB-B, IJB-C) are aligned
the same way: a similarity transform (rotation, uniform scale, translation) estimated by least squares
from the 5 detected points to the template (Umeyama's closed form, scikit-image's SimilarityTransform),
then a bilinear warp of the crop, black outside it (OpenCV's warpAffine: ~0.2 ms per face whatever the crop
size, where scikit-image's warp converts the whole crop to float64 first and takes ~10 ms for a 400 x 400
crop; both use integer pixel centres and agree to rounding).

Template (x, y) for 112 x 112: (38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366),
(41.5493, 92.3655), (70.7299, 92.2041). For another output size S the template is scaled by S / 112.
"""

from __future__ import annotations

import numpy as np

from toolkit.errors import FaceCLError

ARCFACE_TEMPLATE_112 = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
], dtype=np.float64)  # 5 x 2 (x, y)


class AlignmentError(FaceCLError):
    """Landmarks that cannot be used: outside the image, not finite, or degenerate."""


def template_for(size: int) -> np.ndarray:
    """The 5-point template for an output of size x size pixels: 5 x 2."""
    return ARCFACE_TEMPLATE_112 * (size / 112.0)


def estimate_similarity(landmarks_52: np.ndarray, size: int = 112) -> np.ndarray:
    """The 3 x 3 matrix mapping image (x, y, 1) to aligned (x, y, 1), least squares over the 5 points."""
    from skimage.transform import SimilarityTransform

    landmarks_52 = np.asarray(landmarks_52, dtype=np.float64).reshape(5, 2)
    if not np.all(np.isfinite(landmarks_52)):
        raise AlignmentError(f"landmarks are not finite: {landmarks_52.ravel().tolist()}")
    transform = SimilarityTransform.from_estimate(landmarks_52, template_for(size))
    if not transform or not np.all(np.isfinite(transform.params)):
        raise AlignmentError(f"no similarity transform fits the landmarks {landmarks_52.ravel().tolist()} "
                             "(all points coincide?)")
    return transform.params


def check_landmarks_inside(landmarks_52: np.ndarray, height: int, width: int) -> None:
    """Refuse landmarks outside the image rectangle [0, width] x [0, height] (x, y): they come from another
    image or a broken detector, and would align the face to garbage."""
    landmarks_52 = np.asarray(landmarks_52, dtype=np.float64).reshape(5, 2)
    if not np.all(np.isfinite(landmarks_52)):
        raise AlignmentError(f"landmarks are not finite: {landmarks_52.ravel().tolist()}")
    x, y = landmarks_52[:, 0], landmarks_52[:, 1]
    if x.min() < 0 or y.min() < 0 or x.max() > width or y.max() > height:
        raise AlignmentError(f"landmarks {np.round(landmarks_52, 1).ravel().tolist()} lie outside the "
                             f"{width} x {height} image")


def align_face(image_HW3: np.ndarray, landmarks_52: np.ndarray, size: int = 112) -> np.ndarray:
    """The aligned face: size x size x 3 uint8 (bilinear, zeros outside the source image)."""
    import cv2

    if image_HW3.ndim != 3 or image_HW3.shape[2] != 3:
        raise AlignmentError(f"expected an H x W x 3 image, got shape {image_HW3.shape}")
    check_landmarks_inside(landmarks_52, image_HW3.shape[0], image_HW3.shape[1])
    matrix_33 = estimate_similarity(landmarks_52, size)
    return cv2.warpAffine(np.ascontiguousarray(image_HW3, dtype=np.uint8), matrix_33[:2], (size, size),
                          flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=(0, 0, 0))
