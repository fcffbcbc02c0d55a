# Experiment trackers: where the training scalars go besides the console and train.log (recipe key run.trackers).
"""One small interface, three trackers, chosen by `run.trackers` (rank 0 only; any combination, [] for none):

- tensorboard: event files in the run folder's tensorboard/ (the default; TensorBoard ships with the package);
- wandb: Weights & Biases (`pip install "facecl[wandb]"`). Set up as W&B users expect, through its own
  environment: WANDB_PROJECT (else `run.tracker_project`), WANDB_ENTITY, WANDB_MODE (`offline` writes only to
  the run folder's wandb/, for clusters without internet; `wandb sync` uploads it later), WANDB_API_KEY;
- mlflow: MLflow (`pip install "facecl[mlflow]"`): MLFLOW_TRACKING_URI when set (a tracking server), else a
  file store in the run folder's mlruns/ (MLflow keeps that backend in maintenance mode and refuses it unless
  MLFLOW_ALLOW_FILE_STORE is set, which FaceCL then sets for this process); the experiment is
  MLFLOW_EXPERIMENT_NAME, else `run.tracker_project`.

Every tracker gets the same scalars at the same steps (names like `train/loss`, `eval/lfw/accuracy`) and the
resolved recipe as its run's configuration. A resumed run goes on in the same W&B / MLflow run: their run ids
are kept in the run folder's trackers.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Protocol

from toolkit.errors import ConfigError

TRACKER_NAMES = ("tensorboard", "wandb", "mlflow")
# tracker -> (module it needs, what installs it)
REQUIREMENTS = {"tensorboard": ("tensorboard", "pip install tensorboard"),
                "wandb": ("wandb", 'pip install "facecl[wandb]"'),
                "mlflow": ("mlflow", 'pip install "facecl[mlflow]"')}
RUN_IDS_FILE = "trackers.json"


class Tracker(Protocol):
    """Receives scalars by step; closed once at the end of the run (or of this part of it)."""

    name: str

    def log(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def check_trackers_installed(names) -> None:
    """One line per missing library, before any work starts (the trainer calls it when it is built)."""
    for name in names:
        module, install = REQUIREMENTS[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"run.trackers lists {name!r}, but the {module} package is not installed: {install} "
                              f"(or take {name!r} out of run.trackers)")


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    name = "wandb"

    def __init__(self, run_dir: Path, run_name: str, project: str, config: dict, run_id: str | None):
        import wandb

        # resume="allow": a stored id continues that run; without one W&B starts a new run (and makes its id)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=run_name, dir=str(run_dir),
                              config=config, id=run_id, resume="allow")
        self.run_id = self.run.id

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(dict(scalars), step=step)

    def close(self) -> None:
        import wandb

        self.run.finish()
        wandb.teardown()   # ends W&B's service process now (else it lives until this process exits)


class MlflowTracker:
    name = "mlflow"

    def __init__(self, run_dir: Path, run_name: str, project: str, config: dict, run_id: str | None):
        import mlflow

        if not os.environ.get("MLFLOW_TRACKING_URI"):
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # a local store of this run's own
            mlflow.set_tracking_uri((run_dir / "mlruns").resolve().as_uri())
        self.client = mlflow.MlflowClient()
        if run_id is None:
            experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME", project)
            found = self.client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
            run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            for key, value in flatten(config).items():  # parameters are written once, when the run starts
                self.client.log_param(run_id, key, value)
        self.run_id = run_id

    def log(self, scalars: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now_ms = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(key, float(value), now_ms, step)
                                                    for key, value in scalars.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def flatten(tree: dict, prefix: str = "") -> dict[str, str]:
    """{'run': {'name': 'x'}} -> {'run.name': 'x'} (values as text; MLflow parameters are strings)."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, dotted + "."))
        else:
            flat[dotted] = str(value)
    return flat


def open_trackers(names, run_dir: Path, run_name: str, project: str, config: dict) -> list[Tracker]:
    """The trackers of `names`, continuing the W&B / MLflow runs recorded in RUN/trackers.json when resuming."""
    check_trackers_installed(names)
    ids_path = run_dir / RUN_IDS_FILE
    run_ids = json.loads(ids_path.read_text()) if ids_path.exists() else {}
    trackers: list[Tracker] = []
    for name in names:
        if name == "tensorboard":
            trackers.append(TensorBoardTracker(run_dir))
        elif name in ("wandb", "mlflow"):
            tracker_class = WandbTracker if name == "wandb" else MlflowTracker
            tracker = tracker_class(run_dir, run_name, project, config, run_ids.get(name))
            run_ids[name] = tracker.run_id
            trackers.append(tracker)
        else:
            raise ConfigError(f"unknown tracker {name!r}; expected one of {', '.join(TRACKER_NAMES)}")
    if set(run_ids):
        ids_path.write_text(json.dumps(run_ids, indent=1) + "\n")
    return trackers
