# Backbone engines: one interface over single-process, DDP, DeepSpeed ZeRO 0-3 and FSDP2 (fully_shard).
"""The engine owns the backbone part of the model: its wrapping, gradient synchronisation, optimizer step
and checkpoint format. The trainer drives every engine through the same calls, in this order per step:

    for each micro-batch:  emb = engine.forward(images);  engine.backward(loss, is_last_micro)
    engine.unscale_();  norm = engine.clip_grad_norm_(max_norm);  stepped = engine.step();  engine.zero_grad()

`loss` is the mean over the micro-batch; each engine applies the 1/grad_accum_steps averaging itself
(DeepSpeed does it inside engine.backward). The identity-center head is NOT part of any engine.

What each engine does with gradients and precision:
- single: plain autograd; autocast for bf16/fp16, a GradScaler for fp16.
- ddp: DistributedDataParallel averages gradients across ranks (no_sync on all but the last micro-batch).
- deepspeed: DeepSpeed ZeRO stage 0-3 on a torch optimizer; bf16 through DeepSpeed's `torch_autocast`
  (fp32 master parameters, like the other engines); fp16 through DeepSpeed's own fp16 mode and dynamic
  loss scaler (GPU only); clipping by DeepSpeed's `gradient_clipping`.
- fsdp: FSDP2 `fully_shard` on every residual block and the root; gradients reduce-scattered (averaged);
  autocast by default, or FSDP2's MixedPrecisionPolicy when `fsdp_mixed_precision` is set.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.config.schema import Recipe
from toolkit.distributed import DistributedContext

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def _full_value(norm: torch.Tensor) -> torch.Tensor:
    """A DTensor norm (FSDP2) as a plain tensor."""
    full_tensor = getattr(norm, "full_tensor", None)
    return full_tensor() if full_tensor is not None else norm


class BackboneEngine:
    """Base class: single-process behaviour; subclasses override what their engine does differently."""

    name = "single"
    checkpoint_kind = "file"     # "file": engine state travels inside the trainer file; "folder": own files

    def __init__(self, recipe: Recipe, backbone: nn.Module, optimizer: torch.optim.Optimizer,
                 ctx: DistributedContext):
        self.recipe = recipe
        self.ctx = ctx
        self.accum = recipe.parallel.grad_accum_steps
        self.autocast_dtype = AUTOCAST_DTYPES[recipe.parallel.precision]
        self.module = backbone
        self.optimizer = optimizer
        self.scaler = self._make_scaler()

    # ----- construction helpers -------------------------------------------------------------------
    def _make_scaler(self):
        return torch.amp.GradScaler(self.ctx.device.type, enabled=self.recipe.parallel.precision == "fp16")

    # ----- the step ---------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(device_type=self.ctx.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.module(images)

    def key_forward(self, images: torch.Tensor) -> torch.Tensor:
        """UniMoCo key path through the momentum encoder (no gradients), with the forward's precision."""
        with torch.no_grad(), self.autocast():
            return self.unwrapped().key_forward(images)

    def _local(self, param: torch.Tensor) -> list[torch.Tensor]:
        """The tensors holding this rank's copy of a parameter (all of it, unless the engine shards it)."""
        return [param.data]

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """key = m * key + (1 - m) * query, on the locally stored (possibly sharded) parameters only."""
        query, key = [], []
        for q, k in self.unwrapped().momentum_pairs():
            query += self._local(q)
            key += self._local(k)
        torch._foreach_mul_(key, momentum)
        torch._foreach_add_(key, query, alpha=1.0 - momentum)

    def _sync_context(self, is_last_micro: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, is_last_micro: bool) -> None:
        with self._sync_context(is_last_micro):
            self.scaler.scale(loss / self.accum).backward()

    def loss_scale(self) -> float:
        """The factor the loss was multiplied by in backward (1.0 unless fp16)."""
        return float(self.scaler.get_scale()) if self.scaler.is_enabled() else 1.0

    def unscale_(self) -> None:
        self.scaler.unscale_(self.optimizer)

    def found_inf(self) -> torch.Tensor:
        """1.0 if the unscaled gradients hold inf/nan (fp16 only), else 0.0; call after unscale_()."""
        if not self.scaler.is_enabled():
            return torch.zeros((), device=self.ctx.device)
        states = self.scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"]
        return sum(v.to(self.ctx.device) for v in states.values())

    def force_skip(self) -> None:
        """Make the coming step() a skip (the head overflowed): the two parts always skip together."""
        if self.scaler.is_enabled():
            for value in self.scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"].values():
                value.fill_(1.0)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip to max_norm (0 = measure only) and return the gradient norm before clipping."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if max_norm > 0:
            return _full_value(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
        return _full_value(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True))

    def step(self) -> bool:
        """Apply the optimizer step; False when fp16 loss scaling skipped it."""
        scale_before = self.loss_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return not (self.scaler.is_enabled() and self.loss_scale() < scale_before)

    def grad_norm_after_step(self) -> float | None:
        """Engines that clip inside step() report the norm here; the others return None."""
        return None

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def sync_buffers(self) -> None:
        """Average floating-point buffers (batch-norm running statistics) over ranks.

        Every rank updates its running statistics from its own batches; only DDP re-broadcasts them each
        step. Evaluation (each rank embeds part of the set) and checkpoints (one copy is saved and loaded
        into every rank) need one value on all ranks, so the trainer calls this before both.
        """
        if self.ctx.world_size == 1:
            return
        buffers = [b for b in self.unwrapped().buffers() if b.is_floating_point()]
        if buffers:
            flat = torch._utils._flatten_dense_tensors(buffers)
            self.ctx.all_reduce_mean_(flat)
            for buffer, averaged in zip(buffers, torch._utils._unflatten_dense_tensors(flat, buffers)):
                buffer.copy_(averaged)

    def train(self, mode: bool = True) -> None:
        self.module.train(mode)

    # ----- checkpoints ------------------------------------------------------------------------------
    def unwrapped(self) -> nn.Module:
        return self.module

    def state_for_file(self) -> dict[str, Any]:
        """Engine state stored inside the trainer file (engines with checkpoint_kind 'file')."""
        return {"backbone": self.unwrapped().state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_from_file(self, state: dict[str, Any]) -> None:
        self.unwrapped().load_state_dict(state["backbone"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def save_folder(self, folder: Path) -> None:
        raise NotImplementedError

    def load_folder(self, folder: Path) -> None:
        raise NotImplementedError


class SingleEngine(BackboneEngine):
    name = "single"


class DDPEngine(BackboneEngine):
    """torch DistributedDataParallel; the unwrapped module is saved in the trainer file by rank 0."""

    name = "ddp"

    def __init__(self, recipe, backbone, optimizer, ctx):
        super().__init__(recipe, backbone, optimizer, ctx)
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        self.module = nn.parallel.DistributedDataParallel(backbone, device_ids=device_ids, process_group=ctx.group)

    def _sync_context(self, is_last_micro: bool):
        return contextlib.nullcontext() if is_last_micro else self.module.no_sync()

    def unwrapped(self) -> nn.Module:
        return self.module.module


class FSDPEngine(BackboneEngine):
    """PyTorch FSDP2: fully_shard on each residual block, then on the root; DCP checkpoints per rank."""

    name = "fsdp"
    checkpoint_kind = "folder"

    def __init__(self, recipe, backbone, optimizer_factory, ctx):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        par = recipe.parallel
        mp_policy = MixedPrecisionPolicy()
        self.uses_mp_policy = par.fsdp_mixed_precision and par.precision != "fp32"
        if self.uses_mp_policy:
            mp_policy = MixedPrecisionPolicy(param_dtype=AUTOCAST_DTYPES[par.precision], reduce_dtype=torch.float32)
        mesh = torch.distributed.device_mesh.DeviceMesh.from_group(ctx.group, ctx.device.type)
        for block in getattr(backbone, "fsdp_units", lambda: [])():
            fully_shard(block, mesh=mesh, reshard_after_forward=par.fsdp_reshard_after_forward, mp_policy=mp_policy)
        fully_shard(backbone, mesh=mesh, reshard_after_forward=par.fsdp_reshard_after_forward, mp_policy=mp_policy)
        # The optimizer must see the sharded (DTensor) parameters, so it is built after fully_shard.
        super().__init__(recipe, backbone, optimizer_factory(backbone), ctx)

    def _make_scaler(self):
        if self.recipe.parallel.precision == "fp16":
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

    def _local(self, param):
        # Query and key encoder are sharded with the same layout (fsdp_units), so the EMA runs on the
        # local shards: no all-gather for the momentum update.
        return [param.to_local()]

    def save_folder(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder / "fsdp"),
                 process_group=self.ctx.group)

    def load_folder(self, folder: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(self.module, self.optimizer)
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(folder / "fsdp"), process_group=self.ctx.group)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def state_for_file(self) -> dict[str, Any]:
        return {"scaler": self.scaler.state_dict()}

    def load_from_file(self, state: dict[str, Any]) -> None:
        self.scaler.load_state_dict(state["scaler"])


class DeepSpeedEngine(BackboneEngine):
    """DeepSpeed ZeRO 0-3 around a torch optimizer; DeepSpeed's own checkpoint files per rank."""

    name = "deepspeed"
    checkpoint_kind = "folder"

    def __init__(self, recipe, backbone, optimizer, ctx, ds_config: dict):
        import deepspeed

        super().__init__(recipe, backbone, optimizer, ctx)
        self.ds_config = ds_config
        self.module, self.optimizer, _, _ = deepspeed.initialize(model=backbone, optimizer=optimizer,
                                                                 config=ds_config)
        self.native_fp16 = bool(ds_config.get("fp16", {}).get("enabled", False))

    def _make_scaler(self):
        return torch.amp.GradScaler(self.ctx.device.type, enabled=False)  # DeepSpeed scales its own loss

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # bf16 runs through DeepSpeed's torch_autocast (inside the engine's forward); native fp16 keeps
        # the module in half precision, so the input must match it.
        if self.native_fp16:
            images = images.half()
        return self.module(images)

    def key_forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.native_fp16:
            with torch.no_grad():
                return self.unwrapped().key_forward(images.half())
        return super().key_forward(images)

    def _local(self, param):
        # ZeRO-3 keeps only this rank's partition of a parameter (ds_tensor); the key encoder, inside the
        # same engine module, is partitioned alike, so the EMA runs partition by partition. Small
        # "persistent" parameters (below stage3_param_persistence_threshold) also keep their full value
        # in param.data, which forward reads, so both copies are updated. ZeRO-0/1/2: full parameters.
        if not hasattr(param, "ds_tensor"):
            return [param.data]
        if getattr(param, "ds_persist", False) and param.data.numel() > 0:
            if param.ds_tensor.untyped_storage().data_ptr() == param.data.untyped_storage().data_ptr():
                return [param.data]
            return [param.data, param.ds_tensor]
        return [param.ds_tensor]

    def backward(self, loss, is_last_micro):
        self.module.backward(loss)  # divides by gradient_accumulation_steps and applies the fp16 loss scale
        if not is_last_micro:
            self.module.step()      # DeepSpeed counts micro-steps in step(); it updates only on the boundary

    def loss_scale(self) -> float:
        return float(getattr(self.optimizer, "cur_scale", 1.0)) if self.native_fp16 else 1.0

    def unscale_(self) -> None:
        pass  # DeepSpeed unscales inside step()

    def found_inf(self) -> torch.Tensor:
        return torch.zeros((), device=self.ctx.device)  # known only after step(); see step()

    def force_skip(self) -> None:
        # DeepSpeed offers no way to veto its step from outside. The head can only overflow when the
        # embedding gradient (which flows into the backbone) does too, so DeepSpeed skips as well.
        pass

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor | None:
        return None  # DeepSpeed clips in step() (gradient_clipping) and reports the norm afterwards

    def step(self) -> bool:
        skipped_before = self.module.skipped_steps
        self.module.step()
        return self.module.skipped_steps == skipped_before

    def grad_norm_after_step(self) -> float | None:
        norm = self.module.get_global_grad_norm()
        return None if norm is None else float(norm)

    def zero_grad(self) -> None:
        self.module.zero_grad()

    def unwrapped(self) -> nn.Module:
        return self.module.module

    def state_for_file(self) -> dict[str, Any]:
        return {}

    def load_from_file(self, state: dict[str, Any]) -> None:
        pass

    def save_folder(self, folder: Path) -> None:
        self.module.save_checkpoint(str(folder), tag="deepspeed", save_latest=False)

    def load_folder(self, folder: Path) -> None:
        load_path, _ = self.module.load_checkpoint(str(folder), tag="deepspeed", load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint in {folder / 'deepspeed'}")
