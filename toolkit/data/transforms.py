# Seeded MoCo-v2 views (colour jitter, grayscale, blur, flip) drawn per sample and applied to a whole batch at once.
"""Augmentation is a function of (images, per-sample seeds): the caller draws each sample's seed from the
data order, so a resumed run augments every sample exactly as the uninterrupted run, and a sample's views
do not depend on the other samples of its batch.

Images are float32 B x 3 x H x W in [-1, 1] (the toolkit's normalisation). A MoCo-v2 view is, in this
order: colour jitter (p=0.8: brightness, contrast, saturation and hue factors as torchvision draws them,
applied in that order on [0, 1] pixels, then clamped to [0, 1]), grayscale (p=0.2), Gaussian blur (p=0.5,
sigma uniform in blur_sigma pixels at 112x112, scaled with the width; reflect padding, kernel radius
max(1, ceil(2 sigma))) and horizontal flip (p=0.5); there is no random crop (faces are aligned).

Each view's random numbers are 9 uniforms drawn from the sample's seed (`draw_view_parameters`), the same
count whatever is switched on, so the parameters are tensors over the batch with the old per-image code's
ranges and chances. `apply_views` then uses batched ops instead of a loop over images:
- jitter is linear up to its clamp, so brightness, contrast, saturation, hue and the [-1, 1] <-> [0, 1]
  conversions fold into one 3x4 affine map per view; both views of a chunk of samples are one batched
  matmul, followed by the clamp of the jittered views;
- grayscale without jitter folds into that map too; after jitter it rewrites the view's channels;
- blur: the blurred views of the batch, grouped by kernel radius, are the channels of one image blurred
  by one depthwise convolution per direction, each channel with its view's kernel;
- flip is done last (colour is per pixel and blur symmetric, so it commutes with both): mirrored blurred
  views are written back mirrored, the other mirrored views in one gather and scatter.
Grayscale, blur and flip commute with the [0, 1] -> [-1, 1] map (their weights sum to one), so they run on
the normalised pixels. tests/data/reference_views.py keeps the per-image code as the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ViewAugmentation:
    """Parameters of one MoCo-v2 view (the recipe's data.views section maps onto these fields)."""

    color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)   # pixels at 112x112, scaled with the image size
    blur_p: float = 0.5
    flip: bool = True

    def __post_init__(self):
        for name in ("color_jitter_p", "grayscale_p", "blur_p"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"views.{name}={value} is not a probability in [0, 1]")
        if len(self.color_jitter) != 4 or min(self.color_jitter) < 0:
            raise ValueError(f"views.color_jitter={self.color_jitter} must be 4 non-negative strengths "
                             "(brightness, contrast, saturation, hue)")
        low, high = self.blur_sigma
        if not 0 < low <= high:
            raise ValueError(f"views.blur_sigma={self.blur_sigma} must be a range 0 < low <= high (pixels)")


# Uniform numbers of one view, in this order (a fixed count, whatever is switched on).
(U_JITTER_ON, U_BRIGHTNESS, U_CONTRAST, U_SATURATION, U_HUE, U_GRAYSCALE_ON, U_BLUR_ON, U_BLUR_SIGMA,
 U_FLIP_ON) = range(9)
UNIFORMS_PER_VIEW = 9

GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # sum to 1: grayscale maps a constant image onto itself
_YIQ_FROM_RGB_64 = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
                                dtype=torch.float64)
_RGB_FROM_YIQ_64 = torch.linalg.inv(_YIQ_FROM_RGB_64)
# Samples per chunk of apply_views: two views of 8 samples at 112x112 are 2.4 MB, small enough to stay in cache.
CHUNK_SAMPLES = 8
# Views per blur or flip group: 32 views at 112x112 are 4.8 MB.
VIEWS_PER_GROUP = 32


