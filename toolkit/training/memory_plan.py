# Per-rank memory plan of a recipe: backbone model states under its engine, center shard, logits buffers.
"""`plan_memory(recipe, world_size, num_classes)` estimates, in bytes per rank, what a training step keeps
in memory, without a GPU and without allocating the model (the backbone is built on the meta device).

Backbone (engine part), Psi = its parameter count, K = bytes of optimizer state per parameter
(4 per state tensor: SGD with momentum 1, SGD without momentum 0, AdamW 2). Gradients, master weights and
states count the trainable parameters only (iresnet's frozen embedding-BN scale has none):

- single / ddp: every rank holds everything: 4 Psi parameters, 4 Psi gradients, K Psi optimizer states.
  The toolkit keeps fp32 parameters under autocast (bf16, and fp16 with a GradScaler) on every engine.
- DeepSpeed ZeRO (Rajbhandari et al. 2020): stage 1 partitions the optimizer side over the N ranks,
  stage 2 also the gradients, stage 3 also the parameters. FSDP2 (`fully_shard`) partitions all three,
  like stage 3.
- DeepSpeed native fp16 (precision fp16, engine deepspeed) is the paper's mixed-precision accounting:
  2 Psi fp16 parameters + 2 Psi fp16 gradients + (4 + K) Psi fp32 master parameters and states, so
  16 Psi with AdamW (the paper's K = 12 is this 4 + K: master copy, exp_avg, exp_avg_sq).
- DeepSpeed with fp32 parameters (precision fp32 or bf16 autocast) at stage 1-2 still clones its
  partition of the parameters as "fp32 master weights" (`single_partition_of_fp32_groups` in
  deepspeed/runtime/zero/stage_1_and_2.py, 0.19): 4 Psi / N more than the paper's fp32 count. Stage 3
  reuses the fp32 partition unless the optimizer is offloaded. This shows as its own line.
- `offload_optimizer` moves the optimizer side (master weights + states) into CPU memory.

Identity-center head (never partitioned by the engine; sharded by itself, `shard_range`): the largest
shard (rank 0) of `count` classes x D: weights 4 count D, a dense gradient 4 count D (the sampled
centers are indexed out of the shard, so the gradient is a full-shard tensor), optimizer states
K_head count D.

Logits: the head's N x S fp32 buffers for one micro-batch (N = per-rank batch x world size gathered
rows, S = sampled columns of the shard, see `sampled_columns`). How many are alive at once depends on
`head.implementation` (`LIVE_LOGITS_BUFFERS_AT_PEAK`): reference 4 (plus an N x S bool mask when the
inter-class filter is on), fused 1 (the cosine buffer, whose gradient the kernel writes over it), fused_linear
none: it holds one block of classes at a time (`fused_linear_block_bytes`: a block x D gradient block, and an
N x block scratch when N > D) and keeps the cosines in the memory of the centers' gradient (counted above).

Not included: backbone activations, the gathered embeddings (N x D) and normalised centers (S x D),
communication buckets, CUDA context and workspaces, allocator fragmentation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from toolkit.config.schema import Recipe
from toolkit.errors import ConfigError
from toolkit.heads.partial_fc import shard_range

FP32_BYTES = 4
FP16_BYTES = 2
BOOL_BYTES = 1
BYTES_PER_OPTIMIZER_STATE = 4  # every state tensor (momentum, exp_avg, exp_avg_sq) is fp32

# How many N x S fp32 tensors ShardedIdentityCenterHead keeps alive at once, per implementation.
# fused: the matmul's cosine buffer only (the kernel computes statistics from it and writes the gradient
# over it). fused_linear: none. reference: the peak is inside _DistributedSoftmaxCE.forward, while
# torch.exp runs:
#   1. cos_NS: the matmul output. matmul saves its inputs (the normalised N x D embeddings and S x D
#      centers) for backward, not its output, but the local variable `cos_NS` in the head's forward keeps
#      it alive until forward returns.
#   2. logits_NS = cos_NS.index_put(target, margin) * scale: the unscaled index_put result is a temporary
#      freed when the multiplication returns (a multiplication by a Python number saves nothing); the
#      scaled logits stay alive as the loss Function's input until forward returns (they are not saved).
#   3. logits_NS - row_max_N[:, None]: the temporary argument of torch.exp.
#   4. probs_NS = torch.exp(...): normalised in place and saved for backward (the only one left after
#      forward).
# Backward peaks lower, at 3: the gradient reaching cos_NS from index_put's backward, the zeros +
# index_put gradient of the target gather `cos_NS[rows, cols]`, and their out-of-place sum (the softmax
# gradient `probs.clone()` and its scaled copy have been freed by then).
# The measured test (tests/unit/test_memory_plan.py) counts these tensors during a real forward+backward.
LIVE_LOGITS_BUFFERS_AT_PEAK = {"reference": 4, "fused": 1, "fused_linear": 0}


@dataclass(frozen=True)
class PlanInputs:
    """What the plan was computed for."""

    num_classes: int                 # C
    world_size: int                  # W = N of ZeRO
    per_rank_batch: int              # samples per rank per micro-step
    grad_accum_steps: int
    global_batch: int                # per_rank_batch x grad_accum_steps x world_size
    embedding_size: int              # D
    sample_rate: float
    interclass_filter: float
    engine: str
    zero_stage: int
    engine_label: str                # e.g. "deepspeed ZeRO-2", from the engine's strategy
    precision: str
    offload_optimizer: bool
    backbone: str
    backbone_params: int             # Psi: every backbone parameter
    backbone_trainable_params: int   # parameters with gradients and optimizer states
    backbone_optimizer: str          # e.g. "sgd (momentum)"
    backbone_states_per_param: int   # optimizer state tensors per parameter
    head_optimizer: str
    head_states_per_param: int



@dataclass(frozen=True)
class BackboneMemory:
    """Model states of the backbone on one rank, in bytes."""

    params: int
    grads: int
    master_weights: int              # fp32 copy kept by the optimizer side (DeepSpeed), else 0
    optimizer_states: int
    optimizer_on_cpu: bool           # offload_optimizer: master weights + states live in CPU memory
    param_dtype: str                 # "fp32" or "fp16"
    params_partitioned: bool
    grads_partitioned: bool
    optimizer_partitioned: bool

    @property
    def optimizer_side(self) -> int:
        return self.master_weights + self.optimizer_states

    @property
    def gpu_bytes(self) -> int:
        return self.params + self.grads + (0 if self.optimizer_on_cpu else self.optimizer_side)

    @property
    def cpu_bytes(self) -> int:
        return self.optimizer_side if self.optimizer_on_cpu else 0


@dataclass(frozen=True)
class HeadMemory:
    """This rank's shard of the identity centers, in bytes."""

    shard_classes: int               # classes of the largest shard (rank 0)
    center_weights: int
    center_grad: int
    optimizer_states: int

    @property
    def total(self) -> int:
        return self.center_weights + self.center_grad + self.optimizer_states


