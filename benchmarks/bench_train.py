# End-to-end training throughput: the toolkit's own step (Trainer.train_step on each engine) against a bare PyTorch loop.
"""Measures what a user's training job spends per optimizer step, without data decoding.

    python benchmarks/bench_train.py --backbone iresnet50 --engines single --batch-size 32
    python benchmarks/bench_train.py --backbone mobilefacenet --engines ddp,deepspeed:1,deepspeed:2,deepspeed:3,fsdp \\
        --ranks 2 --batch-size 16

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


def parse_args(argv=None) -> argparse.Namespace:
    parser = CommandParser(description="Training throughput of the toolkit's step vs a bare PyTorch loop "
                                                 "(synthetic in-memory batches).")
    parser.add_argument("--backbone", default="iresnet50", help="registered backbone name (toolkit/models)")
    parser.add_argument("--engines", default="single",
                        help="comma-separated: single, ddp, fsdp, deepspeed:N (ZeRO stage N; zero1..3 and fsdp2 "
                             "accepted too)")
    parser.add_argument("--ranks", type=positive(int), default=2, help="ranks of each multi-rank engine")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="training precision")
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
    args = parser.parse_args(argv)
    if args.lr <= 0 or not math.isfinite(args.lr):
        parser.error(f"--lr must be a positive number, got {args.lr}")
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


def recipe_tree(args, engine: str, world_size: int, output_dir: Path) -> dict:
    global_batch = args.batch_size * world_size
    return {
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


def build_recipe(args, engine: str, world_size: int, scratch: Path):
    import yaml

    from toolkit.config import load_config

    path = scratch / "bench_recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_tree(args, engine, world_size, scratch)))
    recipe = load_config(path, args.overrides)
    if recipe.contrastive.weight > 0 or recipe.head.weight <= 0:
        raise SystemExit(f"error: bench_train measures the margin-softmax step: contrastive.weight must be 0 "
                         f"(got {recipe.contrastive.weight}) and head.weight > 0 (got {recipe.head.weight})")
    if recipe.parallel.grad_accum_steps != 1:
        raise SystemExit(f"error: parallel.grad_accum_steps must be 1 here (got {recipe.parallel.grad_accum_steps}): "
                         "the bare loop takes one batch per step")
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


def run_worker(args) -> int:
    engine = canonical_engine(args.worker)
    rank = int(os.environ.get("RANK", "0"))
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    say = (lambda text: print(f"[{engine}] {text}", flush=True)) if rank == 0 else (lambda text: None)

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
        recipe = build_recipe(args, engine, world_size, scratch)
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
        say(f"building the toolkit's trainer ({recipe.model.backbone}, {world_size} rank(s), "
            f"{torch.get_num_threads()} thread(s)/rank, device {device})")
        trainer = Trainer(recipe, scratch / "run", ctx=ctx, verbose=False)
        trainer.stream.close()
        batches = make_batches(args, rank, device)
        trainer.stream = InMemoryBatches(batches.images_KBCHW, batches.labels_KB)
        toolkit_resident_mb = memory.current_mb() - memory.start_mb
        say("building the bare loop from the toolkit's initial weights")
        before_bare = memory.current_mb()
        bare = BareModel(recipe, trainer.backbone.full_state_dict(), full_identity_centers(trainer), device)
        bare_resident_mb = memory.current_mb() - before_bare
        bare_batches = InMemoryBatches(batches.images_KBCHW, batches.labels_KB)
        instrument_trainer(trainer, clock)
        trainer.backbone.train(True)
        trainer.head.train(True)

        sides = {"toolkit": defaultdict(list), "bare": defaultdict(list)}
        early_losses = {"toolkit": [], "bare": []}   # the first two steps' losses of each side

        def run_side(side: str, measured: bool) -> float:
            ctx.barrier()
            resident = memory.reset_peak()
            clock.begin()
            loss = trainer.train_step() if side == "toolkit" else bare.train_step(bare_batches, clock)
            total, cpu, phases, comm = clock.end()
            peak = memory.peak_since_reset_mb() - resident
            loss_value = float(loss)
            if len(early_losses[side]) < 2:
                early_losses[side].append(loss_value)
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
            order = ("toolkit", "bare") if step % 2 == 0 else ("bare", "toolkit")
            times = {side: run_side(side, measured) for side in order}
            label = f"step {step - args.warmup_steps + 1}/{args.steps}" if measured else \
                f"warm-up {step + 1}/{args.warmup_steps}"
            say(f"{label}: toolkit {times['toolkit'] * 1e3:.1f} ms, bare {times['bare'] * 1e3:.1f} ms (rank 0)")

        payload = {
            "rank": rank, "world_size": world_size, "engine": engine,
            "engine_described": type(trainer.backbone).describe(recipe.parallel),
            "device": str(device), "threads": torch.get_num_threads(),
            "parameters": {"backbone": trainer.backbone.count_parameters(),
                           "head": trainer.head.count_parameters()},
            "early_losses": early_losses,
            "skipped_steps": trainer.num_skipped_steps,
            "collective_calls": dict(clock.collective_calls),
            "memory": {"kind": "cuda_allocated" if device.type == "cuda" else "rss",
                       "rss_peak_resettable": memory.can_reset_rss_peak,
                       "at_start_mb": memory.start_mb,
                       "toolkit_resident_after_build_mb": toolkit_resident_mb,
                       "bare_resident_after_build_mb": bare_resident_mb,
                       "process_peak_increase_mb": max(memory.process_peak_mb, memory.peak_mb()) - memory.start_mb},
            "sides": {side: dict(values) for side, values in sides.items()},
        }
        args.worker_out.mkdir(parents=True, exist_ok=True)
        (args.worker_out / f"rank{rank:03d}.json").write_text(json.dumps(payload))
        ctx.barrier()
        if ctx.is_distributed and torch.distributed.is_initialized():
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


def worker_argv(args, engine: str, out_dir: Path) -> list[str]:
    argv = ["--worker", engine, "--worker-out", str(out_dir), "--backbone", args.backbone,
            "--precision", args.precision, "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
            "--num-classes", str(args.num_classes), "--embedding-size", str(args.embedding_size),
            "--warmup-steps", str(args.warmup_steps), "--steps", str(args.steps),
            "--distinct-batches", str(args.distinct_batches), "--lr", repr(args.lr), "--device", args.device,
            "--threads", str(args.threads)]
    for item in args.overrides:
        argv += ["--set", item]
    return argv


def run_engine_job(args, engine: str) -> dict:
    ranks = 1 if engine == "single" else args.ranks
    out_dir = Path(tempfile.mkdtemp(prefix=f"bench_train_{engine.replace(':', '')}_"))
    port = free_port()
    script = str(Path(__file__).resolve())
    if ranks == 1:
        command = [sys.executable, script]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", script]
    command += worker_argv(args, engine, out_dir)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    threads = args.threads or max(1, (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                      else (os.cpu_count() or 1)) // ranks)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    if ranks > 1:
        env["OMP_NUM_THREADS"] = str(threads)
    if not _cuda_wanted(args):
        env.setdefault("DS_ACCELERATOR", "cpu")
    print(f"== {engine}: {ranks} rank(s), {args.backbone}, batch {args.batch_size}/rank, {args.image_size}px, "
          f"{args.precision}; load average {load_average()}", flush=True)
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
    job = {"engine": engine, "ranks": ranks, "wall_s": round(wall_s, 1), "load_average_before": load_before,
           "load_average_after": load_average()}
    if status != 0 or len(rank_files) != ranks:
        tail = stderr_path.read_text(errors="replace").strip().splitlines()[-25:]
        print(f"error: engine {engine} failed ({status}); last lines of its stderr:\n  " + "\n  ".join(tail),
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
    """One engine's figures from its ranks: a step lasts as long as its slowest rank."""
    ranks = len(per_rank)
    first = per_rank[0]
    summary = {"engine_described": first["engine_described"], "device": first["device"],
               "threads_per_rank": first["threads"], "parameters": first["parameters"],
               "global_batch": args.batch_size * ranks}
    for side in ("toolkit", "bare"):
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
            "losses": per_rank[0]["sides"][side]["loss"] if side == "toolkit" else
            [round(statistics.fmean(r["sides"][side]["loss"][i] for r in per_rank), 6) for i in range(args.steps)],
        }
    ratios = [t / b for t, b in zip(summary["toolkit"]["step_ms_per_step"], summary["bare"]["step_ms_per_step"])]
    summary["ratio_toolkit_to_bare_median"] = round(statistics.median(ratios), 4)
    summary["ratio_per_step"] = [round(r, 4) for r in ratios]
    # Process CPU time (all threads) per step: much less sensitive than wall time to other jobs on a shared
    # machine (it still counts OpenMP spin-waiting and cache effects of the neighbours).
    cpu_ratios = [t / b for t, b in zip(summary["toolkit"]["cpu_ms_per_step"], summary["bare"]["cpu_ms_per_step"])]
    summary["cpu_time_ratio_toolkit_to_bare_median"] = round(statistics.median(cpu_ratios), 4)
    toolkit_first = first["early_losses"]["toolkit"][0]                 # the global-batch mean, same on every rank
    bare_first = statistics.fmean(r["early_losses"]["bare"][0] for r in per_rank)   # mean of the ranks' means
    summary["first_step_loss"] = {"toolkit": toolkit_first, "bare": bare_first,
                                  "abs_diff": abs(toolkit_first - bare_first)}
    if ranks == 1 and len(first["early_losses"]["toolkit"]) > 1:
        # After the first update: equal only on one rank (several bare replicas each step on their own batch,
        # the engine on the global one). Rounding differences grow from here on, so later steps are not compared.
        toolkit_second, bare_second = first["early_losses"]["toolkit"][1], first["early_losses"]["bare"][1]
        summary["second_step_loss"] = {"toolkit": toolkit_second, "bare": bare_second,
                                       "abs_diff": abs(toolkit_second - bare_second)}
    summary["memory"] = {"kind": first["memory"]["kind"], "rss_peak_resettable": first["memory"]["rss_peak_resettable"],
                         "process_peak_increase_mb_per_rank": [round(r["memory"]["process_peak_increase_mb"], 1)
                                                               for r in per_rank]}
    summary["skipped_steps"] = first["skipped_steps"]
    summary["collective_calls_rank0"] = first["collective_calls"]
    summary["not_separable"] = WHAT_IS_NOT_SEPARABLE[first["engine"]]
    return summary


