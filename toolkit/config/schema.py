# Recipe schema: typed, documented dataclasses for every section a YAML recipe may contain.
"""The recipe schema.

Every field carries a doc line (``doc(...)``) which is the field's documentation; `--print-config`
and the README are generated from what is written here. A field declared with ``required(...)`` has no
default: a recipe that leaves it out is rejected. Derived numbers (global batch, total steps, class
count of a data set) are not fields: builders compute them from these.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class Bounds:
    """The range a numeric field must lie in (ge/gt: lower, le/lt: upper; None = open); `note` is appended to
    the error in parentheses (e.g. "0 disables"). checks.py tests every field that has one, and the recipe
    reference prints it, so a bound is written once, here."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    note: str = ""

    def contains(self, value) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def describe(self) -> str:
        """'positive', '>= 1', 'in [0, 1)', ... (as the errors say it)."""
        low = ("[", self.ge) if self.ge is not None else ("(", self.gt) if self.gt is not None else None
        high = (self.le, "]") if self.le is not None else (self.lt, ")") if self.lt is not None else None
        if low and high:
            text = f"in {low[0]}{low[1]:g}, {high[0]:g}{high[1]}"
        elif low:
            text = "positive" if low == ("(", 0) else f"{'>=' if low[0] == '[' else '>'} {low[1]:g}"
        else:
            text = f"{'<=' if high[1] == ']' else '<'} {high[0]:g}"
        return f"{text} ({self.note})" if self.note else text


def _bounds(ge, gt, le, lt, note) -> Bounds | None:
    return Bounds(ge, gt, le, lt, note) if (ge, gt, le, lt) != (None, None, None, None) else None


def doc(text: str, default=dataclasses.MISSING, *, default_factory=dataclasses.MISSING, path: bool = False,
        ge=None, gt=None, le=None, lt=None, note: str = ""):
    """A field with a default and its documentation. `path=True` enables ${VAR} expansion; ge/gt/le/lt bound
    a number (`Bounds`)."""
    metadata = {"doc": text, "path": path, "bounds": _bounds(ge, gt, le, lt, note)}
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def required(text: str, *, path: bool = False, ge=None, gt=None, le=None, lt=None, note: str = ""):
    """A field the recipe must set; there is deliberately no default."""
    return field(metadata={"doc": text, "path": path, "required": True, "bounds": _bounds(ge, gt, le, lt, note)})


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """Where the run writes and how it is seeded."""

    name: str = required("Run name; the run folder is OUTPUT_DIR/NAME.")
    output_dir: str = doc("Parent folder of run folders.", "runs", path=True)
    seed: int = doc("Seed for model init, data order and augmentation.", 0)
    log_every: int = doc("Print progress and write TensorBoard scalars every N optimizer steps and at the last; "
                         "loss and grad norms are means over those steps.", 10, ge=1)
    trackers: list[Literal["tensorboard", "wandb", "mlflow"]] = doc(
        "Where the training and evaluation scalars go besides the console and train.log (rank 0): tensorboard "
        "(the run folder's tensorboard/), wandb (Weights & Biases, facecl[wandb]; set up by its WANDB_* variables, "
        "WANDB_MODE=offline writes to the run folder only), mlflow (facecl[mlflow]; MLFLOW_TRACKING_URI, else a file "
        "store in the run folder's mlruns/); [] for none. A resumed run continues the same W&B / MLflow run.",
        default_factory=lambda: ["tensorboard"])
    tracker_project: str = doc("W&B project and MLflow experiment name (WANDB_PROJECT / MLFLOW_EXPERIMENT_NAME win).",
                               "facecl")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """The backbone that maps an aligned face to an embedding."""

    backbone: str = required(
        "Registered backbone name: iresnet18/34/50/100/200/2060, mobilefacenet, mobilefacenet_mbf, "
        "mobilefacenet_large, vit_t/s/b/l/h.")
    embedding_size: int = doc("Embedding dimension.", 512, gt=0)
    dropout: float = doc("Dropout before the embedding FC layer.", 0.0, ge=0.0, lt=1.0)
    activation_checkpointing: bool = doc(
        "Recompute each block (transformer or residual) in backward to save activation memory.", False)
    drop_path: float = doc(
        "ViTs: stochastic depth, rising linearly over the blocks to this rate (0.05 in the WebFace42M "
        "reference models, 0.1 for Glint360K/MS1M).", 0.0)
    mask_ratio: float = doc(
        "ViTs: share of the patch tokens dropped at random per sample in training (the WebFace42M reference "
        "models are named 0.05, but their code drops 0.1 whenever the ratio is above 0); none at evaluation.", 0.0)
    patch_size: int = doc("ViTs: patch size in pixels; 0 = 9 (a 12 x 12 grid at 112x112).", 0)
    compile: bool = doc(
        "Run each block under torch.compile (single, ddp, fsdp and DeepSpeed ZeRO 0-2; not ZeRO-3).", False)
    channels_last: bool = doc("Convolutions in channels_last (NHWC) memory layout (faster on GPU).", False)


