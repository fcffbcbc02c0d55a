# Query encoder (backbone + projection head) and its momentum copy, the key encoder, as one engine module.
"""The module the engine wraps when UniMoCo is on.

`forward(images)` is the query path: (embedding B x D, projection B x P). The key path `key_forward`
runs the momentum copy; its parameters never get gradients and are never in an optimizer. Keeping both
encoders in one module lets every engine place them alike (DDP replicates both, ZeRO-3 and FSDP2 shard
both with the same layout), so the momentum update can run shard by shard: see engines.py.
The root module owns no parameters itself, so every parameter lives in a submodule whose own
forward hooks (ZeRO-3 gathering, FSDP2 units) fire when the key path calls it directly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class ProjectionHead(nn.Module):
    """Linear, or MLP (Linear-BN-ReLU-Linear) projection to the contrastive space."""

    def __init__(self, embedding_size: int, out_dim: int, kind: str = "mlp", hidden: int = 2048):
        super().__init__()
        if kind == "linear":
            self.layers = nn.Linear(embedding_size, out_dim)
        elif kind == "mlp":
            self.layers = nn.Sequential(nn.Linear(embedding_size, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, out_dim))
        else:
            raise ValueError(f"unknown projection {kind!r}; expected 'linear' or 'mlp'")

    def forward(self, emb_BD: torch.Tensor) -> torch.Tensor:
        return self.layers(emb_BD)


class ContrastiveEncoders(nn.Module):
    """backbone + projection (query, trained) and key_backbone + key_projection (EMA copy, frozen)."""

    def __init__(self, backbone: nn.Module, projection: ProjectionHead):
        super().__init__()
        self.backbone = backbone
        self.projection = projection
        self.key_backbone = copy.deepcopy(backbone)
        self.key_projection = copy.deepcopy(projection)
        for param in [*self.key_backbone.parameters(), *self.key_projection.parameters()]:
            param.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb_BD = self.backbone(images)
        return emb_BD, self.projection(emb_BD)

    @torch.no_grad()
    def key_forward(self, images: torch.Tensor) -> torch.Tensor:
        """Key projections (B x P), from the momentum encoder."""
        return self.key_projection(self.key_backbone(images))

    def momentum_pairs(self) -> list[tuple[nn.Parameter, nn.Parameter]]:
        """(query parameter, key parameter) pairs in a fixed order."""
        query = [*self.backbone.parameters(), *self.projection.parameters()]
        key = [*self.key_backbone.parameters(), *self.key_projection.parameters()]
        return list(zip(query, key))

    def fsdp_units(self) -> list[nn.Module]:
        """FSDP2 units, innermost first: the blocks of both backbones, then each encoder part."""
        blocks = [*getattr(self.backbone, "fsdp_units", lambda: [])(),
                  *getattr(self.key_backbone, "fsdp_units", lambda: [])()]
        return [*blocks, self.key_backbone, self.key_projection, self.backbone, self.projection]
