# IResNet backbones (iresnet18/34/50/100/200/2060) in the insightface ArcFace layout, registered by name.
"""Improved ResNet ("IResNet") face-embedding backbones.

Layout (insightface arcface_torch): 3x3 stem conv (stride 1) + BN + PReLU, four stages of
pre-activation-style ``IBasicBlock`` (each stage halves the resolution in its first block),
then the embedding head BN2d -> dropout -> flatten -> Linear -> BN1d ("features", affine
weight frozen at 1.0).  Module attribute names follow insightface (conv1, bn1, prelu,
layer1..layer4, bn2, fc, features) so insightface state dicts load without renaming.

Also holds two helpers shared with the other backbones: ``check_backbone_arguments`` and
``fp32_autocast_disabled``. Activation checkpointing is applied from outside the model
(``toolkit.models.wrapping``), per residual block (``fsdp_units``).
"""

from __future__ import annotations

import contextlib
from typing import List, Sequence, Type

import torch
import torch.nn as nn

from toolkit.errors import FaceCLError
from toolkit.models.init import init_convs_and_norms_
from toolkit.models.registry import register_backbone

# Total downsampling factor of every backbone here: 112x112 input -> 7x7 final feature map.
BACKBONE_STRIDE = 16

IRESNET_STAGE_WIDTHS = (64, 128, 256, 512)
IRESNET_BLOCKS_PER_STAGE = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
    # arcface_torch's iresnet2060: 1030 blocks, 1.12B parameters; train it with activation checkpointing.
    "iresnet2060": (3, 128, 1024 - 128, 3),
}


# ----------------------------------------------------------------------------------------
# Helpers shared by all backbones
# ----------------------------------------------------------------------------------------


def check_backbone_arguments(
    backbone_name: str, *, embedding_size: int, dropout: float, input_size: int
) -> None:
    """Raise FaceCLError for recipe values a backbone cannot be built with."""
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size <= 0 \
            or input_size % BACKBONE_STRIDE != 0:
        raise FaceCLError(
            f"{backbone_name}: input_size must be a positive multiple of {BACKBONE_STRIDE}, "
            f"got {input_size!r}"
        )
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size <= 0:
        raise FaceCLError(
            f"{backbone_name}: embedding_size must be a positive integer, got {embedding_size!r}"
        )
    if not 0.0 <= float(dropout) < 1.0:
        raise FaceCLError(f"{backbone_name}: dropout must be in [0, 1), got {dropout!r}")


def fp32_autocast_disabled(x: torch.Tensor) -> contextlib.AbstractContextManager:
    """Context in which autocast is off for ``x``'s device type (embedding heads run in fp32)."""
    if x.device.type == "meta":  # shape-only traces (parameter counts, memory estimates): no autocast there
        return contextlib.nullcontext()
    return torch.autocast(device_type=x.device.type, enabled=False)


# ----------------------------------------------------------------------------------------
# IResNet
# ----------------------------------------------------------------------------------------


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution, padding 1, no bias."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution, no bias."""
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus identity/projection shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels, eps=1e-05)
        self.conv1 = conv3x3(in_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels, eps=1e-05)
        self.prelu = nn.PReLU(out_channels)
        self.conv2 = conv3x3(out_channels, out_channels, stride)
        self.bn3 = nn.BatchNorm2d(out_channels, eps=1e-05)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                conv1x1(in_channels, out_channels, stride),
                nn.BatchNorm2d(out_channels, eps=1e-05),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, H, W)
        shortcut = x if self.downsample is None else self.downsample(x)  # (B, C_out, H/s, W/s)
        out = self.bn1(x)
        out = self.conv1(out)  # (B, C_out, H, W)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)  # (B, C_out, H/s, W/s)
        out = self.bn3(out)
        return out + shortcut  # (B, C_out, H/s, W/s)


