# Checkpoint files: atomic writes survive a crash mid-save, retention, and refusal of foreign files.
import pickle

import pytest
import torch

from toolkit.training import checkpoint as ckpt
from toolkit.errors import CheckpointError


def test_crash_during_save_keeps_previous_checkpoint_and_pointer(tmp_path, monkeypatch):
    folder = ckpt.CheckpointFolder(tmp_path, keep_last=0)
    folder.save(10, {"weights": torch.arange(5.0)})
    real_save = torch.save

    def crashing_save(obj, handle):
        real_save(obj, handle)
        handle.write(b"half")
        raise OSError("disk full")  # the process dies in the middle of the write

    monkeypatch.setattr(ckpt.torch, "save", crashing_save)
    with pytest.raises(OSError, match="disk full"):
        folder.save(20, {"weights": torch.zeros(5)})
    monkeypatch.setattr(ckpt.torch, "save", real_save)
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
