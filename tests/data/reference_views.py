# The per-image MoCo-v2 view of toolkit.data.transforms before batching (commit 4e458b1), kept as the reference.
"""The code below is the old per-image augmentation unchanged, except where its random numbers come from:
`_uniform` and `_chance` take them from a `UniformSource`, which either draws from a torch.Generator (the
old code exactly) or replays given U(0, 1) numbers. Replaying a view's 9 uniforms of the batched code in
the order the old code asks for them (jitter chance, 4 factors when jittered, grayscale chance, blur
chance, sigma when blurred, flip chance) gives the old code the same parameters as the batched code.
`RecordingSource` logs every draw with the range or probability the old code asked for, which is the
distribution the old code specifies."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from toolkit.data.transforms import (U_BLUR_ON, U_BLUR_SIGMA, U_BRIGHTNESS, U_CONTRAST, U_FLIP_ON, U_GRAYSCALE_ON,
                                     U_HUE, U_JITTER_ON, U_SATURATION, ViewAugmentation)


class UniformSource:
    """U(0, 1) numbers from a generator (as the old code drew them) or from a list (replay)."""

    def __init__(self, gen: torch.Generator | None = None, values: list[float] | None = None):
        self.gen, self.values = gen, list(values or [])

    def next(self) -> float:
        if self.gen is not None:
            return float(torch.rand(1, generator=self.gen))
        return self.values.pop(0)


class RecordingSource(UniformSource):
    """Draws from a generator and logs (kind, range or probability, value) for every call of the old code."""

    def __init__(self, gen: torch.Generator):
        super().__init__(gen)
        self.log: list[tuple] = []


def replay_of_view(uniforms_9: list[float], cfg: ViewAugmentation) -> UniformSource:
    """The batched code's 9 uniforms of one view in the order the old code draws them."""
    order = [U_JITTER_ON]
    if uniforms_9[U_JITTER_ON] < cfg.color_jitter_p:
        order += [U_BRIGHTNESS, U_CONTRAST, U_SATURATION] + ([U_HUE] if cfg.color_jitter[3] > 0 else [])
    order += [U_GRAYSCALE_ON, U_BLUR_ON]
    if uniforms_9[U_BLUR_ON] < cfg.blur_p:
        order += [U_BLUR_SIGMA]
    if cfg.flip:
        order += [U_FLIP_ON]
    return UniformSource(values=[uniforms_9[i] for i in order])


# ----- the old code -----------------------------------------------------------------------------------

_GRAY_WEIGHTS = torch.tensor([0.299, 0.587, 0.114])


def _uniform(source: UniformSource, low: float, high: float) -> float:
    value = low + (high - low) * source.next()
    if isinstance(source, RecordingSource):
        source.log.append(("uniform", (low, high), value))
    return value


def _chance(source: UniformSource, p: float) -> bool:
    value = source.next() < p
    if isinstance(source, RecordingSource):
        source.log.append(("chance", p, value))
    return value


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
                 source: UniformSource) -> torch.Tensor:
    """Brightness, contrast, saturation and hue jitter (torchvision's factors), on [0, 1] images."""
    brightness, contrast, saturation, hue = strengths
    image = rgb_3HW * _uniform(source, max(0.0, 1 - brightness), 1 + brightness)
    mean = _grayscale(image).mean()
    image = (image - mean) * _uniform(source, max(0.0, 1 - contrast), 1 + contrast) + mean
    gray = _grayscale(image)
    image = (image - gray) * _uniform(source, max(0.0, 1 - saturation), 1 + saturation) + gray
    if hue > 0:
        image = _rotate_hue(image, _uniform(source, -hue, hue))
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


def moco_view(image_3HW: torch.Tensor, cfg: ViewAugmentation, source: UniformSource) -> torch.Tensor:
    """One MoCo-v2 view (no crop) of a [-1, 1] image."""
    rgb = image_3HW * 0.5 + 0.5
    if _chance(source, cfg.color_jitter_p):
        rgb = color_jitter(rgb, cfg.color_jitter, source)
    if _chance(source, cfg.grayscale_p):
        rgb = _grayscale(rgb).expand(3, -1, -1)
    if _chance(source, cfg.blur_p):
        # Sigma is given for 112x112 faces; scale it with the image so small smoke images are not wiped out.
        scale = image_3HW.shape[-1] / 112
        rgb = gaussian_blur(rgb, _uniform(source, *cfg.blur_sigma) * scale)
    if cfg.flip and _chance(source, 0.5):
        rgb = rgb.flip(-1)
    return (rgb - 0.5) / 0.5