@dataclass(frozen=True)
class LogitsMemory:
    """The head's N x S buffers at the peak of one micro-batch's forward+backward, in bytes."""

    implementation: str              # head.implementation as it resolves on this machine
    gathered_rows: int               # N = per-rank batch x world size
    sampled_columns: int             # S
    live_fp32_buffers: int           # LIVE_LOGITS_BUFFERS_AT_PEAK[implementation]
    fp32_buffers: int                # live_fp32_buffers x N x S x 4
    filter_mask: int                 # N x S bool mask saved by the reference's inter-class filter, else 0
    block_buffers: int = 0           # fused_linear: its per-block temporaries (sampling too: no S x D copy)
    embedding_size: int = 0          # D

    @property
    def cosines_cached(self) -> bool:
        """fused_linear keeps the cosines in the gradient's memory when N <= D, else recomputes them."""
        return self.implementation == "fused_linear" and self.gathered_rows <= self.embedding_size

    @property
    def total(self) -> int:
        return self.fp32_buffers + self.filter_mask + self.block_buffers


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank: GPU (everything not offloaded) and CPU (offloaded optimizer side)."""

    inputs: PlanInputs
    backbone: BackboneMemory
    head: HeadMemory
    logits: LogitsMemory

    @property
    def gpu_total(self) -> int:
        return self.backbone.gpu_bytes + self.head.total + self.logits.total

    @property
    def cpu_total(self) -> int:
        return self.backbone.cpu_bytes


def optimizer_states_per_param(name: str, momentum: float) -> int:
    """fp32 state tensors the optimizer keeps per parameter (AdamW's scalar step counter not counted)."""
    if name == "sgd":
        return 1 if momentum > 0 else 0
    if name == "adamw":
        return 2
    raise ConfigError(f"no memory rule for optimizer {name!r}")


def _optimizer_label(name: str, momentum: float) -> str:
    if name == "sgd":
        return "sgd (momentum)" if momentum > 0 else "sgd (no momentum)"
    return name


def default_num_classes(recipe: Recipe) -> int:
    """The training class count the recipe's data implies: synthetic identities, or the shards' manifest."""
    if recipe.data.backend == "synthetic":
        return recipe.data.synthetic.num_identities
    from pathlib import Path

    from toolkit.data.shards import load_manifest

    if not Path(recipe.data.manifest).is_file():
        raise ConfigError(f"data.manifest {recipe.data.manifest} not found; pass --num-classes to plan without it")
    return load_manifest(recipe.data.manifest).num_classes


def per_rank_batch(recipe: Recipe, world_size: int) -> int:
    """Samples per rank per micro-step, derived as build_run_shape derives it."""
    accum = recipe.parallel.grad_accum_steps
    if recipe.data.global_batch_size:
        if recipe.data.global_batch_size % (world_size * accum):
            raise ConfigError(f"data.global_batch_size={recipe.data.global_batch_size} does not divide into "
                              f"{world_size} ranks x parallel.grad_accum_steps={accum}")
        return recipe.data.global_batch_size // (world_size * accum)
    return recipe.data.batch_size


def count_backbone_params(recipe: Recipe) -> tuple[int, int]:
    """(all, trainable) parameter counts of the recipe's backbone, built on the meta device (no memory)."""
    from toolkit.training.builders import build_backbone

    with torch.device("meta"):
        backbone = build_backbone(recipe)
    params = list(backbone.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def _partition(num_elements: int, world_size: int, partitioned: bool) -> int:
    """Elements one rank holds: all, or its share rounded up (the largest partition)."""
    return math.ceil(num_elements / world_size) if partitioned else num_elements


def plan_backbone(recipe: Recipe, world_size: int, params: int, trainable: int) -> BackboneMemory:
    """Model states of the backbone on one rank, by the engine's own memory rule (its strategy's layout)."""
    from toolkit.parallel import get_strategy

    strategy = get_strategy(recipe.parallel.engine)
    strategy.check_settings(recipe.parallel)
    layout = strategy.model_state_layout(recipe.parallel)
    states_per_param = optimizer_states_per_param(recipe.optim.name, recipe.optim.momentum)
    optimizer_elements = _partition(trainable, world_size, layout.split_optimizer)
    return BackboneMemory(
        params=layout.param_bytes * _partition(params, world_size, layout.split_params),
        grads=layout.param_bytes * _partition(trainable, world_size, layout.split_grads),
        master_weights=FP32_BYTES * optimizer_elements if layout.master_copy else 0,
        optimizer_states=states_per_param * BYTES_PER_OPTIMIZER_STATE * optimizer_elements,
        optimizer_on_cpu=layout.optimizer_on_cpu,
        param_dtype="fp16" if layout.param_bytes == FP16_BYTES else "fp32",
        params_partitioned=layout.split_params, grads_partitioned=layout.split_grads,
        optimizer_partitioned=layout.split_optimizer)


def plan_head(recipe: Recipe, world_size: int, num_classes: int) -> HeadMemory:
    """This rank's center shard; nothing when head.weight is 0 (the head is not built)."""
    if recipe.head.weight <= 0:
        return HeadMemory(shard_classes=0, center_weights=0, center_grad=0, optimizer_states=0)
    head_optimizer = recipe.optim.name if recipe.head.optimizer == "same" else recipe.head.optimizer
    states_per_param = optimizer_states_per_param(head_optimizer, recipe.optim.momentum)
    shard_classes = shard_range(num_classes, world_size, 0).count  # rank 0 owns the largest shard
    center_elements = shard_classes * recipe.model.embedding_size  # count x D
    return HeadMemory(shard_classes=shard_classes, center_weights=FP32_BYTES * center_elements,
                      center_grad=FP32_BYTES * center_elements,
                      optimizer_states=states_per_param * BYTES_PER_OPTIMIZER_STATE * center_elements)


def sampled_columns(sample_rate: float, shard_classes: int, gathered_rows: int) -> int:
    """Columns S of the logits: int(sample_rate x count) (at least 1), or the whole shard at rate 1.

    Every positive of the gathered batch is kept, so the head keeps min(N, count) columns when that is more
    than int(rate x count) (ShardedIdentityCenterHead.num_kept_columns: a size fixed by the shapes).
    """
    num_sampled = max(1, int(sample_rate * shard_classes))
    if num_sampled >= shard_classes:
        return shard_classes
    return min(shard_classes, max(num_sampled, gathered_rows))


def fused_linear_block_bytes(rows: int, columns: int, dims: int, sampled: bool = False) -> int:
    """The fused linear kernels' temporaries: one block of w classes (w from the same rule as
    kernels/csrc/blockwise.h: about 2M floats / max(N, D), with sampling also at most 1M floats / D; at least
    64, at most S) as a w x D gradient block (with sampling: the block of kept rows gathered from the centers,
    which then holds their gradient), plus an N x w scratch when N > D (then the cosines are recomputed
    instead of kept in the gradient)."""
    block = 2**21 // max(rows, dims, 1)
    if sampled:
        block = min(block, 2**20 // max(dims, 1))
    block = max(64, min(max(columns, 1), block))
    scratch = rows * block if rows > dims else 0
    return FP32_BYTES * (block * dims + scratch)


def plan_logits(recipe: Recipe, world_size: int, shard_classes: int) -> LogitsMemory:
    from toolkit.heads.partial_fc import resolve_implementation

    implementation = resolve_implementation(recipe.head.implementation)
    gathered_rows = per_rank_batch(recipe, world_size) * world_size  # N
    if shard_classes == 0:  # no head
        return LogitsMemory(implementation=implementation, gathered_rows=gathered_rows, sampled_columns=0,
                            live_fp32_buffers=0, fp32_buffers=0, filter_mask=0)
    columns = sampled_columns(recipe.head.sample_rate, shard_classes, gathered_rows)  # S
    elements_NS = gathered_rows * columns
    live = LIVE_LOGITS_BUFFERS_AT_PEAK[implementation]
    filter_mask = BOOL_BYTES * elements_NS if recipe.head.interclass_filter > 0 and implementation == "reference" else 0
    dims = recipe.model.embedding_size
    blocks = (fused_linear_block_bytes(gathered_rows, columns, dims, sampled=columns < shard_classes)
              if implementation == "fused_linear" else 0)
    # With sampling (S < count) the kernels read the kept rows in place, a block at a time, and write their
    # gradient rows into the dense count x D gradient (counted above): the same one block as without.
    return LogitsMemory(implementation=implementation, gathered_rows=gathered_rows, sampled_columns=columns,
                        live_fp32_buffers=live, fp32_buffers=live * FP32_BYTES * elements_NS, filter_mask=filter_mask,
                        block_buffers=blocks, embedding_size=dims)


def plan_memory(recipe: Recipe, world_size: int, num_classes: int) -> MemoryPlan:
    """Bytes per rank of `recipe` trained on `world_size` ranks with `num_classes` identities."""
    from toolkit.parallel import get_strategy

    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if num_classes < 2:
        raise ConfigError(f"the number of classes must be >= 2, got {num_classes}")
    if num_classes < world_size:
        raise ConfigError(f"{num_classes} classes cannot be sharded over {world_size} ranks")
    get_strategy(recipe.parallel.engine).check_world_size(world_size, "the plan is for {} ranks")
    params, trainable = count_backbone_params(recipe)
    backbone = plan_backbone(recipe, world_size, params, trainable)
    head = plan_head(recipe, world_size, num_classes)
    logits = plan_logits(recipe, world_size, head.shard_classes)
    batch = per_rank_batch(recipe, world_size)
    head_optimizer = recipe.optim.name if recipe.head.optimizer == "same" else recipe.head.optimizer
    inputs = PlanInputs(
        num_classes=num_classes, world_size=world_size, per_rank_batch=batch,
        grad_accum_steps=recipe.parallel.grad_accum_steps,
        global_batch=batch * recipe.parallel.grad_accum_steps * world_size,
        embedding_size=recipe.model.embedding_size, sample_rate=recipe.head.sample_rate,
        interclass_filter=recipe.head.interclass_filter, engine=recipe.parallel.engine,
        zero_stage=recipe.parallel.zero_stage,
        engine_label=get_strategy(recipe.parallel.engine).model_state_layout(recipe.parallel).label,
        precision=recipe.parallel.precision,
        offload_optimizer=recipe.parallel.offload_optimizer, backbone=recipe.model.backbone,
        backbone_params=params, backbone_trainable_params=trainable,
        backbone_optimizer=_optimizer_label(recipe.optim.name, recipe.optim.momentum),
        backbone_states_per_param=optimizer_states_per_param(recipe.optim.name, recipe.optim.momentum),
        head_optimizer=_optimizer_label(head_optimizer, recipe.optim.momentum),
        head_states_per_param=optimizer_states_per_param(head_optimizer, recipe.optim.momentum))
    return MemoryPlan(inputs=inputs, backbone=backbone, head=head, logits=logits)


def format_bytes(num_bytes: int) -> str:
    """GiB from 1 GiB up, else MiB (KiB below 0.1 MiB)."""
    if num_bytes == 0:
        return "0"
    if num_bytes >= 2**30:
        return f"{num_bytes / 2**30:.2f} GiB"
    if num_bytes >= 2**20 // 10:
        return f"{num_bytes / 2**20:.1f} MiB"
    return f"{num_bytes / 2**10:.1f} KiB"


@dataclass(frozen=True)
class ActivationEstimate:
    """Backbone activations kept for backward on one rank, per micro-step, with and without checkpointing."""

    samples: int                 # per rank per micro-step
    precision: str
    checkpointed_units: int      # blocks activation checkpointing wraps
    with_checkpointing: int      # bytes
    without_checkpointing: int   # bytes
    recipe_checkpoints: bool     # model.activation_checkpointing

    @property
    def chosen(self) -> int:
        return self.with_checkpointing if self.recipe_checkpoints else self.without_checkpointing


def estimate_activations(recipe: Recipe, world_size: int) -> ActivationEstimate:
    """Traced on fake tensors (toolkit.models.memory): the recipe's backbone, image size and precision, times
    the per-rank micro-batch."""
    from toolkit.models.memory import activation_footprint
    from toolkit.training.builders import build_backbone

    with torch.device("meta"):
        backbone = build_backbone(recipe)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[recipe.parallel.precision]
    footprint = activation_footprint(backbone, recipe.data.image_size, dtype)
    batch = per_rank_batch(recipe, world_size)
    return ActivationEstimate(batch, recipe.parallel.precision, footprint.num_units,
                              footprint.bytes_per_sample(True) * batch, footprint.bytes_per_sample(False) * batch,
                              recipe.model.activation_checkpointing)


def format_plan(plan: MemoryPlan, activations: ActivationEstimate | None = None) -> str:
    """A readable table: the inputs, then one named line per buffer and one GPU total per rank (model states,
    plus the backbone activations of the recipe's setting when given); a CPU section only under offload."""
    inp, bb, head, logits = plan.inputs, plan.backbone, plan.head, plan.logits
    world = inp.world_size

    def share(partitioned: bool) -> str:
        return f"1/{world} partition" if partitioned and world > 1 else "full copy"

    shard_shape = f"{head.shard_classes:,} x {inp.embedding_size}"
    logits_note = (f" (head.implementation {logits.implementation} keeps no N x S buffer: it works a block of "
                   f"classes at a time)" if not logits.fp32_buffers else "")
    lines = [
        "Memory plan per rank (largest center shard = rank 0)",
        f"  classes C = {inp.num_classes:,}; world size W = {world}; global batch {inp.global_batch:,} "
        f"({inp.per_rank_batch} per rank x {inp.grad_accum_steps} accumulation x {world} ranks)",
        f"  backbone {inp.backbone}: Psi = {inp.backbone_params:,} parameters "
        f"({inp.backbone_trainable_params:,} trainable); embedding D = {inp.embedding_size}",
        f"  engine {inp.engine_label}; precision {inp.precision}; backbone optimizer {inp.backbone_optimizer}; "
        f"head optimizer {inp.head_optimizer}",
        f"  head: sample rate {inp.sample_rate:g}, inter-class filter {inp.interclass_filter or 'off'}; center shard "
        f"{head.shard_classes:,} classes; logits N x S = {logits.gathered_rows:,} gathered rows x "
        f"{logits.sampled_columns:,} sampled columns{logits_note}",
        "",
    ]
    # (name, bytes, in CPU memory)
    rows: list[tuple[str, int, bool]] = [
        (f"backbone parameters ({bb.param_dtype}, {share(bb.params_partitioned)})", bb.params, False),
        (f"backbone gradients ({bb.param_dtype}, {share(bb.grads_partitioned)})", bb.grads, False),
    ]
    if bb.master_weights:
        rows.append((f"backbone fp32 master weights ({share(bb.optimizer_partitioned)})", bb.master_weights,
                     bb.optimizer_on_cpu))
    rows += [
        (f"backbone optimizer states ({inp.backbone_states_per_param} x fp32, {share(bb.optimizer_partitioned)})",
         bb.optimizer_states, bb.optimizer_on_cpu),
        (f"center shard weights ({shard_shape} fp32)", head.center_weights, False),
        (f"center shard gradient ({shard_shape} fp32, dense)", head.center_grad, False),
        (f"center shard optimizer states ({inp.head_states_per_param} x fp32)", head.optimizer_states, False),
    ]
    if logits.fp32_buffers:
        rows.append((f"logits buffers, head.implementation {logits.implementation} ({logits.live_fp32_buffers} live "
                     f"x {logits.gathered_rows:,} x {logits.sampled_columns:,} fp32)", logits.fp32_buffers, False))
    if logits.block_buffers:
        how = "cosines kept in the gradient's memory" if logits.cosines_cached else "N > D: cosines recomputed"
        rows.append((f"fused linear kernel: one block of classes ({how})", logits.block_buffers, False))
    if logits.filter_mask:
        rows.append((f"inter-class filter mask ({logits.gathered_rows:,} x {logits.sampled_columns:,} bool)",
                     logits.filter_mask, False))
    gpu_total, other = plan.gpu_total, None
    if activations is not None:
        setting = "checkpointed" if activations.recipe_checkpoints else "not checkpointed"
        rows.append((f"backbone activations ({activations.samples} samples, {activations.precision}, {setting})",
                     activations.chosen, False))
        gpu_total += activations.chosen
        other = (f"with model.activation_checkpointing ({activations.checkpointed_units} blocks) the activations "
                 f"take {format_bytes(activations.with_checkpointing)}" if not activations.recipe_checkpoints else
                 f"without model.activation_checkpointing the activations take "
                 f"{format_bytes(activations.without_checkpointing)}")
    width = max(len(name) for name, _, _ in rows) + 2
    lines.append("  GPU memory per rank")
    lines += [f"    {name:<{width}}{format_bytes(size):>11}" for name, size, cpu in rows if not cpu]
    lines.append(f"    {'total GPU per rank':<{width}}{format_bytes(gpu_total):>11}")
    if other:
        lines.append(f"    ({other})")
    lines.append("")
    if plan.cpu_total:
        lines.append("  CPU memory per rank (optimizer offload)")
        lines += [f"    {name:<{width}}{format_bytes(size):>11}" for name, size, cpu in rows if cpu]
        lines.append(f"    {'total CPU per rank':<{width}}{format_bytes(plan.cpu_total):>11}")
        lines.append("")
    lines.append("  not included: gathered embeddings, normalised centers (reference and fused), "
                 "communication buckets, CUDA context, allocator fragmentation")
    return "\n".join(lines)
