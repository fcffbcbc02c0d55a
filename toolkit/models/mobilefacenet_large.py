# arcface_torch's MobileFaceNets (wide trunk, narrow depthwise branches): mobilefacenet_large and mobilefacenet_mbf.
"""``mobilefacenet_large`` and ``mobilefacenet_mbf``: insightface arcface_torch's ``mbf_large`` and ``mbf``.

Both differ from the paper layout of ``mobilefacenet`` (toolkit/models/mobilefacenet.py): the trunk is
scale x wider (64 / 128 channels times the scale) while each residual branch squeezes to a fixed narrow width
(128 / 256 / 512) for its depthwise convolution. ``mobilefacenet_large`` (``mbf_large``) has scale 4 and
stages of (2, 8, 12, 4) blocks; at 112x112:

    conv3x3 s2 3 -> 256 + BN + PReLU                                   -> (B, 256, 56, 56)
    2 x residual branch 256 -> 128 -> 256                              -> (B, 256, 56, 56)
    branch s2 256 -> 128 -> 256                                        -> (B, 256, 28, 28)
    8 x residual branch 256 -> 128 -> 256                              -> (B, 256, 28, 28)
    branch s2 256 -> 256 -> 512                                        -> (B, 512, 14, 14)
    12 x residual branch 512 -> 256 -> 512                             -> (B, 512, 14, 14)
    branch s2 512 -> 512 -> 512                                        -> (B, 512,  7,  7)
    4 x residual branch 512 -> 256 -> 512                              -> (B, 512,  7,  7)
    conv1x1 512 + BN + PReLU; GDC: depthwise 7x7 + BN; Linear(512, E, no bias) + BN1d   -> (B, E)

``mobilefacenet_mbf`` (``mbf``, arcface_torch's default MobileFaceNet) has scale 2 and stages of (1, 4, 6, 2):
a first stage of one block is, as published, not a residual branch but a grouped 3x3 conv (64 groups, so
2 channels per group at scale 2) + BN + PReLU (``stem_grouped``):

    conv3x3 s2 3 -> 128 + BN + PReLU; grouped conv3x3 128 -> 128 (64 groups) + BN + PReLU -> (B, 128, 56, 56)
    branch s2 128 -> 128 -> 128; 4 x residual branch 128 -> 128 -> 128                  -> (B, 128, 28, 28)
    branch s2 128 -> 256 -> 256; 6 x residual branch 256 -> 256 -> 256                  -> (B, 256, 14, 14)
    branch s2 256 -> 512 -> 256; 2 x residual branch 256 -> 256 -> 256                  -> (B, 256,  7,  7)
    conv1x1 512 + BN + PReLU; GDC; Linear(512, E, no bias) + BN1d                        -> (B, E)

A branch ``in -> h -> out``: 1x1 conv to h + BN + PReLU, depthwise 3x3 (stride) + BN + PReLU, 1x1 linear
conv to out + BN, plus the identity when it is a residual one. Every branch is one FSDP2 /
activation-checkpointing unit. Their ``fp16`` flag only runs the trunk under autocast (no parameters): here
the recipe's ``parallel.precision`` does that.
"""

from __future__ import annotations

from typing import List, Tuple

import torch
import torch.nn as nn

from toolkit.models.init import init_convs_and_norms_
from toolkit.models.iresnet import BACKBONE_STRIDE, check_backbone_arguments, fp32_autocast_disabled
from toolkit.models.mobilefacenet import ConvBN, ConvBNPReLU
from toolkit.models.registry import register_backbone

MBF_LARGE_SCALE = 4
MBF_LARGE_REPEATS = (2, 8, 12, 4)
MBF_SCALE = 2
MBF_REPEATS = (1, 4, 6, 2)
MBF_HEAD_CHANNELS = 512
MBF_STEM_GROUPS = 64  # the grouped conv that replaces a one-block first stage (published: groups=64 at any scale)

# One row per trunk stage: (out channels before scale, branch width of the strided entry block, branch
# width of the residual repeats, repeats index). The first stage has no strided entry block (the stem is).
_STAGES: Tuple[Tuple[int, int, int, int], ...] = (
    (64, 0, 128, 0),
    (64, 128, 128, 1),
    (128, 256, 256, 2),
    (128, 512, 256, 3),
)


class SqueezedBranch(nn.Module):
    """in -> 1x1 to hidden + PReLU -> depthwise 3x3 (stride) + PReLU -> 1x1 to out (+ identity if residual)."""

    def __init__(self, in_channels: int, out_channels: int, hidden: int, stride: int, residual: bool) -> None:
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError(f"a residual branch keeps the shape; got {in_channels}->{out_channels} stride {stride}")
        self.residual = residual
        self.squeeze = ConvBNPReLU(in_channels, hidden, kernel_size=1)
        self.depthwise = ConvBNPReLU(hidden, hidden, kernel_size=3, stride=stride, groups=hidden)
        self.project = ConvBN(hidden, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W)
        out = self.project(self.depthwise(self.squeeze(x)))  # (B, C_out, H/s, W/s)
        return out + x if self.residual else out