@dataclass(frozen=True, kw_only=True)
class HeadConfig:
    """Identity-center layer with combined margin: logit = s * (cos(m1 * theta + m2) - m3) on the target."""

    scale: float = doc("Logit scale s.", 64.0, gt=0)
    margin_m1: float = doc("Multiplicative angular margin m1 (SphereFace); 1.0 disables it.", 1.0, ge=1.0,
                           note="1 disables it")
    margin_m2: float = doc("Additive angular margin m2 (ArcFace uses 0.5).", 0.0)
    margin_m3: float = doc("Additive cosine margin m3 (CosFace uses 0.4).", 0.4)
    sample_rate: float = doc(
        "Partial FC: share of each rank's classes used per step (all positives of the global batch plus random "
        "negatives up to int(sample_rate * local classes)); 1.0 uses every class.", 1.0, gt=0.0, le=1.0)
    interclass_filter: float = doc(
        "Zero negative cosines above this value (likely duplicate identities in noisy data; 0.4 in the "
        "WebFace42M reference configs); 0 disables.", 0.0, ge=0.0, lt=1.0, note="0 disables")
    optimizer: Literal["same", "sgd", "adamw"] = doc(
        "Optimizer of the center shards: 'same' as optim.name, or sgd / adamw (other settings from optim).", "same")
    lr_multiplier: float = doc("The centers' lr is the backbone's lr times this.", 1.0, gt=0)
    weight: float = doc("w_id: weight of the margin-softmax loss in the total loss; 0 disables the head.", 1.0, ge=0)
    implementation: Literal["auto", "reference", "fused", "fused_linear"] = doc(
        "Loss implementation: plain-PyTorch reference, fused kernel on the logits, fused linear kernel (never "
        "materialises the logits nor normalised centers), or auto (fused_linear when the extension is built, "
        "else reference with one warning).", "auto")


@dataclass(frozen=True, kw_only=True)
class ContrastiveConfig:
    """UniMoCo: momentum key encoder, label-aware queue, unified contrastive loss (UniCon)."""

    weight: float = doc("w_con: weight of the UniCon loss in the total loss; 0 disables UniMoCo.", 0.0, ge=0)
    queue_size: int = doc("Keys K in the queue; a multiple of the global batch.", 65536, ge=0)
    temperature: float = doc("Softmax temperature T of the similarities.", 0.07, gt=0)
    margin: float = doc("Margin added to the negatives' similarities.", 0.0)
    momentum: float = doc("Key-encoder EMA momentum m (key = m * key + (1 - m) * query).", 0.999, ge=0.0, lt=1.0)
    momentum_schedule: Literal["constant", "cosine"] = doc(
        "'cosine' raises the momentum from `momentum` to 1 over the run (BYOL-style).", "constant")
    projection: Literal["linear", "mlp"] = doc("Projection head after the backbone embedding.", "mlp")
    projection_dim: int = doc("Output dimension of the projection head.", 128, gt=0)
    projection_hidden: int = doc("Hidden width of the MLP projection head.", 2048)
    key_bn: Literal["shuffle", "sync"] = doc(
        "Key-encoder batch norm across ranks: MoCo's shuffle-BN or SyncBN.", "shuffle")
    implementation: Literal["auto", "reference", "fused"] = doc(
        "UniCon implementation: plain-PyTorch reference, fused kernel, or auto (the kernel when built).", "auto")


