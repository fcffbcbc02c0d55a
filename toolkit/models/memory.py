# Activation memory of a backbone per sample, with and without activation checkpointing, from a fake-tensor trace.
"""How much memory the tensors kept for backward take, per training sample.

``activation_footprint(model, image_size, dtype)`` runs one training-mode forward of ``model`` on fake
tensors (``FakeTensorMode``: shapes and dtypes only, no memory, any model size in well under a minute on
a CPU) under autocast to ``dtype``, and records every tensor autograd saves for backward
(``saved_tensors_hooks``), each storage once, parameters excluded. Saves are attributed to the innermost
``fsdp_units()`` block running at the time, which gives both regimes:

- plain: everything saved stays alive until backward reaches it: ``outside + sum(units)``;
- activation checkpointing per block: each block keeps only its input; backward recomputes one block at a
  time, so the peak is ``outside + sum(unit inputs) + max(unit)``.

It measures what the code does (masking, the fp32 embedding head, SDPA's saved outputs, views sharing a
storage) instead of a per-architecture formula that would drift from the model files. Not counted:
temporaries inside one op (attention's score matrix on the math path, convolution workspaces), the
allocator's fragmentation, and the gradient of the activations during backward (about one block's worth).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn as nn

from toolkit.models.wrapping import _ActivationCheckpointedUnit, _CompiledUnit, backbone_units

_TRACE_BATCH = 2  # BatchNorm1d in training needs 2 samples; batches of 2 and 4 are traced


@dataclass(frozen=True)
class ActivationFootprint:
    """Bytes per sample kept for backward, split by where they are saved."""

    outside_units: int     # stem, patch embedding, embedding head
    unit_inputs: int       # the input of every block (all that checkpointing keeps of a block)
    units_total: int       # everything the blocks save, summed
    largest_unit: int      # the largest single block's saves (recomputed one at a time with checkpointing)
    num_units: int

    def bytes_per_sample(self, checkpointing: bool) -> int:
        if checkpointing:
            return self.outside_units + self.unit_inputs + self.largest_unit
        return self.outside_units + self.units_total


@contextlib.contextmanager
def _plain_units(model: nn.Module) -> Iterator[list[nn.Module]]:
    """Run the blocks' own forward during the trace: no checkpointing (it would hide the saves inside a
    block), no compiled code (dynamo is not needed to count)."""
    units = backbone_units(model)
    classes = [type(unit) for unit in units]
    try:
        for unit, cls in zip(units, classes):
            plain = next(c for c in cls.__mro__ if c not in (_ActivationCheckpointedUnit, _CompiledUnit)
                         and not issubclass(c, (_ActivationCheckpointedUnit, _CompiledUnit)))
            unit.__class__ = plain
        yield units
    finally:
        for unit, cls in zip(units, classes):
            unit.__class__ = cls


def _storage_key(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata


def _trace(model: nn.Module, image_size: int, dtype: torch.dtype, batch: int) -> tuple[int, list[int], list[int]]:
    """(bytes saved outside the blocks, bytes saved per block, input bytes per block) for one fake batch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    saved: dict[int, tuple[int, int | None]] = {}  # storage -> (bytes, block index or None)
    current: list[int | None] = [None]
    with FakeTensorMode(), _plain_units(model) as units:
        # Fake CPU stand-ins for parameters and buffers: shapes and dtypes only.
        fake_state = {name: torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
                      for name, tensor in [*model.named_parameters(), *model.named_buffers()]}
        for name, param in model.named_parameters():
            fake_state[name].requires_grad_(param.requires_grad)
        parameter_keys = {_storage_key(fake_state[name]) for name, _ in model.named_parameters()}
        unit_inputs = [0] * len(units)

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            key = _storage_key(tensor)
            if key not in parameter_keys and key not in saved:
                saved[key] = (tensor.untyped_storage().nbytes(), current[0])
            return tensor

        def enter_unit(index: int):
            def hook(module, args):
                current[0] = index
                unit_inputs[index] = args[0].untyped_storage().nbytes()
            return hook

        def leave_unit(module, args, output):
            current[0] = None

        handles = []
        for index, unit in enumerate(units):
            handles.append(unit.register_forward_pre_hook(enter_unit(index)))
            handles.append(unit.register_forward_hook(leave_unit))
        try:
            images = torch.empty(batch, 3, image_size, image_size)
            autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
            with autocast, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
                torch.func.functional_call(model, fake_state, (images,))
        finally:
            for handle in handles:
                handle.remove()
    per_unit = [0] * len(units)
    outside = 0
    for nbytes, unit in saved.values():
        if unit is None:
            outside += nbytes
        else:
            per_unit[unit] += nbytes
    return outside, per_unit, unit_inputs


def activation_footprint(model: nn.Module, image_size: int, dtype: torch.dtype = torch.float32
                         ) -> ActivationFootprint:
    """Trace ``model`` (real, meta or fake parameters; left unchanged) on fake (B, 3, S, S) batches.

    ``dtype``: the compute dtype (torch.bfloat16 / torch.float16 run the trace under CPU autocast, which
    keeps the same ops in fp32 as CUDA autocast: norms, softmax, the fp32 embedding head). Two batch
    sizes are traced and the difference taken, so what does not grow with the batch (autocast's
    low-precision weight copies, BatchNorm statistics) is not counted per sample.
    """
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    was_training = model.training
    model.train()
    try:
        small = _trace(model, image_size, dtype, _TRACE_BATCH)
        large = _trace(model, image_size, dtype, 2 * _TRACE_BATCH)
    finally:
        model.train(was_training)
    outside = (large[0] - small[0]) // _TRACE_BATCH
    per_unit = [(b - a) // _TRACE_BATCH for a, b in zip(small[1], large[1])]
    inputs = [(b - a) // _TRACE_BATCH for a, b in zip(small[2], large[2])]
    return ActivationFootprint(outside_units=outside, unit_inputs=sum(inputs), units_total=sum(per_unit),
                               largest_unit=max(per_unit, default=0), num_units=len(per_unit))


def activation_bytes_per_sample(model: nn.Module, image_size: int, *, checkpointing: bool,
                                dtype: torch.dtype = torch.float32) -> int:
    """Bytes of activations kept for backward per training sample (see ``activation_footprint``)."""
    return activation_footprint(model, image_size, dtype).bytes_per_sample(checkpointing)
