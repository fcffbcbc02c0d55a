# Optimizers (SGD / AdamW without weight decay on norm and bias parameters) and the per-step lr schedule.
"""Optimizer and learning-rate schedule builders, read from the `optim` and `schedule` recipe sections."""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import nn

from toolkit.config.schema import OptimConfig, ScheduleConfig

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


def split_decay_groups(modules: Iterable[nn.Module]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decay, no_decay) trainable parameters: normalisation weights and every bias go to no_decay."""
    decay, no_decay, seen = [], [], set()
    for module in modules:
        for sub in module.modules():
            for name, param in sub.named_parameters(recurse=False):
                if not param.requires_grad or id(param) in seen:
                    continue
                seen.add(id(param))
                (no_decay if isinstance(sub, _NORM_TYPES) or name == "bias" else decay).append(param)
    return decay, no_decay


def scaled_lr(cfg: OptimConfig, global_batch_size: int) -> float:
    """Peak lr for this run's global batch (linear scaling rule when reference_batch_size is set)."""
    if cfg.reference_batch_size == 0:
        return cfg.lr
    return cfg.lr * global_batch_size / cfg.reference_batch_size


def build_optimizer(cfg: OptimConfig, modules: Iterable[nn.Module], lr: float) -> torch.optim.Optimizer:
    """SGD or AdamW over the modules' trainable parameters, two groups (with / without weight decay)."""
    decay, no_decay = split_decay_groups(modules)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(cfg.betas), eps=cfg.eps)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def warmup_steps_of(cfg: ScheduleConfig, steps_per_epoch: int) -> int:
    """Warmup length in optimizer steps: schedule.warmup_steps, or schedule.warmup_epochs times this run's steps
    per epoch, rounded to the nearest step (halves up) and at least 1."""
    if cfg.warmup_epochs == 0:
        return cfg.warmup_steps
    if steps_per_epoch < 1:
        raise ValueError(f"schedule.warmup_epochs={cfg.warmup_epochs} needs the run's steps per epoch, "
                         f"got steps_per_epoch={steps_per_epoch}")
    return max(1, math.floor(cfg.warmup_epochs * steps_per_epoch + 0.5))


def lr_factor(step: int, total_steps: int, cfg: ScheduleConfig, steps_per_epoch: int = 0) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): warmup, then cosine / poly / constant.
    `steps_per_epoch` is needed only when the warmup is given in epochs."""
    warmup = warmup_steps_of(cfg, steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if cfg.decay == "cosine":
        shape = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif cfg.decay == "poly":
        shape = (1.0 - progress) ** cfg.poly_power
    else:
        shape = 1.0
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: ScheduleConfig,
                    steps_per_epoch: int = 0):
    """LambdaLR stepped once per optimizer step; `steps_per_epoch` turns schedule.warmup_epochs into steps."""
    warmup_steps_of(cfg, steps_per_epoch)   # a warmup in epochs without the run's steps per epoch fails here
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, cfg, steps_per_epoch))