@dataclass(frozen=True, kw_only=True)
class ViewsConfig:
    """The two augmented views of UniMoCo (MoCo v2 without random crop)."""

    color_jitter: tuple[float, float, float, float] = doc("Brightness, contrast, saturation, hue strengths.",
                                                          (0.4, 0.4, 0.4, 0.1))
    color_jitter_p: float = doc("Probability of colour jitter.", 0.8)
    grayscale_p: float = doc("Probability of converting to grayscale.", 0.2)
    blur_sigma: tuple[float, float] = doc("Range of the Gaussian blur sigma (pixels at 112x112).", (0.1, 2.0))
    blur_p: float = doc("Probability of Gaussian blur.", 0.5)
    flip: bool = doc("Random horizontal flip.", True)


@dataclass(frozen=True, kw_only=True)
class SyntheticDataConfig:
    """Built-in synthetic faces: each identity has a stable pattern, each sample varies."""

    num_identities: int = doc("Training identities.", 200, ge=2)
    samples_per_identity: int = doc("Images per training identity in one epoch.", 50, ge=1)
    num_val_identities: int = doc("Held-out identities for verification (disjoint from training).", 100, ge=2)
    num_val_pairs: int = doc("Verification pairs (half positive, half negative); a multiple of 20.", 1000)
    noise_std: float = doc("Per-pixel Gaussian noise (in [0, 1] pixel units).", 0.08)
    max_shift: int = doc("Largest random shift in pixels at 112x112 (scaled with image_size).", 8)
    color_jitter: float = doc("Largest relative brightness/contrast/colour change per sample.", 0.2)
    labeled_fraction: float = doc(
        "Share of training identities whose samples carry their label; the rest are labeled -1 "
        "(unlabeled: only the contrastive objective learns from them).", 1.0, ge=0.0, le=1.0)


@dataclass(frozen=True, kw_only=True)
class WebDatasetConfig:
    """Streaming reader of WebDataset shards: sharded by rank and worker, shuffled, exactly resumable."""

    window_shards: int = doc(
        "Shards each loader worker reads into memory and shuffles together (the sample shuffle buffer, and the "
        "unit a resumed run re-reads); memory per worker is about this many shards of JPEG bytes.", 4, ge=1)
    decoder: Literal["auto", "simplejpeg", "pil"] = doc(
        "JPEG decoder: simplejpeg (libjpeg-turbo, about twice as fast) or PIL; 'auto' prefers simplejpeg.", "auto")
    prefetch_batches: int = doc("Batches each loader worker prepares ahead.", 2, ge=1)


