# The full fp32 state dict of the engine part (backbone, or UniMoCo's encoders), from any engine's files.
"""The engine part of a checkpoint is read by its format (toolkit.parallel.format_of(source).full_state: the
trainer file's state dict for single / DDP, DeepSpeed's merged partitions, FSDP2's DCP files), on CPU, with no
process group, reading tensors only.

Here the keys are then normalised: engine wrapper prefixes (`module.`, `_orig_mod.`, activation-checkpoint
wrappers) are dropped, and a UniMoCo module (ContrastiveEncoders) is split into its parts: `backbone`,
`projection`, `key_backbone`, `key_projection`.
"""

from __future__ import annotations

import re

import torch

from toolkit.checkpoint import CheckpointSource
from toolkit.errors import CheckpointError
from toolkit.parallel import format_of

ENCODER_PARTS = ("backbone", "projection", "key_backbone", "key_projection")
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(module|_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


def strip_wrapper_prefixes(key: str) -> str:
    """'module._orig_mod.layer1.0.conv1.weight' -> 'layer1.0.conv1.weight' (DDP, DeepSpeed, compile, AC)."""
    previous = None
    while previous != key:
        previous = key
        key = _WRAPPER_SEGMENTS.sub(lambda m: m.group(1), key, count=1)
    return key


def split_parts(state: dict[str, torch.Tensor], contrastive: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{'backbone': {...}} or, for UniMoCo's ContrastiveEncoders, one dict per encoder part."""
    state = {strip_wrapper_prefixes(k): v for k, v in state.items()}
    if not contrastive:
        return {"backbone": state}
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in ENCODER_PARTS}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head not in parts:
            raise CheckpointError(f"UniMoCo checkpoint key {key!r} belongs to none of {', '.join(ENCODER_PARTS)}")
        parts[head][rest] = value
    return parts


def engine_state(source: CheckpointSource) -> dict[str, torch.Tensor]:
    """The full engine-module state dict (parameters in fp32 and buffers), keys as the engine saved them."""
    return format_of(source).full_state(source)


def encoder_parts(source: CheckpointSource) -> dict[str, dict[str, torch.Tensor]]:
    """{'backbone': state} (plus projection / key_backbone / key_projection for UniMoCo runs)."""
    return split_parts(engine_state(source), source.contrastive)
