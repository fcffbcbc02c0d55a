# Progress lines and TensorBoard scalars: interval means (not one step's value), the last partial interval, width.
import re

import pytest

from toolkit.training.run_files import prepare_run_folder
from toolkit.training.trainer import Trainer

# UniMoCo on top of the margin softmax: the loss has two parts and both parts have a grad norm.
UNIMOCO = ["contrastive.weight=1.0", "contrastive.queue_size=96", "contrastive.projection=mlp",
           "contrastive.projection_dim=16", "contrastive.projection_hidden=32", "contrastive.momentum=0.9",
           "data.samples_per_label=2", "data.synthetic.labeled_fraction=0.5"]
INTERVAL_MEANS = ["loss", "loss_id", "loss_con", "grad_norm_backbone", "grad_norm_head"]


def train(tiny_recipe, name: str, *overrides: str) -> Trainer:
    recipe = tiny_recipe(*UNIMOCO, "run.trackers=[tensorboard]", "train.num_epochs=1.33", f"run.name={name}", *overrides)
    trainer = Trainer(recipe, prepare_run_folder(recipe), verbose=True)
    trainer.fit()
    return trainer


def tensorboard_scalars(run_dir) -> dict[str, dict[int, float]]:
    """{tag without 'train/': {step: value}} of the run's event files."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return {tag.removeprefix("train/"): {event.step: event.value for event in events.Scalars(tag)}
            for tag in events.Tags()["scalars"] if tag.startswith("train/")}


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_logged_loss_parts_and_grad_norms_are_means_over_the_interval(tiny_recipe, capsys):
    every_step = train(tiny_recipe, "every_step", "run.log_every=1")   # each step's own values
    capsys.readouterr()
    every_third = train(tiny_recipe, "every_third", "run.log_every=3")
    console = capsys.readouterr().out
    total = every_third.shape.total_steps
    assert total == 8   # 6 steps/epoch x 1.33: the last interval is steps 7-8

    # Logging does not change training: both runs have the same loss curve.
    assert every_step.result.losses == every_third.result.losses

    per_step, logged = tensorboard_scalars(every_step.run_dir), tensorboard_scalars(every_third.run_dir)
    intervals = {3: range(1, 4), 6: range(4, 7), 8: range(7, 9)}
    for name in INTERVAL_MEANS:
        assert sorted(logged[name]) == sorted(intervals), name
        for step, steps in intervals.items():
            expected = sum(per_step[name][s] for s in steps) / len(steps)
            assert logged[name][step] == pytest.approx(expected, rel=1e-6, abs=0), (name, step)
        assert logged[name][3] != pytest.approx(per_step[name][3], rel=1e-6), name   # not the last step's value
    for step in intervals:
        assert logged["lr"][step] == per_step["lr"][step]   # lr is the current value, not a mean

    assert "progress every 3 steps (loss, loss parts, grad norms: means since the previous line)" in console
    final = next(line for line in console.splitlines() if line.startswith(f"step {total}/{total} | epoch"))
    loss_mean = sum(per_step["loss"][s] for s in intervals[8]) / 2
    assert re.search(r"\| loss (\S+) \(id ", final).group(1) == f"{loss_mean:.4g}", final


def test_unimoco_progress_line_fits_in_160_characters(tiny_recipe, capsys):
    recipe = tiny_recipe(*UNIMOCO, "run.trackers=[tensorboard]", "train.num_epochs=0.5", "run.log_every=2", "run.name=wide")
    trainer = Trainer(recipe, prepare_run_folder(recipe), verbose=True)
    trainer.fit()
    lines = [line for line in capsys.readouterr().out.splitlines() if re.match(r"step \d+/\d+ \| epoch", line)]
    assert len(lines) == 2
    for line in lines:
        assert len(line) <= 160, (len(line), line)
        assert "loss_con" not in line and "queue_identities" not in line and "(id " in line
    # What left the console is still in TensorBoard.
    scalars = tensorboard_scalars(trainer.run_dir)
    assert {"queue_identities", "positives_per_query", "momentum", "loss_con", "grad_norm_head"} <= set(scalars)
