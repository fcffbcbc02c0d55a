# DeepSpeed config rendered from the recipe (no number written twice), plus an optional user file merged in.
"""`render_deepspeed_config` derives every DeepSpeed setting the recipe already decides (batch sizes,
accumulation, clipping, precision, ZeRO stage and offload). `parallel.deepspeed_config` may add settings
the recipe does not cover (bucket sizes, overlap_comm, ...); a setting it shares with the rendered config
must have the same value, otherwise the run stops with an error naming both values.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from toolkit.errors import ConfigError

if TYPE_CHECKING:
    from toolkit.parallel.settings import ParallelSettings

# Sections that would take over what the recipe and the trainer own.
_FORBIDDEN_SECTIONS = {
    "optimizer": "the optimizer comes from the recipe's optim section",
    "scheduler": "the learning-rate schedule comes from the recipe's schedule section",
}


def render_deepspeed_config(par: "ParallelSettings", *, micro_batch_size: int, grad_accum_steps: int,
                            global_batch_size: int) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "train_batch_size": global_batch_size,
        "gradient_clipping": par.clip_grad_norm,
        "zero_optimization": {"stage": par.zero_stage},
        # A torch optimizer object is passed in (SGD/AdamW from the recipe), which ZeRO calls "untested".
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the trainer prints progress itself
        "wall_clock_breakdown": False,
    }
    if par.offload_optimizer:
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        config["zero_force_ds_cpu_optimizer"] = False
    if par.precision == "bf16":
        # Autocast with fp32 master parameters, the same numerics as the other engines.
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif par.precision == "fp16":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def _load_user_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"parallel.deepspeed_config file not found: {path}")
    text = path.read_text()
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"parallel.deepspeed_config {path} does not parse: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"parallel.deepspeed_config {path} must hold a mapping, got {type(data).__name__}")
    return data


def merge_user_config(rendered: dict[str, Any], user: dict[str, Any], source: str, prefix: str = "") -> dict[str, Any]:
    """Rendered settings plus the user's; equal values are fine, different values are an error."""
    merged = dict(rendered)
    for key, value in user.items():
        dotted = f"{prefix}{key}"
        if not prefix and key in _FORBIDDEN_SECTIONS:
            raise ConfigError(f"{source} sets '{key}', but {_FORBIDDEN_SECTIONS[key]}")
        if key not in rendered:
            merged[key] = value
        elif isinstance(value, dict) and isinstance(rendered[key], dict):
            merged[key] = merge_user_config(rendered[key], value, source, f"{dotted}.")
        elif value != rendered[key]:
            raise ConfigError(f"{source} sets {dotted} = {value!r}, but the recipe gives {dotted} = "
                              f"{rendered[key]!r}; change the recipe instead")
    return merged


def build_deepspeed_config(par: "ParallelSettings", *, micro_batch_size: int, grad_accum_steps: int,
                           global_batch_size: int) -> dict[str, Any]:
    """The rendered config with the user's file (parallel.deepspeed_config) merged in."""
    rendered = render_deepspeed_config(par, micro_batch_size=micro_batch_size, grad_accum_steps=grad_accum_steps,
                                       global_batch_size=global_batch_size)
    if not par.deepspeed_config:
        return rendered
    path = Path(par.deepspeed_config)
    return merge_user_config(rendered, _load_user_file(path), f"parallel.deepspeed_config {path}")