@dataclass(frozen=True, kw_only=True)
class DaliConfig:
    """NVIDIA DALI pipeline (fn.readers.webdataset) on the same shards."""

    decode_device: Literal["auto", "cpu", "mixed"] = doc(
        "Where JPEGs are decoded: 'mixed' (GPU, nvJPEG), 'cpu', or 'auto' (mixed when a GPU is present).", "auto")
    num_threads: int = doc("CPU threads of each rank's pipeline.", 4, ge=1)
    shuffle_buffer: int = doc("Samples DALI's reader holds for random shuffling (its initial_fill).", 4096, ge=1)
    prefetch_batches: int = doc("Batches the pipeline prepares ahead (prefetch_queue_depth).", 2, ge=1)


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where samples come from and how they are batched."""

    backend: Literal["synthetic", "webdataset", "dali"] = doc(
        "Data source: 'synthetic' (built in, no files), 'webdataset' (streaming reader of the shards written by "
        "launch/prepare_data.py) or 'dali' (NVIDIA DALI pipeline on the same shards; pip install .[dali]).",
        "synthetic")
    manifest: str = doc(
        "manifest.json of the shards (webdataset and dali backends), e.g. ${DATA_ROOT}/ms1mv3/manifest.json.", "",
        path=True)
    max_skipped_fraction: float = doc(
        "Stop the run with an error when more than this share of the samples read could not be used (corrupt "
        "JPEG, missing member, damaged shard); until then each is replaced in its batch and counted.", 0.01,
        ge=0.0, le=1.0)
    batch_size: int = doc("Samples per rank per micro-step. Give this or global_batch_size, not both.", 0)
    global_batch_size: int = doc(
        "Samples per optimizer step over all ranks; the per-rank batch is derived as global / (ranks x "
        "grad_accum_steps), which must divide evenly. Give this or batch_size, not both.", 0)
    image_size: int = doc("Square input size; real faces are 112 (a multiple of 16).", 112)
    num_workers: int = doc("DataLoader worker processes per rank (0 = load in the training process).", 2, ge=0)
    flip: bool = doc("Random horizontal flip augmentation.", True)
    samples_per_label: int = doc(
        "Images of one identity placed together in a batch (UniMoCo uses 2); 1 = plain shuffling.", 1, ge=1)
    views: ViewsConfig = doc("Augmentation of the two UniMoCo views (used when contrastive.weight > 0).",
                             default_factory=ViewsConfig)
    synthetic: SyntheticDataConfig = doc("Settings of the synthetic backend.", default_factory=SyntheticDataConfig)
    webdataset: WebDatasetConfig = doc("Settings of the webdataset backend.", default_factory=WebDatasetConfig)
    dali: DaliConfig = doc("Settings of the dali backend.", default_factory=DaliConfig)


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Optimizer of the backbone and the identity centers. Norm and bias parameters get no weight decay."""

    name: Literal["sgd", "adamw"] = required("Optimizer: 'sgd' or 'adamw'.")
    lr: float = required("Peak learning rate (after warmup) at the reference batch size.", gt=0)
    reference_batch_size: int = doc(
        "Global batch that `lr` is quoted for; the used lr is lr * global_batch / reference_batch_size "
        "(linear scaling rule). 0 means 'lr is for whatever global batch this run has'.", 0, ge=0)
    weight_decay: float = doc("Weight decay (decoupled for AdamW).", 5e-4, ge=0)
    momentum: float = doc("SGD momentum.", 0.9)
    nesterov: bool = doc("SGD Nesterov momentum.", False)
    betas: tuple[float, float] = doc("AdamW betas.", (0.9, 0.999))
    eps: float = doc("AdamW epsilon.", 1e-8)


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    """Learning rate over optimizer steps: linear warmup, then cosine or polynomial decay."""

    warmup_steps: int = doc("Linear warmup from 0 to the peak lr over this many optimizer steps. Give this or "
                            "warmup_epochs, not both (0 = not given).", 0, ge=0)
    warmup_epochs: float = doc(
        "Linear warmup over this many epochs (may be fractional), turned into optimizer steps with the run's own "
        "steps per epoch (nearest step, halves up, at least 1), so that warmup keeps its share of the run at any "
        "world size or batch; the startup line says how many steps. Give this or warmup_steps, not both "
        "(0 = not given).", 0.0, ge=0)
    decay: Literal["cosine", "poly", "constant"] = doc("Decay after warmup.", "cosine")
    poly_power: float = doc("Exponent of polynomial decay.", 2.0)
    min_lr_ratio: float = doc("Final lr as a fraction of the peak lr.", 0.0, ge=0.0, le=1.0)


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """How the step runs: engine, precision, accumulation and clipping."""

    engine: Literal["single", "ddp", "deepspeed", "fsdp"] = doc(
        "Training engine for the backbone: one process, PyTorch DDP, DeepSpeed ZeRO, or PyTorch FSDP2 "
        "(fully_shard). The identity-center head is never handed to the engine.", "single")
    precision: Literal["fp32", "bf16", "fp16"] = doc(
        "Compute precision: bf16 autocast (CPU or GPU), fp16 autocast + loss scaling (GPU only), or fp32.", "fp32")
    grad_accum_steps: int = doc("Micro-steps accumulated into one optimizer step.", 1, ge=1)
    clip_grad_norm: float = doc(
        "Clip the gradient norm of each part (backbone, head) to this value; 0 disables clipping.", 0.0,
        ge=0, note="0 disables")
    zero_stage: int = doc("DeepSpeed ZeRO stage 0-3 (engine: deepspeed).", 2)
    offload_optimizer: bool = doc("DeepSpeed: keep ZeRO optimizer states in CPU memory (stages 1-3).", False)
    deepspeed_config: str = doc(
        "Optional DeepSpeed JSON/YAML file with extra settings; a setting that contradicts the recipe is an "
        "error. Empty = none.", "", path=True)
    fsdp_reshard_after_forward: bool = doc(
        "FSDP2: free gathered parameters after forward (ZeRO-3 like); false keeps them until backward.", True)
    fsdp_mixed_precision: bool = doc(
        "FSDP2: keep bf16/fp16 parameter copies for compute and reduce gradients in fp32 (MixedPrecisionPolicy) "
        "instead of autocast.", False)
    timeout_s: int = doc(
        "Seconds a rank may go without progress (a step, an evaluation or a save) before the job ends with a line "
        "naming the stalled rank, instead of hanging; collectives time out just after.", 600, gt=0)


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Length of the run."""

    num_epochs: float = required("Epochs to train (may be fractional); steps are derived from the data size.", gt=0)
    device: Literal["auto", "cpu", "cuda"] = doc("'auto' uses CUDA when available.", "auto")
    max_nonfinite_steps: int = doc(
        "A step whose loss or gradients are not finite (inf/nan) is skipped on every part and counted; after "
        "this many consecutive skipped steps the run stops with exit status 3 (diverged).", 20, ge=1)
    init_from: str = doc(
        "Start from these weights instead of a random init: a consolidated file of ours (convert.py consolidate, "
        "with its identity centers when written with --with-head), a FaceCL run or checkpoint, or an arcface_torch "
        "backbone file (model.pt, backbone.pth, checkpoint_gpu_0.pt) of any of their backbones: r18-r2060, mbf, "
        "mbf_large, vit_t/s/b/l/h, onto the registry backbone of the same architecture (docs/export.md). Ignored "
        "when the run is resumed.", "")
    init_from_softmax: str = doc(
        "arcface_torch's per-rank Partial FC weight files (a folder, or one file) to start the identity centers "
        "from; merged in class order and resharded to this job's ranks.", "")


@dataclass(frozen=True, kw_only=True)
class EvalConfig:
    """Verification on held-out pairs with the 10-fold protocol."""

    every_steps: int = doc("Run verification every N optimizer steps (0 = only at the end).", 0, ge=0)
    sets: list[str] = doc(
        "insightface .bin verification files (lfw.bin, cfp_fp.bin, agedb_30.bin, ...), IJB-B/IJB-C release "
        "folders (1:1 TAR at FAR 1e-5/1e-4/1e-3) and labelled images scored all-to-all (a folder of identity "
        "sub-folders or a shard manifest.json); the first .bin set is the one reported last. Empty: the "
        "synthetic held-out pairs with the synthetic backend, nothing with real data.", default_factory=list, path=True)
    ijb_max_pairs: int = doc(
        "IJB folders in eval.sets: score a seeded subset of this many template pairs (all genuine pairs up to "
        "half of it) so that evaluation fits into training; 0 = every pair (the benchmark's numbers).", 0)
    batch_size: int = doc("Images per forward pass during evaluation.", 256)
    num_folds: int = doc("Cross-validation folds of the verification protocol.", 10, ge=2)


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """Checkpoints written atomically into the run folder's checkpoints/."""

    every_steps: int = doc("Save every N optimizer steps (0 = only at the end).", 0, ge=0)
    keep_last: int = doc("Keep this many most recent checkpoints (0 = keep all).", 2, ge=0)
    save_final: bool = doc("Save a checkpoint when the run ends.", True)


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """A whole recipe: one field per top-level YAML section."""

    run: RunConfig = required("Run name, output folder and seed.")
    model: ModelConfig = required("Backbone.")
    data: DataConfig = required("Data source and batching.")
    optim: OptimConfig = required("Optimizer.")
    train: TrainConfig = required("Run length and device.")
    head: HeadConfig = doc("Identity-center margin softmax.", default_factory=HeadConfig)
    contrastive: ContrastiveConfig = doc("UniMoCo contrastive objective.", default_factory=ContrastiveConfig)
    schedule: ScheduleConfig = doc("Learning-rate schedule.", default_factory=ScheduleConfig)
    parallel: ParallelConfig = doc("Engine, precision, accumulation, clipping.", default_factory=ParallelConfig)
    eval: EvalConfig = doc("Verification.", default_factory=EvalConfig)
    checkpoint: CheckpointConfig = doc("Checkpointing.", default_factory=CheckpointConfig)
