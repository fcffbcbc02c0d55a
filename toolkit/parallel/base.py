# The strategy protocol every parallel engine implements, with single-process behaviour as the default.
"""A strategy owns everything engine-specific about the backbone part of the model (the backbone, or with
UniMoCo both encoders and the projection): starting or joining the process group, wrapping the module,
gradient synchronisation, the optimizer step, its checkpoint files and identity, its memory rule and the
full (unsharded) state dict. The trainer drives every strategy through the same calls, in this order per
optimizer step:

    for each micro-batch:  out = part.forward(images);  part.backward(loss, is_last_micro)
    part.unscale_(); ok = not part.found_nonfinite(); norm = part.clip_grad_norm_(max_norm)
    stepped = part.step(skip=not ok);  part.zero_grad()

`loss` is the mean over the micro-batch; each strategy applies the 1/grad_accum_steps averaging itself
(DeepSpeed does it inside its backward). The identity-center head is a second part with the same calls
(toolkit/training/parts.py); it is never wrapped by an engine: its shards must not be averaged.

Each strategy registers itself under its recipe name (`parallel.engine`) with `@register_strategy`; the
builders find it with `get_strategy(name)`. Its `checkpoint_format` (toolkit/parallel/checkpoint_format.py) owns
its checkpoint files offline: checks, safe reads, sizes, the merged state for export. Adding an engine is one
module in this package (the strategy, and its format if it writes its own folder, registered with
`@register_checkpoint_format`), its import in this package's __init__, and its name in the schema's Literal.
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch
from torch import nn

from toolkit.distributed import DistributedContext
from toolkit.distributed import job_errors
from toolkit.distributed.network import check_peers
from toolkit.errors import ConfigError
from toolkit.parallel.checkpoint_format import CheckpointFormat

if TYPE_CHECKING:
    from toolkit.parallel.settings import ParallelSettings

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass(frozen=True)
class LaunchEnvironment:
    """What the launcher (torchrun, deepspeed, python) told this process; launch/ reads it from os.environ."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    has_rendezvous: bool = False     # MASTER_ADDR is set: a launcher prepared the process group
    master_addr: str = ""
    master_port: str = ""
    network_address: str = ""        # this host's address on the network the ranks share (launch/ chooses it)

    @classmethod
    def from_env(cls, env) -> "LaunchEnvironment":
        world_size = int(env.get("WORLD_SIZE", "1"))
        return cls(rank=int(env.get("RANK", "0")), world_size=world_size, local_rank=int(env.get("LOCAL_RANK", "0")),
                   local_world_size=int(env.get("LOCAL_WORLD_SIZE", env.get("LOCAL_SIZE", world_size))),
                   has_rendezvous="MASTER_ADDR" in env, master_addr=env.get("MASTER_ADDR", ""),
                   master_port=env.get("MASTER_PORT", ""))


@dataclass(frozen=True)
class BatchShape:
    """The batch numbers an engine needs (derived by the builders from the recipe and the world size)."""

    micro_batch_size: int      # samples per rank per micro-step
    grad_accum_steps: int
    global_batch_size: int     # samples per optimizer step over all ranks


@dataclass(frozen=True)
class ModelStateLayout:
    """The memory rule of an engine: which model states are split over the ranks, and their precision."""

    split_params: bool
    split_grads: bool
    split_optimizer: bool
    param_bytes: int = 4             # bytes per parameter and gradient element (2 for native fp16)
    master_copy: bool = False        # the optimizer side keeps its own fp32 copy of (its partition of) the weights
    optimizer_on_cpu: bool = False   # master weights and optimizer states live in CPU memory
    label: str = ""


def full_value(norm: torch.Tensor) -> torch.Tensor:
    """A DTensor norm (FSDP2) as a plain tensor."""
    full_tensor = getattr(norm, "full_tensor", None)
    return full_tensor() if full_tensor is not None else norm


_STRATEGIES: dict[str, type["ParallelStrategy"]] = {}


def register_strategy(name: str):
    """Class decorator: make the strategy available as `parallel.engine: NAME`."""

    def decorator(cls: type[ParallelStrategy]) -> type[ParallelStrategy]:
        if name in _STRATEGIES and _STRATEGIES[name] is not cls:
            raise ValueError(f"parallel strategy {name!r} is already registered by {_STRATEGIES[name].__qualname__}")
        cls.name = name
        _STRATEGIES[name] = cls
        return cls

    return decorator


def get_strategy(name: str) -> type["ParallelStrategy"]:
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise ConfigError(f"unknown parallel.engine {name!r}; registered engines: {', '.join(sorted(_STRATEGIES))}") \
            from None


def strategy_names() -> list[str]:
    return sorted(_STRATEGIES)


