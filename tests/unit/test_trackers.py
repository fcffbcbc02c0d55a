# run.trackers: TensorBoard, Weights & Biases (offline) and MLflow (file store) get the same scalars at the same steps
# as the training's own record, and a resumed run continues the same W&B / MLflow runs.
import json
import struct

import pytest

from tests.unit.test_progress_lines import tensorboard_scalars
from toolkit.config import load_config
from toolkit.errors import ConfigError
from toolkit.training import trackers as trackers_module
from toolkit.training.run_files import prepare_run_folder
from toolkit.training.trainer import Trainer

WANDB_BLOCK = 32768   # W&B's transaction log: LevelDB's log format (7-byte record headers in 32 KiB blocks)


def wandb_history(run_dir) -> dict[str, dict[int, float]]:
    """{key: {step: value}} from the history records of every offline W&B run in the run folder."""
    from wandb.proto import wandb_internal_pb2

    history: dict[str, dict[int, float]] = {}
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        assert data[:4] == b":W&B", path
        position, pending = 7, b""
        while position + 7 <= len(data):
            room = WANDB_BLOCK - position % WANDB_BLOCK
            if room < 7:   # a block's tail too short for a header is padding
                position += room
                continue
            _, length, kind = struct.unpack("<IHB", data[position:position + 7])
            pending += data[position + 7:position + 7 + length]
            position += 7 + length
            if kind in (1, 4):   # a full record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    for item in record.history.item:   # keys with a '/' come as a nested key
                        key = item.key or "/".join(item.nested_key)
                        if not key.startswith("_"):
                            history.setdefault(key, {})[record.history.step.num] = json.loads(item.value_json)
    return history


def mlflow_history(run_dir, run_id: str) -> dict[str, dict[int, list[float]]]:
    """{key: {step: [values]}} of the MLflow run in the run folder's file store."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri())
    history: dict[str, dict[int, list[float]]] = {}
    for key in client.get_run(run_id).data.metrics:
        for metric in client.get_metric_history(run_id, key):
            history.setdefault(key, {}).setdefault(metric.step, []).append(metric.value)
    return history


@pytest.fixture
def offline_trackers(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "wandb-cache"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    for name in ("WANDB_PROJECT", "MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)


@pytest.mark.slow  # two short trainings with three trackers: about 10 s
def test_every_tracker_gets_the_training_scalars_and_a_resume_continues_their_runs(tiny_recipe, offline_trackers):
    overrides = ["run.trackers=[tensorboard, wandb, mlflow]", "run.name=tracked", "run.log_every=2",
                 "train.num_epochs=1", "checkpoint.every_steps=3", "checkpoint.keep_last=0"]
    recipe = tiny_recipe(*overrides)
    trainer = Trainer(recipe, prepare_run_folder(recipe), verbose=False)
    losses = dict(trainer.fit().losses)
    run_dir = trainer.run_dir
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    ids = json.loads((run_dir / "trackers.json").read_text())
    assert sorted(ids) == ["mlflow", "wandb"]

    # The independent record: every step's loss (results.json); the trackers get interval means of it.
    expected = {step: (losses[step - 1] + losses[step]) / 2 for step in (2, 4, 6)}
    board = tensorboard_scalars(run_dir)
    wandb_values = wandb_history(run_dir)
    mlflow_values = mlflow_history(run_dir, ids["mlflow"])
    for step, loss in expected.items():
        assert board["loss"][step] == pytest.approx(loss, rel=1e-6), step
        assert wandb_values["train/loss"][step] == pytest.approx(loss, rel=1e-6), step
        assert mlflow_values["train/loss"][step] == [pytest.approx(loss, rel=1e-6)], step
    # Every scalar, evaluation included, reaches all three with the same values at the same steps.
    assert any(key.startswith("eval/") for key in wandb_values)
    for key, by_step in wandb_values.items():
        assert sorted(by_step) == sorted(mlflow_values[key]), key
        for step, value in by_step.items():
            assert mlflow_values[key][step] == [pytest.approx(value, rel=1e-6)], (key, step)
        if key.startswith("train/"):
            assert board[key.removeprefix("train/")] == pytest.approx(by_step, rel=1e-6), key

    # The recipe is the runs' configuration.
    import mlflow

    params = mlflow.MlflowClient(tracking_uri=(run_dir / "mlruns").resolve().as_uri()).get_run(ids["mlflow"]).data.params
    assert params["run.name"] == "tracked" and params["head.scale"] == str(recipe.head.scale)

    # A new process resumes the run at step 3 in the same folder: the same W&B and MLflow runs go on.
    resumed = Trainer(recipe, run_dir, verbose=False)
    resumed.resume(run_dir / "checkpoints" / "step_00000003.pt")
    resumed_losses = dict(resumed.fit().losses)
    assert json.loads((run_dir / "trackers.json").read_text()) == ids
    wandb_runs = sorted(run_dir.glob("wandb/offline-run-*"))
    assert len(wandb_runs) == 2 and all(path.name.endswith(f"-{ids['wandb']}") for path in wandb_runs)
    mlflow_again = mlflow_history(run_dir, ids["mlflow"])
    resumed_mean = (resumed_losses[5] + resumed_losses[6]) / 2
    assert mlflow_again["train/loss"][6] == [pytest.approx(expected[6], rel=1e-6), pytest.approx(resumed_mean, rel=1e-6)]
    assert resumed_mean == pytest.approx(expected[6], abs=1e-5)   # the resume reproduces the losses


def test_an_unknown_tracker_is_a_one_line_recipe_error(tmp_path):
    from tests.conftest import SMOKE_RECIPE

    with pytest.raises(ConfigError, match=r"'run.trackers' must be one of 'tensorboard', 'wandb', 'mlflow', got 'wandbb'"):
        load_config(SMOKE_RECIPE, ["run.trackers=[tensorboard, wandbb]", f"run.output_dir={tmp_path}"])


def test_a_missing_tracker_library_is_named_before_anything_is_built(tiny_recipe, monkeypatch):
    real_find_spec = trackers_module.importlib.util.find_spec
    monkeypatch.setattr(trackers_module.importlib.util, "find_spec",
                        lambda name, *args: None if name == "mlflow" else real_find_spec(name, *args))
    recipe = tiny_recipe("run.trackers=[mlflow]", "run.name=untracked")
    with pytest.raises(ConfigError, match=r"run.trackers lists 'mlflow', but the mlflow package is not installed: "
                                          r"pip install \"facecl\[mlflow\]\""):
        Trainer(recipe, prepare_run_folder(recipe), verbose=False)