def markdown_table(payload: dict) -> str:
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


def run_parent(args) -> int:
    engines = [canonical_engine(name) for name in args.engines.split(",") if name.strip()]
    if not engines:
        raise SystemExit(f"error: --engines {args.engines!r} names no engine")
    if args.ranks < 2 and any(e != "single" for e in engines):
        print(f"note: --ranks {args.ranks}: the multi-rank engines run as a process group of one", flush=True)
    out_path = results_path(args.out, "bench_train", overwrite=args.overwrite)
    load = wait_for_quiet_machine(args.max_load, args.load_wait_s, args.load_retries)
    import torch

    jobs = [run_engine_job(args, engine) for engine in engines]
    payload = {
        "benchmark": "bench_train",
        "setup": {"backbone": args.backbone, "engines": engines, "ranks": args.ranks, "precision": args.precision,
                  "batch_size": args.batch_size, "image_size": args.image_size, "num_classes": args.num_classes,
                  "embedding_size": args.embedding_size, "warmup_steps": args.warmup_steps, "steps": args.steps,
                  "distinct_batches": args.distinct_batches, "lr": args.lr, "overrides": args.overrides,
                  "data": "pre-made in-memory tensors (no decoding)"},
        "machine": {"cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "load_average": {"at_start": load["checks"][-1], "checks_before_start": load["checks"],
                         "below_max_load_at_start": load["below_max_load"], "max_load": args.max_load,
                         "at_end": load_average()},
        "method": ("toolkit: Trainer.train_step() of a Trainer built from the recipe (engine, sharded head, optimizers) "
                   "with its data stream replaced by pre-made batches; bare: the registry backbone + the same margin "
                   "softmax on one unsharded centre matrix + torch.optim.SGD, same initial weights and batches; the "
                   "sides alternate per step (order flipped every step); step time = slowest rank; ratio = median "
                   "over steps of toolkit/bare (also of process CPU time per step, which other jobs disturb less). Memory: per-step peak above the resident set before the step (CPU: "
                   "VmHWM reset via /proc/self/clear_refs; CUDA: max_memory_allocated)."),
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
