# build_* factories: each reads one recipe section (plus derived values) and returns a ready object.
"""Builders turn the read-only recipe into objects. Derived numbers (class count, steps, global batch)
are computed here and returned, never written back into the recipe."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from toolkit.config.schema import Recipe
from toolkit.data import ResumableBatchStream, SyntheticFaces, SyntheticPairs, SyntheticTrainSet
from toolkit.errors import ConfigError, FaceCLError
from toolkit.heads import Margin
from toolkit.heads.partial_fc import ShardedIdentityCenterHead
from toolkit.models import create_backbone


@dataclass(frozen=True)
class RunShape:
    """Numbers derived from the recipe and the world: computed once, shared by trainer and logs."""

    world_size: int
    batch_size: int            # per rank per micro-step
    grad_accum_steps: int
    global_batch_size: int     # samples per optimizer step, all ranks
    steps_per_epoch: int       # optimizer steps
    total_steps: int


def check_names(recipe: Recipe) -> None:
    """The names a recipe refers to exist, as training would find them (also for --print-config): the
    backbone in the model registry, the engine among the strategies and its settings, each eval.sets entry
    an input of a registered benchmark kind. A ConfigError naming the value otherwise."""
    from toolkit.models import check_backbone_name
    from toolkit.parallel import get_strategy

    try:
        check_backbone_name(recipe.model.backbone)
    except FaceCLError as exc:
        raise ConfigError(f"model.backbone: {exc}") from None
    strategy = get_strategy(recipe.parallel.engine)
    strategy.check_settings(recipe.parallel)
    eval_set_benchmarks(recipe)


def eval_set_benchmarks(recipe: Recipe, settings=None) -> list:
    """Each eval.sets path as the registered benchmark kind it is (toolkit.eval.benchmark), metadata not yet
    read. One ConfigError line for a path that is missing, that no kind takes, that holds features instead of
    images, or whose name another entry already has (two lfw.bin from different folders would overwrite each
    other's results)."""
    from toolkit.errors import FaceCLError
    from toolkit.eval.benchmark import benchmark_for

    benchmarks, paths_by_name = [], {}
    for path in recipe.eval.sets:
        try:
            benchmark = benchmark_for(path, settings=settings, source="eval.sets")
        except FaceCLError as exc:
            raise ConfigError(str(exc)) from None
        if benchmark.carries_embeddings:
            raise ConfigError(f"eval.sets: {path} holds its own features, not images: it cannot evaluate the "
                              "model being trained")
        if benchmark.name in paths_by_name:
            raise ConfigError(f"eval.sets: {path} and {paths_by_name[benchmark.name]} are both named "
                              f"'{benchmark.name}'; their results would overwrite each other (rename one)")
        paths_by_name[benchmark.name] = path
        benchmarks.append(benchmark)
    return benchmarks


def build_device(recipe: Recipe, local_rank: int = 0) -> torch.device:
    """The device of this rank: cuda:<local_rank> on GPU machines, else cpu."""
    wanted = recipe.train.device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available")
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(wanted, local_rank) if wanted == "cuda" else torch.device("cpu")
    if recipe.parallel.precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"parallel.precision 'fp16' needs a CUDA device (this run is on {device.type}); "
                          "use bf16 or fp32 on CPU")
    return device


def build_backbone(recipe: Recipe) -> torch.nn.Module:
    """The backbone, compiled / channels_last / checkpointed per block as the recipe says (in that order:
    checkpointing wraps the compiled block), ready for the engine to wrap."""
    from toolkit.models import apply_activation_checkpointing, prepare_backbone

    from toolkit.parallel import get_strategy

    cfg = recipe.model
    if cfg.compile:
        get_strategy(recipe.parallel.engine).check_compile(recipe.parallel)
    # ViT-only options are passed when set, so that a convolutional backbone rejects them by name.
    options = {name: value for name, value in (("drop_path", cfg.drop_path), ("mask_ratio", cfg.mask_ratio),
                                               ("patch_size", cfg.patch_size)) if value}
    backbone = create_backbone(cfg.backbone, embedding_size=cfg.embedding_size, dropout=cfg.dropout,
                               input_size=recipe.data.image_size, **options)
    prepare_backbone(backbone, compile=cfg.compile, channels_last=cfg.channels_last)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(backbone)
    return backbone


