# DeepSpeed ZeRO stages 0-3 around a torch optimizer; DeepSpeed's own checkpoint files per rank.
"""ZeRO (Rajbhandari et al. 2020) partitions the optimizer states over the N ranks at stage 1, also the
gradients at stage 2 and also the parameters at stage 3. Per-rank model-state memory for Adam in mixed
precision (2 bytes parameters and gradients, 12 bytes fp32 master copy and two moments), Psi parameters:

    stage 0: 16 Psi      stage 1: 4 Psi + 12 Psi / N      stage 2: 2 Psi + 14 Psi / N      stage 3: 16 Psi / N

The toolkit keeps fp32 parameters under bf16 autocast (DeepSpeed's `torch_autocast` mode), like the other
engines; fp16 uses DeepSpeed's own fp16 mode and dynamic loss scaler (GPU only). Clipping is DeepSpeed's
`gradient_clipping`, inside its step. The rendered DeepSpeed config is in deepspeed_config.py.
"""

from __future__ import annotations

import datetime
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from toolkit.errors import CheckpointError, ConfigError
from toolkit.parallel.base import LaunchEnvironment, ModelStateLayout, ParallelStrategy, register_strategy
from toolkit.parallel.deepspeed_checkpoint import (TAG, DeepSpeedCheckpointFormat, check_tag_folder,
                                                   is_universal, library_reads_safely, read_module_extras,
                                                   safe_load)
from toolkit.parallel.deepspeed_config import build_deepspeed_config


def shared_memory_buffer_path(launch: LaunchEnvironment) -> Path:
    """The /dev/shm file DeepSpeed's CPU all-reduce creates for this rank (deepspeed/ops/csrc/cpu/comm/shm.cpp:
    deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>, 2 x 33 MB)."""
    return Path("/dev/shm") / f"deepspeed_allreduce_buffer_{os.getuid()}_{launch.master_addr}_{launch.master_port}_" \
                              f"{launch.rank}"


def remove_shared_memory_buffer(launch: LaunchEnvironment) -> None:
    """Unlink this rank's buffer file as soon as every rank has mapped every buffer.

    DeepSpeed's CPU communication maps one shared-memory file per rank when the process group starts
    (each rank creates its own, then opens all the others') and never removes them, so every job left
    2 x 33 MB per rank in /dev/shm, on success, error and crash alike. Once all ranks are past that
    start (a barrier), the names are no longer needed: the mappings live on until the processes exit, and
    no file is left behind whatever way the job ends, SIGKILL included.
    """
    torch.distributed.barrier()
    shared_memory_buffer_path(launch).unlink(missing_ok=True)


