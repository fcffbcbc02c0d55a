# Checkpoint files: atomic writes survive a crash mid-save, retention, and refusal of foreign files.
import pickle

import pytest
import torch

import toolkit.checkpoint as ckpt
from toolkit.errors import CheckpointError


def test_crash_during_save_keeps_previous_checkpoint_and_pointer(tmp_path, monkeypatch):
    folder = ckpt.CheckpointFolder(tmp_path, keep_last=0)
    folder.save(10, {"weights": torch.arange(5.0)})
    real_save = torch.save

    def crashing_save(obj, handle):
        real_save(obj, handle)
        handle.write(b"half")
        raise OSError("disk full")  # the process dies in the middle of the write

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        folder.save(20, {"weights": torch.zeros(5)})
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / "latest").read_text().strip() == "step_00000010.pt"
    assert not (tmp_path / "step_00000020.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000010.pt"]  # no temp files left
    loaded = ckpt.load_checkpoint(tmp_path)
    assert loaded["step"] == 10 and torch.equal(loaded["weights"], torch.arange(5.0))


def test_keep_last_prunes_oldest(tmp_path):
    folder = ckpt.CheckpointFolder(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        folder.save(step, {})
    assert sorted(p.name for p in tmp_path.glob("step_*.pt")) == ["step_00000003.pt", "step_00000004.pt"]
    assert ckpt.load_checkpoint(tmp_path)["step"] == 4


class _Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_foreign_files_are_refused_without_running_code(tmp_path, capsys):
    pickled = tmp_path / "evil.pt"
    pickled.write_bytes(pickle.dumps({"format": ckpt.FORMAT, "x": _Exploit()}))
    with pytest.raises(CheckpointError, match="not a FaceCL checkpoint"):
        ckpt.load_checkpoint(pickled)
    assert "must never run" not in capsys.readouterr().out
    plain = tmp_path / "plain.pt"
    torch.save({"state": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="no 'facecl-checkpoint' format tag"):
        ckpt.load_checkpoint(plain)
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="without a 'latest'"):
        ckpt.load_checkpoint(tmp_path)


def test_rng_state_round_trip_restores_all_generators():
    import random

    import numpy as np

    state = ckpt.capture_rng_state()
    expected = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    ckpt.restore_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == expected


KILLED_SAVE = r"""
import os, sys, torch
import toolkit.checkpoint as ckpt
folder = ckpt.CheckpointFolder(sys.argv[1])
folder.save(5, {"weights": torch.arange(5.0)})
def dying_save(obj, handle):
    handle.write(b"partial bytes of a large checkpoint")
    handle.flush()
    os._exit(9)   # killed mid-save: no exception handler runs
torch.save = dying_save
folder.save(10, {"weights": torch.zeros(5)})
"""


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_a_started_run_removes_what_killed_saves_left_and_nothing_else(tmp_path, tiny_recipe, capsys):
    import subprocess
    import sys

    from tests.conftest import REPO
    from toolkit.training.run_files import prepare_run_folder
    from toolkit.training.trainer import Trainer

    recipe = tiny_recipe("run.name=stale", "train.num_epochs=0.1", "checkpoint.every_steps=0")
    folder = prepare_run_folder(recipe) / "checkpoints"
    proc = subprocess.run([sys.executable, "-c", KILLED_SAVE, str(folder)], cwd=REPO, capture_output=True,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 9
    left = [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".step_00000010.pt."), left   # the real leftover
    (folder / ".partial-step_00000007").mkdir()                                 # a killed folder save
    (folder / ".partial-step_00000007" / "trainer.pt").write_bytes(b"x" * 100)
    others = ["notes.tmp", ".step_12.pt.abcdef.tmp", "my.partial-step_00000001", ".partial-step_9"]
    for name in others:   # not this toolkit's names: kept
        (folder / name).write_text("user file")
    trainer = Trainer(recipe, prepare_run_folder(recipe), verbose=True)
    trainer.fit()
    out = capsys.readouterr().out
    names = sorted(p.name for p in folder.iterdir())
    assert not any(name.startswith(".step_00000010.pt.") or name == ".partial-step_00000007" for name in names)
    assert all(name in names for name in others), names
    assert "step_00000005.pt" in names   # the finished checkpoint is untouched
    assert f"removed {left[0]}" in out and "removed .partial-step_00000007" in out


def test_resume_paths_that_mislead_get_plain_lines(tmp_path):
    """`latest` deleted, naming a deleted entry, or holding binary bytes: each is one line that says what is
    there and what to pass instead."""
    folder = ckpt.CheckpointFolder(tmp_path / "checkpoints", keep_last=0)
    for step in (3, 7):
        folder.save(step, {"weights": torch.zeros(2)})
    run = tmp_path
    (run / "checkpoints" / "latest").unlink()
    with pytest.raises(CheckpointError, match=r"has no 'latest' pointer but holds 2 checkpoint.*the newest checkpoint "
                                              r"there is .*step_00000007\.pt: pass it"):
        ckpt.load_checkpoint(run)
    (run / "checkpoints" / "latest").write_text("step_00000009.pt\n")
    with pytest.raises(CheckpointError, match=r"latest names step_00000009\.pt, which does not exist.*newest "
                                              r"checkpoint there is .*step_00000007\.pt"):
        ckpt.load_checkpoint(run)
    (run / "checkpoints" / "latest").write_bytes(bytes(range(200, 256)))
    with pytest.raises(CheckpointError, match="holds binary bytes, not a checkpoint name"):
        ckpt.load_checkpoint(run)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_checkpoint_files_follow_the_umask(tmp_path, umask):
    """mkstemp creates 0600 files; checkpoints get what the user's umask gives every other new file."""
    import os

    previous = os.umask(umask)
    try:
        folder = ckpt.CheckpointFolder(tmp_path / "checkpoints")
        path = folder.save(1, {"weights": torch.zeros(2)})
        (tmp_path / "plain").write_text("x")
    finally:
        os.umask(previous)
    expected = 0o666 & ~umask
    assert (tmp_path / "plain").stat().st_mode & 0o777 == expected
    assert path.stat().st_mode & 0o777 == expected
    assert (tmp_path / "checkpoints" / "latest").stat().st_mode & 0o777 == expected