def load_initial_weights(recipe: Recipe, model: torch.nn.Module):
    """train.init_from: load the backbone weights into `model` (with UniMoCo into the query encoder and its
    momentum copy); returns the full identity centers C x D when the file (or init_from_softmax) has them."""
    cfg = recipe.train
    if not cfg.init_from:
        if cfg.init_from_softmax:
            raise ConfigError("train.init_from_softmax needs train.init_from (the backbone to start from)")
        return None
    from toolkit.export.init_from import load_init_state

    state, centers = load_init_state(cfg.init_from, backbone=recipe.model.backbone,
                                     embedding_size=recipe.model.embedding_size, image_size=recipe.data.image_size,
                                     softmax=cfg.init_from_softmax or None, patch_size=recipe.model.patch_size or None)
    backbones = [model] if recipe.contrastive.weight <= 0 else [model.backbone, model.key_backbone]
    for module in backbones:
        missing, unexpected = module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ConfigError(f"train.init_from {cfg.init_from}: does not fit {recipe.model.backbone} (missing "
                              f"{missing[:3]}, unexpected {unexpected[:3]})")
    return centers


def build_model(recipe: Recipe) -> torch.nn.Module:
    """What the engine wraps: the backbone, or with UniMoCo the query encoder and its momentum copy."""
    backbone = build_backbone(recipe)
    if recipe.contrastive.weight <= 0:
        return backbone
    from toolkit.contrastive.encoders import ContrastiveEncoders, ProjectionHead

    cfg = recipe.contrastive
    projection = ProjectionHead(recipe.model.embedding_size, cfg.projection_dim, cfg.projection, cfg.projection_hidden)
    encoders = ContrastiveEncoders(backbone, projection)
    if cfg.key_bn == "sync":
        # Key statistics over the global batch (GPU only); otherwise shuffle-BN mixes ranks (unimoco.py).
        encoders.key_backbone = torch.nn.SyncBatchNorm.convert_sync_batchnorm(encoders.key_backbone)
        encoders.key_projection = torch.nn.SyncBatchNorm.convert_sync_batchnorm(encoders.key_projection)
    return encoders


def build_unimoco(recipe: Recipe, shape: "RunShape", ctx):
    """The UniMoCo objective with its label queue (K must be a multiple of the global batch)."""
    from toolkit.contrastive.queue import LabelQueue
    from toolkit.contrastive.unimoco import UniMoCoObjective

    cfg = recipe.contrastive
    if cfg.queue_size % shape.global_batch_size:
        raise ConfigError(f"contrastive.queue_size {cfg.queue_size} is not a multiple of the global batch "
                          f"{shape.global_batch_size} ({shape.batch_size} per rank x {shape.world_size} ranks x "
                          f"{shape.grad_accum_steps} accumulation)")
    if cfg.key_bn == "sync" and ctx.device.type != "cuda":
        raise ConfigError("contrastive.key_bn 'sync' needs CUDA devices (SyncBatchNorm); use 'shuffle' on CPU")
    queue = LabelQueue(cfg.queue_size, cfg.projection_dim, shape.global_batch_size, seed=recipe.run.seed).to(ctx.device)
    if cfg.implementation == "reference":
        from toolkit.contrastive.unicon import unicon_loss_reference as unicon_fn
    else:  # fused, or auto: the kernel when the extension is built (toolkit.ops falls back otherwise)
        from toolkit.ops import unicon_loss as unicon_fn
    return UniMoCoObjective(queue, ctx, temperature=cfg.temperature, margin=cfg.margin,
                            shuffle_bn=cfg.key_bn == "shuffle", seed=recipe.run.seed, unicon_fn=unicon_fn)


