# The training loop: micro-steps with accumulation, one step protocol for every part, logging, eval, checkpoints.
"""Trainer over the training parts of a face-recognition model.

Part "backbone": the backbone (with UniMoCo also the projection and the momentum key encoder) inside the
recipe's parallel strategy (toolkit/parallel: single, DDP, DeepSpeed ZeRO, FSDP2). Part "head": the
identity-center shard of this rank with its own optimizer (training/parts.py), outside ZeRO/FSDP
partitioning and outside the engine's gradient averaging. A part whose loss weight is 0 is not built
(a contrastive-only run has no identity centers).

One optimizer step (`train_step`):
1. for each micro-batch: forward the query view, loss = w_id * head loss + w_con * UniCon, backward;
2. every part unscales its gradients (fp16: by the one loss scale both parts were multiplied by);
3. with fp16, every part reports non-finite gradients; one flag for all;
4. clipping (`parallel.clip_grad_norm`) by each part's own norm; the norms are logged;
5. the parts step in order, all or none: a part that skips (the flag, or DeepSpeed's own fp16 overflow)
   makes the later parts skip too; then the momentum update of the key encoder, zero_grad, schedules.

Precision, the same on every engine: bf16 runs the backbone under autocast (DeepSpeed: its torch_autocast
mode) with fp32 parameters; the head computes its loss in fp32. fp16 (GPU only) scales the loss once
for both parts: by the engine's GradScaler (single, DDP, FSDP2) or DeepSpeed's loss scaler.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from toolkit.checkpoint import CHECKPOINTS_DIR, Checkpointer, StateAdapter
from toolkit.config import Recipe, recipe_to_dict
from toolkit.contrastive.momentum import momentum_update_
from toolkit.contrastive.unimoco import momentum_at
from toolkit.distributed import DistributedContext
from toolkit.distributed.collectives import all_gather_no_grad
from toolkit.distributed.signals import StopSignals
from toolkit.errors import CheckpointError, FaceCLError, TrainingDivergedError
from toolkit.training import builders
from toolkit.training.divergence import NonfiniteSteps
from toolkit.training.interval_means import IntervalMeans
from toolkit.training.optim import build_scheduler, scaled_lr, warmup_steps_of
from toolkit.training.parts import part_sizes
from toolkit.training.progress import ProgressReporter
from toolkit.training.run_files import RUN_STATUSES, TrainResult, write_results_json
from toolkit.training.trackers import check_trackers_installed, open_trackers
from toolkit.training.watchdog import StepWatchdog


class Trainer:
    """Runs a recipe on one process or one rank of a job; every rank constructs its own Trainer."""

    def __init__(self, recipe: Recipe, run_dir: Path, *, ctx: DistributedContext | None = None,
                 verbose: bool = True, resume_from: Path | None = None, allow_batch_change: bool = False):
        """`resume_from`: the checkpoint `resume()` will load, read here first so that a job of another world
        size keeps its global batch (builders.build_run_shape); `allow_batch_change` lets it change instead."""
        self.recipe = recipe
        self.run_dir = run_dir
        self.ctx = ctx or DistributedContext(device=builders.build_device(recipe))
        self.device = self.ctx.device
        self.verbose = verbose and self.ctx.is_main
        if self.ctx.is_main:  # a missing tracker library is found now, not after the model and data are built
            check_trackers_installed(recipe.run.trackers)
        # Same seed on every rank: identical initial weights everywhere, before any engine wraps them.
        torch.manual_seed(recipe.run.seed)

        self.train_set = builders.build_train_set(recipe)
        self.num_classes = self.train_set.num_classes
        saved = builders.saved_shape_of(resume_from, recipe) if resume_from is not None else None
        self.shape = builders.build_run_shape(recipe, len(self.train_set), self.ctx.world_size, saved=saved,
                                              allow_batch_change=allow_batch_change)
        if saved is not None and saved.world_size != self.ctx.world_size:
            shape = self.shape
            kept = "kept" if shape.global_batch_size == saved.global_batch_size else "changed (--allow-batch-change)"
            self._say(f"global batch {kept} across the world-size change: the checkpoint's {saved.batch_size} per rank "
                      f"x {saved.world_size} ranks x {saved.grad_accum_steps} accumulation = {saved.global_batch_size}; "
                      f"now {shape.batch_size} per rank x {shape.world_size} ranks x {shape.grad_accum_steps} "
                      f"accumulation = {shape.global_batch_size}")
        self.stream = builders.build_train_stream(recipe, self.train_set, self.shape, rank=self.ctx.rank,
                                                  pin_memory=self.device.type == "cuda")
        self.val_sets = builders.build_val_sets(recipe)

        self.peak_lr = scaled_lr(recipe.optim, self.shape.global_batch_size)
        self.contrastive_on = recipe.contrastive.weight > 0
        model = builders.build_model(recipe).to(self.device)  # backbone, or UniMoCo's two encoders
        init_centers = builders.load_initial_weights(recipe, model)
        self.head = None
        if recipe.head.weight > 0:
            # The shards are drawn from a per-rank stream, so that rank r's initial centers do not depend on
            # how many classes other ranks hold (2M x 512 must never be drawn whole on one rank).
            torch.manual_seed(recipe.run.seed * 1_000_003 + 17 + self.ctx.rank)
            self.head = builders.build_head_part(recipe, self.num_classes, self.ctx, self.peak_lr)
            if init_centers is not None:
                self.head.load_full_centers(init_centers, recipe.train.init_from_softmax or recipe.train.init_from)
            torch.manual_seed(recipe.run.seed)
        self.backbone = builders.build_strategy(recipe, self.shape, model, self.ctx, self.peak_lr)
        self.unimoco = builders.build_unimoco(recipe, self.shape, self.ctx) if self.contrastive_on else None
        # The parts step in this order; the backbone first, because DeepSpeed may skip its step on its own.
        self.parts = {"backbone": self.backbone, **({"head": self.head} if self.head is not None else {})}
        self.schedulers = {name: build_scheduler(part.lr_optimizer, self.shape.total_steps, recipe.schedule,
                                                 self.shape.steps_per_epoch)
                           for name, part in self.parts.items()}
        self.fp16 = recipe.parallel.precision == "fp16"
        self.step = 0
        self.result = TrainResult(final_step=0)
        self.last_grad_norms: dict[str, float | torch.Tensor | None] = {}
        self.last_loss_parts: dict[str, torch.Tensor] = {}
        # Loss, loss parts and grad norms of every step since the last progress line, summed on the device. Not
        # in checkpoints: after a resume the first line's means cover the steps since the resume.
        self.interval = IntervalMeans(self.device)
        self.num_skipped_steps = 0          # steps not applied, for any reason (fp16 overflow, non-finite)
        self.nonfinite = NonfiniteSteps(recipe.train.max_nonfinite_steps, self._say)
        self.stop_signals: StopSignals | None = None   # set by fit()
        self.stop_code = 0                              # a stop signal seen by any rank (StopSignals.code)
        self.checkpointer = Checkpointer(run_dir / CHECKPOINTS_DIR, self.ctx, engine=self.backbone, head=self.head,
                                         states=self._checkpoint_states(), identity=self._identity,
                                         keep_last=recipe.checkpoint.keep_last, say=self._say)

    # ----- checkpoint state -------------------------------------------------------------------------
    def _identity(self, resuming: Path | None = None) -> dict:
        """What a checkpoint must match to be resumed by this run. The world size may change (the center
        shards and FSDP2's DCP files reshard) unless the engine's identity says otherwise (ZeRO files that
        are not in the universal format)."""
        identity = {"backbone": self.recipe.model.backbone, "embedding_size": self.recipe.model.embedding_size,
                    "optimizer": self.recipe.optim.name,
                    "head_optimizer": self.head.optimizer.__class__.__name__ if self.head is not None else None,
                    "num_classes": self.num_classes, "image_size": self.recipe.data.image_size,
                    "contrastive": self.contrastive_on, **self.backbone.checkpoint_identity(resuming)}
        return identity

    def _checkpoint_states(self) -> dict[str, StateAdapter]:
        """What trainer.pt holds beside the engine's state and the center shards, by name."""
        return {
            "schedulers": StateAdapter(lambda: {name: sched.state_dict() for name, sched in self.schedulers.items()},
                                       lambda saved: [sched.load_state_dict(saved[name])
                                                      for name, sched in self.schedulers.items()]),
            "data": StateAdapter(self.stream.state_dict, self._load_data_position),
            "contrastive": StateAdapter(
                lambda: {"queue": self.unimoco.queue.state_dict()} if self.unimoco is not None else {},
                self._load_contrastive),
            "history": StateAdapter(self._history, self._load_history),
            "shape": StateAdapter(lambda: {"world_size": self.shape.world_size, "batch_size": self.shape.batch_size,
                                           "grad_accum_steps": self.shape.grad_accum_steps,
                                           "global_batch_size": self.shape.global_batch_size},
                                  lambda saved: None),   # read before the trainer is built (saved_shape_of)
        }

    def _load_data_position(self, saved: dict) -> None:
        try:
            self.stream.load_state_dict(saved, allow_world_size_change=True)
        except ValueError as exc:
            raise CheckpointError(f"checkpoint data position: {exc}") from None

    def _load_contrastive(self, saved: dict | None) -> None:
        if self.unimoco is None:
            return
        if "queue" not in (saved or {}):
            raise CheckpointError("the checkpoint has no UniMoCo queue (saved without contrastive learning)")
        self.unimoco.queue.load_state_dict(saved["queue"])

    def _history(self) -> dict:
        return {"losses": [list(x) for x in self.result.losses], "evaluations": self.result.evaluations,
                "skipped_steps": self.num_skipped_steps, "nonfinite_steps": self.nonfinite.total}

    def _load_history(self, history: dict | None) -> None:
        history = history or {}
        self.result.losses = [(int(s), float(v)) for s, v in history.get("losses", [])]
        self.result.evaluations = list(history.get("evaluations", []))
        self.num_skipped_steps = int(history.get("skipped_steps", 0))
        self.nonfinite.total = int(history.get("nonfinite_steps", 0))

    def save(self) -> Path | None:
        """Write a checkpoint of the current step (all ranks call this)."""
        return self.checkpointer.save(self.step)

    def resume(self, path) -> None:
        restored = self.checkpointer.load(path)
        for line in recipe_changes(restored.origin or restored.source, self.recipe):
            self._say(line)
        if restored.world_size != self.ctx.world_size:
            data = ("the data continues sample for sample (same global batch)"
                    if self.stream.resumes_sample_exactly else
                    "the data order continues from the same epoch position, but not sample for sample")
            self._say(f"warning: checkpoint {restored.source} was written by {restored.world_size} ranks, this job has "
                      f"{self.ctx.world_size}: the center shards are resharded exactly; {data}; per-rank random "
                      f"state (dropout, drop path, sampled negative classes) is not carried over: it starts "
                      f"from this job's seed")
        self.step = restored.step
        self._say(f"resumed from {restored.source} at step {self.step}")

    # ----- the step -----------------------------------------------------------------------------------
    def train_step(self, measure_grad_norm: bool = True) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns this rank's mean loss (no sync).

        Gradient norms (before clipping) are kept in `last_grad_norms` when clipping is on or
        `measure_grad_norm` is set (every step of fit(): the progress line shows their mean). The step's loss,
        loss parts and, when the step is applied, its grad norms are added to `interval` (on the device).
        """
        accum = self.shape.grad_accum_steps
        step_loss = torch.zeros((), device=self.device)
        # Forward updates batch-norm statistics before we know whether the step is finite: keep a copy
        # (a few KB to MB) to put back when the step is skipped.
        buffers = self.backbone.floating_buffers()
        buffers_before = [b.detach().clone() for b in buffers]
        for micro in range(accum):
            images, labels = self.stream.next_batch()
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            loss = self._micro_step_loss(images, labels, micro_step=self.step * accum + micro)
            self.backbone.backward(loss, is_last_micro=micro == accum - 1)
            step_loss += loss.detach()
        loss_scale = self.backbone.loss_scale()
        self.backbone.unscale_()
        if self.head is not None:
            self.head.unscale_(loss_scale)
        # Non-finite loss or gradients on any rank skip the step on every part. One all-reduce of two flags and
        # one host sync per step (fp16 loss scaling needs the same anyway). fp16 gradient overflow is the
        # loss scaler's normal business (flag 1); a non-finite loss, or gradients without loss scaling,
        # count towards divergence (flag 0).
        # A stop signal (SIGTERM, SIGUSR1) that reached any rank travels in the same all-reduce.
        grads_bad = sum(part.found_nonfinite() for part in self.parts.values())
        stop_code = float(self.stop_signals.code) if self.stop_signals is not None else 0.0
        flags = torch.stack([(~torch.isfinite(step_loss)).float() + (0 if self.fp16 else grads_bad),
                             grads_bad if self.fp16 else torch.zeros((), device=self.device),
                             torch.full((), stop_code, device=self.device)]).float()
        if self.ctx.world_size > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX, group=self.ctx.group)
        decision = int(((flags[0] > 0).int() + 2 * (flags[1] > 0).int() + 4 * flags[2].int()).item())  # one host sync
        nonfinite, overflow = bool(decision & 1), bool(decision & 2)
        self.stop_code = decision >> 2
        skip = nonfinite or overflow
        max_norm = self.recipe.parallel.clip_grad_norm
        self.last_grad_norms = {}
        if max_norm > 0 or measure_grad_norm:
            self.last_grad_norms = {name: part.clip_grad_norm_(max_norm) for name, part in self.parts.items()}
        applied = True
        for part in self.parts.values():  # all or none: a part that skips makes the later ones skip
            applied = part.step(skip=skip or not applied) and applied
        if applied:
            if self.unimoco is not None:
                momentum_update_(self.backbone.unwrapped().momentum_pairs(), self.backbone.local_tensors,
                                 self.momentum)
        else:
            self.num_skipped_steps += 1
            if nonfinite:
                torch._foreach_copy_(buffers, buffers_before)
        self.nonfinite.record(nonfinite, self.step + 1, self.checkpointer.latest())
        if "backbone" in self.last_grad_norms and self.last_grad_norms["backbone"] is None:
            self.last_grad_norms["backbone"] = self.backbone.grad_norm_after_step()
        for part in self.parts.values():
            part.zero_grad()
        for sched in self.schedulers.values():
            sched.step()
        self.interval.add("loss", step_loss / accum)
        if applied:   # a skipped step's gradients were never used
            for name, norm in self.last_grad_norms.items():
                if norm is not None:
                    self.interval.add(f"grad_norm_{name}", norm)
        return step_loss / accum

    def _micro_step_loss(self, images: torch.Tensor, labels_B: torch.Tensor, micro_step: int) -> torch.Tensor:
        """total = w_id * margin softmax + w_con * UniCon, both from one forward of the query encoder."""
        recipe = self.recipe
        images_q = images[:, 0] if self.contrastive_on else images  # B x 3 x H x W (view 0 = query)
        output = self.backbone.forward(images_q)
        emb_BD, projection_BP = output if self.contrastive_on else (output, None)
        total = torch.zeros((), device=self.device)
        if self.head is not None:
            loss_id = self.head.loss(emb_BD, labels_B)
            total = total + recipe.head.weight * loss_id
            self.last_loss_parts["loss_id"] = loss_id.detach()
            self.interval.add("loss_id", self.last_loss_parts["loss_id"])
        if self.unimoco is not None:
            keys_NP = self.unimoco.keys(self.backbone, images[:, 1], micro_step)
            labels_N = all_gather_no_grad(labels_B, self.ctx.group)
            loss_con = self.unimoco.loss(projection_BP, labels_B, keys_NP, labels_N)
            self.unimoco.enqueue(keys_NP, labels_N)
            total = total + recipe.contrastive.weight * loss_con
            self.last_loss_parts["loss_con"] = loss_con.detach()
            self.interval.add("loss_con", self.last_loss_parts["loss_con"])
        return total

    @property
    def momentum(self) -> float:
        """Key-encoder momentum for the update after the current optimizer step."""
        cfg = self.recipe.contrastive
        return momentum_at(cfg.momentum, cfg.momentum_schedule, self.step, self.shape.total_steps)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """The embedding used for verification (the backbone's, not the projection)."""
        output = self.backbone.forward(images)
        return output[0] if self.contrastive_on else output

    def _interval_means_for_log(self) -> dict[str, float]:
        """Loss, loss parts (when there are two) and grad norms: means over the steps since the last progress
        line and over the ranks (a collective: every rank calls it on logging steps)."""
        means = self.interval.take(self.ctx.all_reduce_mean_)
        if len(self.last_loss_parts) < 2:   # one part: its loss is the loss
            means = {name: value for name, value in means.items() if name not in self.last_loss_parts}
        return means

    def _unimoco_stats_for_log(self) -> dict[str, float]:
        if self.unimoco is None:
            return {}
        return {**self.unimoco.statistics(), "momentum": self.momentum}

    def _skipped_inputs_for_log(self) -> dict[str, float]:
        """Inputs the data stream skipped so far (corrupt image, missing key, ...), by reason; this rank's."""
        return {f"skipped_{reason}": float(count) for reason, count in self.stream.skip_stats().items() if count}

    # ----- evaluation and the loop ----------------------------------------------------------------------
    def evaluate(self) -> list[dict]:
        """Every benchmark of eval.sets (toolkit.eval.benchmark); every rank takes part (sharded engines need all
        ranks in a forward). Returns one entry per set, in eval.sets order."""
        self.backbone.sync_buffers()
        self.backbone.train(False)
        entries = []
        try:
            for name, benchmark in self.val_sets.items():
                result = benchmark.evaluate(self._embed, device=self.device, rank=self.ctx.rank,
                                            world_size=self.ctx.world_size, group=self.ctx.group)
                entries.append({"step": self.step, "set": name, **result})
        finally:
            self.backbone.train(True)
        self.result.evaluations.extend(entries)
        return entries

    def _say(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    def describe(self) -> None:
        recipe, shape, ctx = self.recipe, self.shape, self.ctx
        self._say(f"run folder: {self.run_dir}")
        self._say(f"engine {type(self.backbone).describe(recipe.parallel)}"
                  + f" | world size {ctx.world_size} | device {self.device} | precision {recipe.parallel.precision}"
                  + f" | threads/rank {torch.get_num_threads()}")
        self._say(" | ".join(part_sizes(self.backbone, self.head, self.recipe.model.backbone, self.contrastive_on)))
        self._say(f"batch {shape.batch_size}/rank x {shape.world_size} ranks x {shape.grad_accum_steps} accumulation "
                  f"= global batch {shape.global_batch_size} | {shape.steps_per_epoch} steps/epoch | "
                  f"{shape.total_steps} steps | peak lr {self.peak_lr:.4g} | {self._warmup_text()}")

    def _warmup_text(self) -> str:
        """The warmup in steps, and where it was given in epochs, what those became."""
        schedule = self.recipe.schedule
        steps = warmup_steps_of(schedule, self.shape.steps_per_epoch)
        if schedule.warmup_epochs == 0:
            return f"warmup {steps} steps"
        return (f"warmup {steps} steps (schedule.warmup_epochs={schedule.warmup_epochs:g} x "
                f"{self.shape.steps_per_epoch} steps/epoch)")

    def _flush_losses(self, pending: list[tuple[int, torch.Tensor]]) -> list[float]:
        """Average the pending steps' losses over ranks (collective), record them; returns the values."""
        values = self.ctx.all_reduce_mean_(torch.stack([loss for _, loss in pending])).tolist()
        self.result.losses.extend((step, value) for (step, _), value in zip(pending, values))
        pending.clear()
        return values

    def fit(self, stop: StopSignals | None = None) -> TrainResult:
        """Train to the end, or until a stop signal (`stop`, installed by the launch script) reached any rank:
        then the step in flight is finished and saved, and `result.stopped_by` names the signal."""
        self.stop_signals = stop
        recipe, shape = self.recipe, self.shape
        start_time = time.perf_counter()
        self.describe()
        self.checkpointer.remove_stale_temporaries()
        if not self.val_sets:
            self._say("evaluation: none (eval.sets is empty and the data is not synthetic); list .bin sets in "
                      "eval.sets to verify during training")
        trackers = (open_trackers(recipe.run.trackers, self.run_dir, recipe.run.name, recipe.run.tracker_project,
                                  recipe_to_dict(recipe)) if self.ctx.is_main else [])
        reporter = ProgressReporter(shape.total_steps, shape.global_batch_size, trackers, enabled=self.verbose)
        reporter.print_header(recipe.run.log_every, trackers_only="UniMoCo queue statistics and momentum"
                              if self.unimoco is not None else "")
        pending_losses: list[tuple[int, torch.Tensor]] = []
        for part in self.parts.values():
            part.train(True)
        # Several ranks: a rank that stops making progress ends the job within parallel.timeout_s.
        watchdog = (StepWatchdog(recipe.parallel.timeout_s, self.ctx.rank, self.ctx.world_size,
                                 on_stall=lambda report: self._end_early("stalled", report),
                                 on_peer_error=lambda message: self._end_early("failed", message)).start()
                    if self.ctx.world_size > 1 else None)
        try:
            while self.step < shape.total_steps:
                lr = self.schedulers["backbone"].get_last_lr()[0]
                loss = self.train_step()
                self.step += 1
                if watchdog is not None:
                    watchdog.beat(self.step)
                reporter.step_done()
                pending_losses.append((self.step, loss))
                last = self.step == shape.total_steps
                stopping = self.stop_code > 0 and not last
                # The last line covers the steps since the one before: a partial interval at the end or at a stop.
                will_log = self.step % recipe.run.log_every == 0 or last or stopping
                will_save = (recipe.checkpoint.every_steps and self.step % recipe.checkpoint.every_steps == 0) or (
                    last and recipe.checkpoint.save_final) or stopping
                if will_log or will_save:
                    # The loop's host syncs beside the step's own: the window's per-step losses, averaged over ranks,
                    # on log steps (and before a save, so that the checkpoint's loss history is complete), and the
                    # interval means on log steps.
                    self._flush_losses(pending_losses)
                if will_log:
                    reporter.log(self.step, self.step / shape.steps_per_epoch, lr=lr,
                                 means=self._interval_means_for_log(),
                                 counters={**self._skipped_inputs_for_log(),
                                           **({"nonfinite_steps": float(self.nonfinite.total)}
                                              if self.nonfinite.total else {})},
                                 trackers_only=self._unimoco_stats_for_log())
                if self.val_sets and not stopping and (
                        (recipe.eval.every_steps and self.step % recipe.eval.every_steps == 0) or last):
                    for entry in self.evaluate():
                        reporter.log_eval(self.step, entry["set"], self.val_sets[entry["set"]].scalars(entry))
                    reporter.restart_clock()
                    if watchdog is not None:
                        watchdog.beat(self.step)
                if will_save:
                    self.save()
                    reporter.restart_clock()
                    if watchdog is not None:
                        watchdog.beat(self.step)
                if stopping:
                    self.result.stopped_by = StopSignals.name_of(self.stop_code)
                    self.result.status = "stopped"
                    self._say(f"stopped by {self.result.stopped_by} after step {self.step} of {shape.total_steps}; "
                              f"continue with --resume auto")
                    break
        except TrainingDivergedError as exc:
            # Every rank takes this decision at the same step (it comes from the step's all-reduce): the pending
            # losses can still be averaged over the ranks for the record.
            self._flush_losses(pending_losses) if pending_losses else None
            self._end_early("diverged", str(exc))
            raise
        except FaceCLError as exc:   # e.g. a full disk during a save, data that cannot be read
            self._end_early("failed", str(exc))
            raise
        finally:
            if watchdog is not None:
                watchdog.stop()
            reporter.close()
        self.result.final_step = self.step
        self.result.wall_time_s = time.perf_counter() - start_time
        return self.result

    def gather_head_shards(self) -> list[dict]:
        """Every rank's center shard and optimizer state, on every rank (for tests and small exports)."""
        return self.ctx.all_gather_objects(self.head.shard_state())

    def final_verification(self) -> dict | None:
        """The last evaluation of the primary verification set: the first whose kind reports the 10-fold pair
        accuracy (accuracy_mean, accuracy_std, num_pairs); None without one."""
        primary = next((name for name, benchmark in self.val_sets.items()
                        if benchmark.reports_verification_accuracy), None)
        if primary is None:
            return None
        entries = [e for e in self.result.evaluations if e.get("set", primary) == primary]
        return entries[-1] if entries else None

    def _end_early(self, status: str, message: str) -> None:
        """Record why the run ends before its last step and write results.json (rank 0, best effort: the run
        is ending anyway)."""
        self.result.status, self.result.message = status, message
        self.result.final_step = self.step
        try:
            self.write_results()
        except OSError:
            pass

    def write_results(self) -> Path | None:
        """results.json (rank 0): how the run ended, final verification, every evaluation, the loss curve."""
        if not self.ctx.is_main:
            return None
        last_step = self.result.evaluations[-1]["step"] if self.result.evaluations else None
        final_by_set = {e["set"]: e for e in self.result.evaluations if e["step"] == last_step}
        payload = {
            "status": self.result.status,
            "exit_status": RUN_STATUSES[self.result.status],
            "message": self.result.message,
            "final_step": self.result.final_step,
            "final_verification": self.final_verification(),
            "final_verification_by_set": final_by_set,
            "evaluations": self.result.evaluations,
            "loss_curve": [{"step": s, "loss": v} for s, v in self.result.losses],
            "skipped_steps": self.num_skipped_steps,
            "nonfinite_steps": self.nonfinite.total,
            "engine": self.recipe.parallel.engine,
            "world_size": self.ctx.world_size,
            "global_batch_size": self.shape.global_batch_size,
            "peak_lr": self.peak_lr,
            "train_wall_time_s": self.result.wall_time_s,
            "stopped_by": self.result.stopped_by,
        }
        return write_results_json(self.run_dir / "results.json", payload)


def recipe_changes(source: Path, recipe: Recipe, limit: int = 20) -> list[str]:
    """One line per recipe value that differs from the resolved.yaml of the run that wrote `source` (none when
    that run's folder has none): what the resumed run does differently. Values the checkpoint must match (the
    model, the class count, the engine's layout) were refused before this."""
    import yaml

    from toolkit.checkpoint import RECIPE_FILE, run_dir_of
    from toolkit.config import dump_recipe

    run_dir = run_dir_of(source) if source.name.startswith("step_") else None
    saved_file = run_dir / RECIPE_FILE if run_dir is not None else None
    if saved_file is None or not saved_file.is_file():
        return []
    try:
        saved = yaml.safe_load(saved_file.read_text())
    except yaml.YAMLError:
        return [f"note: {saved_file} is not valid YAML; the recipe changes since that run are not listed"]
    now = yaml.safe_load(dump_recipe(recipe))

    def flat(tree, prefix=""):
        if isinstance(tree, dict):
            return {k: v for key, value in tree.items() for k, v in flat(value, f"{prefix}{key}.").items()}
        return {prefix[:-1]: tree}

    before, after = flat(saved if isinstance(saved, dict) else {}), flat(now)
    changed = [key for key in sorted(set(before) | set(after)) if before.get(key) != after.get(key)]
    lines = [f"recipe change on resume: {key} {before.get(key, '(unset)')!r} -> {after.get(key, '(unset)')!r} "
             f"(accepted)" for key in changed[:limit]]
    if len(changed) > limit:
        lines.append(f"recipe change on resume: ... and {len(changed) - limit} more (compare {saved_file})")
    return lines
