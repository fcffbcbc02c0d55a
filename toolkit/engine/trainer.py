# The training loop: micro-steps with accumulation, mixed precision, clipping, logging, eval and checkpoints.
"""Trainer for the two parts of a face-recognition model.

Part 1, the engine part: the backbone (later also projection head and momentum encoder), wrapped by the
recipe's engine (single, DDP, DeepSpeed ZeRO, FSDP2; see engines.py). Part 2, the identity-center head:
centers sharded over the ranks (Partial FC, heads/partial_fc.py) with their own optimizer, outside
ZeRO/FSDP partitioning and outside the engine's gradient averaging: each rank steps only its own shard.
Both parts step together on every optimizer step with the same lr schedule.

The factor of W between the two parts: the engine averages the backbone's gradients over the W ranks, as
is right for a per-rank mean loss. The sharded head's loss is already the mean over the global batch, so
its gradient for this rank's embeddings is 1/W of a per-rank mean's. The trainer multiplies the
embedding gradient by W (`scale_gradient`) so that, after the engine's averaging, the backbone gets
exactly the gradient of the global-mean loss, the same as a single process on the whole batch.

Precision and clipping policy, the same on every engine:
- bf16 runs the backbone under autocast (DeepSpeed: its torch_autocast mode) with fp32 parameters; the
  head computes its loss in fp32.
- fp16 (GPU only) scales the loss once for both parts: by the engine's GradScaler (single, DDP, FSDP2) or
  DeepSpeed's loss scaler. The head's gradients are unscaled by the same factor. When any gradient of
  either part is not finite, both steps are skipped (the engine's skip decides for DeepSpeed, whose step
  cannot be vetoed from outside: a non-finite head gradient implies a non-finite embedding gradient, which
  DeepSpeed sees in the backbone).
- Clipping applies `parallel.clip_grad_norm` to each part (backbone, head) by its own gradient norm
  (the head's norm is taken over all shards). DeepSpeed clips its part inside its step and cannot include
  outside parameters in its norm, so per-part clipping is the one policy every engine can implement
  identically.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from toolkit.config import Recipe, dump_recipe
from toolkit.contrastive.unimoco import momentum_at
from toolkit.distributed import DistributedContext
from toolkit.distributed.collectives import all_gather_no_grad
from toolkit.engine import builders
from toolkit.engine.checkpoint import (TRAINER_FILE, CheckpointFolder, capture_rng_state, load_checkpoint,
                                       read_payload, restore_rng_state, write_payload)
from toolkit.engine.optim import build_scheduler, scaled_lr
from toolkit.engine.progress import ProgressReporter
from toolkit.errors import CheckpointError, FaceCLError
from toolkit.eval import evaluate_pairs
from toolkit.heads.shard_checkpoint import load_shards_into, shard_payload


@dataclass
class TrainResult:
    """What a finished run reports; also written to <run>/results.json."""

    final_step: int
    losses: list[tuple[int, float]] = field(default_factory=list)   # (optimizer step, mean loss of the step)
    evaluations: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0


def prepare_run_folder(recipe: Recipe) -> Path:
    """Create <output_dir>/<name> and check it is writable; a one-line error otherwise."""
    run_dir = Path(recipe.run.output_dir) / recipe.run.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{os.getpid()}"  # one per process: ranks may share the folder
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise FaceCLError(f"run.output_dir {recipe.run.output_dir!r}: cannot write run folder {run_dir} "
                          f"({exc.strerror or exc})") from None
    return run_dir


class Trainer:
    """Runs a recipe on one process or one rank of a job; every rank constructs its own Trainer."""

    def __init__(self, recipe: Recipe, run_dir: Path, *, ctx: DistributedContext | None = None,
                 verbose: bool = True):
        self.recipe = recipe
        self.run_dir = run_dir
        self.ctx = ctx or DistributedContext(device=builders.build_device(recipe))
        self.device = self.ctx.device
        self.verbose = verbose and self.ctx.is_main
        # Same seed on every rank: identical initial weights everywhere, before any engine wraps them.
        torch.manual_seed(recipe.run.seed)

        self.train_set = builders.build_train_set(recipe)
        self.num_classes = self.train_set.num_classes
        self.shape = builders.build_run_shape(recipe, len(self.train_set), self.ctx.world_size)
        self.stream = builders.build_train_stream(recipe, self.train_set, self.shape, rank=self.ctx.rank,
                                                  pin_memory=self.device.type == "cuda")
        self.val_sets = builders.build_val_sets(recipe)

        self.peak_lr = scaled_lr(recipe.optim, self.shape.global_batch_size)
        self.contrastive_on = recipe.contrastive.weight > 0
        model = builders.build_model(recipe).to(self.device)  # backbone, or UniMoCo's two encoders
        # The shards are drawn from a per-rank stream, so that rank r's initial centers do not depend on
        # how many classes other ranks hold (2M x 512 must never be drawn whole on one rank).
        torch.manual_seed(recipe.run.seed * 1_000_003 + 17 + self.ctx.rank)
        self.head = builders.build_head(recipe, self.num_classes, self.ctx).to(self.device)
        torch.manual_seed(recipe.run.seed)
        self.engine = builders.build_engine(recipe, self.shape, model, self.ctx, self.peak_lr)
        self.unimoco = builders.build_unimoco(recipe, self.shape, self.ctx) if self.contrastive_on else None
        self.head_optimizer = builders.build_head_optimizer(recipe, self.head, self.peak_lr)
        self.schedulers = {"backbone": build_scheduler(_base_optimizer(self.engine.optimizer), self.shape.total_steps,
                                                       recipe.schedule),
                           "head": build_scheduler(self.head_optimizer, self.shape.total_steps, recipe.schedule)}
        self.fp16 = recipe.parallel.precision == "fp16"
        # One file only for a single process; with several ranks every rank writes its center shard.
        self.checkpoint_in_folder = self.engine.checkpoint_kind == "folder" or self.ctx.world_size > 1
        self.checkpoints = CheckpointFolder(run_dir / "checkpoints", recipe.checkpoint.keep_last)
        self.step = 0
        self.result = TrainResult(final_step=0)
        self.last_grad_norms: dict[str, float | torch.Tensor | None] = {}
        self.last_loss_parts: dict[str, torch.Tensor] = {}
        self.num_skipped_steps = 0

    # ----- checkpoint state -------------------------------------------------------------------------
    def _identity(self) -> dict:
        """What a checkpoint must match to be resumed by this run. The world size may change (the center
        shards and FSDP2's DCP files reshard) except for DeepSpeed, whose ZeRO files are per rank."""
        identity = {"backbone": self.recipe.model.backbone, "embedding_size": self.recipe.model.embedding_size,
                    "optimizer": self.recipe.optim.name, "head_optimizer": self.head_optimizer.__class__.__name__,
                    "num_classes": self.num_classes, "image_size": self.recipe.data.image_size,
                    "contrastive": self.contrastive_on,
                    "engine_format": self.engine.name if self.engine.checkpoint_kind == "folder" else "file"}
        if self.engine.name == "deepspeed":
            identity["world_size"] = self.ctx.world_size
        return identity

    def _trainer_state(self) -> dict:
        """Everything but the engine's own files; RNG states of all ranks (collective call)."""
        return {
            "run": self._identity(),
            "engine": self.engine.state_for_file(),
            "world_size": self.ctx.world_size,
            "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
            "rng_per_rank": self.ctx.all_gather_objects(capture_rng_state()),
            "data": self.stream.state_dict(),
            "contrastive": {"queue": self.unimoco.queue.state_dict()} if self.unimoco is not None else {},
            "history": {"losses": [list(x) for x in self.result.losses], "evaluations": self.result.evaluations,
                        "skipped_steps": self.num_skipped_steps},
        }

    def save(self) -> Path:
        """Write a checkpoint of the current step (all ranks call this)."""
        self.engine.sync_buffers()
        state = self._trainer_state()
        shard = shard_payload(self.head, self.head_optimizer)
        if not self.checkpoint_in_folder:
            path = self.checkpoints.save(self.step, {**state, "head_shards": [shard]})
        else:
            partial = self.checkpoints.start_folder(self.step) if self.ctx.is_main else None
            partial = self.ctx.broadcast_object(str(partial) if partial else None)
            if self.engine.checkpoint_kind == "folder":
                self.engine.save_folder(Path(partial))
            write_payload(Path(partial) / head_shard_file(self.ctx.rank), self.step, shard)
            if self.ctx.is_main:
                write_payload(Path(partial) / TRAINER_FILE, self.step, state)
            self.ctx.barrier()
            path = self.checkpoints.commit_folder(self.step) if self.ctx.is_main else None
        self.ctx.barrier()
        self._say(f"checkpoint saved: {path}")
        return path

    def resume(self, path) -> None:
        payload = load_checkpoint(path, map_location=self.device)
        source = payload["path"]
        saved = payload.get("run", {})
        for key, expected in self._identity().items():
            if saved.get(key) != expected:
                raise CheckpointError(f"checkpoint {source} was written by a run with {key}={saved.get(key)!r}; "
                                      f"this run has {key}={expected!r}")
        if self.engine.checkpoint_kind == "folder":
            self.engine.load_folder(Path(source))
        self.engine.load_from_file(payload["engine"])
        load_shards_into(self.head, self.head_optimizer, self._saved_head_shards(payload, Path(source)), source)
        for name, sched in self.schedulers.items():
            sched.load_state_dict(payload["schedulers"][name])
        saved_world = int(payload.get("world_size", self.ctx.world_size))
        try:
            self.stream.load_state_dict(payload["data"], allow_world_size_change=True)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {source}: {exc}") from None
        if saved_world == self.ctx.world_size:
            restore_rng_state(payload["rng_per_rank"][self.ctx.rank])
        else:
            self._say(f"warning: checkpoint {source} was written by {saved_world} ranks, this job has "
                      f"{self.ctx.world_size}: the center shards are resharded exactly; the data order continues "
                      f"from the same epoch position, but not sample for sample")
        self.step = int(payload["step"])
        if self.unimoco is not None:
            if "queue" not in payload.get("contrastive", {}):
                raise CheckpointError(f"checkpoint {source} has no UniMoCo queue (saved without contrastive learning)")
            self.unimoco.queue.load_state_dict(payload["contrastive"]["queue"])
        history = payload.get("history", {})
        self.result.losses = [(int(s), float(v)) for s, v in history.get("losses", [])]
        self.result.evaluations = list(history.get("evaluations", []))
        self.num_skipped_steps = int(history.get("skipped_steps", 0))
        self._say(f"resumed from {source} at step {self.step}")

    # ----- the step -----------------------------------------------------------------------------------
    def train_step(self, measure_grad_norm: bool = False) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns this rank's mean loss (no sync).

        Gradient norms (before clipping) are kept in `last_grad_norms` when clipping is on or
        `measure_grad_norm` is set (logging steps).
        """
        accum = self.shape.grad_accum_steps
        step_loss = torch.zeros((), device=self.device)
        for micro in range(accum):
            images, labels = self.stream.next_batch()
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            loss = self._micro_step_loss(images, labels, micro_step=self.step * accum + micro)
            self.engine.backward(loss, is_last_micro=micro == accum - 1)
            step_loss += loss.detach()
        self.engine.unscale_()
        head_ok = self._unscale_head_gradients(self.engine.loss_scale())
        if self.fp16 and not head_ok:
            self.engine.force_skip()
        max_norm = self.recipe.parallel.clip_grad_norm
        self.last_grad_norms = {}
        if max_norm > 0 or measure_grad_norm:
            self.last_grad_norms["backbone"] = self.engine.clip_grad_norm_(max_norm)
            self.last_grad_norms["head"] = self._clip_head(max_norm)
        stepped = self.engine.step()
        if stepped and head_ok:
            self.head_optimizer.step()
            if self.unimoco is not None:
                self.engine.momentum_update(self.momentum)
        else:
            self.num_skipped_steps += 1
        if "backbone" in self.last_grad_norms and self.last_grad_norms["backbone"] is None:
            self.last_grad_norms["backbone"] = self.engine.grad_norm_after_step()
        self.engine.zero_grad()
        self.head_optimizer.zero_grad(set_to_none=True)
        for sched in self.schedulers.values():
            sched.step()
        return step_loss / accum

    def _micro_step_loss(self, images: torch.Tensor, labels_B: torch.Tensor, micro_step: int) -> torch.Tensor:
        """total = w_id * margin softmax + w_con * UniCon, both from one forward of the query encoder."""
        recipe = self.recipe
        images_q = images[:, 0] if self.contrastive_on else images  # B x 3 x H x W (view 0 = query)
        output = self.engine.forward(images_q)
        emb_BD, projection_BP = output if self.contrastive_on else (output, None)
        total = torch.zeros((), device=self.device)
        if recipe.head.weight > 0:
            # x W: the engine averages the backbone's gradients over ranks, the head's loss is a global mean.
            loss_id = self.head(scale_gradient(emb_BD, self.ctx.world_size), labels_B)
            total = total + recipe.head.weight * loss_id
            self.last_loss_parts["loss_id"] = loss_id.detach()
        if self.unimoco is not None:
            keys_NP = self.unimoco.keys(self.engine, images[:, 1], micro_step)
            labels_N = all_gather_no_grad(labels_B, self.ctx.group)
            loss_con = self.unimoco.loss(projection_BP, labels_B, keys_NP, labels_N)
            self.unimoco.enqueue(keys_NP, labels_N)
            total = total + recipe.contrastive.weight * loss_con
            self.last_loss_parts["loss_con"] = loss_con.detach()
        return total

    @property
    def momentum(self) -> float:
        """Key-encoder momentum for the update after the current optimizer step."""
        return momentum_at(self.recipe.contrastive, self.step, self.shape.total_steps)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """The embedding used for verification (the backbone's, not the projection)."""
        output = self.engine.forward(images)
        return output[0] if self.contrastive_on else output

    def _saved_head_shards(self, payload: dict, source: Path) -> list[dict]:
        if "head_shards" in payload:
            return payload["head_shards"]
        files = sorted(source.glob("head_rank*.pt"))
        if not files:
            raise CheckpointError(f"checkpoint {source} holds no center shards (head_rank*.pt)")
        return [read_payload(file) for file in files]

    def _head_grads(self) -> list[torch.Tensor]:
        return [p.grad for p in self.head.parameters() if p.grad is not None]

    def _unscale_head_gradients(self, loss_scale: float) -> bool:
        """Divide the head's gradients by the loss scale; False if any shard's are not finite (fp16 only)."""
        grads = self._head_grads()
        if not self.fp16 or not grads:
            return True
        torch._foreach_div_(grads, loss_scale)
        # A host sync, but fp16 loss scaling needs one per step anyway (the scaler's skip decision).
        bad = (~torch.isfinite(torch.stack([g.float().sum() for g in grads]).sum())).float()
        if self.ctx.world_size > 1:
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX, group=self.ctx.group)
        return not bool(bad)

    def _clip_head(self, max_norm: float) -> torch.Tensor:
        """Clip the head by its norm over all shards; returns that norm before clipping."""
        grads = self._head_grads()
        norm_sq = torch.stack([g.float().pow(2).sum() for g in grads]).sum() if grads else torch.zeros(
            (), device=self.device)
        if self.ctx.world_size > 1:
            torch.distributed.all_reduce(norm_sq, group=self.ctx.group)
        norm = norm_sq.sqrt()
        if max_norm > 0:
            coefficient = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            torch._foreach_mul_(grads, coefficient)
        return norm

    def _loss_parts_for_log(self) -> dict[str, float]:
        if len(self.last_loss_parts) < 2:
            return {}
        return {name: float(value) for name, value in self.last_loss_parts.items()}

    def _unimoco_stats_for_log(self) -> dict[str, float]:
        if self.unimoco is None:
            return {}
        return {**self.unimoco.statistics(), "momentum": self.momentum}

    def _skipped_inputs_for_log(self) -> dict[str, float]:
        """Inputs the data stream skipped so far (corrupt image, missing key, ...), by reason; this rank's."""
        return {f"skipped_{reason}": float(count) for reason, count in self.stream.skip_stats().items() if count}

    def _grad_norms_for_log(self) -> dict[str, float]:
        return {f"grad_norm_{part}": float(norm) for part, norm in self.last_grad_norms.items() if norm is not None}

    # ----- evaluation and the loop ----------------------------------------------------------------------
    def evaluate(self) -> list[dict]:
        """Verification on every set; every rank takes part (sharded engines need all ranks in a forward).
        Returns one entry per set, the primary (first) set first."""
        self.engine.sync_buffers()
        self.engine.train(False)
        entries = []
        try:
            for name, pairs in self.val_sets.items():
                result = evaluate_pairs(self._embed, pairs, pairs.is_same_P, device=self.device,
                                        batch_size=self.recipe.eval.batch_size, num_folds=self.recipe.eval.num_folds,
                                        rank=self.ctx.rank, world_size=self.ctx.world_size, group=self.ctx.group)
                entries.append({"step": self.step, "set": name, **result.as_dict()})
        finally:
            self.engine.train(True)
        self.result.evaluations.extend(entries)
        return entries

    def _say(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    def describe(self) -> None:
        recipe, shape, ctx = self.recipe, self.shape, self.ctx
        num_params = sum(p.numel() for p in self.engine.unwrapped().parameters())
        self._say(f"run folder: {self.run_dir}")
        self._say(f"engine {recipe.parallel.engine}"
                  + (f" (ZeRO stage {recipe.parallel.zero_stage})" if recipe.parallel.engine == "deepspeed" else "")
                  + f" | world size {ctx.world_size} | device {self.device} | precision {recipe.parallel.precision}"
                  + f" | threads/rank {torch.get_num_threads()}")
        self._say(f"backbone {recipe.model.backbone}: {num_params / 1e6:.2f}M params (rank 0 shard for sharded "
                  f"engines) | head: {self.num_classes} classes x {recipe.model.embedding_size}")
        self._say(f"batch {shape.batch_size}/rank x {shape.world_size} ranks x {shape.grad_accum_steps} accumulation "
                  f"= global batch {shape.global_batch_size} | {shape.steps_per_epoch} steps/epoch | "
                  f"{shape.total_steps} steps | peak lr {self.peak_lr:.4g}")

    def fit(self) -> TrainResult:
        recipe, shape = self.recipe, self.shape
        start_time = time.perf_counter()
        self.describe()
        tb_dir = self.run_dir / "tensorboard" if recipe.run.tensorboard else None
        reporter = ProgressReporter(shape.total_steps, shape.global_batch_size, tb_dir, enabled=self.verbose)
        pending_losses: list[tuple[int, torch.Tensor]] = []
        self.engine.train(True)
        self.head.train()
        try:
            while self.step < shape.total_steps:
                lr = self.schedulers["backbone"].get_last_lr()[0]
                will_log = (self.step + 1) % recipe.run.log_every == 0 or self.step + 1 == shape.total_steps
                loss = self.train_step(measure_grad_norm=will_log)
                self.step += 1
                reporter.step_done()
                pending_losses.append((self.step, loss))
                last = self.step == shape.total_steps
                if will_log:
                    # The only host sync of the loop: the window's losses, averaged over ranks, on log steps.
                    window = self.ctx.all_reduce_mean_(torch.stack([l for _, l in pending_losses]))
                    values = window.tolist()
                    self.result.losses.extend((s, v) for (s, _), v in zip(pending_losses, values))
                    pending_losses.clear()
                    reporter.log(self.step, self.step / shape.steps_per_epoch,
                                 {"loss": values[-1], "lr": lr, **self._loss_parts_for_log(),
                                  **self._grad_norms_for_log(), **self._unimoco_stats_for_log(),
                                  **self._skipped_inputs_for_log()})
                if (recipe.eval.every_steps and self.step % recipe.eval.every_steps == 0) or last:
                    for entry in self.evaluate():
                        reporter.log_eval(self.step, entry["set"],
                                          {"accuracy": entry["accuracy_mean"], "std": entry["accuracy_std"]})
                    reporter.restart_clock()
                if (recipe.checkpoint.every_steps and self.step % recipe.checkpoint.every_steps == 0) or (
                        last and recipe.checkpoint.save_final):
                    self.save()
                    reporter.restart_clock()
        finally:
            reporter.close()
        self.result.final_step = self.step
        self.result.wall_time_s = time.perf_counter() - start_time
        return self.result

    def gather_head_shards(self) -> list[dict]:
        """Every rank's center shard and optimizer state, on every rank (for tests and small exports)."""
        return self.ctx.all_gather_objects(shard_payload(self.head, self.head_optimizer))

    def final_verification(self) -> dict | None:
        """The last evaluation of the primary (first) verification set."""
        primary = next(iter(self.val_sets))
        entries = [e for e in self.result.evaluations if e.get("set", primary) == primary]
        return entries[-1] if entries else None

    def write_results(self) -> Path | None:
        """results.json (rank 0): final verification, every evaluation and the per-step loss curve."""
        if not self.ctx.is_main:
            return None
        last_step = self.result.evaluations[-1]["step"] if self.result.evaluations else None
        final_by_set = {e["set"]: e for e in self.result.evaluations if e["step"] == last_step}
        payload = {
            "final_step": self.result.final_step,
            "final_verification": self.final_verification(),
            "final_verification_by_set": final_by_set,
            "evaluations": self.result.evaluations,
            "loss_curve": [{"step": s, "loss": v} for s, v in self.result.losses],
            "skipped_steps": self.num_skipped_steps,
            "engine": self.recipe.parallel.engine,
            "world_size": self.ctx.world_size,
            "global_batch_size": self.shape.global_batch_size,
            "peak_lr": self.peak_lr,
            "train_wall_time_s": self.result.wall_time_s,
        }
        path = self.run_dir / "results.json"
        path.write_text(json.dumps(payload, indent=1))
        return path


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in forward; multiplies the gradient by `factor` in backward."""
    return tensor if factor == 1 else _ScaleGradient.apply(tensor, factor)


def head_shard_file(rank: int) -> str:
    return f"head_rank{rank:05d}.pt"


def _base_optimizer(optimizer):
    """The torch optimizer whose param_groups carry the lr (DeepSpeed wraps it in a ZeRO optimizer)."""
    return getattr(optimizer, "optimizer", optimizer)


def write_run_files(trainer: Trainer) -> list[Path]:
    """resolved.yaml, and for DeepSpeed the rendered engine config, into the run folder (rank 0)."""
    written = [trainer.run_dir / "resolved.yaml"]
    written[0].write_text(dump_recipe(trainer.recipe))
    ds_config = getattr(trainer.engine, "ds_config", None)
    if ds_config is not None:
        written.append(trainer.run_dir / "deepspeed_config.json")
        written[-1].write_text(json.dumps(ds_config, indent=1))
    return written
