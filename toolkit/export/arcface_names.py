# arcface_torch backbone state dicts -> FaceCL registry state dicts: which of their tensors is which of ours.
"""arcface_torch writes a backbone as its module's state dict (`model.pt`, `backbone.pth`, or
`state_dict_backbone` of train_v2's `checkpoint_gpu_R.pt`), named after its modules. For every registry
backbone with the same architecture, `arcface_key_map` names, for each of our tensors, theirs, and
`map_arcface_backbone` applies it strictly: each of our tensors is filled, each of theirs used, every shape
equal; otherwise one line naming the tensor.

Their get_model names -> ours (the drop path rate and mask ratio in their names are training options, not
tensors: one file serves every variant of a size):
- r18 / r34 / r50 / r100 / r200 / r2060 -> iresnet18 ... iresnet2060: the same names.
- vit_t, vit_t_dp005_mask0 -> vit_t; vit_s, vit_s_dp005_mask_0 -> vit_s; vit_b, vit_b_dp005_mask_005 -> vit_b;
  vit_l_dp005_mask_005 -> vit_l; vit_h -> vit_h: the same names (pos_embed, mask_token, blocks.N.norm1 /
  attn.qkv / attn.proj / norm2 / mlp.fc1 / mlp.fc2, norm, feature.0-3) except their PatchEmbed module:
  `patch_embed.proj.*` -> `patch_embed.*`. (Their `norm_layer="bn"` variant, used by no get_model name,
  is refused: its `norm1.bn.*` tensors have no counterpart.)
- mbf -> mobilefacenet_mbf, mbf_large -> mobilefacenet_large: their `layers` list holds a ConvBlock stem,
  then the first stage (mbf: one grouped ConvBlock; mbf_large: a Residual of DepthWise blocks), then
  DepthWise (strided) and Residual for each later stage; every ConvBlock / LinearBlock keeps its conv, BN
  (and PReLU) in an nn.Sequential `layers`, every DepthWise its three blocks. Ours: `stem`, `stem_grouped`,
  `branches.N.{squeeze,depthwise,project}`; their `conv_sep` is our `conv_to_head`, their GDC `features`
  our `global_depthwise` + `embedding_fc` + `embedding_bn`.
"""

from __future__ import annotations

import torch

from toolkit.errors import CheckpointError
from toolkit.models.mobilefacenet_large import MBF_LARGE_REPEATS, MBF_REPEATS

# FaceCL backbone -> arcface_torch get_model names of the same architecture.
ARCFACE_COUNTERPARTS: dict[str, tuple[str, ...]] = {
    "iresnet18": ("r18",), "iresnet34": ("r34",), "iresnet50": ("r50",), "iresnet100": ("r100",),
    "iresnet200": ("r200",), "iresnet2060": ("r2060",),
    "mobilefacenet_mbf": ("mbf",), "mobilefacenet_large": ("mbf_large",),
    "vit_t": ("vit_t", "vit_t_dp005_mask0"), "vit_s": ("vit_s", "vit_s_dp005_mask_0"),
    "vit_b": ("vit_b", "vit_b_dp005_mask_005"), "vit_l": ("vit_l_dp005_mask_005",), "vit_h": ("vit_h",),
}


def _mobilefacenet_prefixes(repeats: tuple[int, int, int, int]) -> dict[str, str]:
    """Our module prefix -> theirs, for arcface_torch's MobileFaceNet(blocks=repeats)."""
    prefixes = {"stem": "layers.0.layers"}
    count = 0

    def depthwise(theirs: str) -> None:  # their DepthWise: ConvBlock 1x1, ConvBlock dw 3x3, LinearBlock 1x1
        nonlocal count
        for index, part in enumerate(("squeeze", "depthwise", "project")):
            prefixes[f"branches.{count}.{part}"] = f"{theirs}.layers.{index}.layers"
        count += 1

    if repeats[0] == 1:
        prefixes["stem_grouped"] = "layers.1.layers"
    else:
        for block in range(repeats[0]):
            depthwise(f"layers.1.layers.{block}")
    for stage in (1, 2, 3):  # layers.2 / 4 / 6: strided DepthWise; layers.3 / 5 / 7: Residual
        depthwise(f"layers.{2 * stage}")
        for block in range(repeats[stage]):
            depthwise(f"layers.{2 * stage + 1}.layers.{block}")
    prefixes.update({"conv_to_head": "conv_sep.layers", "global_depthwise": "features.layers.0.layers",
                     "embedding_fc": "features.layers.2", "embedding_bn": "features.layers.3"})
    return prefixes