class ParallelStrategy:
    """Single-process behaviour; each engine overrides what it does differently."""

    name: ClassVar[str] = "base"
    # Its checkpoint files, read offline (toolkit/parallel/checkpoint_format.py); with a `folder`, the strategy
    # writes and loads that folder itself (save_folder / load_folder), else its state travels in trainer.pt.
    checkpoint_format: ClassVar[type[CheckpointFormat]] = CheckpointFormat
    multi_rank: ClassVar[bool] = True         # False: the engine runs one process only

    # ----- before the model exists: recipe checks, process group, memory rule --------------------------
    @classmethod
    def check_settings(cls, par: "ParallelSettings") -> None:
        """Settings only some engines support; a ConfigError naming the value otherwise."""
        if par.offload_optimizer:
            raise ConfigError(f"parallel.offload_optimizer needs a DeepSpeed ZeRO stage >= 1; engine {cls.name!r} "
                              "cannot offload")

    @classmethod
    def check_compile(cls, par: "ParallelSettings") -> None:
        """model.compile under this engine: a ConfigError where the engine cannot run a compiled backbone."""

    @classmethod
    def check_world_size(cls, world_size: int, where: str = "this job has {} ranks") -> None:
        if world_size > 1 and not cls.multi_rank:
            raise ConfigError(f"parallel.engine {cls.name!r} runs one process, but {where.format(world_size)}; "
                              "set parallel.engine to ddp, deepspeed or fsdp")

    @classmethod
    def start(cls, par: "ParallelSettings", device: torch.device, launch: LaunchEnvironment) -> DistributedContext:
        """Start or join the job's process group (gloo on CPU, nccl on GPU) with the recipe's timeout."""
        cls.check_world_size(launch.world_size, "the launcher started {} ranks")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        # The trainer's step watchdog ends a stalled job after timeout_s with a line naming the stalled rank;
        # the collectives' own timeout is the backstop just after it.
        timeout = datetime.timedelta(seconds=par.timeout_s + max(10.0, 0.1 * par.timeout_s))
        cls._init_process_group(backend, timeout, launch)
        return DistributedContext(rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank,
                                  local_world_size=launch.local_world_size, device=device,
                                  group=torch.distributed.group.WORLD)

    @classmethod
    def _init_process_group(cls, backend: str, timeout: datetime.timedelta, launch: LaunchEnvironment) -> None:
        """The launcher's rendezvous (env://), a check that every rank reaches every other (a rank that cannot
        ends the whole job within a second, with one line), then the process group."""
        store, rank, world_size = next(torch.distributed.rendezvous("env://", launch.rank, launch.world_size,
                                                                    timeout=timeout))
        job_errors.attach(store)   # held beyond the process group: a failing rank's line reaches the others
        if world_size > 1 and launch.network_address:
            check_peers(store, rank, world_size, launch.network_address, wait_s=timeout.total_seconds())
        torch.distributed.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)

    @classmethod
    def describe(cls, par: "ParallelSettings") -> str:
        """The engine as the run's first lines name it."""
        return cls.name

    @classmethod
    def model_state_layout(cls, par: "ParallelSettings") -> ModelStateLayout:
        """Every rank holds every parameter, gradient and optimizer state (single process, DDP)."""
        return ModelStateLayout(split_params=False, split_grads=False, split_optimizer=False, label=cls.name)

    @classmethod
    def create(cls, par: "ParallelSettings", model: nn.Module, optimizer_factory: OptimizerFactory,
               ctx: DistributedContext, batch: BatchShape):
        """Wrap `model` and build its optimizer (after sharding, for engines whose optimizer must see shards)."""
        if not ctx.is_distributed and cls.multi_rank:
            raise ConfigError(f"parallel.engine {cls.name!r} needs a process group; start the job with "
                              "launch/train.py")
        return cls(par, model, optimizer_factory(model), ctx, grad_accum_steps=batch.grad_accum_steps)

    def __init__(self, par: "ParallelSettings", model: nn.Module, optimizer: torch.optim.Optimizer,
                 ctx: DistributedContext, *, grad_accum_steps: int):
        self.par = par
        self.ctx = ctx
        self.accum = grad_accum_steps
        self.precision = par.precision
        self.autocast_dtype = AUTOCAST_DTYPES[par.precision]
        self.module = model
        self.optimizer = optimizer
        self.scaler = self._make_scaler()

    def _make_scaler(self):
        return torch.amp.GradScaler(self.ctx.device.type, enabled=self.precision == "fp16")

    # ----- the step ---------------------------------------------------------------------------------
    def autocast(self):
        return torch.autocast(device_type=self.ctx.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)

    def forward(self, images: torch.Tensor):
        with self.autocast():
            return self.module(images)

    def key_forward(self, images: torch.Tensor) -> torch.Tensor:
        """UniMoCo key path through the momentum encoder (no gradients), with the forward's precision."""
        with torch.no_grad(), self.autocast():
            return self.unwrapped().key_forward(images)

    def local_tensors(self, param: torch.Tensor) -> list[torch.Tensor]:
        """The tensors holding this rank's copy of a parameter: all of it, unless the engine shards it.
        An in-place update of these (e.g. the UniMoCo momentum update) updates what forward reads."""
        return [param.data]

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

    def found_nonfinite(self) -> torch.Tensor:
        """1.0 if this rank's unscaled gradients hold inf/nan, else 0.0 (no host sync); call after unscale_().
        With fp16 loss scaling the scaler has found it already; otherwise one norm per gradient tensor."""
        if self.scaler.is_enabled():
            states = self.scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"]
            return sum(v.to(self.ctx.device) for v in states.values())
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                 for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.ctx.device)
        return (~torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(grads)]).sum())).float()

    def floating_buffers(self) -> list[torch.Tensor]:
        """Batch-norm running statistics and other floating-point buffers (forward updates them even when
        the optimizer step is then skipped, so the trainer restores them after a skipped step)."""
        return [b for b in self.unwrapped().buffers() if b.is_floating_point()]

    def weights_finite(self) -> torch.Tensor:
        """1.0 when every parameter and floating buffer this rank holds is finite, else 0.0."""
        local = [t for p in self.unwrapped().parameters() for t in self.local_tensors(p) if t.numel()]
        local += [b for b in self.floating_buffers() if b.numel()]
        if not local:
            return torch.ones((), device=self.ctx.device)
        return torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(local)]).sum()).float()

    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor | None:
        """Clip to max_norm (0 = measure only) and return the gradient norm before clipping."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if max_norm > 0:
            return full_value(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
        return full_value(torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True))

    def step(self, skip: bool = False) -> bool:
        """Apply the optimizer step unless `skip` (another part's gradients are not finite); returns whether
        the step was applied (fp16 loss scaling may skip it on its own)."""
        if skip and self.scaler.is_enabled():
            for value in self.scaler._per_optimizer_states[id(self.optimizer)]["found_inf_per_device"].values():
                value.fill_(1.0)   # the scaler skips and lowers its scale, as for its own overflow
        elif skip:
            return False
        scale_before = self.loss_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return not (self.scaler.is_enabled() and self.loss_scale() < scale_before)

    def grad_norm_after_step(self) -> torch.Tensor | float | None:
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

    @property
    def lr_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer whose param_groups carry the lr (the scheduler steps it)."""
        return self.optimizer

    # ----- checkpoints and export -------------------------------------------------------------------
    def unwrapped(self) -> nn.Module:
        return self.module

    def run_files(self) -> dict[str, str]:
        """Files (name -> text) worth keeping in the run folder, e.g. the rendered engine config."""
        return {}

    @property
    def writes_folder(self) -> bool:
        """Whether this engine writes its own folder in a step folder (else its state goes in trainer.pt)."""
        return self.checkpoint_format.folder is not None

    def checkpoint_identity(self, resuming: Path | None = None) -> dict[str, Any]:
        """What a checkpoint must match to be resumed by this engine (beyond model and data): saved with each
        checkpoint, and compared with the saved one when `resuming` that checkpoint (its folder or file)."""
        return {"engine_format": self.checkpoint_format.name}

    # Said after "resuming needs the same world size" when the identity's world_size refuses a checkpoint.
    world_size_change_hint = ""

    def state_for_file(self) -> dict[str, Any]:
        """Engine state stored inside the trainer file."""
        return {"backbone": self.unwrapped().state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_from_file(self, state: dict[str, Any]) -> None:
        self.unwrapped().load_state_dict(state["backbone"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])

    def save_folder(self, folder: Path) -> None:
        """Write the engine's files into `folder / checkpoint_format.folder` (every rank; collective)."""
        raise NotImplementedError(f"engine {self.name!r} keeps its state in the trainer file")

    def load_folder(self, folder: Path) -> None:
        """Load what save_folder wrote in the step folder `folder` (every rank; collective)."""
        raise NotImplementedError(f"engine {self.name!r} keeps its state in the trainer file")

    def count_parameters(self, module: nn.Module | None = None) -> int:
        """Parameters of the whole (unsharded) model, or of one of its submodules, whatever this rank holds.
        FSDP2's DTensor parameters report their global numel; ZeRO-3 overrides this (ds_numel)."""
        return sum(p.numel() for p in (module or self.unwrapped()).parameters())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The unsharded model state (CPU tensors, the unwrapped module's keys) on every rank (collective)."""
        return {key: value.detach().cpu().clone() for key, value in self.unwrapped().state_dict().items()}

    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load an unsharded model state into the (possibly sharded) module (collective)."""
        self.unwrapped().load_state_dict(state)
