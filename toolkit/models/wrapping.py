# Applied to a built backbone from outside its definition: activation checkpointing, channels_last, torch.compile.
"""Training-time transformations of a backbone that leave the model definition (and its state_dict) alone.

Every backbone exposes ``fsdp_units()``: its repeated blocks (transformer blocks, residual blocks). The
functions here act on those units, so the engine layer decides how a model is run while the model files
stay plain ``nn.Module`` definitions:

- ``apply_activation_checkpointing(model)``: each unit recomputes its forward during backward
  (non-reentrant ``torch.utils.checkpoint``); BatchNorm running statistics are updated once per step,
  as without checkpointing.
- ``prepare_backbone(model, compile=..., channels_last=...)``: channels_last memory format for the
  convolutions, and ``torch.compile`` of each unit's forward.

How a unit is changed: its class is swapped for a generated subclass that overrides ``forward`` (the trick
FSDP2's ``fully_shard`` uses too). This keeps the module tree and the state_dict keys unchanged (no wrapper
module, no ``_orig_mod.``/``_checkpoint_wrapped_module.`` prefixes), survives ``copy.deepcopy`` (the
UniMoCo key encoder is a deep copy of the query backbone: an instance attribute holding a closure would
still point at the original), and leaves module hooks outside the overridden forward, so FSDP2's
all-gather and DeepSpeed ZeRO-3's parameter fetch happen around the checkpointed/compiled region.

Order with the engines: ``prepare_backbone`` (compile inside), then ``apply_activation_checkpointing``
(checkpoint around the compiled forward), then FSDP2 ``fully_shard`` per unit / DeepSpeed initialize.
Either function may be called alone. Engine support of ``compile``: single process, DDP and FSDP2 (per
unit, parameters gathered by FSDP2 hooks outside the compiled code) are supported; DeepSpeed ZeRO-3 is
not (its parameter-fetch hooks sit on every submodule, inside the compiled forward; use DeepSpeed's own
``engine.compile()`` there), ZeRO-0/1/2 keep full parameters and work like single.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.utils.checkpoint import checkpoint

__all__ = [
    "apply_activation_checkpointing",
    "is_activation_checkpointed",
    "is_compiled",
    "prepare_backbone",
    "backbone_units",
]


def backbone_units(model: nn.Module) -> List[nn.Module]:
    """The innermost ``fsdp_units()`` of ``model``: units that contain no other unit.

    A composite model (the UniMoCo encoders) lists both the backbone blocks and the encoder parts that
    hold them; checkpointing or compiling the outer ones as well would nest the work for nothing.
    """
    units = list(getattr(model, "fsdp_units", lambda: [])())
    if not units:
        raise ValueError(f"{type(model).__name__} has no fsdp_units(); every backbone must list its repeated blocks")
    unit_ids = {id(unit) for unit in units}
    innermost = []
    for unit in units:
        has_inner_unit = any(id(sub) in unit_ids for sub in unit.modules() if sub is not unit)
        if not has_inner_unit:
            innermost.append(unit)
    return innermost


# ----------------------------------------------------------------------------------------
# Activation checkpointing
# ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _batchnorm_running_stats_restored(module: nn.Module) -> Iterator[None]:
    """Undo any running-statistics update that BatchNorm layers inside ``module`` make in this context."""
    saved_buffers = [
        (buffer, buffer.detach().clone())
        for submodule in module.modules()
        if isinstance(submodule, _BatchNorm) and submodule.training and submodule.track_running_stats
        for buffer in (submodule.running_mean, submodule.running_var, submodule.num_batches_tracked)
        if buffer is not None
    ]
    try:
        yield
    finally:
        # `finally`: non-reentrant checkpoint may stop the recomputation early through an exception.
        with torch.no_grad():
            for buffer, saved in saved_buffers:
                buffer.copy_(saved)


class _ActivationCheckpointedUnit(nn.Module):
    """Mixin placed in front of a unit's class: forward runs under non-reentrant checkpointing.

    Only while training with autograd on: evaluation and the no-grad UniMoCo key path run plainly.
    The recomputation in backward runs BatchNorm layers in training mode a second time; the recompute
    context restores their running statistics, so a step updates them exactly once. Dropout and drop
    path draw the same random numbers in the recomputation (checkpoint restores the RNG state).
    """

    def forward(self, *args, **kwargs):
        inner_forward = super().forward
        if not (self.training and torch.is_grad_enabled()):
            return inner_forward(*args, **kwargs)

        def contexts() -> Tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
            # (context of the first forward, context of the backward-time recomputation)
            return contextlib.nullcontext(), _batchnorm_running_stats_restored(self)

        return checkpoint(inner_forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)


_CHECKPOINTED_CLASSES: Dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """One generated subclass per unit class, so every unit of a class shares it (and isinstance holds)."""
    if cls not in _CHECKPOINTED_CLASSES:
        _CHECKPOINTED_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_ActivationCheckpointedUnit, cls),
                                          {"__module__": cls.__module__})
    return _CHECKPOINTED_CLASSES[cls]


def is_activation_checkpointed(unit: nn.Module) -> bool:
    return isinstance(unit, _ActivationCheckpointedUnit)


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Make every (innermost) unit of ``model.fsdp_units()`` recompute its forward in backward.

    In place; returns ``model``. Idempotent. The state_dict keys do not change. Call it before FSDP2
    ``fully_shard`` / DeepSpeed initialize (the engine's hooks then stay outside the checkpointed region).
    """
    for unit in backbone_units(model):
        if not is_activation_checkpointed(unit):
            unit.__class__ = _checkpointed_class(type(unit))
    return model


