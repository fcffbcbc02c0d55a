# A save that runs out of disk: one line naming the device and the sizes, exit non-zero, old checkpoints intact.
"""The run folder lives on a small tmpfs mounted for the test (root only; skipped elsewhere, and said so):
the first checkpoint fits, the second does not."""

import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, SMOKE_RECIPE

TINY = ["data.image_size=16", "data.batch_size=8", "data.num_workers=0", "data.synthetic.num_identities=12",
        "data.synthetic.samples_per_identity=8", "data.synthetic.num_val_pairs=40", "model.embedding_size=32",
        "run.trackers=[]", "eval.every_steps=0", "train.num_epochs=0.3", "checkpoint.every_steps=1",
        "checkpoint.keep_last=0"]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / f"disk-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    # One checkpoint of this model is about 7.5 MB (0.93M parameters + SGD momentum): 11 MB holds one.
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=11m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_disk_full_during_a_save_is_one_line_and_keeps_the_previous_checkpoint(small_disk):
    args = ["--recipe", str(SMOKE_RECIPE)]
    for item in [*TINY, f"run.output_dir={small_disk}", "run.name=full"]:
        args += ["--set", item]
    proc = subprocess.run([sys.executable, "launch/train.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(errors) == 1 and errors[0].startswith(f"error: no space left on {small_disk} (tmpfs) while saving "
                                                     "checkpoint step 2 (needs about 0.01 GB"), errors
    assert "Traceback" not in proc.stderr
    assert "warning: checkpoint step 2 needs about" in proc.stdout   # said before the save started
    checkpoints = Path(small_disk) / "full" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_00000001.pt"]   # nothing half-written
    from toolkit.checkpoint import load_checkpoint

    assert load_checkpoint(checkpoints)["step"] == 1