def build_margin(recipe: Recipe) -> Margin:
    cfg = recipe.head
    return Margin(scale=cfg.scale, m1=cfg.margin_m1, m2=cfg.margin_m2, m3=cfg.margin_m3)


def build_head_part(recipe: Recipe, num_classes: int, ctx, peak_lr: float):
    """The head as a training part: this rank's center shard and its optimizer."""
    from toolkit.training.parts import HeadPart

    head = build_head(recipe, num_classes, ctx).to(ctx.device)
    return HeadPart(head, build_head_optimizer(recipe, head, peak_lr), ctx)


def build_head(recipe: Recipe, num_classes: int, ctx) -> ShardedIdentityCenterHead:
    """This rank's shard of the identity centers (all of them on one process)."""
    cfg = recipe.head
    if num_classes < ctx.world_size:
        raise ConfigError(f"{num_classes} classes cannot be sharded over {ctx.world_size} ranks")
    return ShardedIdentityCenterHead(num_classes, recipe.model.embedding_size, build_margin(recipe), rank=ctx.rank,
                                     world_size=ctx.world_size, group=ctx.group, sample_rate=cfg.sample_rate,
                                     interclass_filter=cfg.interclass_filter, implementation=cfg.implementation)


def build_head_optimizer(recipe: Recipe, head: torch.nn.Module, peak_lr: float) -> torch.optim.Optimizer:
    from dataclasses import replace

    from toolkit.training.optim import build_optimizer

    cfg = recipe.optim if recipe.head.optimizer == "same" else replace(recipe.optim, name=recipe.head.optimizer)
    return build_optimizer(cfg, [head], peak_lr * recipe.head.lr_multiplier)


def build_synthetic_faces(recipe: Recipe) -> SyntheticFaces:
    syn = recipe.data.synthetic
    return SyntheticFaces(image_size=recipe.data.image_size, seed=recipe.run.seed, noise_std=syn.noise_std,
                          max_shift=syn.max_shift, color_jitter=syn.color_jitter)


def build_view_augmentation(recipe: Recipe):
    """The two UniMoCo views' augmentation (data.views), or None when the run has one view."""
    from dataclasses import asdict

    from toolkit.data.transforms import ViewAugmentation

    return ViewAugmentation(**asdict(recipe.data.views)) if num_views(recipe) == 2 else None


def num_views(recipe: Recipe) -> int:
    """2 augmented views per image when UniMoCo is on (query and key), else 1."""
    return 2 if recipe.contrastive.weight > 0 else 1


def build_train_set(recipe: Recipe):
    """The training data set; it knows its class count (`num_classes`) and size (`len`). For shards both
    come from the manifest."""
    if recipe.data.backend in ("webdataset", "dali"):
        from toolkit.data.shard_stream import ShardedTrainSet

        return ShardedTrainSet(recipe.data.manifest, samples_per_label=recipe.data.samples_per_label)
    syn = recipe.data.synthetic
    views = build_view_augmentation(recipe)
    return SyntheticTrainSet(build_synthetic_faces(recipe), syn.num_identities, syn.samples_per_identity,
                             flip=recipe.data.flip, views=views, labeled_fraction=syn.labeled_fraction)


def build_val_pairs(recipe: Recipe) -> SyntheticPairs:
    """Held-out identities: numbered after the training identities, so the two sets are disjoint."""
    syn = recipe.data.synthetic
    return SyntheticPairs(build_synthetic_faces(recipe), first_identity=syn.num_identities,
                          num_identities=syn.num_val_identities, num_pairs=syn.num_val_pairs)


