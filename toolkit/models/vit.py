# Vision Transformer face-embedding backbones (vit_t/s/b/l/h) with token masking and drop path, registered by name.
"""Vision Transformers for aligned faces, in the layout of insightface arcface_torch (the backbones behind
the strongest published WebFace42M results).

Layout at 112x112, patch 9 (the last 4 pixel rows/columns are not covered, as in the published models):

    patch embedding  Conv2d(3, D, 9, stride 9) + bias            -> (B, 144, D)   12 x 12 tokens
    + learnable position embedding (1, 144, D), no class token
    training only: keep a random int(144 * (1 - mask_ratio)) tokens per sample (the others never enter
    the transformer)
    depth x block:  x + drop_path(attn(LN(x)));  x + drop_path(mlp(LN(x)))
        attn: qkv Linear(D, 3D, no bias) -> 8 heads -> scaled_dot_product_attention -> Linear(D, D)
        mlp:  Linear(D, 4D) -> ReLU6 -> Linear(4D, D)
    LayerNorm (fp32); training only: masked positions are filled with a learned mask token
    features: flatten (B, 144 * D) -> dropout -> Linear(144 D, D, no bias) -> BN1d(D)
              -> Linear(D, embedding_size, no bias) -> BN1d(embedding_size)           (fp32)

Sizes (embed D x depth): vit_t 256 x 12, vit_s 512 x 12, vit_b 512 x 24, vit_l 768 x 24, vit_h 1024 x 48;
8 heads in all. Drop path grows linearly from 0 at the first block to ``drop_path`` at the last. The
published WebFace42M variants are named drop_path 0.05 and mask_ratio 0.05 (vit_b, vit_l); the
Glint360K/MS1M ones 0.1 / 0.1; those are the recipe's ``model.drop_path`` / ``model.mask_ratio``. (Their
forward calls ``random_masking(x)`` without the ratio, so any ratio above 0 masks its default 0.1 there;
here ``mask_ratio`` is taken as given: 0.1 trains as they did.) Their state dicts load onto these modules
through train.init_from (toolkit/export/arcface_names.py: only ``patch_embed.proj`` is named differently).

``patch_size`` lets smaller images keep a small token grid (CPU smoke runs: 32x32 with patch 8 is a 4x4
grid); the grid is ``input_size // patch_size`` per side.

Attention goes through ``torch.nn.functional.scaled_dot_product_attention``, which picks flash /
memory-efficient kernels on GPU (bf16/fp16 under autocast) and a fused math kernel on CPU.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from toolkit.errors import FaceCLError
from toolkit.models.iresnet import fp32_autocast_disabled
from toolkit.models.registry import register_backbone

VIT_PATCH_SIZE = 9
VIT_NUM_HEADS = 8
VIT_MLP_RATIO = 4
VIT_NORM_EPS = 1e-5          # nn.LayerNorm default, as published
VIT_FEATURE_BN_EPS = 2e-5    # the two BatchNorm1d of the feature head, as published
VIT_INIT_STD = 0.02

# name: (embed dim, depth)
VIT_SIZES = {
    "vit_t": (256, 12),
    "vit_s": (512, 12),
    "vit_b": (512, 24),
    "vit_l": (768, 24),
    "vit_h": (1024, 48),
}


class DropPath(nn.Module):
    """Stochastic depth: in training, zero a sample's residual branch with probability p, scale the rest by 1/(1-p)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        # One Bernoulli draw per sample, broadcast over tokens and channels: (B, 1, 1)
        keep_B11 = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        keep_B11.bernoulli_(keep_prob)
        return x * keep_B11 / keep_prob

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.4f}"


class SelfAttention(nn.Module):
    """Multi-head self-attention through F.scaled_dot_product_attention (no hand-written softmax)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise FaceCLError(f"vit: embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x_BTD.shape
        head_dim = dim // self.num_heads
        qkv = self.qkv(x_BTD).view(batch, tokens, 3, self.num_heads, head_dim)  # (B, T, 3, H, Dh)
        q_BHTd, k_BHTd, v_BHTd = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, T, Dh)
        out_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHTd, v_BHTd)  # scale 1/sqrt(Dh)
        out_BTD = out_BHTd.transpose(1, 2).reshape(batch, tokens, dim)
        return self.proj(out_BTD)


class FeedForward(nn.Module):
    """Linear(D, 4D) -> ReLU6 -> Linear(4D, D) (ReLU6 as in the published face ViTs)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x_BTD)))  # (B, T, 4D) inside