@dataclass(frozen=True)
class ViewParameters:
    """Random parameters of the two views of B samples; every field is B x 2 (view 0 the query, 1 the key)."""

    jitter_on_B2: torch.Tensor       # bool
    brightness_B2: torch.Tensor      # factor, used where jitter_on
    contrast_B2: torch.Tensor
    saturation_B2: torch.Tensor
    hue_turns_B2: torch.Tensor       # hue rotation in turns of the colour circle (0 when the hue strength is 0)
    grayscale_on_B2: torch.Tensor    # bool
    blur_on_B2: torch.Tensor         # bool
    blur_sigma_B2: torch.Tensor      # pixels at this image size, used where blur_on
    flip_on_B2: torch.Tensor         # bool


def _between(low: float, high: float, uniform: torch.Tensor) -> torch.Tensor:
    return low + (high - low) * uniform


def view_parameters(uniforms_B29: torch.Tensor, cfg: ViewAugmentation, image_width: int) -> ViewParameters:
    """Map U(0, 1) numbers (B x 2 x 9, in the U_* order) onto view parameters with cfg's ranges and chances."""
    if uniforms_B29.dim() != 3 or uniforms_B29.shape[1:] != (2, UNIFORMS_PER_VIEW):
        raise ValueError(f"uniforms of shape {tuple(uniforms_B29.shape)}, expected B x 2 x {UNIFORMS_PER_VIEW}")
    u = uniforms_B29.to(torch.float64).unbind(-1)
    brightness, contrast, saturation, hue = cfg.color_jitter
    # Sigma is given for 112x112 faces; scale it with the image so small smoke images are not wiped out.
    sigma_scale = image_width / 112
    return ViewParameters(
        jitter_on_B2=u[U_JITTER_ON] < cfg.color_jitter_p,
        brightness_B2=_between(max(0.0, 1 - brightness), 1 + brightness, u[U_BRIGHTNESS]),
        contrast_B2=_between(max(0.0, 1 - contrast), 1 + contrast, u[U_CONTRAST]),
        saturation_B2=_between(max(0.0, 1 - saturation), 1 + saturation, u[U_SATURATION]),
        hue_turns_B2=_between(-hue, hue, u[U_HUE]),
        grayscale_on_B2=u[U_GRAYSCALE_ON] < cfg.grayscale_p,
        blur_on_B2=u[U_BLUR_ON] < cfg.blur_p,
        blur_sigma_B2=_between(*cfg.blur_sigma, u[U_BLUR_SIGMA]) * sigma_scale,
        flip_on_B2=(u[U_FLIP_ON] < 0.5) & cfg.flip,
    )


def draw_view_parameters(sample_seeds: Sequence[int], cfg: ViewAugmentation, image_width: int) -> ViewParameters:
    """Both views' parameters of every sample, each from its own seed (2 x 9 uniforms per sample)."""
    if len(sample_seeds) == 0:
        raise ValueError("draw_view_parameters needs at least one sample seed, got none")
    uniforms_B29 = torch.stack([torch.rand(2, UNIFORMS_PER_VIEW, generator=torch.Generator().manual_seed(int(seed)))
                                for seed in sample_seeds])
    return view_parameters(uniforms_B29, cfg, image_width)


def _hue_rotations(turns_V: torch.Tensor) -> torch.Tensor:
    """Hue rotation matrices in YIQ space (a linear approximation of HSV hue), float64: V x 3 x 3."""
    angle_V = 2 * math.pi * turns_V
    rotate_V33 = torch.zeros(turns_V.numel(), 3, 3, dtype=torch.float64)
    rotate_V33[:, 0, 0] = 1.0
    rotate_V33[:, 1, 1], rotate_V33[:, 1, 2] = angle_V.cos(), -angle_V.sin()
    rotate_V33[:, 2, 1], rotate_V33[:, 2, 2] = angle_V.sin(), angle_V.cos()
    return _RGB_FROM_YIQ_64 @ rotate_V33 @ _YIQ_FROM_RGB_64