def build_val_sets(recipe: Recipe) -> dict:
    """{name: benchmark} to evaluate on (toolkit.eval.benchmark): each eval.sets path as the registered kind it
    is (a .bin file named by its stem, an IJB release as IJB-B / IJB-C, ...), its metadata read now; with the
    synthetic backend and no paths, the synthetic held-out pairs as a verification benchmark; with real data
    and no paths, nothing (never synthetic faces for a model trained on real ones)."""
    from toolkit.errors import FaceCLError
    from toolkit.eval.benchmark import EvalSettings
    from toolkit.eval.verification import PairVerification

    settings = EvalSettings(image_size=recipe.data.image_size, batch_size=recipe.eval.batch_size,
                            num_workers=recipe.data.num_workers, num_folds=recipe.eval.num_folds,
                            fars=(1e-5, 1e-4, 1e-3, 1e-2, 1e-1), max_pairs=recipe.eval.ijb_max_pairs or None,
                            seed=recipe.run.seed)
    if not recipe.eval.sets:
        if recipe.data.backend != "synthetic":
            return {}
        return {"synthetic": PairVerification.from_pairs("synthetic", build_val_pairs(recipe), settings)}
    sets = {}
    for benchmark in eval_set_benchmarks(recipe, settings):
        try:
            sets[benchmark.name] = benchmark.load()
        except FaceCLError as exc:   # the same on every rank: a recipe error
            raise ConfigError(f"eval.sets: {exc}") from None
    return sets


def build_train_stream(recipe: Recipe, dataset, shape: RunShape, *, rank: int = 0,
                       pin_memory: bool = False, device: torch.device | None = None):
    """The rank's endless batch stream: next_batch(), state_dict()/load_state_dict(), skip_stats()."""
    data = recipe.data
    views = build_view_augmentation(recipe)
    try:
        if data.backend == "webdataset":
            from toolkit.data.shard_stream import ShardBatchStream

            return ShardBatchStream(dataset, shape.batch_size, seed=recipe.run.seed, num_workers=data.num_workers,
                                    rank=rank, world_size=shape.world_size, flip=data.flip, views=views,
                                    image_size=data.image_size, window_shards=data.webdataset.window_shards,
                                    decoder=data.webdataset.decoder, max_skipped_fraction=data.max_skipped_fraction,
                                    pin_memory=pin_memory, prefetch_batches=data.webdataset.prefetch_batches)
        if data.backend == "dali":
            from dataclasses import asdict

            from toolkit.data.dali_stream import DaliBatchStream, DaliOptions

            return DaliBatchStream(dataset, shape.batch_size, seed=recipe.run.seed, rank=rank,
                                   world_size=shape.world_size, flip=data.flip, views=views,
                                   image_size=data.image_size, config=DaliOptions(**asdict(data.dali)), device=device)
        return ResumableBatchStream(dataset, shape.batch_size, seed=recipe.run.seed,
                                    num_workers=recipe.data.num_workers, rank=rank, world_size=shape.world_size,
                                    samples_per_label=recipe.data.samples_per_label, pin_memory=pin_memory,
                                    grad_accum_steps=shape.grad_accum_steps)
    except ValueError as exc:
        raise ConfigError(f"batch of {shape.batch_size} per rank: {exc}") from None


@dataclass(frozen=True)
class SavedShape:
    """The batch shape a checkpoint was trained with (what a resume at another world size tries to keep)."""

    world_size: int
    batch_size: int            # per rank per micro-step
    grad_accum_steps: int

    @property
    def global_batch_size(self) -> int:
        return self.world_size * self.batch_size * self.grad_accum_steps


def saved_shape_of(path, recipe: Recipe) -> SavedShape:
    """The batch shape recorded in a checkpoint's trainer file (older checkpoints: from their data position,
    with the recipe's accumulation steps)."""
    from toolkit.checkpoint import load_checkpoint

    payload = load_checkpoint(path)
    shape = payload.get("shape") or {}
    data = payload.get("data") or {}
    world = int(shape.get("world_size", payload.get("world_size", 1)))
    batch = int(shape.get("batch_size", data.get("batch_size", recipe.data.batch_size)))
    accum = int(shape.get("grad_accum_steps", data.get("grad_accum_steps", recipe.parallel.grad_accum_steps)))
    return SavedShape(world_size=world, batch_size=batch, grad_accum_steps=accum)


