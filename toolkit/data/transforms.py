# Seeded augmentations on image tensors: flip, and the two MoCo-v2 views (colour jitter, grayscale, blur).
"""Augmentations are functions of (image, generator): the caller seeds the generator from the sample's
position in the data order, so a resumed run augments every sample exactly as the uninterrupted run.

Images are float32 3 x H x W in [-1, 1] (the toolkit's normalisation); the colour operations work on
[0, 1] internally. The MoCo-v2 view is colour jitter (p=0.8), grayscale (p=0.2), Gaussian blur (p=0.5)
and flip, without random crop (faces are aligned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


_GRAY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114])


def _uniform(gen: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(1, generator=gen))


def _chance(gen: torch.Generator, p: float) -> bool:
    return float(torch.rand(1, generator=gen)) < p


def _grayscale(rgb_3HW: torch.Tensor) -> torch.Tensor:
    return (rgb_3HW * _GRAY_WEIGHTS.to(rgb_3HW)[:, None, None]).sum(dim=0, keepdim=True)  # 1 x H x W


def _rotate_hue(rgb_3HW: torch.Tensor, turns: float) -> torch.Tensor:
    """Hue rotation by `turns` of a full circle, in YIQ space (a linear approximation of HSV hue)."""
    to_yiq = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    angle = 2 * math.pi * turns
    rotate = torch.tensor([[1.0, 0.0, 0.0], [0.0, math.cos(angle), -math.sin(angle)],
                           [0.0, math.sin(angle), math.cos(angle)]])
    matrix = torch.linalg.inv(to_yiq) @ rotate @ to_yiq
    return torch.einsum("ij,jhw->ihw", matrix.to(rgb_3HW), rgb_3HW)


def color_jitter(rgb_3HW: torch.Tensor, strengths: tuple[float, float, float, float],
                 gen: torch.Generator) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter (torchvision's factors), on [0, 1] images."""
    brightness, contrast, saturation, hue = strengths
    image = rgb_3HW * _uniform(gen, max(0.0, 1 - brightness), 1 + brightness)
    mean = _grayscale(image).mean()
    image = (image - mean) * _uniform(gen, max(0.0, 1 - contrast), 1 + contrast) + mean
    gray = _grayscale(image)
    image = (image - gray) * _uniform(gen, max(0.0, 1 - saturation), 1 + saturation) + gray
    if hue > 0:
        image = _rotate_hue(image, _uniform(gen, -hue, hue))
    return image.clamp(0.0, 1.0)


def gaussian_blur(image_3HW: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with a kernel of about 4 sigma each side, reflect padding."""
    radius = max(1, math.ceil(2 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=image_3HW.dtype)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    image = image_3HW[:, None]  # 3 x 1 x H x W: channels as a batch
    image = F.conv2d(F.pad(image, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    image = F.conv2d(F.pad(image, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))
    return image[:, 0]


def moco_view(image_3HW: torch.Tensor, cfg: ViewAugmentation, gen: torch.Generator) -> torch.Tensor:
    """One MoCo-v2 view (no crop) of a [-1, 1] image."""
    rgb = image_3HW * 0.5 + 0.5
    if _chance(gen, cfg.color_jitter_p):
        rgb = color_jitter(rgb, cfg.color_jitter, gen)
    if _chance(gen, cfg.grayscale_p):
        rgb = _grayscale(rgb).expand(3, -1, -1)
    if _chance(gen, cfg.blur_p):
        # Sigma is given for 112x112 faces; scale it with the image so small smoke images are not wiped out.
        scale = image_3HW.shape[-1] / 112
        rgb = gaussian_blur(rgb, _uniform(gen, *cfg.blur_sigma) * scale)
    if cfg.flip and _chance(gen, 0.5):
        rgb = rgb.flip(-1)
    return (rgb - 0.5) / 0.5


def two_views(image_3HW: torch.Tensor, cfg: ViewAugmentation, gen: torch.Generator) -> torch.Tensor:
    """The query and key views of one image: 2 x 3 x H x W."""
    return torch.stack([moco_view(image_3HW, cfg, gen), moco_view(image_3HW, cfg, gen)])