class IResNet(nn.Module):
    """IResNet embedding network: (B, 3, S, S) images -> (B, embedding_size) fp32 embeddings."""

    def __init__(
        self,
        blocks_per_stage: Sequence[int],
        *,
        embedding_size: int = 512,
        dropout: float = 0.0,
        input_size: int = 112,
        zero_init_residual: bool = False,
        block_type: Type[IBasicBlock] = IBasicBlock,
        name: str = "iresnet",
    ) -> None:
        super().__init__()
        check_backbone_arguments(
            name, embedding_size=embedding_size, dropout=dropout, input_size=input_size
        )
        if len(blocks_per_stage) != len(IRESNET_STAGE_WIDTHS):
            raise ValueError(f"need {len(IRESNET_STAGE_WIDTHS)} stages, got {blocks_per_stage!r}")
        self.embedding_size = embedding_size
        self.input_size = input_size
        final_map_size = input_size // BACKBONE_STRIDE  # 7 at 112x112
        final_channels = IRESNET_STAGE_WIDTHS[-1]

        # Stem: (B, 3, S, S) -> (B, 64, S, S)
        stem_channels = IRESNET_STAGE_WIDTHS[0]
        self.conv1 = conv3x3(3, stem_channels)
        self.bn1 = nn.BatchNorm2d(stem_channels, eps=1e-05)
        self.prelu = nn.PReLU(stem_channels)

        # Stages: each halves the resolution in its first block.
        # (B, 64, S, S) -> layer1 (B, 64, S/2) -> layer2 (B, 128, S/4) -> layer3 (B, 256, S/8)
        # -> layer4 (B, 512, S/16, S/16)
        in_channels = stem_channels
        stages: List[nn.Sequential] = []
        for stage_width, num_blocks in zip(IRESNET_STAGE_WIDTHS, blocks_per_stage):
            blocks = [block_type(in_channels, stage_width, stride=2)]
            blocks += [block_type(stage_width, stage_width, stride=1) for _ in range(num_blocks - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = stage_width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages

        # Embedding head: BN2d -> dropout -> flatten -> Linear -> BN1d.
        self.bn2 = nn.BatchNorm2d(final_channels, eps=1e-05)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(final_channels * final_map_size * final_map_size, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-05)

        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        init_convs_and_norms_(self)
        # Embedding BN acts as a learned shift only (insightface): scale frozen at 1.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        if zero_init_residual:
            # Last BN of each residual branch at zero: every block starts as the identity.
            for module in self.modules():
                if isinstance(module, IBasicBlock):
                    nn.init.constant_(module.bn3.weight, 0.0)

    def fsdp_units(self) -> list[nn.Module]:
        """The residual blocks: each becomes one FSDP2 unit (gathered just before it runs)."""
        return [block for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for block in stage]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, 3, S, S)
        x = self.conv1(images)  # (B, 64, S, S)
        x = self.bn1(x)
        x = self.prelu(x)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                x = block(x)
        # x: (B, 512, S/16, S/16)
        x = self.bn2(x)
        with fp32_autocast_disabled(x):
            x = self.dropout(x.float())  # (B, 512, S/16, S/16) fp32
            x = torch.flatten(x, 1)  # (B, 512 * (S/16)^2)
            x = self.fc(x)  # (B, embedding_size)
            x = self.features(x)  # (B, embedding_size)
        return x


def _build_iresnet(name: str, **options) -> IResNet:
    return IResNet(IRESNET_BLOCKS_PER_STAGE[name], name=name, **options)


@register_backbone("iresnet18")
def iresnet18(*, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
              zero_init_residual: bool = False) -> IResNet:
    """IResNet-18: blocks per stage (2, 2, 2, 2); 24.0M parameters at 112x112 / 512-d."""
    return _build_iresnet("iresnet18", embedding_size=embedding_size, dropout=dropout,
                          input_size=input_size, zero_init_residual=zero_init_residual)


@register_backbone("iresnet34")
def iresnet34(*, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
              zero_init_residual: bool = False) -> IResNet:
    """IResNet-34: blocks per stage (3, 4, 6, 3); 34.1M parameters at 112x112 / 512-d."""
    return _build_iresnet("iresnet34", embedding_size=embedding_size, dropout=dropout,
                          input_size=input_size, zero_init_residual=zero_init_residual)


@register_backbone("iresnet50")
def iresnet50(*, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
              zero_init_residual: bool = False) -> IResNet:
    """IResNet-50: blocks per stage (3, 4, 14, 3); 43.6M parameters at 112x112 / 512-d."""
    return _build_iresnet("iresnet50", embedding_size=embedding_size, dropout=dropout,
                          input_size=input_size, zero_init_residual=zero_init_residual)


@register_backbone("iresnet100")
def iresnet100(*, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
               zero_init_residual: bool = False) -> IResNet:
    """IResNet-100: blocks per stage (3, 13, 30, 3); 65.2M parameters at 112x112 / 512-d."""
    return _build_iresnet("iresnet100", embedding_size=embedding_size, dropout=dropout,
                          input_size=input_size, zero_init_residual=zero_init_residual)


@register_backbone("iresnet200")
def iresnet200(*, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
               zero_init_residual: bool = False) -> IResNet:
    """IResNet-200: blocks per stage (6, 26, 60, 6); 118.8M parameters at 112x112 / 512-d."""
    return _build_iresnet("iresnet200", embedding_size=embedding_size, dropout=dropout,
                          input_size=input_size, zero_init_residual=zero_init_residual)


@register_backbone("iresnet2060")
def iresnet2060(*, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
                zero_init_residual: bool = False) -> IResNet:
    """IResNet-2060: blocks per stage (3, 128, 896, 3); 1,122.3M parameters at 112x112 / 512-d."""
    return _build_iresnet("iresnet2060", embedding_size=embedding_size, dropout=dropout,
                          input_size=input_size, zero_init_residual=zero_init_residual)
