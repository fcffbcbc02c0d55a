# The training loop: micro-steps with accumulation, mixed precision, clipping, logging, eval and checkpoints.
"""Trainer for the two parts of a face-recognition model.

Part 1, the engine part: the backbone (later also projection head and momentum encoder), which an engine
may wrap (DDP, ZeRO, FSDP). Part 2, the identity-center head with its own optimizer, which no engine
partitions or averages. Both parts step together on every optimizer step with the same lr schedule.

Precision and clipping policy (one place for both parts):
- bf16 / fp16 autocast covers the backbone forward; the head computes its loss in fp32.
- fp16 uses one GradScaler for both parts: the loss is scaled once, both optimizers are unscaled before
  clipping, and the scaler skips both steps together when any gradient is not finite.
- Clipping uses the global norm over the parameters of both parts, so one outlier in either part scales
  the whole update, as if they were one model.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from toolkit.config import Recipe, dump_recipe
from toolkit.engine import builders
from toolkit.engine.checkpoint import CheckpointFolder, capture_rng_state, load_checkpoint, restore_rng_state
from toolkit.engine.optim import build_optimizer, build_scheduler, scaled_lr
from toolkit.engine.progress import ProgressReporter
from toolkit.errors import CheckpointError, FaceCLError
from toolkit.eval import evaluate_pairs

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


@dataclass
class TrainResult:
    """What a finished run reports; also written to <run>/results.json."""

    final_step: int
    losses: list[tuple[int, float]] = field(default_factory=list)   # (optimizer step, mean loss of the step)
    evaluations: list[dict] = field(default_factory=list)
    wall_time_s: float = 0.0

    @property
    def final_accuracy(self) -> float | None:
        return self.evaluations[-1]["accuracy_mean"] if self.evaluations else None


def prepare_run_folder(recipe: Recipe) -> Path:
    """Create <output_dir>/<name> and check it is writable; a one-line error otherwise."""
    run_dir = Path(recipe.run.output_dir) / recipe.run.name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise FaceCLError(f"run.output_dir {recipe.run.output_dir!r}: cannot write run folder {run_dir} "
                          f"({exc.strerror or exc})") from None
    return run_dir


class Trainer:
    """Single-process trainer; the distributed engines plug in behind the same step structure."""

    def __init__(self, recipe: Recipe, run_dir: Path, *, device: torch.device | None = None, verbose: bool = True):
        self.recipe = recipe
        self.run_dir = run_dir
        self.device = device or builders.build_device(recipe)
        self.verbose = verbose
        torch.manual_seed(recipe.run.seed)

        self.train_set = builders.build_train_set(recipe)
        self.num_classes = self.train_set.num_classes
        self.shape = builders.build_run_shape(recipe, len(self.train_set))
        self.stream = builders.build_train_stream(recipe, self.train_set, pin_memory=self.device.type == "cuda")
        self.val_pairs = builders.build_val_pairs(recipe)

        self.backbone = builders.build_backbone(recipe).to(self.device)
        self.head = builders.build_head(recipe, self.num_classes).to(self.device)
        peak_lr = scaled_lr(recipe.optim, self.shape.global_batch_size)
        self.backbone_optimizer = build_optimizer(recipe.optim, [self.backbone], peak_lr)
        self.head_optimizer = build_optimizer(recipe.optim, [self.head], peak_lr)
        self.optimizers = {"backbone": self.backbone_optimizer, "head": self.head_optimizer}
        self.schedulers = {name: build_scheduler(opt, self.shape.total_steps, recipe.schedule)
                           for name, opt in self.optimizers.items()}
        precision = recipe.parallel.precision
        self.autocast_dtype = _AUTOCAST_DTYPES[precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=precision == "fp16")
        self.checkpoints = CheckpointFolder(run_dir / "checkpoints", recipe.checkpoint.keep_last)
        self.step = 0
        self.result = TrainResult(final_step=0)

    # ----- checkpoint state -------------------------------------------------------------------------
    def _identity(self) -> dict:
        """What a checkpoint must match to be resumed by this run."""
        return {"backbone": self.recipe.model.backbone, "embedding_size": self.recipe.model.embedding_size,
                "num_classes": self.num_classes, "image_size": self.recipe.data.image_size}

    def state_dict(self) -> dict:
        return {
            "run": self._identity(),
            "backbone": self.backbone.state_dict(),
            "head": self.head.state_dict(),
            "optimizers": {name: opt.state_dict() for name, opt in self.optimizers.items()},
            "schedulers": {name: sched.state_dict() for name, sched in self.schedulers.items()},
            "scaler": self.scaler.state_dict(),
            "rng": capture_rng_state(),
            "data": self.stream.state_dict(),
            "history": {"losses": [list(x) for x in self.result.losses], "evaluations": self.result.evaluations},
        }

    def load_state_dict(self, state: dict, source: str) -> None:
        saved = state.get("run", {})
        for key, expected in self._identity().items():
            if saved.get(key) != expected:
                raise CheckpointError(f"checkpoint {source} was written by a run with {key}={saved.get(key)!r}; "
                                      f"this recipe has {key}={expected!r}")
        self.backbone.load_state_dict(state["backbone"])
        self.head.load_state_dict(state["head"])
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][name])
        for name, sched in self.schedulers.items():
            sched.load_state_dict(state["schedulers"][name])
        self.scaler.load_state_dict(state["scaler"])
        try:
            self.stream.load_state_dict(state["data"])
        except ValueError as exc:
            raise CheckpointError(f"checkpoint {source}: {exc}") from None
        restore_rng_state(state["rng"])
        self.step = int(state["step"])
        history = state.get("history", {})
        self.result.losses = [(int(s), float(v)) for s, v in history.get("losses", [])]
        self.result.evaluations = list(history.get("evaluations", []))

    def resume(self, path) -> None:
        payload = load_checkpoint(path, map_location=self.device)
        self.load_state_dict(payload, str(path))
        self._say(f"resumed from {path} at step {self.step}")

    def save(self) -> Path:
        path = self.checkpoints.save(self.step, self.state_dict())
        self._say(f"checkpoint saved: {path}")
        return path

    # ----- the step -----------------------------------------------------------------------------------
    def _parameters(self) -> list[torch.nn.Parameter]:
        return [p for part in (self.backbone, self.head) for p in part.parameters() if p.requires_grad]

    def train_step(self, measure_grad_norm: bool = False) -> torch.Tensor:
        """One optimizer step over grad_accum_steps micro-batches; returns the step's mean loss (no sync).

        The gradient norm (of both parts, after unscaling) is kept in `last_grad_norm` when clipping is on
        or `measure_grad_norm` is set (logging steps), else None.
        """
        accum = self.shape.grad_accum_steps
        step_loss = torch.zeros((), device=self.device)
        for _ in range(accum):
            images, labels = self.stream.next_batch()
            images = images.to(self.device, non_blocking=True)
            labels = labels.to(self.device, non_blocking=True)
            with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype or torch.float32,
                                enabled=self.autocast_dtype is not None):
                emb_BD = self.backbone(images)
            # Each micro-batch's loss is a mean over its samples; dividing by accum makes the accumulated
            # gradient the mean over all samples of the optimizer step.
            loss = self.head(emb_BD, labels) / accum
            self.scaler.scale(loss).backward()
            step_loss += loss.detach()
        for opt in self.optimizers.values():
            self.scaler.unscale_(opt)
        self.last_grad_norm = self._clip_or_measure(measure_grad_norm)
        for opt in self.optimizers.values():
            self.scaler.step(opt)
        self.scaler.update()
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        for sched in self.schedulers.values():
            sched.step()
        return step_loss

    def _clip_or_measure(self, measure: bool) -> torch.Tensor | None:
        max_norm = self.recipe.parallel.clip_grad_norm
        if max_norm > 0:
            return torch.nn.utils.clip_grad_norm_(self._parameters(), max_norm, foreach=True)
        if measure:
            grads = [p.grad for p in self._parameters() if p.grad is not None]
            return torch.nn.utils.get_total_norm(grads, foreach=True)
        return None

    def _grad_norm_for_log(self) -> float:
        if self.last_grad_norm is not None:
            return float(self.last_grad_norm)
        return float("nan")

    # ----- evaluation and the loop ----------------------------------------------------------------------
    def evaluate(self) -> dict:
        result = evaluate_pairs(self.backbone, self.val_pairs, self.val_pairs.is_same_P, device=self.device,
                                batch_size=self.recipe.eval.batch_size, num_folds=self.recipe.eval.num_folds,
                                autocast_dtype=self.autocast_dtype)
        entry = {"step": self.step, **result.as_dict()}
        self.result.evaluations.append(entry)
        return entry

    def _say(self, text: str) -> None:
        if self.verbose:
            print(text, flush=True)

    def fit(self) -> TrainResult:
        recipe, shape = self.recipe, self.shape
        start_time = time.perf_counter()
        self._say(f"run folder: {self.run_dir}")
        self._say(f"backbone {recipe.model.backbone}: {sum(p.numel() for p in self.backbone.parameters()) / 1e6:.2f}M "
                  f"params | head: {self.num_classes} classes x {recipe.model.embedding_size} | device {self.device} "
                  f"| precision {recipe.parallel.precision}")
        self._say(f"batch {shape.batch_size}/rank x {shape.world_size} ranks x {shape.grad_accum_steps} accumulation "
                  f"= global batch {shape.global_batch_size} | {shape.steps_per_epoch} steps/epoch | "
                  f"{shape.total_steps} steps | peak lr {scaled_lr(recipe.optim, shape.global_batch_size):.4g}")
        tb_dir = self.run_dir / "tensorboard" if recipe.run.tensorboard else None
        reporter = ProgressReporter(shape.total_steps, shape.global_batch_size, tb_dir, enabled=self.verbose)
        pending_losses: list[tuple[int, torch.Tensor]] = []
        self.backbone.train()
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
                    # The only host sync of the loop: losses of the window are read here, on logging steps.
                    values = torch.stack([l for _, l in pending_losses]).tolist()
                    self.result.losses.extend((s, v) for (s, _), v in zip(pending_losses, values))
                    pending_losses.clear()
                    reporter.log(self.step, self.step / shape.steps_per_epoch,
                                 {"loss": values[-1], "lr": lr, "grad_norm": self._grad_norm_for_log()})
                if (recipe.eval.every_steps and self.step % recipe.eval.every_steps == 0) or last:
                    entry = self.evaluate()
                    reporter.log_eval(self.step, "verification",
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

    def write_results(self) -> Path:
        """results.json: final verification, every evaluation and the per-step loss curve."""
        final = self.result.evaluations[-1] if self.result.evaluations else None
        payload = {
            "final_step": self.result.final_step,
            "final_verification": final,
            "evaluations": self.result.evaluations,
            "loss_curve": [{"step": s, "loss": v} for s, v in self.result.losses],
            "train_wall_time_s": self.result.wall_time_s,
        }
        path = self.run_dir / "results.json"
        path.write_text(json.dumps(payload, indent=1))
        return path


def write_resolved_recipe(recipe: Recipe, run_dir: Path) -> Path:
    path = run_dir / "resolved.yaml"
    path.write_text(dump_recipe(recipe))
    return path