@register_strategy("deepspeed")
class DeepSpeedZero(ParallelStrategy):
    """deepspeed.initialize over the model and a torch optimizer; `deepspeed/` tag folder in each checkpoint."""

    checkpoint_format = DeepSpeedCheckpointFormat

    @classmethod
    def check_settings(cls, par) -> None:
        if par.offload_optimizer and par.zero_stage < 1:
            raise ConfigError(f"parallel.offload_optimizer needs zero_stage >= 1, got zero_stage {par.zero_stage}")

    @classmethod
    def check_compile(cls, par) -> None:
        if par.zero_stage == 3:
            raise ConfigError("model.compile is not supported with DeepSpeed ZeRO-3 (its parameter-fetch hooks run "
                              "inside every block); use zero_stage 0-2 or parallel.engine fsdp")

    @classmethod
    def _init_process_group(cls, backend: str, timeout: datetime.timedelta, launch: LaunchEnvironment) -> None:
        if backend == "gloo":
            # DeepSpeed picks its accelerator from this variable when it is first imported; without a GPU it
            # must be its CPU accelerator (gloo, shared-memory all-reduce).
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # torch's process group first (rendezvous and the peer check of every engine); DeepSpeed then builds its
        # communication backend on it.
        super()._init_process_group(backend, timeout, launch)
        import deepspeed

        deepspeed.init_distributed(dist_backend=backend, timeout=timeout, auto_mpi_discovery=False, verbose=False)
        if backend == "gloo":
            remove_shared_memory_buffer(launch)

    @classmethod
    def describe(cls, par) -> str:
        return f"deepspeed (ZeRO stage {par.zero_stage})"

    @classmethod
    def model_state_layout(cls, par) -> ModelStateLayout:
        stage = par.zero_stage
        native_fp16 = par.precision == "fp16"
        # With fp32 parameters (fp32, or bf16 autocast), ZeRO 1-2 still clone their partition as "fp32 master
        # weights" (single_partition_of_fp32_groups in deepspeed/runtime/zero/stage_1_and_2.py, 0.19); stage 3
        # reuses the fp32 partition unless the optimizer is offloaded. Native fp16 always keeps a master copy.
        master_copy = native_fp16 or stage in (1, 2) or (stage == 3 and par.offload_optimizer)
        return ModelStateLayout(split_params=stage >= 3, split_grads=stage >= 2, split_optimizer=stage >= 1,
                                param_bytes=2 if native_fp16 else 4, master_copy=master_copy,
                                optimizer_on_cpu=par.offload_optimizer and stage >= 1,
                                label=f"deepspeed ZeRO-{stage}" + (" + optimizer offload" if par.offload_optimizer
                                                                   else ""))

    @classmethod
    def create(cls, par, model, optimizer_factory, ctx, batch):
        ds_config = build_deepspeed_config(par, micro_batch_size=batch.micro_batch_size,
                                           grad_accum_steps=batch.grad_accum_steps,
                                           global_batch_size=batch.global_batch_size)
        strategy = cls(par, model, optimizer_factory(model), ctx, grad_accum_steps=batch.grad_accum_steps)
        strategy._initialize(ds_config)
        return strategy

    def _initialize(self, ds_config: dict) -> None:
        import deepspeed

        self.ds_config = ds_config
        self.module, self.optimizer, _, _ = deepspeed.initialize(model=self.module, optimizer=self.optimizer,
                                                                 config=ds_config)
        self.native_fp16 = bool(ds_config.get("fp16", {}).get("enabled", False))

    def _make_scaler(self):
        return torch.amp.GradScaler(self.ctx.device.type, enabled=False)  # DeepSpeed scales its own loss

    def forward(self, images: torch.Tensor):
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

    def local_tensors(self, param):
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

    def found_nonfinite(self) -> torch.Tensor:
        # ZeRO keeps the gradients in its own (partitioned) buffers; it checks them inside step() and skips
        # a step whose gradient norm is not finite (counted in skipped_steps). The trainer's loss check
        # covers the rest.
        return torch.zeros((), device=self.ctx.device)

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor | None:
        return None  # DeepSpeed clips in step() (gradient_clipping) and reports the norm afterwards

    def step(self, skip: bool = False) -> bool:
        # DeepSpeed offers no veto of its step from outside. To skip, its step still runs (its micro-step
        # counters and gradient buffers move on as usual) while the torch optimizer inside does nothing:
        # the fp32 weights (or ZeRO's fp32 partitions, copied back to the module) stay as they were.
        skipped_before = self.module.skipped_steps
        if not skip:
            self.module.step()
            return self.module.skipped_steps == skipped_before
        inner = self.lr_optimizer
        inner.step = lambda *args, **kwargs: None   # an instance attribute shadows the class's step
        try:
            self.module.step()
        finally:
            del inner.step
        return False

    def grad_norm_after_step(self) -> torch.Tensor | float | None:
        return self.module.get_global_grad_norm()   # a device tensor under ZeRO: no host sync here

    def zero_grad(self) -> None:
        self.module.zero_grad()

    @property
    def lr_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # the torch optimizer inside ZeRO's

    def unwrapped(self) -> nn.Module:
        return self.module.module

    def run_files(self) -> dict[str, str]:
        return {"deepspeed_config.json": json.dumps(self.ds_config, indent=1)}

    def checkpoint_identity(self, resuming: Path | None = None) -> dict[str, Any]:
        # ZeRO's files hold per-rank partitions: resuming them needs the same number of ranks, unless the
        # checkpoint was converted to DeepSpeed's universal format.
        identity = super().checkpoint_identity(resuming)
        if resuming is not None and self.checkpoint_format.resumes_at_any_world_size(resuming):
            return identity
        return {**identity, "world_size": self.ctx.world_size}

    world_size_change_hint = (" (ZeRO files are partitioned by rank; `python launch/convert.py universal CHECKPOINT "
                              "--out FOLDER` writes a copy that resumes at any world size)")

    def state_for_file(self) -> dict[str, Any]:
        return {}

    def load_from_file(self, state: dict[str, Any]) -> None:
        pass

    def save_folder(self, folder: Path) -> None:
        self.module.save_checkpoint(str(folder), tag=TAG, save_latest=False)

    def load_folder(self, folder: Path) -> None:
        check_tag_folder(folder / TAG)   # every file DeepSpeed's loader may open, read safely first
        universal = is_universal(folder)
        extras = read_module_extras(folder) if universal else None
        # DeepSpeed 0.19.8's ZeRO-3 universal loader reads exp_avg / exp_avg_sq for every parameter, whatever the
        # optimizer; for an SGD checkpoint DeepSpeed loads the module only (its universal path then fills the fp32
        # partitions from fp32.pt) and the momentum is loaded below.
        zero3_state = self._zero3_universal_state_names(folder) if universal and self.par.zero_stage == 3 else ()
        sgd_zero3 = "momentum_buffer" in zero3_state
        # A universal checkpoint loads at any world size; DeepSpeed reads the choice from its config.
        config = self.module._config
        config.load_universal_checkpoint = universal
        try:
            with library_reads_safely():
                load_path, _ = self.module.load_checkpoint(str(folder), tag=TAG, load_optimizer_states=True,
                                                           load_lr_scheduler_states=False, load_module_only=sgd_zero3)
        finally:
            config.load_universal_checkpoint = False
        if load_path is None:
            raise CheckpointError(f"DeepSpeed found no checkpoint in {folder / TAG}")
        if universal:
            if self.par.zero_stage == 3:
                if sgd_zero3:
                    self._load_zero3_universal_state(folder, "momentum_buffer")
                self._repair_zero3_universal_optimizer(folder)
            self._load_module_extras(extras, folder)

    @staticmethod
    def _zero3_universal_state_names(folder: Path) -> tuple[str, ...]:
        """The optimizer states a universal folder holds per parameter (exp_avg..., or momentum_buffer)."""
        for param_dir in sorted((folder / TAG / "zero").iterdir()):
            names = tuple(sorted(p.stem for p in param_dir.glob("*.pt") if p.stem not in ("fp32", "step")))
            if names:
                return names
        return ()

    def _load_zero3_universal_state(self, folder: Path, key: str) -> None:
        """One optimizer state of every ZeRO-3 sub-group from zero/<parameter>/<key>.pt, cut into this rank's
        partitions by DeepSpeed's own `load_hp_checkpoint_state` (as its loader does for exp_avg). torch's SGD
        creates momentum_buffer lazily at its first step; set here, the first step after the resume uses it."""
        zero3 = self.optimizer
        zero_dir = folder / TAG / "zero"
        with torch.no_grad(), library_reads_safely():
            for sub_group_id, group_params in enumerate(zero3.fp16_groups):
                fp32_partition = zero3.fp32_partitioned_groups_flat[sub_group_id]
                state = torch.zeros_like(fp32_partition)
                offset = 0
                for param in group_params:
                    piece = zero3.load_hp_checkpoint_state(str(zero_dir / zero3.param_names[param]), key, param=param)
                    state.narrow(0, offset, piece.numel()).copy_(piece)
                    offset += piece.numel()
                self.lr_optimizer.state[fp32_partition][key] = state

    def _repair_zero3_universal_optimizer(self, folder: Path) -> None:
        """Undo two slips of DeepSpeed 0.19.8's ZeRO-3 universal loader (stage3.py,
        load_hp_checkpoint_state_from_checkpoint_dir_stage3), which made a resumed run drift from its first update:
        - it puts one and the same `step` tensor into the state of every sub-group, and torch's Adam increments
          it in place, so each sub-group's update advanced the others' bias correction too;
        - it copies param group 0's hyperparameters into every group (weight decay on the no-decay group).
        Each sub-group gets its own step, and every group its saved hyperparameters (lr, weight decay, betas)."""
        optimizer = self.lr_optimizer
        for state in optimizer.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()
        saved = safe_load(folder / TAG / "zero" / "optimizer_state.pt")
        saved_groups = saved.get("optimizer_state_dict", {}).get("param_groups") if isinstance(saved, dict) else None
        if not isinstance(saved_groups, list) or len(saved_groups) != len(optimizer.param_groups):
            raise CheckpointError(f"{folder}/{TAG}/zero/optimizer_state.pt holds "
                                  f"{len(saved_groups) if isinstance(saved_groups, list) else 'no'} optimizer param "
                                  f"groups; this run's optimizer has {len(optimizer.param_groups)}")
        for group, saved_group in zip(optimizer.param_groups, saved_groups):
            group.update({key: value for key, value in saved_group.items() if key != "params"})

    def _load_module_extras(self, extras: dict[str, torch.Tensor], folder: Path) -> None:
        """Copy the buffers and frozen parameters (the key encoder) into the module; ZeRO-3's frozen parameters
        are partitioned, so they are gathered, written on rank 0 and re-partitioned."""
        module = self.unwrapped()
        buffers = dict(module.named_buffers())
        frozen = {name: p for name, p in module.named_parameters() if not p.requires_grad}
        expected = set(buffers) | set(frozen)
        unknown, missing = sorted(set(extras) - expected), sorted(expected - set(extras))
        if unknown or missing:
            raise CheckpointError(f"{folder}/{TAG}: the saved buffers and frozen parameters do not match this "
                                  f"run's (unknown: {', '.join(unknown[:3]) or 'none'}; missing: "
                                  f"{', '.join(missing[:3]) or 'none'})")
        with torch.no_grad():
            for name, buffer in buffers.items():
                buffer.copy_(extras[name])
            with self._gathered(modifier_rank=0, params=list(frozen.values())):
                for name, param in frozen.items():
                    param.data.copy_(extras[name].reshape(param.shape))

    def _gathered(self, modifier_rank=None, params: list[nn.Parameter] | None = None):
        """`params` (default: all parameters) whole for the duration of the block (ZeRO-3); with `modifier_rank`,
        that rank's writes are broadcast and re-partitioned on exit. Nothing to do at stages 0-2."""
        import contextlib

        if getattr(self.par, "zero_stage", 0) < 3 or params == []:
            return contextlib.nullcontext()
        import deepspeed

        params = list(self.unwrapped().parameters()) if params is None else params
        return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)

    def count_parameters(self, module: nn.Module | None = None) -> int:
        # ZeRO-3 empties param.data on every rank; ds_numel keeps the full size.
        return sum(getattr(p, "ds_numel", p.numel()) for p in (module or self.unwrapped()).parameters())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        with self._gathered():
            return super().full_state_dict()

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        with self._gathered(modifier_rank=0):
            self.unwrapped().load_state_dict(state)
        refresh = getattr(self.optimizer, "refresh_fp32_params", None)
        if refresh is not None:   # the optimizer side keeps its own fp32 copy: update it from the new weights
            refresh()