def build_run_shape(recipe: Recipe, num_samples: int, world_size: int = 1, *, saved: SavedShape | None = None,
                    allow_batch_change: bool = False) -> RunShape:
    """The run's batch numbers. Resuming a checkpoint of another world size (`saved`), the checkpoint's global
    batch is kept, so that the learning-rate schedule and the data order go on as they were: the per-rank
    batch stays and the accumulation steps change (memory per rank stays the same), else the accumulation
    stays and the per-rank batch changes; where neither divides, the resume is refused unless
    `allow_batch_change` (then the recipe's own shape at this world size is used)."""
    accum = recipe.parallel.grad_accum_steps
    if recipe.data.global_batch_size:
        global_batch = recipe.data.global_batch_size
        if global_batch % (world_size * accum):
            raise ConfigError(f"data.global_batch_size={global_batch} does not divide into {world_size} ranks x "
                              f"parallel.grad_accum_steps={accum}")
        batch = global_batch // (world_size * accum)
    else:
        batch = recipe.data.batch_size
        global_batch = batch * accum * world_size
    if saved is not None and saved.world_size != world_size and not allow_batch_change:
        batch, accum, global_batch = _keep_global_batch(saved, world_size, accum)
    steps_per_epoch = num_samples // global_batch
    if steps_per_epoch < 1:
        raise ConfigError(f"global batch {global_batch} ({batch} per rank x parallel.grad_accum_steps="
                          f"{accum} x {world_size} ranks) is larger than the data set ({num_samples} samples)")
    total_steps = max(1, math.ceil(recipe.train.num_epochs * steps_per_epoch))
    return RunShape(world_size=world_size, batch_size=batch, grad_accum_steps=accum, global_batch_size=global_batch,
                    steps_per_epoch=steps_per_epoch, total_steps=total_steps)


def _keep_global_batch(saved: SavedShape, world_size: int, recipe_accum: int) -> tuple[int, int, int]:
    """(per-rank batch, accumulation steps, global batch) that keep the checkpoint's global batch on
    `world_size` ranks; a ConfigError with the way out where none does."""
    target = saved.global_batch_size
    if target % (world_size * saved.batch_size) == 0:
        return saved.batch_size, target // (world_size * saved.batch_size), target
    if target % (world_size * recipe_accum) == 0:
        return target // (world_size * recipe_accum), recipe_accum, target
    raise ConfigError(f"the checkpoint's global batch {target} ({saved.batch_size} per rank x {saved.world_size} ranks "
                      f"x {saved.grad_accum_steps} accumulation) cannot be split over {world_size} ranks, neither with "
                      f"{saved.batch_size} per rank nor with {recipe_accum} accumulation steps; resume on a world size "
                      f"that divides it, or pass --allow-batch-change to continue with this recipe's batch (the "
                      f"learning-rate schedule and the data order then change)")


def build_strategy(recipe: Recipe, shape: RunShape, model: torch.nn.Module, ctx, peak_lr: float):
    """Wrap the model in the recipe's parallel strategy, with its optimizer (built after sharding for FSDP2)."""
    from toolkit.parallel import BatchShape, get_strategy
    from toolkit.training.optim import build_optimizer

    strategy = get_strategy(recipe.parallel.engine)
    strategy.check_settings(recipe.parallel)
    strategy.check_world_size(ctx.world_size)
    batch = BatchShape(micro_batch_size=shape.batch_size, grad_accum_steps=shape.grad_accum_steps,
                       global_batch_size=shape.global_batch_size)
    return strategy.create(recipe.parallel, model, lambda module: build_optimizer(recipe.optim, [module], peak_lr),
                           ctx, batch)


def start_distributed(recipe: Recipe, launch):
    """Start (or join) the job's process group as the recipe's engine does it; returns the DistributedContext.

    `launch` is the toolkit.parallel.LaunchEnvironment that launch/train.py read from the launcher."""
    from toolkit.parallel import get_strategy

    strategy = get_strategy(recipe.parallel.engine)
    strategy.check_settings(recipe.parallel)
    device = build_device(recipe, launch.local_rank)
    return strategy.start(recipe.parallel, device, launch)