class TransformerBlock(nn.Module):
    """Pre-norm block: x + drop_path(attn(LN(x))), then x + drop_path(mlp(LN(x))). One FSDP2 unit."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, drop_path: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.attn = SelfAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=VIT_NORM_EPS)
        self.mlp = FeedForward(dim, mlp_hidden)
        self.drop_path = DropPath(drop_path)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        x_BTD = x_BTD + self.drop_path(self.attn(self.norm1(x_BTD)))
        return x_BTD + self.drop_path(self.mlp(self.norm2(x_BTD)))


class VisionTransformer(nn.Module):
    """Face ViT: (B, 3, S, S) images -> (B, embedding_size) fp32 embeddings."""

    def __init__(
        self,
        *,
        embed_dim: int,
        depth: int,
        embedding_size: int = 512,
        dropout: float = 0.0,
        input_size: int = 112,
        patch_size: int = VIT_PATCH_SIZE,
        num_heads: int = VIT_NUM_HEADS,
        drop_path: float = 0.0,
        mask_ratio: float = 0.0,
        name: str = "vit",
    ) -> None:
        super().__init__()
        _check_vit_arguments(name, embedding_size=embedding_size, dropout=dropout, input_size=input_size,
                             patch_size=patch_size, drop_path=drop_path, mask_ratio=mask_ratio)
        self.embedding_size = embedding_size
        self.input_size = input_size
        self.embed_dim = embed_dim
        self.mask_ratio = float(mask_ratio)
        grid = input_size // patch_size
        self.num_tokens = grid * grid  # 144 at 112 / patch 9

        # (B, 3, S, S) -> (B, D, grid, grid); pixels past grid * patch are not covered (112 = 12 * 9 + 4).
        self.patch_embed = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))  # (1, T, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))  # (1, 1, D)
        drop_rates = [float(drop_path) * i / max(1, depth - 1) for i in range(depth)]  # 0 .. drop_path
        self.blocks = nn.ModuleList(
            TransformerBlock(embed_dim, num_heads, VIT_MLP_RATIO * embed_dim, rate) for rate in drop_rates
        )
        self.norm = nn.LayerNorm(embed_dim, eps=VIT_NORM_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.feature = nn.Sequential(
            nn.Linear(self.num_tokens * embed_dim, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=VIT_FEATURE_BN_EPS),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=VIT_FEATURE_BN_EPS),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=VIT_INIT_STD, a=-2 * VIT_INIT_STD, b=2 * VIT_INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm1d)):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=VIT_INIT_STD, a=-2 * VIT_INIT_STD, b=2 * VIT_INIT_STD)
        nn.init.normal_(self.mask_token, std=VIT_INIT_STD)

    def fsdp_units(self) -> list[nn.Module]:
        """The transformer blocks: each becomes one FSDP2 unit (and one activation-checkpointing unit)."""
        return list(self.blocks)

    def num_kept_tokens(self) -> int:
        """Tokens per sample that enter the transformer in training: int(T * (1 - mask_ratio)), at least 1."""
        return max(1, int(self.num_tokens * (1.0 - self.mask_ratio)))

    def sample_kept_tokens(self, batch_size: int, device: torch.device) -> torch.Tensor:
        """Random kept-token indices, (B, K) sorted ascending, drawn from the global torch RNG.

        Each sample keeps its own random subset (argsort of uniform noise); sorting keeps the tokens in
        their spatial order, which attention ignores but makes the masks easy to inspect.
        """
        noise_BT = torch.rand(batch_size, self.num_tokens, device=device)
        keep_BK = noise_BT.argsort(dim=1)[:, : self.num_kept_tokens()]
        return keep_BK.sort(dim=1).values

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # images: (B, 3, S, S)
        batch = images.shape[0]
        x = self.patch_embed(images)  # (B, D, grid, grid)
        x_BTD = x.flatten(2).transpose(1, 2) + self.pos_embed  # (B, T, D)
        masking = self.training and self.mask_ratio > 0.0
        if masking:
            keep_BK = self.sample_kept_tokens(batch, images.device)
            index_BKD = keep_BK.unsqueeze(-1).expand(-1, -1, self.embed_dim)
            x_BTD = torch.gather(x_BTD, 1, index_BKD)  # (B, K, D): masked tokens never enter the blocks
        for block in self.blocks:
            x_BTD = block(x_BTD)
        with fp32_autocast_disabled(x_BTD):
            x_BTD = self.norm(x_BTD.float())  # (B, K or T, D) fp32
            if masking:
                # Masked positions get the learned mask token, kept ones their output: (B, T, D)
                full_BTD = self.mask_token.expand(batch, self.num_tokens, -1).to(x_BTD.dtype)
                x_BTD = full_BTD.scatter(1, index_BKD, x_BTD)
            x = self.dropout(x_BTD.reshape(batch, self.num_tokens * self.embed_dim))  # (B, T * D)
            return self.feature(x)  # (B, embedding_size)


def _check_vit_arguments(name: str, *, embedding_size: int, dropout: float, input_size: int, patch_size: int,
                         drop_path: float, mask_ratio: float) -> None:
    """Raise FaceCLError for recipe values a ViT cannot be built with."""
    for label, value in (("input_size", input_size), ("patch_size", patch_size), ("embedding_size", embedding_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise FaceCLError(f"{name}: {label} must be a positive integer, got {value!r}")
    if patch_size > input_size:
        raise FaceCLError(f"{name}: patch_size {patch_size} is larger than input_size {input_size}")
    if not 0.0 <= float(dropout) < 1.0:
        raise FaceCLError(f"{name}: dropout must be in [0, 1), got {dropout!r}")
    if not 0.0 <= float(drop_path) < 1.0:
        raise FaceCLError(f"{name}: drop_path must be in [0, 1), got {drop_path!r}")
    if not 0.0 <= float(mask_ratio) < 1.0:
        raise FaceCLError(f"{name}: mask_ratio must be in [0, 1), got {mask_ratio!r}")


def _vit_factory(name: str):
    embed_dim, depth = VIT_SIZES[name]

    def factory(*, embedding_size: int = 512, dropout: float = 0.0, input_size: int = 112,
                patch_size: int = VIT_PATCH_SIZE, drop_path: float = 0.0, mask_ratio: float = 0.0
                ) -> VisionTransformer:
        return VisionTransformer(embed_dim=embed_dim, depth=depth, embedding_size=embedding_size, dropout=dropout,
                                 input_size=input_size, patch_size=patch_size, drop_path=drop_path,
                                 mask_ratio=mask_ratio, name=name)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"{name}: ViT with embed dim {embed_dim}, depth {depth}, {VIT_NUM_HEADS} heads, "
                       f"patch {VIT_PATCH_SIZE} at 112x112 (144 tokens).")
    return register_backbone(name)(factory)


vit_t = _vit_factory("vit_t")
vit_s = _vit_factory("vit_s")
vit_b = _vit_factory("vit_b")
vit_l = _vit_factory("vit_l")
vit_h = _vit_factory("vit_h")
