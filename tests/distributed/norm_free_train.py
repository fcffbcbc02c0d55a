# Test helper: launch/train.py with one more backbone, "test_layernorm_net", whose output does not depend on the batch.
"""Batch norm makes a sample's embedding depend on the other samples of its rank's batch, so two runs with the
same global batch split over different world sizes cannot give equal losses. This small convolutional net
normalises per sample (LayerNorm over channels, GroupNorm with one group) so that they can: tests of resuming
at another world size use it to compare losses exactly."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from toolkit.models import register_backbone  # noqa: E402


class LayerNormNet(nn.Module):
    """Two per-sample-normalised conv blocks and a linear embedding: (B, 3, S, S) -> (B, embedding_size)."""

    def __init__(self, embedding_size: int, input_size: int, width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(1, width), nn.Conv2d(width, width, 3, padding=1), nn.GELU())
            for _ in range(2))
        self.head = nn.Sequential(nn.Flatten(), nn.LayerNorm(width * (input_size // 2) ** 2),
                                  nn.Linear(width * (input_size // 2) ** 2, embedding_size))

    def fsdp_units(self):
        return list(self.blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


@register_backbone("test_layernorm_net")
def test_layernorm_net(*, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112) -> LayerNormNet:
    return LayerNormNet(embedding_size, input_size)


if __name__ == "__main__":
    import runpy

    sys.argv[0] = str(Path(__file__).resolve().parents[2] / "launch" / "train.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
