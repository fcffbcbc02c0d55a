# The main job end to end through launch/train.py: smoke recipe accuracy, results files, CLI resume.
import json
import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO, SMOKE_RECIPE, TINY_OVERRIDES


def run_train(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, str(REPO / "launch" / "train.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_smoke_recipe_reaches_the_accuracy_bar(tmp_path):
    proc = run_train("--recipe", str(SMOKE_RECIPE), "--set", f"run.output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    last_line = proc.stdout.strip().splitlines()[-1]
    assert last_line.startswith("final verification accuracy:")
    run_dir = tmp_path / "smoke_synthetic"
    results = json.loads((run_dir / "results.json").read_text())
    accuracy = results["final_verification"]["accuracy_mean"]
    assert accuracy >= 0.90, last_line
    assert f"{accuracy * 100:.2f}%" in last_line
    curve = [point["loss"] for point in results["loss_curve"]]
    assert len(curve) == results["final_step"]
    assert sum(curve[-20:]) / 20 < 0.2 * sum(curve[:20]) / 20  # it learned
    resolved = yaml.safe_load((run_dir / "resolved.yaml").read_text())
    assert resolved["run"]["output_dir"] == str(tmp_path) and resolved["model"]["backbone"] == "mobilefacenet"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_cli_resume_continues_the_loss_curve_exactly(tmp_path):
    common = ["--recipe", str(SMOKE_RECIPE)]
    for item in [*TINY_OVERRIDES, f"run.output_dir={tmp_path}", "train.num_epochs=2", "data.num_workers=2",
                 "checkpoint.every_steps=4", "checkpoint.keep_last=0", "model.dropout=0.1"]:
        common += ["--set", item]
    full = run_train(*common, "--set", "run.name=full")
    assert full.returncode == 0, full.stderr[-2000:]
    resumed = run_train(*common, "--set", "run.name=resumed", "--resume",
                        str(tmp_path / "full" / "checkpoints" / "step_00000004.pt"))
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "at step 4" in resumed.stdout
    full_curve = json.loads((tmp_path / "full" / "results.json").read_text())["loss_curve"]
    resumed_curve = json.loads((tmp_path / "resumed" / "results.json").read_text())["loss_curve"]
    assert [p["step"] for p in resumed_curve] == [p["step"] for p in full_curve] == list(range(1, 13))
    for a, b in zip(full_curve, resumed_curve):
        assert abs(a["loss"] - b["loss"]) <= 1e-6, (a, b)


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_train_log_holds_the_console_and_a_resume_appends_to_it(tmp_path):
    common = ["--recipe", str(SMOKE_RECIPE)]
    for item in [*TINY_OVERRIDES, f"run.output_dir={tmp_path}", "run.name=logged", "train.num_epochs=1"]:
        common += ["--set", item]
    first = run_train(*common)
    assert first.returncode == 0, first.stderr[-2000:]
    log = tmp_path / "logged" / "train.log"
    first_log = log.read_text()
    header, *body = first_log.splitlines()
    assert header.startswith("==== ") and "train.py --recipe" in header
    # every console line, stdout and stderr, in the order each stream wrote it
    for stream in (first.stdout, first.stderr):
        lines = iter(body)
        assert all(any(line == logged for logged in lines) for line in stream.splitlines()), stream
    assert len(body) == len(first.stdout.splitlines()) + len(first.stderr.splitlines())
    assert body[-1].startswith("final verification accuracy:")
    second = run_train(*common, "--resume", "auto", "--set", "train.num_epochs=2")
    assert second.returncode == 0, second.stderr[-2000:]
    both = log.read_text()
    assert both.startswith(first_log) and both.count("\n==== ") == 1
    appended = both[len(first_log):].splitlines()[1:]
    assert appended == second.stdout.splitlines() + second.stderr.splitlines() or \
        sorted(appended) == sorted(second.stdout.splitlines() + second.stderr.splitlines())
    assert any("resumed from" in line for line in appended) and appended[-1].startswith("final verification")
