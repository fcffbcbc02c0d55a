# MobileFaceNet backbone (Chen et al. 2018, insightface-style), registered as "mobilefacenet".
"""MobileFaceNet: a ~1M-parameter face-embedding network for mobile/edge deployment.

Layout at 112x112 (table 1 of the paper; insightface arcface_torch uses the same structure):

    conv3x3 s2 64 + BN + PReLU              -> (B,  64, 56, 56)
    depthwise conv3x3 64 + BN + PReLU       -> (B,  64, 56, 56)
    bottleneck t=2 c=64  n=5 s=2            -> (B,  64, 28, 28)
    bottleneck t=4 c=128 n=1 s=2            -> (B, 128, 14, 14)
    bottleneck t=2 c=128 n=6 s=1            -> (B, 128, 14, 14)
    bottleneck t=4 c=128 n=1 s=2            -> (B, 128,  7,  7)
    bottleneck t=2 c=128 n=2 s=1            -> (B, 128,  7,  7)
    conv1x1 512 + BN + PReLU                -> (B, 512,  7,  7)
    linear GDC: depthwise 7x7 512 + BN      -> (B, 512,  1,  1)
    linear 1x1 (Linear) to embedding + BN1d -> (B, embedding_size)

A bottleneck is the inverted residual of MobileNetV2 with PReLU: 1x1 expand (x t) + BN +
PReLU -> depthwise 3x3 (stride) + BN + PReLU -> 1x1 linear projection + BN, with an identity
shortcut when stride is 1 and channels are unchanged.  ``width_multiplier`` scales the 64/128
channel widths (the 512-channel head is fixed); the GDC kernel is ``input_size / 16``.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn as nn

from toolkit.errors import FaceCLError
from toolkit.models.init import init_convs_and_norms_
from toolkit.models.iresnet import (
    BACKBONE_STRIDE,
    check_backbone_arguments,
    fp32_autocast_disabled,
)
from toolkit.models.registry import register_backbone

# (expansion factor t, output channels c, repeats n, stride of the first repeat s)
MOBILEFACENET_BOTTLENECKS: Tuple[Tuple[int, int, int, int], ...] = (
    (2, 64, 5, 2),
    (4, 128, 1, 2),
    (2, 128, 6, 1),
    (4, 128, 1, 2),
    (2, 128, 2, 1),
)
MOBILEFACENET_STEM_CHANNELS = 64
MOBILEFACENET_HEAD_CHANNELS = 512


def _scaled_channels(channels: int, width_multiplier: float) -> int:
    """Channels times the width multiplier, rounded to a multiple of 8 (at least 8)."""
    return max(8, int(round(channels * width_multiplier / 8.0)) * 8)


class ConvBNPReLU(nn.Sequential):
    """Conv (no bias) -> BN -> PReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                      padding=kernel_size // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.PReLU(out_channels),
        )


class ConvBN(nn.Sequential):
    """Linear conv (no bias, no activation) -> BN."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 groups: int = 1, padding: int | None = None) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride,
                      padding=kernel_size // 2 if padding is None else padding,
                      groups=groups, bias=False),
            nn.BatchNorm2d(out_channels),
        )


class InvertedResidualBottleneck(nn.Module):
    """1x1 expand + PReLU -> depthwise 3x3 (stride) + PReLU -> 1x1 linear project (+ shortcut)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int) -> None:
        super().__init__()
        hidden_channels = in_channels * expansion
        self.use_shortcut = stride == 1 and in_channels == out_channels
        self.expand = ConvBNPReLU(in_channels, hidden_channels, kernel_size=1)
        self.depthwise = ConvBNPReLU(hidden_channels, hidden_channels, kernel_size=3,
                                     stride=stride, groups=hidden_channels)
        self.project = ConvBN(hidden_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W)
        out = self.expand(x)  # (B, C_in * t, H, W)
        out = self.depthwise(out)  # (B, C_in * t, H/s, W/s)
        out = self.project(out)  # (B, C_out, H/s, W/s)
        return out + x if self.use_shortcut else out


