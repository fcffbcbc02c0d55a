# A run folder belongs to one run: reruns are refused, simultaneous starts exclude each other, restarts continue.
"""Real `launch/train.py` processes on the tiny smoke recipe (one process each):

- a second run started into a folder that holds checkpoints is refused with one line (the folder, the latest
  step, the two ways on) and leaves the first run's files byte for byte as they were;
- two runs started at once under one run.name: exactly one trains, the other exits 2 saying who holds it;
- a run killed with SIGKILL (no handler runs: its lock stays behind) and started again with the identical
  command line (`--resume auto`) takes the stale lock over, continues from its latest checkpoint and ends with
  the losses of the uninterrupted run, exactly (CPU, fp32).
"""
import hashlib
import signal
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.distributed.conftest import JOB_TIMEOUT_S, check_ok, job_env, loss_curve, train_args

pytestmark = pytest.mark.slow  # real processes

STEPS = ["train.num_epochs=1.5", "checkpoint.every_steps=4", "checkpoint.keep_last=2", "model.dropout=0.2"]


def command(root, name: str, *cli: str) -> list[str]:
    return [sys.executable, "launch/train.py", *train_args(root, name, *STEPS), *cli]


def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=JOB_TIMEOUT_S)


def fingerprint(folder) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted run (18 steps, checkpoints every 4): the reference of this module's tests."""
    root = tmp_path_factory.mktemp("run_folder")
    check_ok(run(command(root, "reference")))
    return root


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(errors) == 1 and errors[0].startswith("error: "), proc.stderr[-3000:]
    return errors[0]


def test_a_second_run_into_a_folder_with_checkpoints_is_refused_and_changes_nothing(finished_run):
    folder = finished_run / "reference"
    before = fingerprint(folder)
    line = one_error_line(run(command(finished_run, "reference")))
    assert f"run folder {folder} already holds checkpoints (latest: step 18)" in line
    assert "--resume auto" in line and "run.name" in line
    assert fingerprint(folder) == before


def test_two_runs_started_at_once_exactly_one_trains(tmp_path):
    procs = [subprocess.Popen(command(tmp_path, "shared", "--set", "train.num_epochs=6"), cwd=REPO, env=job_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outcomes = [(proc.wait(timeout=JOB_TIMEOUT_S), *proc.communicate()) for proc in procs]
    statuses = sorted(status for status, _, _ in outcomes)
    assert statuses == [0, 2], [err[-2000:] for _, _, err in outcomes]
    _, _, loser_err = next(outcome for outcome in outcomes if outcome[0] == 2)
    lines = [line for line in loser_err.splitlines() if line.strip()]
    assert len(lines) == 1 and f"run folder {tmp_path / 'shared'} is in use by another run" in lines[0], loser_err
    assert "pid" in lines[0] and "run.name" in lines[0]
    assert not (tmp_path / "shared" / ".facecl-run.lock").exists()   # the winner gave it back


def test_a_killed_run_restarted_with_the_same_command_line_ends_as_the_uninterrupted_run(finished_run, tmp_path):
    cmd = command(tmp_path, "restarted", "--resume", "auto")
    proc = subprocess.Popen(cmd, cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_after = None
    for line in proc.stdout:
        if "checkpoint saved:" in line and "step_00000008" in line:
            proc.send_signal(signal.SIGKILL)   # no handler runs: the lock file stays behind
            killed_after = line
            break
    proc.wait(timeout=JOB_TIMEOUT_S)
    assert killed_after is not None and proc.returncode == -signal.SIGKILL
    assert (tmp_path / "restarted" / ".facecl-run.lock").exists()
    first = run(cmd)
    check_ok(first)
    assert "took over the lock" in first.stdout and "is no longer running" in first.stdout
    assert "resumed from" in first.stdout
    resumed_at = int(first.stdout.split(" at step ")[1].split()[0])
    assert 8 <= resumed_at < 18
    reference, restarted = loss_curve(finished_run / "reference"), loss_curve(tmp_path / "restarted")
    assert sorted(restarted) == sorted(reference) == list(range(1, 19))
    for step in range(1, 19):
        assert restarted[step] == pytest.approx(reference[step], rel=0, abs=1e-6), step
    assert len({round(value, 5) for value in reference.values()}) > 10   # the losses move


def test_resume_auto_without_a_checkpoint_starts_fresh(tmp_path):
    proc = run(command(tmp_path, "fresh", "--resume", "auto", "--set", "train.num_epochs=0.5"))
    check_ok(proc)
    assert f"--resume auto: no checkpoint in {tmp_path / 'fresh' / 'checkpoints'}; starting from step 0" in proc.stdout
    assert "resumed from" not in proc.stdout
