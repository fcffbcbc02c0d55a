# PyTorch FSDP2 (fully_shard): parameters, gradients and optimizer states sharded per block; DCP checkpoints.
"""`parallelize` applies the wrappers in a fixed order, as torchtitan does:

1. (activation checkpointing, when the recipe asks, is applied by the builders before this: it must wrap
   the blocks before they are sharded, and leaves parameter names unchanged);
2. `fully_shard` on every unit of `model.fsdp_units()` (transformer blocks, residual blocks; with UniMoCo
   the query and key encoders' blocks alike), so that one block's parameters are gathered at a time;
3. `fully_shard` on the root, which takes every parameter not inside a unit (stem, embedding layers).

Gradients are reduce-scattered (averaged) over the ranks. Precision: autocast by default (fp32 parameters,
like the other engines), or FSDP2's MixedPrecisionPolicy (bf16/fp16 parameters in compute, fp32 reduce)
when `parallel.fsdp_mixed_precision` is set.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.parallel.base import AUTOCAST_DTYPES, ModelStateLayout, ParallelStrategy, register_strategy
from toolkit.parallel.dcp_checkpoint import DcpCheckpointFormat, load_dcp_safely


def parallelize(model: nn.Module, group, device_type: str, *, reshard_after_forward: bool,
                mixed_precision_dtype: torch.dtype | None) -> nn.Module:
    """Shard `model` in place with FSDP2 (units first, then the root); returns it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp_policy = MixedPrecisionPolicy()
    if mixed_precision_dtype is not None:
        mp_policy = MixedPrecisionPolicy(param_dtype=mixed_precision_dtype, reduce_dtype=torch.float32)
    mesh = torch.distributed.device_mesh.DeviceMesh.from_group(group, device_type)
    for unit in getattr(model, "fsdp_units", lambda: [])():
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=mp_policy)
    return model


@register_strategy("fsdp")
class FullyShardedDataParallel2(ParallelStrategy):
    """FSDP2 on the units and the root; DCP checkpoint folder `fsdp/` written by every rank."""

    checkpoint_format = DcpCheckpointFormat

    @classmethod
    def model_state_layout(cls, par) -> ModelStateLayout:
        return ModelStateLayout(split_params=True, split_grads=True, split_optimizer=True,
                                label="fsdp (FSDP2, partitioned like ZeRO-3)")

    @classmethod
    def create(cls, par, model, optimizer_factory, ctx, batch):
        uses_mp_policy = par.fsdp_mixed_precision and par.precision != "fp32"
        parallelize(model, ctx.group, ctx.device.type, reshard_after_forward=par.fsdp_reshard_after_forward,
                    mixed_precision_dtype=AUTOCAST_DTYPES[par.precision] if uses_mp_policy else None)
        # The optimizer must see the sharded (DTensor) parameters, so it is built after fully_shard.
        strategy = cls(par, model, optimizer_factory(model), ctx, grad_accum_steps=batch.grad_accum_steps)
        strategy.uses_mp_policy = uses_mp_policy
        return strategy

    uses_mp_policy = False

    def _make_scaler(self):
        if self.precision == "fp16":
            # Sharded gradients: overflow found on one rank's shard must skip the step on every rank.
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            return ShardedGradScaler(self.ctx.device.type, process_group=self.ctx.group)
        return torch.amp.GradScaler(self.ctx.device.type, enabled=False)

    def autocast(self):
        if self.uses_mp_policy:
            return contextlib.nullcontext()
        return super().autocast()

    def backward(self, loss, is_last_micro):
        self.module.set_requires_gradient_sync(is_last_micro)
        self.scaler.scale(loss / self.accum).backward()

    def local_tensors(self, param):
        # Query and key encoder are sharded with the same layout (fsdp_units), so an update of the local
        # shards (the UniMoCo EMA) needs no all-gather.
        return [param.to_local()]

    def _state_dicts(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        return get_state_dict(self.module, self.optimizer)

    def save_folder(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp

        model_state, optim_state = self._state_dicts()
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder / self.checkpoint_format.folder),
                 process_group=self.ctx.group)

    def load_folder(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        model_state, optim_state = self._state_dicts()
        state = {"model": model_state, "optim": optim_state}
        load_dcp_safely(state, folder / self.checkpoint_format.folder, process_group=self.ctx.group)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def state_for_file(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()}

    def load_from_file(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state["scaler"])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        # Every sharded (DTensor) entry is all-gathered, in state-dict order on every rank (collective).
        return {key: (value.full_tensor() if hasattr(value, "full_tensor") else value).detach().cpu().clone()
                for key, value in self.module.state_dict().items()}

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        # set_model_state_dict replaces the dict's entries by sharded tensors: hand it a copy of the caller's.
        set_model_state_dict(self.module, dict(state), options=StateDictOptions(full_state_dict=True))