class MobileFaceNet(nn.Module):
    """MobileFaceNet: (B, 3, S, S) images -> (B, embedding_size) fp32 embeddings."""

    def __init__(
        self,
        *,
        embedding_size: int = 512,
        dropout: float = 0.0,
        input_size: int = 112,
        width_multiplier: float = 1.0,
        zero_init_residual: bool = False,
        bottlenecks: Sequence[Tuple[int, int, int, int]] = MOBILEFACENET_BOTTLENECKS,
    ) -> None:
        super().__init__()
        check_backbone_arguments(
            "mobilefacenet", embedding_size=embedding_size, dropout=dropout, input_size=input_size
        )
        if not float(width_multiplier) > 0.0:
            raise FaceCLError(f"mobilefacenet: width_multiplier must be > 0, got {width_multiplier!r}")
        total_stride = 2 * 2 ** sum(1 for _, _, _, stride in bottlenecks if stride == 2)
        if total_stride != BACKBONE_STRIDE:
            raise ValueError(f"bottleneck table must downsample by {BACKBONE_STRIDE}, got {total_stride}")
        self.embedding_size = embedding_size
        self.input_size = input_size
        final_map_size = input_size // BACKBONE_STRIDE  # 7 at 112x112

        # Stem: (B, 3, S, S) -> conv s2 -> (B, C0, S/2, S/2) -> depthwise -> same shape.
        stem_channels = _scaled_channels(MOBILEFACENET_STEM_CHANNELS, width_multiplier)
        self.stem_conv = ConvBNPReLU(3, stem_channels, kernel_size=3, stride=2)
        self.stem_depthwise = ConvBNPReLU(stem_channels, stem_channels, kernel_size=3,
                                          groups=stem_channels)

        # Bottlenecks: (B, C0, S/2, S/2) -> (B, C_last, S/16, S/16)
        blocks: List[nn.Module] = []
        in_channels = stem_channels
        for expansion, channels, repeats, first_stride in bottlenecks:
            out_channels = _scaled_channels(channels, width_multiplier)
            for repeat_index in range(repeats):
                stride = first_stride if repeat_index == 0 else 1
                blocks.append(InvertedResidualBottleneck(in_channels, out_channels, stride, expansion))
                in_channels = out_channels
        self.bottlenecks = nn.Sequential(*blocks)

        # (B, C_last, S/16, S/16) -> (B, 512, S/16, S/16)
        self.conv_to_head = ConvBNPReLU(in_channels, MOBILEFACENET_HEAD_CHANNELS, kernel_size=1)
        # Linear global depthwise conv: (B, 512, S/16, S/16) -> (B, 512, 1, 1)
        self.global_depthwise = ConvBN(MOBILEFACENET_HEAD_CHANNELS, MOBILEFACENET_HEAD_CHANNELS,
                                       kernel_size=final_map_size, groups=MOBILEFACENET_HEAD_CHANNELS,
                                       padding=0)
        # Embedding head (fp32): dropout -> flatten -> linear 1x1 -> BN1d.
        self.dropout = nn.Dropout(p=dropout)
        self.embedding_fc = nn.Linear(MOBILEFACENET_HEAD_CHANNELS, embedding_size, bias=False)
        self.embedding_bn = nn.BatchNorm1d(embedding_size)

        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        init_convs_and_norms_(self)
        if zero_init_residual:
            # Projection BN of shortcut blocks at zero: those blocks start as the identity.
            for module in self.modules():
                if isinstance(module, InvertedResidualBottleneck) and module.use_shortcut:
                    nn.init.constant_(module.project[1].weight, 0.0)

    def fsdp_units(self) -> list[nn.Module]:
        """The bottleneck blocks: each becomes one FSDP2 unit (gathered just before it runs)."""
        return list(self.bottlenecks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, 3, S, S)
        x = self.stem_conv(images)  # (B, 64w, S/2, S/2)
        x = self.stem_depthwise(x)  # (B, 64w, S/2, S/2)
        for block in self.bottlenecks:
            x = block(x)
        # x: (B, 128w, S/16, S/16)
        x = self.conv_to_head(x)  # (B, 512, S/16, S/16)
        x = self.global_depthwise(x)  # (B, 512, 1, 1)
        with fp32_autocast_disabled(x):
            x = self.dropout(x.float())
            x = torch.flatten(x, 1)  # (B, 512) fp32
            x = self.embedding_fc(x)  # (B, embedding_size)
            x = self.embedding_bn(x)  # (B, embedding_size)
        return x


@register_backbone("mobilefacenet")
def mobilefacenet(*, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
                  width_multiplier: float = 1.0,
                  zero_init_residual: bool = False) -> MobileFaceNet:
    """MobileFaceNet (paper layout); ~1.2M parameters at 112x112 / 512-d, width 1.0."""
    return MobileFaceNet(embedding_size=embedding_size, dropout=dropout, input_size=input_size,
                         width_multiplier=width_multiplier, zero_init_residual=zero_init_residual)
