# schedule.warmup_epochs: warmup given in epochs becomes steps with the run's own steps per epoch.
"""The lr schedule with warmup_epochs=E equals the one with warmup_steps=round(E x steps per epoch) at each world
size, both keys at once are one error line, and the WebFace42M ViT recipes (which use it) print their config."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toolkit.config import load_config
from toolkit.errors import ConfigError
from toolkit.training.builders import build_run_shape
from toolkit.training.optim import build_scheduler, warmup_steps_of

REPO_ROOT = Path(__file__).resolve().parents[2]
SMOKE_RECIPE = REPO_ROOT / "recipes" / "smoke_synthetic.yaml"
VIT_RECIPES = ["webface42m_vit_b.yaml", "webface42m_vit_l.yaml"]
NUM_SAMPLES = 800          # the same global data at every world size
PER_RANK_BATCH = 8         # so that the global batch, and the steps per epoch, follow the world size


def smoke_recipe(*overrides: str):
    return load_config(SMOKE_RECIPE, [f"data.batch_size={PER_RANK_BATCH}", "train.num_epochs=4", *overrides])


def lr_curve(recipe, world_size: int) -> list[float]:
    """The lr of every optimizer step of the run (peak lr 1), as the trainer's scheduler gives it."""
    shape = build_run_shape(recipe, NUM_SAMPLES, world_size)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = build_scheduler(optimizer, shape.total_steps, recipe.schedule, shape.steps_per_epoch)
    curve = []
    for _ in range(shape.total_steps):
        curve.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return curve


@pytest.mark.parametrize("world_size", [1, 2])
@pytest.mark.parametrize("epochs", [0.5, 1.3])
def test_warmup_in_epochs_is_the_schedule_of_those_epochs_in_steps(world_size, epochs):
    steps_per_epoch = NUM_SAMPLES // (PER_RANK_BATCH * world_size)          # 100 at 1 rank, 50 at 2
    in_steps = round(epochs * steps_per_epoch)                              # whole here: 50 / 25, 130 / 65
    by_epochs = lr_curve(smoke_recipe(f"schedule.warmup_epochs={epochs}", "schedule.warmup_steps=0"), world_size)
    by_steps = lr_curve(smoke_recipe(f"schedule.warmup_steps={in_steps}"), world_size)
    assert by_epochs == by_steps
    assert by_epochs[in_steps - 1] == pytest.approx(1.0) and by_epochs[in_steps - 2] < 1.0


def test_warmup_in_epochs_keeps_its_share_of_the_run_when_the_world_size_changes():
    recipe = smoke_recipe("schedule.warmup_epochs=0.5", "schedule.warmup_steps=0")
    shares = []
    for world_size in (1, 2):
        shape = build_run_shape(recipe, NUM_SAMPLES, world_size)
        shares.append(warmup_steps_of(recipe.schedule, shape.steps_per_epoch) / shape.total_steps)
    assert shares == [0.125, 0.125]   # 0.5 of 4 epochs


@pytest.mark.parametrize(("epochs", "steps_per_epoch", "steps"), [
    (4, 13826, 55304),     # WebFace42M at a global batch of 3072
    (0.5, 3, 2),           # 1.5: halves round up
    (0.1, 30, 3),          # 3.0000000000000004: no extra step from float noise
    (0.001, 10, 1),        # a warmup that is asked for is at least one step
])
def test_warmup_epochs_round_to_the_nearest_step(epochs, steps_per_epoch, steps):
    recipe = smoke_recipe(f"schedule.warmup_epochs={epochs}", "schedule.warmup_steps=0")
    assert warmup_steps_of(recipe.schedule, steps_per_epoch) == steps


def test_warmup_steps_and_warmup_epochs_together_are_one_error_line_naming_both():
    with pytest.raises(ConfigError) as info:
        smoke_recipe("schedule.warmup_epochs=0.5")   # the smoke recipe sets warmup_steps: 20
    message = str(info.value)
    assert "\n" not in message, message
    assert "schedule.warmup_steps=20" in message and "schedule.warmup_epochs=0.5" in message, message


def test_negative_warmup_epochs_is_an_error_naming_the_value():
    with pytest.raises(ConfigError, match=r"^schedule.warmup_epochs must be >= 0, got -1.0$"):
        smoke_recipe("schedule.warmup_epochs=-1", "schedule.warmup_steps=0")


@pytest.mark.parametrize("name", VIT_RECIPES)
def test_the_webface42m_vit_recipes_give_warmup_in_epochs(name):
    recipe = load_config(REPO_ROOT / "recipes" / name, expand_env=False)
    assert (recipe.schedule.warmup_epochs, recipe.schedule.warmup_steps, recipe.train.num_epochs) == (4, 0, 40)


@pytest.mark.parametrize("name", VIT_RECIPES)
def test_print_config_of_a_webface42m_vit_recipe(name, tmp_path):
    """As a user would run it: DATA_ROOT set, the verification files present (empty: only their names are read)."""
    sets = tmp_path / "webface42m"
    sets.mkdir()
    for file_name in ("lfw.bin", "cfp_fp.bin", "agedb_30.bin"):
        (sets / file_name).write_bytes(b"")
    env = {**os.environ, "DATA_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "train.py"), "--recipe",
                           str(REPO_ROOT / "recipes" / name), "--print-config"],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "  warmup_epochs: 4.0\n  " in proc.stdout and "  warmup_steps: 0\n" in proc.stdout, proc.stdout


def test_startup_line_says_what_warmup_epochs_became_in_steps(tiny_recipe, capsys):
    from toolkit.training.run_files import prepare_run_folder
    from toolkit.training.trainer import Trainer

    recipe = tiny_recipe("schedule.warmup_epochs=0.5", "schedule.warmup_steps=0")   # 48 samples / 8 = 6 steps/epoch
    Trainer(recipe, prepare_run_folder(recipe), verbose=True).describe()
    assert "| warmup 3 steps (schedule.warmup_epochs=0.5 x 6 steps/epoch)" in capsys.readouterr().out
