# What the engines read of the recipe's `parallel` section: a protocol, so that this package needs no recipe types.
"""The recipe's ParallelConfig (toolkit/config/schema.py, where every field is documented) has these fields;
the strategies and the DeepSpeed config renderer read only them. Declaring them here keeps the layering
honest: toolkit/parallel sits below toolkit/config and takes any object with these attributes (the builders
pass the recipe's section; tests may pass their own)."""

from __future__ import annotations

from typing import Protocol


class ParallelSettings(Protocol):
    engine: str
    zero_stage: int
    precision: str                  # fp32 | bf16 | fp16
    offload_optimizer: bool
    deepspeed_config: str           # path of a YAML/JSON merged into the rendered DeepSpeed config ('' = none)
    fsdp_reshard_after_forward: bool
    fsdp_mixed_precision: bool
    clip_grad_norm: float
    timeout_s: int