# ----------------------------------------------------------------------------------------
# torch.compile and channels_last
# ----------------------------------------------------------------------------------------


class _CompiledUnit(nn.Module):
    """Marker base of the generated compiled-unit classes (their ``forward`` is a compiled function)."""


_COMPILED_CLASSES: Dict[Tuple[type, Tuple], type] = {}
_RECOMPILE_LIMIT = 64


def _compiled_class(cls: type, compile_options: Tuple) -> type:
    """A subclass whose forward is ``torch.compile(cls.forward)``: one compiled function per unit class.

    Compiling the class's function (with the module as its first argument) instead of each instance's
    bound method lets the units of one class share compiled code (dynamo lifts the parameters as inputs).
    """
    key = (cls, compile_options)
    if key not in _COMPILED_CLASSES:
        compiled_forward = torch.compile(cls.forward, **dict(compile_options))
        _COMPILED_CLASSES[key] = type(f"Compiled{cls.__name__}", (_CompiledUnit, cls),
                                      {"forward": compiled_forward, "__module__": cls.__module__})
    return _COMPILED_CLASSES[key]


def is_compiled(unit: nn.Module) -> bool:
    return isinstance(unit, _CompiledUnit)


def _inputs_to_channels_last(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook: a 4-D image batch is handed to the first convolution in channels_last layout."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return args


def prepare_backbone(model: nn.Module, *, compile: bool = False, channels_last: bool = False,
                     compile_options: Dict | None = None) -> nn.Module:
    """Apply channels_last and/or torch.compile to a backbone, in place; returns ``model``.

    channels_last: 4-D parameters (convolution weights) and the input batch (a forward pre-hook) use the
    NHWC layout, which cuDNN / oneDNN convolutions run faster in (tensor cores need it); outputs equal the
    NCHW run within fp32 tolerance. For the ViTs only the patch embedding is a convolution: harmless.
    compile: each innermost unit's forward is compiled (``compile_options`` go to ``torch.compile``); the
    stem and embedding head stay eager. Call before ``apply_activation_checkpointing`` and before the
    engine wraps the model (see the module docstring for which engines support it).
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
        if not getattr(model, "_facecl_channels_last_hook", False):
            model.register_forward_pre_hook(_inputs_to_channels_last)
            model._facecl_channels_last_hook = True
    if compile:
        # Static shapes: a training run has a few fixed block shapes, and dynamic-shape kernels for
        # train-mode BatchNorm fail to lower in inductor (torch 2.14: "Cannot convert expression to float").
        # All units of a class share one compiled function, so each distinct block shape (and train/eval)
        # is one cache entry of it: raise dynamo's per-function recompile limit (8) to hold them all.
        options = tuple(sorted({"dynamic": False, **(compile_options or {})}.items()))
        from torch import _dynamo  # not `import torch._dynamo`: that would make `torch` local to this function

        dynamo_config = _dynamo.config
        limit_name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
        setattr(dynamo_config, limit_name, max(getattr(dynamo_config, limit_name), _RECOMPILE_LIMIT))
        for unit in backbone_units(model):
            if is_activation_checkpointed(unit):
                raise ValueError("prepare_backbone(compile=True) must run before apply_activation_checkpointing: "
                                 f"unit {type(unit).__name__} is already checkpointed")
            if not is_compiled(unit):
                unit.__class__ = _compiled_class(type(unit), options)
    return model

