# End-to-end training throughput: the toolkit's own step (Trainer.train_step on each engine) against a bare PyTorch
# loop, or against insightface's arcface_torch training step run from its own code (--peer arcface_torch).
"""Measures what a user's training job spends per optimizer step, without data decoding.

    python benchmarks/bench_train.py --backbone iresnet50 --engines single --batch-size 32
    python benchmarks/bench_train.py --backbone mobilefacenet --engines ddp,deepspeed:1,deepspeed:2,deepspeed:3,fsdp \\
        --ranks 2 --batch-size 16
    python benchmarks/bench_train.py --peer arcface_torch --backbone iresnet50 --engines single,ddp --ranks 2 \\
        --sample-rates 1,0.2 --batch-size 16

Every engine runs as its own job (single: one python process; multi-rank engines: torchrun with gloo on
CPU or NCCL on GPU, as tests/distributed starts its jobs). In each rank:

- the toolkit side is a real `Trainer` built from a recipe (toolkit/training/builders.py: backbone, engine,
  sharded identity-center head, optimizers, schedules); its data stream is replaced by pre-made in-memory
  batches and `Trainer.train_step()` is called as `fit()` calls it (without fit's logging/eval/checkpoints);
- the bare side is the same backbone from the model registry, with the same initial weights, the same
  identity centers (unsharded) and the same margin-softmax math in plain PyTorch, stepped by a plain
  torch.optim.SGD; no engine, no sharding, no communication. With several ranks every rank runs its own bare
  replica at the same time, so both sides share the machine alike;
- the two sides alternate step by step (the order flips every step) on the same batch; the ratio quoted is
  the median over steps of toolkit / bare, the step time of a step is the slowest rank's.

With `--peer arcface_torch` the other side is insightface's own training step instead of the bare loop:
recognition/arcface_torch copied from the insightface repository ($FACECL_INSIGHTFACE_REPO, see
benchmarks/arcface_torch_peer.py) into a temporary folder, patched only where this device, precision, image size
or torch needs it (each patch printed and recorded in the JSON), and its train_v2.py step restated around its
own modules: iresnet in DDP (bucket_cap_mb=16, fp16 compress hook, as train_v2), PartialFC_V2 with
CombinedMarginLoss (ArcFace: s=64, m=(1.0, 0.5, 0.0)), SGD (momentum 0.9) over both, clip_grad_norm_(backbone, 5),
PolynomialLRWarmup. It runs on every rank of the job (one process: DDP over a one-rank process group, as
train_v2 on one GPU). The toolkit side starts from arcface_torch's initial weights through the recipe
(train.init_from = their backbone.pth, train.init_from_softmax = their per-rank Partial FC weights), with the same
margins, sample rate, lr, momentum, weight decay and clipping; at sample rate 1 the first-step losses agree.
`--sample-rates 1,0.2` runs each engine at each Partial FC sample rate. Defaults go to
benchmarks/results/bench_train_arcface_torch.json.

The step is split by timers around the calls the trainer makes (data, backbone forward, head, backward,
optimizer; "other" is the rest of train_step: non-finite checks, buffer copies, zero_grad, schedules).
Communication is the time a rank spends inside torch.distributed collectives and in waiting on their
handles, attributed to the phase it happens in (it is part of that phase, not added to it). DDP's gradient
all-reduce runs inside its C++ reducer during backward and is not visible to these timers.

Engine names are the recipe's `parallel.engine` values: single, ddp, deepspeed (ZeRO stage via
`deepspeed:N`, N = 0-3; zero1..zero3 are accepted as short names), fsdp (FSDP2; fsdp2 accepted).
The JSON goes to benchmarks/results/bench_train.json (never over a committed file: see results_file.py),
the markdown table beside it as .md.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from results_file import results_path  # noqa: E402
from toolkit.command_line import CommandParser  # noqa: E402

PHASES = ("data", "forward", "head", "backward", "optimizer", "other")
PEERS = ("bare", "arcface_torch")
# arcface_torch's configs/base.py margin_list (ArcFace) and train_v2.py's CombinedMarginLoss(64, ...).
ARCFACE_TORCH_HEAD = {"scale": 64.0, "margin_m1": 1.0, "margin_m2": 0.5, "margin_m3": 0.0}
SHORT_ENGINE_NAMES = {"zero0": "deepspeed:0", "zero1": "deepspeed:1", "zero2": "deepspeed:2", "zero3": "deepspeed:3",
                      "fsdp2": "fsdp"}
# Collectives the timers wrap (those the toolkit, FSDP2 and DeepSpeed call through torch.distributed).
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_single", "reduce_scatter",
               "reduce_scatter_tensor", "reduce_scatter_single", "broadcast", "reduce", "all_to_all",
               "all_to_all_single", "barrier", "gather", "scatter", "_all_gather_base", "_reduce_scatter_base",
               "all_gather_object", "broadcast_object_list")
WHAT_IS_NOT_SEPARABLE = {
    "single": "no communication",
    "ddp": "gradient all-reduce runs in DDP's C++ reducer, overlapped with backward: it is inside 'backward' and "
           "not in 'comm'",
    "deepspeed:0": "gradient all-reduce inside DeepSpeed's backward/step ('comm' shows where)",
    "deepspeed:1": "gradient all-reduce in backward, parameter all-gather after the partitioned update in "
                   "'optimizer' ('comm' shows where)",
    "deepspeed:2": "gradient reduce-scatter in backward hooks, parameter all-gather after the partitioned update "
                   "in 'optimizer' ('comm' shows where)",
    "deepspeed:3": "parameter all-gathers in forward and backward, gradient reduce-scatter in backward "
                   "('comm' shows where)",
    "fsdp": "FSDP2 all-gathers in forward/backward and reduce-scatters in backward; async collectives are timed "
            "in their wait() ('comm' shows where)",
}


# ----- command line ------------------------------------------------------------------------------------
def canonical_engine(text: str) -> str:
    """'single', 'ddp', 'fsdp' or 'deepspeed:N' (N = ZeRO stage 0-3) from a name the user typed."""
    name = SHORT_ENGINE_NAMES.get(text.strip().lower(), text.strip().lower())
    if name == "deepspeed":
        name = "deepspeed:2"   # the recipe's default zero_stage
    if name in ("single", "ddp", "fsdp") or re.fullmatch(r"deepspeed:[0-3]", name):
        return name
    raise SystemExit(f"error: unknown engine {text!r}; use single, ddp, fsdp, deepspeed:N with N in 0-3 "
                     "(or zero0..zero3, fsdp2)")


def engine_overrides(engine: str) -> dict:
    """The recipe's parallel section for an engine name."""
    if engine.startswith("deepspeed:"):
        return {"engine": "deepspeed", "zero_stage": int(engine.split(":")[1])}
    return {"engine": engine}


def positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a value > 0, got {text!r}")
        return value
    return parse


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a value >= 0, got {text!r}")
    return value


def sample_rates(text: str) -> list[float]:
    rates = []
    for item in text.split(","):
        try:
            rate = float(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected sample rates in (0, 1] separated by commas, got {text!r}") \
                from None
        if not 0.0 < rate <= 1.0:
            raise argparse.ArgumentTypeError(f"sample rate {item!r} is not in (0, 1]")
        rates.append(rate)
    return rates


def parse_args(argv=None) -> argparse.Namespace:
    parser = CommandParser(description="Training throughput of the toolkit's step vs a bare PyTorch loop or "
                                       "insightface's arcface_torch step (synthetic in-memory batches).")
    parser.add_argument("--backbone", default="iresnet50", help="registered backbone name (toolkit/models)")
    parser.add_argument("--engines", default="single",
                        help="comma-separated: single, ddp, fsdp, deepspeed:N (ZeRO stage N; zero1..3 and fsdp2 "
                             "accepted too)")
    parser.add_argument("--ranks", type=positive(int), default=2, help="ranks of each multi-rank engine")
    parser.add_argument("--peer", choices=PEERS, default="bare",
                        help="the other side: 'bare' (plain PyTorch loop) or 'arcface_torch' (insightface's "
                             "train_v2.py step from its own code; needs $FACECL_INSIGHTFACE_REPO or the snapshot)")
    parser.add_argument("--sample-rates", type=sample_rates, default=None, metavar="R[,R...]",
                        help="--peer arcface_torch: Partial FC sample rates, each engine runs at each (default 1)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="training precision (fp16: --peer arcface_torch on a GPU, with loss scaling on both "
                             "sides)")
    parser.add_argument("--batch-size", type=positive(int), default=32, help="samples per rank per step")
    parser.add_argument("--image-size", type=positive(int), default=112, help="side of the square inputs")
    parser.add_argument("--num-classes", type=positive(int), default=1000, help="identities of the head (all ranks)")
    parser.add_argument("--embedding-size", type=positive(int), default=512, help="backbone output size")
    parser.add_argument("--warmup-steps", type=non_negative_int, default=2, help="unmeasured steps of each side")
    parser.add_argument("--steps", type=positive(int), default=10, help="measured steps of each side")
    parser.add_argument("--distinct-batches", type=positive(int), default=4,
                        help="pre-made batches per rank, cycled")
    parser.add_argument("--lr", type=float, default=0.01, help="learning rate of both sides")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when there is a GPU")
    parser.add_argument("--threads", type=non_negative_int, default=0,
                        help="torch threads per rank (0: CPU cores / ranks, at least 1)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="extra recipe override for the toolkit side (e.g. head.implementation=fused); repeatable")
    parser.add_argument("--max-load", type=float, default=1.0,
                        help="wait before each engine until the 1-minute load average is below this (0: never wait)")
    parser.add_argument("--load-wait-s", type=float, default=30.0, help="seconds between load checks")
    parser.add_argument("--load-retries", type=non_negative_int, default=6, help="load checks before running anyway")
    parser.add_argument("--timeout-s", type=positive(float), default=3600.0, help="limit per engine job")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/bench_train.json)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out / committed result")
    # Internal: one rank of an engine job (started by the parent through python or torchrun).
    parser.add_argument("--worker", metavar="ENGINE", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--peer-source", type=Path, help=argparse.SUPPRESS)   # the patched arcface_torch copy
    parser.add_argument("--sample-rate", type=float, help=argparse.SUPPRESS)  # this job's (--peer arcface_torch)
    args = parser.parse_args(argv)
    if args.lr <= 0 or not math.isfinite(args.lr):
        parser.error(f"--lr must be a positive number, got {args.lr}")
    if args.peer == "bare" and args.sample_rates is not None:
        parser.error("--sample-rates needs --peer arcface_torch (the bare loop has no Partial FC sampling)")
    if args.peer == "bare" and args.precision == "fp16":
        parser.error("--precision fp16 needs --peer arcface_torch (the bare loop has no loss scaling)")
    if args.peer == "arcface_torch" and args.sample_rates is None:
        args.sample_rates = [1.0]
    return args


# ----- timers --------------------------------------------------------------------------------------------
class StepClock:
    """Wall time per phase of the step being recorded, and time inside collectives per phase.

    Only the outermost timed call counts (a phase inside a phase belongs to the outer one); on CUDA every
    phase boundary synchronises the device, the same for both sides, so that the split is the device's."""

    def __init__(self, sync=lambda: None):
        self.sync = sync
        self.recording = False
        self.current_phase: str | None = None
        self.in_collective = False
        self.phases: dict[str, float] = defaultdict(float)
        self.comm: dict[str, float] = defaultdict(float)
        self.collective_calls: dict[str, int] = defaultdict(int)
        self._start = self._cpu_start = 0.0

    def begin(self) -> None:
        self.phases, self.comm = defaultdict(float), defaultdict(float)
        self.sync()
        self.recording = True
        self._cpu_start = time.process_time()
        self._start = time.perf_counter()

    def end(self) -> tuple[float, float, dict, dict]:
        """(wall seconds, CPU seconds of this process, wall seconds per phase, collective seconds per phase)."""
        self.sync()
        total = time.perf_counter() - self._start
        cpu = time.process_time() - self._cpu_start
        self.recording = False
        phases = {name: self.phases.get(name, 0.0) for name in PHASES if name != "other"}
        phases["other"] = max(0.0, total - sum(phases.values()))
        return total, cpu, phases, dict(self.comm)

    def timed(self, phase: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not self.recording or self.current_phase is not None:
                return fn(*args, **kwargs)
            self.sync()
            self.current_phase = phase
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.phases[phase] += time.perf_counter() - start
                self.current_phase = None
        return wrapper

    def collective(self, name: str, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if not self.recording or self.in_collective:
                return fn(*args, **kwargs)
            self.in_collective = True
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.comm[self.current_phase or "other"] += time.perf_counter() - start
                self.collective_calls[name] += 1
                self.in_collective = False
        return wrapper


def install_collective_timers(clock: StepClock) -> None:
    """Wrap torch.distributed's collectives and Work.wait (async handles) before anything imports them by name."""
    import torch.distributed as dist
    import torch.distributed.distributed_c10d as c10d

    for name in COLLECTIVES:
        original = getattr(dist, name, None)
        if original is None:
            continue
        wrapped = clock.collective(name, original)
        setattr(dist, name, wrapped)
        if getattr(c10d, name, None) is original:
            setattr(c10d, name, wrapped)
    c10d.Work.wait = clock.collective("wait", c10d.Work.wait)


class MemoryMeter:
    """Peak memory of one step above what was resident before it: CUDA allocator figures on GPU; on CPU the
    process's resident set (VmHWM, whose high-water mark Linux resets through /proc/self/clear_refs)."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.can_reset_rss_peak = False
        if not self.cuda:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self.can_reset_rss_peak = self._status_mb("VmHWM") is not None
            except OSError:
                self.can_reset_rss_peak = False
        self.process_peak_mb = 0.0
        self.start_mb = self.current_mb()

    @staticmethod
    def _status_mb(field: str) -> float | None:
        try:
            match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
        except OSError:
            return None
        return int(match.group(1)) / 1024 if match else None

    def current_mb(self) -> float:
        if self.cuda:
            return self.torch.cuda.memory_allocated(self.device) / 2**20
        rss = self._status_mb("VmRSS")
        if rss is not None:
            return rss
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def peak_mb(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.can_reset_rss_peak:
            return self._status_mb("VmHWM")
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def reset_peak(self) -> float:
        """Start a new peak window; returns what is resident now."""
        self.process_peak_mb = max(self.process_peak_mb, self.peak_mb())
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats(self.device)
        elif self.can_reset_rss_peak:
            Path("/proc/self/clear_refs").write_text("5")
        return self.current_mb()

    def peak_since_reset_mb(self) -> float:
        peak = self.peak_mb()
        self.process_peak_mb = max(self.process_peak_mb, peak)
        return peak


# ----- one rank of an engine job ---------------------------------------------------------------------------
class InMemoryBatches:
    """Pre-made (images, labels) batches on the device, cycled: the data cost is a list lookup."""

    def __init__(self, images_KBCHW, labels_KB):
        self.images_KBCHW, self.labels_KB = images_KBCHW, labels_KB
        self.position = 0

    def batch(self, index: int):
        k = index % self.images_KBCHW.shape[0]
        return self.images_KBCHW[k], self.labels_KB[k]

    def next_batch(self):
        images, labels = self.batch(self.position)
        self.position += 1
        return images, labels

    def close(self) -> None:
        pass


def recipe_tree(args, engine: str, world_size: int, output_dir: Path, peer_init: Path | None = None) -> dict:
    """The toolkit side's recipe; with `peer_init` (--peer arcface_torch: the folder its initial weights are
    written to) also train_v2.py's head, clipping and sample rate, and their weights as the initial ones."""
    global_batch = args.batch_size * world_size
    tree = {
        "run": {"name": "bench_train", "output_dir": str(output_dir), "seed": 0, "trackers": [],
                "log_every": 1_000_000},
        "model": {"backbone": args.backbone, "embedding_size": args.embedding_size},
        "data": {"backend": "synthetic", "batch_size": args.batch_size, "image_size": args.image_size,
                 "num_workers": 0, "flip": False,
                 "synthetic": {"num_identities": args.num_classes,
                               "samples_per_identity": max(1, math.ceil(global_batch / args.num_classes)),
                               "num_val_identities": 2, "num_val_pairs": 20}},
        "optim": {"name": "sgd", "lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4, "reference_batch_size": 0},
        "schedule": {"decay": "constant", "warmup_steps": 0},
        "parallel": {**engine_overrides(engine), "precision": args.precision},
        "train": {"num_epochs": 1, "device": args.device},
        "eval": {"every_steps": 0},
        "checkpoint": {"every_steps": 0, "save_final": False},
    }
    if peer_init is not None:
        from arcface_torch_peer import CLIP_NORM

        tree["head"] = {**ARCFACE_TORCH_HEAD, "sample_rate": args.sample_rate}
        tree["parallel"]["clip_grad_norm"] = CLIP_NORM
        tree["train"].update(init_from=str(peer_init / "backbone.pth"), init_from_softmax=str(peer_init / "softmax"))
    return tree


def build_recipe(args, engine: str, world_size: int, scratch: Path, peer_init: Path | None = None):
    import yaml

    from toolkit.config import load_config

    path = scratch / "bench_recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_tree(args, engine, world_size, scratch, peer_init)))
    recipe = load_config(path, args.overrides)
    if recipe.contrastive.weight > 0 or recipe.head.weight <= 0:
        raise SystemExit(f"error: bench_train measures the margin-softmax step: contrastive.weight must be 0 "
                         f"(got {recipe.contrastive.weight}) and head.weight > 0 (got {recipe.head.weight})")
    if recipe.parallel.grad_accum_steps != 1:
        raise SystemExit(f"error: parallel.grad_accum_steps must be 1 here (got {recipe.parallel.grad_accum_steps}): "
                         "the bare loop takes one batch per step")
    if peer_init is not None:
        from arcface_torch_peer import SGD_MOMENTUM

        optim = recipe.optim
        unlike = [f"{what} {got}" for what, got, same in (
            ("optim.name", optim.name, optim.name == "sgd"), ("optim.momentum", optim.momentum,
                                                             optim.momentum == SGD_MOMENTUM),
            ("optim.nesterov", optim.nesterov, not optim.nesterov),
            ("head.lr_multiplier", recipe.head.lr_multiplier, recipe.head.lr_multiplier == 1.0),
            ("head.optimizer", recipe.head.optimizer, recipe.head.optimizer in ("same", "sgd"))) if not same]
        if unlike:
            raise SystemExit(f"error: --peer arcface_torch runs train_v2.py's SGD (momentum {SGD_MOMENTUM}, no "
                             f"Nesterov, one lr): the recipe has {', '.join(unlike)}")
    return recipe


def make_batches(args, rank: int, device):
    import torch

    generator = torch.Generator().manual_seed(1234 + rank)
    shape = (args.distinct_batches, args.batch_size, 3, args.image_size, args.image_size)
    images = torch.randn(shape, generator=generator).clamp_(-1, 1).to(device)
    labels = torch.randint(0, args.num_classes, (args.distinct_batches, args.batch_size), generator=generator)
    return InMemoryBatches(images, labels.to(device))


class BareModel:
    """The plain-PyTorch side: registry backbone, one unsharded centre matrix with the same margin softmax,
    plain SGD over both, autocast for bf16."""

    def __init__(self, recipe, backbone_state: dict, centers_CD, device):
        import torch
        from torch import nn

        from toolkit.models import create_backbone

        self.torch = torch
        cfg = recipe.model
        self.backbone = create_backbone(cfg.backbone, embedding_size=cfg.embedding_size, dropout=cfg.dropout,
                                        input_size=recipe.data.image_size).to(device)
        missing, unexpected = self.backbone.load_state_dict(backbone_state, strict=False)
        if missing or unexpected:
            raise SystemExit(f"error: the toolkit's backbone state does not fit a plain {cfg.backbone} (missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}); model options such as compile change "
                             "parameter names")
        self.backbone.train(True)
        self.centers_CD = nn.Parameter(centers_CD.to(device).clone())
        from toolkit.heads import Margin

        head = recipe.head

        self.margin = Margin(scale=head.scale, m1=head.margin_m1, m2=head.margin_m2, m3=head.margin_m3)
        optim = recipe.optim
        # The toolkit's rule (no weight decay on normalisation weights and biases) keeps the two sides' updates,
        # and so their losses, equal step after step.
        norm_types = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
        no_decay = [param for module in self.backbone.modules() if isinstance(module, norm_types)
                    for param in module.parameters(recurse=False)]
        no_decay += [module.bias for module in self.backbone.modules()
                     if isinstance(getattr(module, "bias", None), nn.Parameter) and not isinstance(module, norm_types)]
        no_decay_ids = {id(p) for p in no_decay}
        decay = [p for p in self.backbone.parameters() if id(p) not in no_decay_ids] + [self.centers_CD]
        self.optimizer = torch.optim.SGD([{"params": decay, "weight_decay": optim.weight_decay},
                                          {"params": no_decay, "weight_decay": 0.0}], lr=optim.lr,
                                         momentum=optim.momentum, nesterov=optim.nesterov)
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp32": None}[recipe.parallel.precision]
        self.device = device

    def forward(self, images):
        with self.torch.autocast(self.device.type, dtype=self.autocast_dtype or self.torch.float32,
                                 enabled=self.autocast_dtype is not None):
            return self.backbone(images)

    def head_loss(self, emb_BD, labels_B):
        """Mean margin-softmax cross-entropy over all classes, in fp32 like the toolkit's head."""
        import torch.nn.functional as F

        # The margin formula (CosFace / ArcFace / combined with its fallback) is the toolkit's, so that the two
        # sides compute the same loss; the rest is plain PyTorch.
        from toolkit.ops.margins import apply_margin_to_target

        torch = self.torch
        with torch.autocast(self.device.type, enabled=False):
            cos_BC = F.linear(F.normalize(emb_BD.float(), dim=1), F.normalize(self.centers_CD, dim=1))
            rows_B = torch.arange(labels_B.shape[0], device=labels_B.device)
            target_B = apply_margin_to_target(cos_BC[rows_B, labels_B], self.margin)
            logits_BC = cos_BC.index_put((rows_B, labels_B), target_B) * self.margin.scale
            return F.cross_entropy(logits_BC, labels_B)

    def train_step(self, batches: InMemoryBatches, clock: StepClock):
        images, labels = clock.timed("data", batches.next_batch)()
        emb = clock.timed("forward", self.forward)(images)
        loss = clock.timed("head", self.head_loss)(emb, labels)
        clock.timed("backward", loss.backward)()
        clock.timed("optimizer", self.optimizer.step)()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def instrument_trainer(trainer, clock: StepClock) -> None:
    """Timers around the calls train_step makes on its parts (instance attributes shadow the methods)."""
    trainer.stream.next_batch = clock.timed("data", trainer.stream.next_batch)
    trainer.backbone.forward = clock.timed("forward", trainer.backbone.forward)
    trainer.backbone.backward = clock.timed("backward", trainer.backbone.backward)
    trainer.head.loss = clock.timed("head", trainer.head.loss)
    for part in trainer.parts.values():
        part.step = clock.timed("optimizer", part.step)


def full_identity_centers(trainer):
    """Every rank's centre shard, in class order, on every rank (collective)."""
    import torch

    shard = trainer.head.module.shard
    mine = (shard.start, trainer.head.module.centers_CD.detach().cpu().clone())
    pieces = sorted(trainer.ctx.all_gather_objects(mine), key=lambda item: item[0])
    return torch.cat([piece for _, piece in pieces])


def start_arcface_torch(args, recipe, device, rank: int, say):
    """arcface_torch's step on this rank (after the toolkit's process group, if any, is up), its initial weights
    written to the job's folder for the toolkit side's train.init_from; every rank waits for every file."""
    import torch
    import torch.distributed as dist

    from arcface_torch_peer import ArcfaceTorchStep

    if not dist.is_initialized():
        # train_v2 wraps even one GPU in DDP over a one-rank process group; PartialFC_V2 asserts there is one.
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0,
                                world_size=1)
    say(f"building arcface_torch's step from {args.peer_source}")
    head = recipe.head
    peer = ArcfaceTorchStep(args.peer_source, backbone=recipe.model.backbone,
                            embedding_size=recipe.model.embedding_size, num_classes=args.num_classes,
                            sample_rate=head.sample_rate, scale=head.scale,
                            margins=(head.margin_m1, head.margin_m2, head.margin_m3),
                            interclass_filter=head.interclass_filter, lr=recipe.optim.lr,
                            weight_decay=recipe.optim.weight_decay, precision=recipe.parallel.precision,
                            device=device, seed=recipe.run.seed)
    peer.write_initial_weights(peer_init_folder(args), rank)
    torch.distributed.barrier()
    return peer


def peer_init_folder(args) -> Path:
    return args.worker_out / "arcface_torch_init"


def toolkit_centers_per_step(trainer) -> int:
    sampled = getattr(trainer.head.module, "last_sampled_classes", None)
    return int(sampled.numel()) if sampled is not None else int(trainer.head.module.shard.count)


def run_worker(args) -> int:
    engine = canonical_engine(args.worker)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    say = (lambda text: print(f"[{engine}] {text}", flush=True)) if rank == 0 else (lambda text: None)
    peer_name = args.peer

    import torch

    clock = StepClock()
    if world_size > 1:
        install_collective_timers(clock)   # before the toolkit and DeepSpeed import the collectives

    from toolkit.distributed import DistributedContext
    from toolkit.parallel import LaunchEnvironment
    from toolkit.training import builders
    from toolkit.training.trainer import Trainer

    scratch = Path(tempfile.mkdtemp(prefix=f"bench_train_rank{rank}_"))
    try:
        peer_init = peer_init_folder(args) if peer_name == "arcface_torch" else None
        recipe = build_recipe(args, engine, world_size, scratch, peer_init)
        device = builders.build_device(recipe, int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cpu":
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            torch.set_num_threads(args.threads or max(1, cores // world_size))
        if device.type == "cuda":
            clock.sync = lambda: torch.cuda.synchronize(device)
        memory = MemoryMeter(device)
        if engine == "single":
            ctx = DistributedContext(device=device)
        else:
            ctx = builders.start_distributed(recipe, LaunchEnvironment.from_env(os.environ))
        resident = {}
        peer = None
        if peer_name == "arcface_torch":
            before = memory.current_mb()
            peer = start_arcface_torch(args, recipe, device, rank, say)
            resident[peer_name] = memory.current_mb() - before
        say(f"building the toolkit's trainer ({recipe.model.backbone}, {world_size} rank(s), "
            f"{torch.get_num_threads()} thread(s)/rank, device {device})")
        before = memory.current_mb() if peer is not None else memory.start_mb
        trainer = Trainer(recipe, scratch / "run", ctx=ctx, verbose=False)
        trainer.stream.close()
        batches = make_batches(args, rank, device)
        trainer.stream = InMemoryBatches(batches.images_KBCHW, batches.labels_KB)
        resident["toolkit"] = memory.current_mb() - before
        if peer is None:
            say("building the bare loop from the toolkit's initial weights")
            before = memory.current_mb()
            peer = BareModel(recipe, trainer.backbone.full_state_dict(), full_identity_centers(trainer), device)
            resident[peer_name] = memory.current_mb() - before
        peer_batches = InMemoryBatches(batches.images_KBCHW, batches.labels_KB)
        instrument_trainer(trainer, clock)
        trainer.backbone.train(True)
        trainer.head.train(True)

        sides = {"toolkit": defaultdict(list), peer_name: defaultdict(list)}
        early_losses = {"toolkit": [], peer_name: []}   # the first two steps' losses of each side
        centers = {"toolkit": args.num_classes, peer_name: args.num_classes}   # this rank's, at the last step

        def run_side(side: str, measured: bool) -> float:
            ctx.barrier()
            resident = memory.reset_peak()
            clock.begin()
            loss = trainer.train_step() if side == "toolkit" else peer.train_step(peer_batches, clock)
            total, cpu, phases, comm = clock.end()
            peak = memory.peak_since_reset_mb() - resident
            loss_value = float(loss)
            if len(early_losses[side]) < 2:
                early_losses[side].append(loss_value)
            if side == "toolkit":
                centers[side] = toolkit_centers_per_step(trainer)
            elif peer_name == "arcface_torch":
                centers[side] = peer.centers_per_step()
            record = sides[side]
            if measured:
                record["step_s"].append(total)
                record["cpu_s"].append(cpu)
                record["phases_s"].append(phases)
                record["comm_s"].append(comm)
                record["loss"].append(loss_value)
                record["step_peak_mb"].append(peak)
            return total

        total_steps = args.warmup_steps + args.steps
        for step in range(total_steps):
            measured = step >= args.warmup_steps
            order = ("toolkit", peer_name) if step % 2 == 0 else (peer_name, "toolkit")
            times = {side: run_side(side, measured) for side in order}
            label = f"step {step - args.warmup_steps + 1}/{args.steps}" if measured else \
                f"warm-up {step + 1}/{args.warmup_steps}"
            say(f"{label}: toolkit {times['toolkit'] * 1e3:.1f} ms, {peer_name} {times[peer_name] * 1e3:.1f} ms "
                "(rank 0)")

        parameters = {"backbone": trainer.backbone.count_parameters(), "head": trainer.head.count_parameters()}
        if peer_name == "arcface_torch":
            parameters[peer_name] = peer.count_parameters()
        payload = {
            "rank": rank, "world_size": world_size, "engine": engine, "peer": peer_name,
            "engine_described": type(trainer.backbone).describe(recipe.parallel),
            "device": str(device), "threads": torch.get_num_threads(),
            "settings": {"sample_rate": recipe.head.sample_rate, "scale": recipe.head.scale,
                         "margins": [recipe.head.margin_m1, recipe.head.margin_m2, recipe.head.margin_m3],
                         "lr": recipe.optim.lr, "momentum": recipe.optim.momentum,
                         "weight_decay": recipe.optim.weight_decay,
                         "clip_grad_norm": recipe.parallel.clip_grad_norm},
            "parameters": parameters,
            "centers_per_step": centers,
            "early_losses": early_losses,
            "skipped_steps": trainer.num_skipped_steps,
            "collective_calls": dict(clock.collective_calls),
            "memory": {"kind": "cuda_allocated" if device.type == "cuda" else "rss",
                       "rss_peak_resettable": memory.can_reset_rss_peak,
                       "at_start_mb": memory.start_mb,
                       **{f"{side}_resident_after_build_mb": mb for side, mb in resident.items()},
                       "process_peak_increase_mb": max(memory.process_peak_mb, memory.peak_mb()) - memory.start_mb},
            "sides": {side: dict(values) for side, values in sides.items()},
        }
        args.worker_out.mkdir(parents=True, exist_ok=True)
        (args.worker_out / f"rank{rank:03d}.json").write_text(json.dumps(payload))
        ctx.barrier()
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


# ----- the parent: one job per engine, then the tables ----------------------------------------------------
def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def wait_for_quiet_machine(max_load: float, wait_s: float, retries: int) -> dict:
    """Wait (up to `retries` checks) until the 1-minute load average is below max_load."""
    checks = [load_average()]
    while max_load > 0 and checks[-1][0] >= max_load and len(checks) <= retries:
        print(f"load average {checks[-1]} >= {max_load}: waiting {wait_s:.0f} s "
              f"(check {len(checks)}/{retries})", flush=True)
        time.sleep(wait_s)
        checks.append(load_average())
    quiet = max_load <= 0 or checks[-1][0] < max_load
    if not quiet:
        print(f"warning: load average still {checks[-1]} after {retries} checks; measuring anyway", flush=True)
    return {"checks": checks, "below_max_load": quiet}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_argv(args, engine: str, out_dir: Path, sample_rate: float | None = None) -> list[str]:
    argv = ["--worker", engine, "--worker-out", str(out_dir), "--backbone", args.backbone,
            "--precision", args.precision, "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
            "--num-classes", str(args.num_classes), "--embedding-size", str(args.embedding_size),
            "--warmup-steps", str(args.warmup_steps), "--steps", str(args.steps),
            "--distinct-batches", str(args.distinct_batches), "--lr", repr(args.lr), "--device", args.device,
            "--threads", str(args.threads), "--peer", args.peer]
    if args.peer == "arcface_torch":
        argv += ["--peer-source", str(args.peer_source), "--sample-rate", repr(sample_rate)]
    for item in args.overrides:
        argv += ["--set", item]
    return argv


def run_engine_job(args, engine: str, sample_rate: float | None = None) -> dict:
    """One job: `engine` on its ranks; with --peer arcface_torch at Partial FC sample rate `sample_rate`."""
    ranks = 1 if engine == "single" else args.ranks
    out_dir = Path(tempfile.mkdtemp(prefix=f"bench_train_{engine.replace(':', '')}_"))
    port = free_port()
    script = str(Path(__file__).resolve())
    if ranks == 1:
        command = [sys.executable, script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", script]
    command += worker_argv(args, engine, out_dir, sample_rate)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    threads = args.threads or max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                      else (os.cpu_count() or 1)) // ranks)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    if ranks > 1:
        env["OMP_NUM_THREADS"] = str(threads)
    if not _cuda_wanted(args):
        env.setdefault("DS_ACCELERATOR", "cpu")
    rate = f", sample rate {sample_rate:g}" if sample_rate is not None else ""
    print(f"== {engine}: {ranks} rank(s), {args.backbone}, batch {args.batch_size}/rank, {args.image_size}px, "
          f"{args.precision}{rate}, toolkit vs {args.peer}; load average {load_average()}", flush=True)
    load_before = load_average()
    started = time.perf_counter()
    stderr_path = out_dir / "stderr.txt"
    try:
        with open(stderr_path, "w") as stderr:
            proc = subprocess.run(command, cwd=REPO, env=env, stderr=stderr, timeout=args.timeout_s)
        status = proc.returncode
    except subprocess.TimeoutExpired:
        status = f"timeout after {args.timeout_s:.0f} s"
    finally:
        for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
            path.unlink(missing_ok=True)
    wall_s = time.perf_counter() - started
    rank_files = sorted(out_dir.glob("rank*.json"))
    job = {"engine": engine, "ranks": ranks, **({"sample_rate": sample_rate} if sample_rate is not None else {}),
           "wall_s": round(wall_s, 1), "load_average_before": load_before, "load_average_after": load_average()}
    if status != 0 or len(rank_files) != ranks:
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-25:]
        print(f"error: engine {engine}{rate} failed ({status}); last lines of its stderr:\n  " + "\n  ".join(tail),
              flush=True)
        shutil.rmtree(out_dir, ignore_errors=True)
        return {**job, "error": f"exit status {status}", "stderr_tail": tail}
    per_rank = [json.loads(path.read_text()) for path in rank_files]
    shutil.rmtree(out_dir, ignore_errors=True)
    return {**job, **summarise(per_rank, args)}


def _cuda_wanted(args) -> bool:
    if args.device == "cpu":
        return False
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _ms(seconds: float) -> float:
    return round(seconds * 1e3, 2)


def summarise(per_rank: list[dict], args) -> dict:
    """One job's figures from its ranks: a step lasts as long as its slowest rank."""
    ranks = len(per_rank)
    first = per_rank[0]
    peer = first["peer"]
    # arcface_torch's loss is the global-batch mean on every rank, as the toolkit's; each bare replica's is its own.
    peer_loss_is_global = peer != "bare"
    summary = {"engine_described": first["engine_described"], "device": first["device"],
               "threads_per_rank": first["threads"], "parameters": first["parameters"],
               "settings": first["settings"], "global_batch": args.batch_size * ranks}
    for side in ("toolkit", peer):
        steps = [max(r["sides"][side]["step_s"][i] for r in per_rank) for i in range(args.steps)]
        phase_means = {}
        for phase in PHASES:
            values = [r["sides"][side]["phases_s"][i][phase] for r in per_rank for i in range(args.steps)]
            phase_means[phase] = _ms(statistics.fmean(values))
        comm_by_phase = defaultdict(float)
        for r in per_rank:
            for comm in r["sides"][side]["comm_s"]:
                for phase, seconds in comm.items():
                    comm_by_phase[phase] += seconds / (ranks * args.steps)
        mean_step = statistics.fmean(steps)
        cpu_steps = [max(r["sides"][side]["cpu_s"][i] for r in per_rank) for i in range(args.steps)]
        summary[side] = {
            "step_ms_per_step": [_ms(s) for s in steps],
            "mean_step_ms": _ms(mean_step), "median_step_ms": _ms(statistics.median(steps)),
            "samples_per_s": round(args.batch_size * ranks / mean_step, 2),
            "cpu_ms_per_step": [_ms(s) for s in cpu_steps],
            "split_ms": phase_means,
            "comm_ms_by_phase": {phase: _ms(v) for phase, v in sorted(comm_by_phase.items())},
            "comm_ms": _ms(sum(comm_by_phase.values())),
            "step_peak_increase_mb_per_rank": [round(max(r["sides"][side]["step_peak_mb"]), 1) for r in per_rank],
            "resident_after_build_mb_per_rank": [round(r["memory"][f"{side}_resident_after_build_mb"], 1)
                                                 for r in per_rank],
            "centers_per_step_per_rank": [r["centers_per_step"][side] for r in per_rank],
            "losses": per_rank[0]["sides"][side]["loss"] if side == "toolkit" or peer_loss_is_global else
            [round(statistics.fmean(r["sides"][side]["loss"][i] for r in per_rank), 6) for i in range(args.steps)],
        }
    ratios = [t / b for t, b in zip(summary["toolkit"]["step_ms_per_step"], summary[peer]["step_ms_per_step"])]
    summary[f"ratio_toolkit_to_{peer}_median"] = round(statistics.median(ratios), 4)
    summary["ratio_per_step"] = [round(r, 4) for r in ratios]
    # Process CPU time (all threads) per step: much less sensitive than wall time to other jobs on a shared
    # machine (it still counts OpenMP spin-waiting and cache effects of the neighbours).
    cpu_ratios = [t / b for t, b in zip(summary["toolkit"]["cpu_ms_per_step"], summary[peer]["cpu_ms_per_step"])]
    summary[f"cpu_time_ratio_toolkit_to_{peer}_median"] = round(statistics.median(cpu_ratios), 4)

    def early(side: str, step: int) -> float:
        if side == "toolkit" or peer_loss_is_global:       # the global-batch mean, same on every rank
            return first["early_losses"][side][step]
        return statistics.fmean(r["early_losses"][side][step] for r in per_rank)   # mean of the ranks' means

    summary["first_step_loss"] = {"toolkit": early("toolkit", 0), peer: early(peer, 0),
                                  "abs_diff": abs(early("toolkit", 0) - early(peer, 0))}
    if (ranks == 1 or peer_loss_is_global) and min(len(v) for v in first["early_losses"].values()) > 1:
        # After the first update. Against the bare loop: equal only on one rank (several bare replicas each step on
        # their own batch, the engine on the global one). Against arcface_torch: not equal (its margin gradient and
        # clipping differ; see the differences). Rounding differences grow from here on: later steps not compared.
        summary["second_step_loss"] = {"toolkit": early("toolkit", 1), peer: early(peer, 1),
                                       "abs_diff": abs(early("toolkit", 1) - early(peer, 1))}
    summary["memory"] = {"kind": first["memory"]["kind"], "rss_peak_resettable": first["memory"]["rss_peak_resettable"],
                         "process_peak_increase_mb_per_rank": [round(r["memory"]["process_peak_increase_mb"], 1)
                                                               for r in per_rank]}
    summary["skipped_steps"] = first["skipped_steps"]
    summary["collective_calls_rank0"] = first["collective_calls"]
    summary["not_separable"] = WHAT_IS_NOT_SEPARABLE[first["engine"]]
    return summary


def markdown_table(payload: dict) -> str:
    if payload["setup"].get("peer", "bare") != "bare":
        return peer_markdown_table(payload)
    setup = payload["setup"]
    lines = [f"bench_train: {setup['backbone']}, {setup['image_size']}x{setup['image_size']}, batch "
             f"{setup['batch_size']}/rank, {setup['precision']}, {setup['num_classes']} classes, "
             f"{setup['warmup_steps']} warm-up + {setup['steps']} measured steps per side; "
             f"{payload['machine']['cpu_cores']} CPU cores; load average {payload['load_average']['at_start']} at "
             f"start",
             "",
             "| engine | ranks | samples/s | toolkit ms/step | bare ms/step | toolkit/bare (median) | CPU-time ratio | "
             "data | forward | head | backward | optimizer | other | comm (inside) | step peak mem Δ/rank MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    notes = []
    for job in payload["engines"]:
        if "error" in job:
            lines.append(f"| {job['engine']} | {job['ranks']} | failed: {job['error']} |" + " |" * 12)
            continue
        tk, split = job["toolkit"], job["toolkit"]["split_ms"]
        peak = "/".join(f"{v:.0f}" for v in tk["step_peak_increase_mb_per_rank"])
        lines.append(f"| {job['engine']} | {job['ranks']} | {tk['samples_per_s']:.1f} | {tk['mean_step_ms']:.1f} | "
                     f"{job['bare']['mean_step_ms']:.1f} | {job['ratio_toolkit_to_bare_median']:.3f} | "
                     f"{job['cpu_time_ratio_toolkit_to_bare_median']:.3f} | "
                     + " | ".join(f"{split[p]:.1f}" for p in PHASES)
                     + f" | {tk['comm_ms']:.1f} | {peak} |")
        notes.append(f"- {job['engine']}: {job['not_separable']}; first-step loss toolkit "
                     f"{job['first_step_loss']['toolkit']:.6f} vs bare {job['first_step_loss']['bare']:.6f}")
    lines += ["", "Ratios are medians over steps of toolkit / bare (wall time of the slowest rank; 'CPU-time ratio': "
              "process CPU time, less disturbed by other jobs). Split columns are the toolkit's mean ms per phase; "
              "'comm' is time inside collectives, already counted in the phase it happened in. Bare split and "
              "per-step figures are in the JSON.", "", *notes]
    return "\n".join(lines) + "\n"


def peer_markdown_table(payload: dict) -> str:
    """The toolkit against arcface_torch: throughput of both and their ratio, then each side's split."""
    setup, peer = payload["setup"], payload["peer"]
    name = peer["name"]
    done = [job for job in payload["engines"] if "error" not in job]
    settings = ""
    if done:
        s = done[0]["settings"]
        settings = (f", margin s={s['scale']:g} m=({', '.join(f'{m:g}' for m in s['margins'])}), SGD lr {s['lr']:g} "
                    f"momentum {s['momentum']:g} weight decay {s['weight_decay']:g}, clipping {s['clip_grad_norm']:g}")
    commit = (peer.get("commit") or "unknown commit")[:10]
    lines = [f"bench_train, toolkit vs {name} ({peer['code']} at insightface {commit}, run from a temporary copy): "
             f"{setup['backbone']}, {setup['image_size']}x{setup['image_size']}, batch {setup['batch_size']}/rank, "
             f"{setup['precision']}, {setup['num_classes']} classes{settings}; {setup['warmup_steps']} warm-up + "
             f"{setup['steps']} measured steps per side, alternating; {payload['machine']['cpu_cores']} CPU cores"
             + (f", {payload['machine']['cuda']}" if payload["machine"].get("cuda") else "")
             + f"; load average {payload['load_average']['at_start']} at start",
             "",
             f"| engine | ranks | sample rate | toolkit samples/s | {name} samples/s | step time toolkit/{name} "
             f"(median) | CPU-time ratio | centers/rank/step toolkit / {name} | first-step loss toolkit / {name} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for job in payload["engines"]:
        rate = job.get("sample_rate", 1.0)
        if "error" in job:
            lines.append(f"| {job['engine']} | {job['ranks']} | {rate:g} | failed: {job['error']} |" + " |" * 5)
            continue
        tk, other = job["toolkit"], job[name]
        loss = job["first_step_loss"]
        lines.append(f"| {job['engine']} | {job['ranks']} | {rate:g} | {tk['samples_per_s']:.2f} | "
                     f"{other['samples_per_s']:.2f} | {job[f'ratio_toolkit_to_{name}_median']:.3f} | "
                     f"{job[f'cpu_time_ratio_toolkit_to_{name}_median']:.3f} | "
                     f"{tk['centers_per_step_per_rank'][0]} / {other['centers_per_step_per_rank'][0]} | "
                     f"{loss['toolkit']:.6f} / {loss[name]:.6f} |")
    lines += ["", "Mean ms per phase (each side's mean over ranks and steps; 'comm': time inside collectives, already "
              "counted in its phase):", "",
              "| engine | ranks | sample rate | side | ms/step | data | forward | head | backward | optimizer | other | "
              "comm (inside) | step peak mem Δ/rank MB |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for job in payload["engines"]:
        if "error" in job:
            continue
        for side in ("toolkit", name):
            figures = job[side]
            peak = "/".join(f"{v:.0f}" for v in figures["step_peak_increase_mb_per_rank"])
            lines.append(f"| {job['engine']} | {job['ranks']} | {job.get('sample_rate', 1.0):g} | {side} | "
                         f"{figures['mean_step_ms']:.1f} | "
                         + " | ".join(f"{figures['split_ms'][p]:.1f}" for p in PHASES)
                         + f" | {figures['comm_ms']:.1f} | {peak} |")
    lines += ["", f"Ratios are medians over steps of toolkit / {name} step time (wall time of the slowest rank; below 1: "
              "the toolkit is faster; 'CPU-time ratio': process CPU time, less disturbed by other jobs). At sample "
              "rate 1 both sides compute the same first-step loss from the same weights and batch; below 1 their "
              "random negatives differ.", "",
              f"Patches to {name}'s files (temporary copy; nothing else changed):",
              *[f"- {patch['file']}: `{patch['old']}` -> `{patch['new']}`: {patch['why']}" for patch in peer["patches"]],
              *(["- none"] if not peer["patches"] else []), "",
              "Its train_v2.py step, restated around its modules, differs from train_v2.py in:",
              *[f"- {note}" for note in peer["train_v2_deviations"]], "",
              "What the two steps do differently:", *[f"- {note}" for note in peer["step_differences"]]]
    return "\n".join(lines) + "\n"


METHOD_COMMON = ("the sides alternate per step (order flipped every step); step time = slowest rank; ratio = median "
                 "over steps of toolkit/{peer} (also of process CPU time per step, which other jobs disturb less). "
                 "Memory: per-step peak above the resident set before the step (CPU: VmHWM reset via "
                 "/proc/self/clear_refs; CUDA: max_memory_allocated).")
METHOD = {
    "bare": ("toolkit: Trainer.train_step() of a Trainer built from the recipe (engine, sharded head, optimizers) "
             "with its data stream replaced by pre-made batches; bare: the registry backbone + the same margin "
             "softmax on one unsharded centre matrix + torch.optim.SGD, same initial weights and batches; "
             + METHOD_COMMON.format(peer="bare")),
    "arcface_torch": ("toolkit: Trainer.train_step() of a Trainer built from the recipe (engine, sharded head, "
                      "optimizers) with its data stream replaced by pre-made batches, started from arcface_torch's "
                      "initial weights (train.init_from: their backbone.pth, train.init_from_softmax: their per-rank "
                      "Partial FC weights); arcface_torch: its train_v2.py step (DDP iresnet, PartialFC_V2 + "
                      "CombinedMarginLoss, SGD, clip_grad_norm_(backbone, 5), PolynomialLRWarmup) around its own "
                      "modules imported from a patched temporary copy (see peer.patches), on every rank; same "
                      "batches, classes, sample rate, margins, lr, momentum, weight decay and clipping; "
                      + METHOD_COMMON.format(peer="arcface_torch")),
}


def prepare_arcface_torch(args) -> tuple[Path, dict, Path]:
    """The patched copy of arcface_torch the workers import (its folder, what the JSON records, what to remove)."""
    from arcface_torch_peer import NETWORKS, STEP_DIFFERENCES, prepare_copy

    if args.backbone not in NETWORKS:
        raise SystemExit(f"error: --peer arcface_torch: arcface_torch has no network for --backbone {args.backbone}; "
                         f"use one of {', '.join(NETWORKS)}")
    if args.image_size % 16:
        raise SystemExit(f"error: --peer arcface_torch: --image-size must be a multiple of 16 (their iresnet's fc "
                         f"layer sees size/16 squared positions), got {args.image_size}")
    cuda = _cuda_wanted(args)
    if args.precision == "fp16" and not cuda:
        raise SystemExit("error: --precision fp16 needs a GPU (fp16 autocast with loss scaling); use fp32 or bf16")
    folder = Path(tempfile.mkdtemp(prefix="bench_train_arcface_torch_"))
    try:
        source, info = prepare_copy(folder, device_type="cuda" if cuda else "cpu", precision=args.precision,
                                    image_size=args.image_size)
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    info["step_differences"] = STEP_DIFFERENCES
    print(f"arcface_torch: {info['code']} of {info['repository']} (commit {info['commit'] or 'unknown'}) copied to "
          f"{source}; {len(info['patches'])} patch(es):", flush=True)
    for patch in info["patches"]:
        print(f"  - {patch['file']}: {patch['old']!r} -> {patch['new']!r}: {patch['why']}", flush=True)
    return source, info, folder


def run_parent(args) -> int:
    engines = [canonical_engine(name) for name in args.engines.split(",") if name.strip()]
    if not engines:
        raise SystemExit(f"error: --engines {args.engines!r} names no engine")
    if args.ranks < 2 and any(e != "single" for e in engines):
        print(f"note: --ranks {args.ranks}: the multi-rank engines run as a process group of one", flush=True)
    peer_copy = None
    if args.peer == "arcface_torch":
        args.peer_source, peer_info, peer_copy = prepare_arcface_torch(args)
        out_path = results_path(args.out, "bench_train_arcface_torch", overwrite=args.overwrite)
    else:
        out_path = results_path(args.out, "bench_train", overwrite=args.overwrite)
    try:
        load = wait_for_quiet_machine(args.max_load, args.load_wait_s, args.load_retries)
        import torch

        if args.peer == "arcface_torch":
            jobs = [run_engine_job(args, engine, rate) for engine in engines for rate in args.sample_rates]
        else:
            jobs = [run_engine_job(args, engine) for engine in engines]
    finally:
        if peer_copy is not None:
            shutil.rmtree(peer_copy, ignore_errors=True)
    payload = {
        "benchmark": "bench_train",
        "setup": {"backbone": args.backbone, "engines": engines, "ranks": args.ranks, "precision": args.precision,
                  "batch_size": args.batch_size, "image_size": args.image_size, "num_classes": args.num_classes,
                  "embedding_size": args.embedding_size, "warmup_steps": args.warmup_steps, "steps": args.steps,
                  "distinct_batches": args.distinct_batches, "lr": args.lr, "overrides": args.overrides,
                  "peer": args.peer, **({"sample_rates": args.sample_rates} if args.peer != "bare" else {}),
                  "data": "pre-made in-memory tensors (no decoding)"},
        "machine": {"cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "load_average": {"at_start": load["checks"][-1], "checks_before_start": load["checks"],
                         "below_max_load_at_start": load["below_max_load"], "max_load": args.max_load,
                         "at_end": load_average()},
        "method": METHOD[args.peer],
        **({"peer": peer_info} if args.peer != "bare" else {}),
        "engines": jobs,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(payload, indent=1) + "\n")
    table = markdown_table(payload)
    out_path.with_suffix(".md").write_text(table)
    print()
    print(table, end="")
    print(f"\nwrote {out_path} and {out_path.with_suffix('.md')}")
    return 1 if any("error" in job for job in jobs) else 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        if args.worker_out is None:
            raise SystemExit("error: --worker needs --worker-out")
        return run_worker(args)
    return run_parent(args)


if __name__ == "__main__":
    sys.exit(main())