class ArcfaceMobileFaceNet(nn.Module):
    """mbf_large / mbf: (B, 3, S, S) images -> (B, embedding_size) fp32 embeddings."""

    def __init__(self, *, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
                 scale: int = MBF_LARGE_SCALE, repeats: Tuple[int, int, int, int] = MBF_LARGE_REPEATS,
                 name: str = "mobilefacenet_large") -> None:
        super().__init__()
        check_backbone_arguments(name, embedding_size=embedding_size, dropout=dropout, input_size=input_size)
        self.embedding_size = embedding_size
        self.input_size = input_size
        final_map_size = input_size // BACKBONE_STRIDE  # 7 at 112x112

        stem_channels = 64 * scale
        self.stem = ConvBNPReLU(3, stem_channels, kernel_size=3, stride=2)  # (B, 64s, S/2, S/2)
        # mbf: a grouped conv instead of a one-block residual first stage, as published
        self.stem_grouped = (ConvBNPReLU(stem_channels, stem_channels, kernel_size=3, groups=MBF_STEM_GROUPS)
                             if repeats[0] == 1 else None)
        branches: List[nn.Module] = []
        in_channels = stem_channels
        for base_channels, entry_hidden, repeat_hidden, repeat_index in _STAGES:
            out_channels = base_channels * scale
            if entry_hidden:  # strided entry block, no identity: halves the resolution
                branches.append(SqueezedBranch(in_channels, out_channels, entry_hidden, stride=2, residual=False))
                in_channels = out_channels
            if repeat_index == 0 and repeats[0] == 1:
                continue
            for _ in range(repeats[repeat_index]):
                branches.append(SqueezedBranch(in_channels, out_channels, repeat_hidden, stride=1, residual=True))
        self.branches = nn.Sequential(*branches)  # (B, 128s, S/16, S/16)

        self.conv_to_head = ConvBNPReLU(in_channels, MBF_HEAD_CHANNELS, kernel_size=1)  # (B, 512, S/16, S/16)
        self.global_depthwise = ConvBN(MBF_HEAD_CHANNELS, MBF_HEAD_CHANNELS, kernel_size=final_map_size,
                                       groups=MBF_HEAD_CHANNELS, padding=0)  # (B, 512, 1, 1)
        self.dropout = nn.Dropout(p=dropout)
        self.embedding_fc = nn.Linear(MBF_HEAD_CHANNELS, embedding_size, bias=False)
        self.embedding_bn = nn.BatchNorm1d(embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        init_convs_and_norms_(self, linears=True)

    def fsdp_units(self) -> list[nn.Module]:
        """The branches (29 in mbf_large, 15 in mbf): each becomes one FSDP2 unit (and one checkpointing unit)."""
        return list(self.branches)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, 3, S, S)
        x = self.stem(images)  # (B, 64s, S/2, S/2)
        if self.stem_grouped is not None:
            x = self.stem_grouped(x)  # (B, 64s, S/2, S/2)
        for branch in self.branches:
            x = branch(x)
        x = self.conv_to_head(x)  # (B, 512, S/16, S/16)
        x = self.global_depthwise(x)  # (B, 512, 1, 1)
        with fp32_autocast_disabled(x):
            x = self.dropout(torch.flatten(x.float(), 1))  # (B, 512) fp32
            return self.embedding_bn(self.embedding_fc(x))  # (B, embedding_size)


@register_backbone("mobilefacenet_large")
def mobilefacenet_large(*, embedding_size: int = 512, dropout: float = 0.0,
                        input_size: int = 112) -> ArcfaceMobileFaceNet:
    """MobileFaceNet-large (arcface_torch mbf_large: scale 4, repeats (2, 8, 12, 4)); 6.31M parameters."""
    return ArcfaceMobileFaceNet(embedding_size=embedding_size, dropout=dropout, input_size=input_size)


@register_backbone("mobilefacenet_mbf")
def mobilefacenet_mbf(*, embedding_size: int = 512, dropout: float = 0.0,
                      input_size: int = 112) -> ArcfaceMobileFaceNet:
    """arcface_torch's mbf (get_mbf: scale 2, repeats (1, 4, 6, 2)); 2.06M parameters at 112x112 / 512-d."""
    return ArcfaceMobileFaceNet(embedding_size=embedding_size, dropout=dropout, input_size=input_size,
                                scale=MBF_SCALE, repeats=MBF_REPEATS, name="mobilefacenet_mbf")