def _prefixes(backbone: str) -> dict[str, str]:
    if backbone.startswith("vit_"):
        return {"patch_embed": "patch_embed.proj"}
    if backbone == "mobilefacenet_mbf":
        return _mobilefacenet_prefixes(MBF_REPEATS)
    if backbone == "mobilefacenet_large":
        return _mobilefacenet_prefixes(MBF_LARGE_REPEATS)
    return {}  # iresnets


def arcface_key_map(backbone: str, our_keys) -> dict[str, str]:
    """Our state-dict key -> arcface_torch's, for every key of FaceCL `backbone` (a counterpart)."""
    prefixes = _prefixes(backbone)
    mapping = {}
    for key in our_keys:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):  # longest module prefix first
            theirs = prefixes.get(".".join(parts[:cut]))
            if theirs is not None:
                mapping[key] = ".".join([theirs, *parts[cut:]])
                break
        else:
            mapping[key] = key
    return mapping


def _strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def reference_state(backbone: str, embedding_size: int, image_size: int,
                    patch_size: int | None = None) -> dict[str, torch.Tensor]:
    """The registry model's state dict on the meta device: names and shapes, no memory (vit_h included)."""
    from toolkit.export.consolidate import build_registry_backbone

    options = {"patch_size": patch_size} if patch_size else {}
    with torch.device("meta"):
        return build_registry_backbone({"backbone": backbone, "embedding_size": embedding_size,
                                        "image_size": image_size, "options": options}).state_dict()


def map_arcface_backbone(their: dict[str, torch.Tensor], backbone: str, *, embedding_size: int = 512,
                         image_size: int = 112, patch_size: int | None = None,
                         where: str = "") -> dict[str, torch.Tensor]:
    """Their state dict -> ours (registry keys, fp32): every tensor mapped, every shape checked against the
    registry model of these sizes (`patch_size`: a ViT recipe's model.patch_size; theirs is always 9)."""
    at = f"{where}: " if where else ""
    if backbone not in ARCFACE_COUNTERPARTS:
        raise CheckpointError(f"{at}FaceCL has no arcface_torch counterpart for backbone {backbone!r}; "
                              f"supported: {', '.join(sorted(ARCFACE_COUNTERPARTS))}")
    reference = reference_state(backbone, embedding_size, image_size, patch_size)
    names = arcface_key_map(backbone, reference)
    their = _strip_module(their)
    patch = f", patch {patch_size}" if patch_size else ""
    what = (f"not an arcface_torch {' / '.join(ARCFACE_COUNTERPARTS[backbone])} with embedding size "
            f"{embedding_size} at {image_size}x{image_size}{patch}")
    used = set(names.values())
    unused = [key for key in their if key not in used]
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise CheckpointError(f"{at}tensor {unused[0]} {tuple(their[unused[0]].shape)} has no counterpart in "
                              f"FaceCL {backbone}{more}: {what}")
    mapped = {}
    for ours, expected in reference.items():
        theirs = names[ours]
        ours_named = f"FaceCL {backbone}" + (f" {ours}" if ours != theirs else "")
        if theirs not in their:
            raise CheckpointError(f"{at}tensor {theirs} is missing ({ours_named} has shape "
                                  f"{tuple(expected.shape)}): {what}")
        value = their[theirs]
        if tuple(value.shape) != tuple(expected.shape):
            raise CheckpointError(f"{at}tensor {theirs} has shape {tuple(value.shape)}, {ours_named} has "
                                  f"{tuple(expected.shape)}: {what}")
        mapped[ours] = value.float() if value.is_floating_point() else value
    return mapped