def _colour_affine(params: ViewParameters, scale: float, shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-view affine map of stored pixel values v (z = scale v + shift in [-1, 1]) that equals colour jitter (and
    grayscale, when it comes without jitter) on [0, 1] pixels x = (z + 1) / 2, given m_z, the mean gray level of
    the view's image in z: [M | offset] (V x 3 x 4, V = 2B, query first) for v -> M v + offset + m_z mean_coef,
    and mean_coef (V x 3). The jittered views are clamped to [-1, 1] afterwards (the old code's clamp to [0, 1]).

    On x: brightness b gives b x; contrast c gives c b x + (1 - c) b m_x (m_x = (m_z + 1) / 2); saturation s is
    S = s I + (1 - s) 1 w^T; hue is a matrix H; so jitter is A x + o with A = c b H S, o = (1 - c) b m_x H S 1.
    In z: 2 (A (z + 1) / 2 + o) - 1 = A z + A 1 - 1 + k (m_z + 1) with k = (1 - c) b H S 1; in v, A z = scale A v +
    shift A 1. A view without jitter is I z, or 1 w^T z when it turns gray (w sums to 1, so the gray of z is
    the [-1, 1] image of the gray of x)."""
    V = params.jitter_on_B2.numel()
    b_V = params.brightness_B2.reshape(V)
    c_V = params.contrast_B2.reshape(V)
    s_V = params.saturation_B2.reshape(V)
    eye_33 = torch.eye(3, dtype=torch.float64)
    ones_31 = torch.ones(3, 1, dtype=torch.float64)
    to_gray_33 = ones_31 @ torch.tensor([GRAY_WEIGHTS], dtype=torch.float64)   # every channel the gray level
    saturation_V33 = s_V[:, None, None] * eye_33 + (1 - s_V)[:, None, None] * to_gray_33
    apply_hue = bool((params.hue_turns_B2 != 0).any())
    hue_V33 = _hue_rotations(params.hue_turns_B2.reshape(V)) if apply_hue else eye_33.expand(V, 3, 3)
    hue_saturation_V33 = hue_V33 @ saturation_V33
    jitter_V33 = (c_V * b_V)[:, None, None] * hue_saturation_V33
    jitter_mean_coef_V31 = ((1 - c_V) * b_V)[:, None, None] * (hue_saturation_V33 @ ones_31)
    jitter_offset_V31 = jitter_V33 @ ones_31 - 1 + jitter_mean_coef_V31
    jitter_V = params.jitter_on_B2.reshape(V)[:, None, None]
    gray_V = params.grayscale_on_B2.reshape(V)[:, None, None]
    matrix_V33 = torch.where(jitter_V, jitter_V33, torch.where(gray_V, to_gray_33, eye_33))
    offset_V31 = torch.where(jitter_V, jitter_offset_V31, 0.0) + shift * (matrix_V33 @ ones_31)
    mean_coef_V31 = torch.where(jitter_V, jitter_mean_coef_V31, 0.0)
    return torch.cat([scale * matrix_V33, offset_V31], dim=2).float(), mean_coef_V31[:, :, 0].float()


def _blur_kernels(sigma_V: torch.Tensor) -> torch.Tensor:
    """Normalised Gaussian kernels of radius max(1, ceil(2 sigma)), zero-padded to the largest radius R:
    V x (2R + 1). Zero taps beyond a view's own radius make a shared padding give each view its own blur."""
    radius_V = torch.clamp(torch.ceil(2 * sigma_V), min=1).long()
    R = int(radius_V.max())
    offsets_K = torch.arange(-R, R + 1, dtype=torch.float32)
    kernel_VK = torch.exp(-0.5 * (offsets_K / sigma_V.float()[:, None]) ** 2)
    kernel_VK = torch.where(offsets_K.abs() <= radius_V[:, None], kernel_VK, 0.0)
    return kernel_VK / kernel_VK.sum(dim=1, keepdim=True)


def _blur_in_place(views_V3HW: torch.Tensor, picked_N: torch.Tensor, kernel_NK: torch.Tensor, mirrored: bool) -> None:
    """Separable Gaussian blur of views_V3HW[picked_N[n]] with kernel_NK[n] each, reflect padding, in place
    (mirrored when `mirrored`): every channel of every picked view is a channel of one image (1 x 3N x H x W),
    blurred by one depthwise convolution per direction with one kernel per view."""
    N, (_, H, W) = picked_N.numel(), views_V3HW.shape[1:]
    R = (kernel_NK.shape[1] - 1) // 2
    weight_C1K = kernel_NK.repeat_interleave(3, dim=0)[:, None, :]     # 3N x 1 x K: one filter per view channel
    # Reflect-padding rows before the horizontal pass gives the same rows as padding after it.
    planes = F.pad(views_V3HW.index_select(0, picked_N).view(1, 3 * N, H, W), (R, R, R, R), mode="reflect")
    planes = F.conv2d(planes, weight_C1K[:, :, None, :], groups=3 * N)   # 1 x 3N x (H + 2R) x W
    planes = F.conv2d(planes, weight_C1K[:, :, :, None], groups=3 * N)   # 1 x 3N x H x W
    blurred_N3HW = planes.view(N, 3, H, W)
    views_V3HW.index_copy_(0, picked_N, blurred_N3HW.flip(-1) if mirrored else blurred_N3HW)


def _output_batch(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor for the views. In a DataLoader worker it is allocated in shared memory,
    where the batch has to go anyway (the pickler would copy it there). Otherwise it comes from numpy's
    allocator, which asks for transparent huge pages on large blocks: the first touch of a fresh 38 MB batch
    then costs a few page faults instead of ~9,000 (glibc returns blocks above 32 MB to the system on free,
    so every batch is fresh memory)."""
    if torch.utils.data.get_worker_info() is not None:
        storage = torch.UntypedStorage._new_shared(math.prod(shape) * 4)   # as DataLoader's collate does
        return torch.empty(0).set_(storage, 0, shape)
    return torch.from_numpy(np.empty(shape, dtype=np.float32))


def _runs(flags: list[bool], first: int, last: int) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive True flags within [first, last)."""
    runs, start = [], None
    for i in range(first, last + 1):
        on = i < last and flags[i]
        if on and start is None:
            start = i
        elif not on and start is not None:
            runs.append((start, i))
            start = None
    return runs


def _as_channels_first(images: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """(images as B x 3 x H x W, scale, shift) with z = scale * value + shift the [-1, 1] pixel: float32 images
    B x 3 x H x W in [-1, 1] as they are, or decoded uint8 pixels B x H x W x 3 (a channels-first view, read
    by the chunk copies, so the batch is never converted to float as a whole)."""
    if images.dtype == torch.uint8 and images.dim() == 4 and images.shape[3] == 3:
        return images.permute(0, 3, 1, 2), 1 / 127.5, -1.0
    if images.dtype.is_floating_point and images.dim() == 4 and images.shape[1] == 3:
        return images.float(), 1.0, 0.0
    raise ValueError(f"images of shape {tuple(images.shape)} and dtype {images.dtype}, expected float "
                     "B x 3 x H x W in [-1, 1] or uint8 B x H x W x 3")


def apply_views(images: torch.Tensor, params: ViewParameters, chunk_samples: int = CHUNK_SAMPLES) -> torch.Tensor:
    """The two views of every image with the given parameters: B x 2 x 3 x H x W float32 in [-1, 1]. Images are
    float32 B x 3 x H x W in [-1, 1], or uint8 B x H x W x 3 as decoded (value v is the pixel v / 127.5 - 1)."""
    images_B3HW, scale, shift = _as_channels_first(images)
    B, _, H, W = images_B3HW.shape
    if params.jitter_on_B2.shape != (B, 2):
        raise ValueError(f"view parameters for {tuple(params.jitter_on_B2.shape)} views, images are {B} x 2 views")
    gray_weights_31 = torch.tensor([GRAY_WEIGHTS])[0, :, None]
    affine_V34, mean_coef_V3 = _colour_affine(params, scale, shift)
    jitter_V = params.jitter_on_B2.reshape(-1).tolist()
    gray_after_jitter_V = (params.grayscale_on_B2 & params.jitter_on_B2).reshape(-1).tolist()
    blur_V, flip_V = params.blur_on_B2.reshape(-1), params.flip_on_B2.reshape(-1)
    largest_sigma = float(torch.where(params.blur_on_B2, params.blur_sigma_B2, 0.0).max())
    largest_radius = max(1, math.ceil(2 * largest_sigma))
    if largest_radius >= min(H, W):
        raise ValueError(f"blur radius {largest_radius} px needs images larger than {H}x{W} (blur_sigma "
                         f"{largest_sigma:.3g} px is too large for the size)")

    out_B23HW = _output_batch((B, 2, 3, H, W))
    # Both views of a sample are one matmul of its [M | offset] rows (6 x 4) with the image plus a channel of ones.
    affine_B64 = affine_V34.view(B, 6, 4)
    sources_C4P = torch.empty(min(B, chunk_samples), 4, H * W)
    sources_C4P[:, 3].fill_(1.0)
    for start in range(0, B, chunk_samples):
        stop = min(B, start + chunk_samples)
        first, last = 2 * start, 2 * stop                               # the chunk's views
        sources_C4P[: stop - start, :3].view(-1, 3, H, W).copy_(images_B3HW[start:stop])
        # The contrast term needs each image's mean gray level, read from the chunk while it is in cache.
        gray_mean_C = (sources_C4P[: stop - start, :3].mean(dim=2) @ gray_weights_31)[:, 0] * scale + shift
        affine_B64[start:stop, :, 3].addcmul_(mean_coef_V3[first:last].view(-1, 6), gray_mean_C[:, None])
        views_V3P = out_B23HW[start:stop].view(last - first, 3, H * W)
        torch.bmm(affine_B64[start:stop], sources_C4P[: stop - start], out=views_V3P.view(-1, 6, H * W))
        for run_start, run_stop in _runs(jitter_V, first, last):
            views_V3P[run_start - first: run_stop - first].clamp_(-1.0, 1.0)
        for view in range(first, last):
            if gray_after_jitter_V[view]:
                plane_3P = views_V3P[view - first]
                plane_3P.copy_((gray_weights_31.T @ plane_3P).expand(3, -1))
    # Blur and flip over the whole batch: blurred views grouped by kernel radius (no taps spent on zeros) and
    # by flip (a mirrored group is written back mirrored), in groups of a few MB.
    views_V3HW = out_B23HW.view(2 * B, 3, H, W)
    sigma_V = params.blur_sigma_B2.reshape(-1)
    radius_V = torch.clamp(torch.ceil(2 * sigma_V), min=1).long()
    if bool(blur_V.any()):
        kernel_VK = _blur_kernels(torch.where(blur_V, sigma_V, 0.5))     # V x (2 largest_radius + 1)
    for radius in torch.unique(radius_V[blur_V]).tolist():
        for mirrored in (False, True):
            group_G = torch.nonzero(blur_V & (radius_V == radius) & (flip_V == mirrored)).view(-1)
            taps = slice(largest_radius - radius, largest_radius + radius + 1)   # the group's own radius
            for part in range(0, group_G.numel(), VIEWS_PER_GROUP):
                picked_N = group_G[part: part + VIEWS_PER_GROUP]
                _blur_in_place(views_V3HW, picked_N, kernel_VK[picked_N, taps], mirrored)
    mirrored_M = torch.nonzero(flip_V & ~blur_V).view(-1)
    for part in range(0, mirrored_M.numel(), VIEWS_PER_GROUP):
        picked_N = mirrored_M[part: part + VIEWS_PER_GROUP]
        views_V3HW.index_copy_(0, picked_N, views_V3HW.index_select(0, picked_N).flip(-1))
    return out_B23HW


def two_views_batch(images: torch.Tensor, sample_seeds: Sequence[int], cfg: ViewAugmentation) -> torch.Tensor:
    """The query and key views of every image, sample i augmented from sample_seeds[i]: B x 2 x 3 x H x W.
    Images as apply_views takes them (float B x 3 x H x W in [-1, 1], or uint8 B x H x W x 3)."""
    images_B3HW, _, _ = _as_channels_first(images)
    if len(sample_seeds) != images_B3HW.shape[0]:
        raise ValueError(f"{len(sample_seeds)} sample seeds for a batch of {images_B3HW.shape[0]} images")
    return apply_views(images, draw_view_parameters(sample_seeds, cfg, images_B3HW.shape[-1]))
