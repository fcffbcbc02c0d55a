# Safe loading: planted code in every kind of file is refused with one plain line, and never runs.
import pickle
from pathlib import Path

import pytest
import torch

from toolkit.errors import CheckpointError
from toolkit.serialization import safe_dcp_metadata, safe_torch_load


class Planted:
    """Unpickling this creates the marker file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _torch_zip(path: Path, marker: Path) -> None:
    torch.save({"format": "facecl-checkpoint", "weights": torch.ones(3), "x": Planted(marker)}, path)


def _torch_legacy(path: Path, marker: Path) -> None:
    torch.save({"weights": torch.ones(3), "x": Planted(marker)}, path, _use_new_zipfile_serialization=False)


def _raw_pickle(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"x": Planted(marker)}))


@pytest.mark.parametrize("writer", [_torch_zip, _torch_legacy, _raw_pickle])
def test_planted_payload_in_a_torch_file_is_refused_and_never_runs(tmp_path, writer):
    marker, path = tmp_path / "marker", tmp_path / "evil.pt"
    writer(path, marker)
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(path)
    message = str(info.value)
    assert not marker.exists()
    assert "\n" not in message and str(path) in message
    assert "pickled object of type" in message and "it could run code" in message
    assert "documentation" not in message and "weights_only" not in message
    # The payload is real: an unrestricted load does run it (so the test can fail).
    if writer is not _raw_pickle:
        torch.load(path, weights_only=False)
        assert marker.exists()


def test_pickled_object_names_its_type(tmp_path):
    path = tmp_path / "ns.pt"
    import argparse

    torch.save({"args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(CheckpointError, match=r"of type argparse\.Namespace that FaceCL does not load"):
        safe_torch_load(path)


@pytest.mark.parametrize("cut", [0, 10, 0.5])
def test_truncated_torch_file_is_one_plain_line(tmp_path, cut):
    whole = tmp_path / "whole.pt"
    torch.save({"w": torch.randn(1000)}, whole)
    data = whole.read_bytes()
    path = tmp_path / "cut.pt"
    path.write_bytes(data[: int(len(data) * cut) if isinstance(cut, float) else cut])
    with pytest.raises(CheckpointError) as info:
        safe_torch_load(path)
    assert "is truncated or not a torch file" in str(info.value) and "\n" not in str(info.value)


def test_tensors_and_plain_containers_load(tmp_path):
    path = tmp_path / "ok.pt"
    value = {"a": torch.arange(5), "b": [1, 2.5, "x", None], "c": (torch.ones(2, 2),)}
    torch.save(value, path)
    loaded = safe_torch_load(path)
    assert torch.equal(loaded["a"], value["a"]) and loaded["b"] == value["b"]
    mapped = safe_torch_load(path, mmap=True)
    assert torch.equal(mapped["c"][0], torch.ones(2, 2))


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        safe_torch_load(tmp_path / "nope.pt")


def _dcp_folder(tmp_path: Path) -> Path:
    import warnings

    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.randn(4, 3), "b": torch.zeros(3)}}, checkpoint_id=str(folder), no_dist=True)
    return folder


def test_real_dcp_metadata_reads(tmp_path):
    metadata = safe_dcp_metadata(_dcp_folder(tmp_path))
    assert set(metadata.state_dict_metadata) == {"model.w", "model.b"}
    assert tuple(metadata.state_dict_metadata["model.w"].size) == (4, 3)


def test_planted_payload_in_dcp_metadata_is_refused_and_never_runs(tmp_path):
    folder = _dcp_folder(tmp_path)
    marker = tmp_path / "marker"
    original = pickle.loads((folder / ".metadata").read_bytes())   # our own file, trusted here
    original.planted = Planted(marker)
    (folder / ".metadata").write_bytes(pickle.dumps(original))
    with pytest.raises(CheckpointError, match=r"pickled object of type pathlib\.\w*Path\.touch|pickled object"):
        safe_dcp_metadata(folder)
    assert not marker.exists()


def test_truncated_dcp_metadata(tmp_path):
    folder = _dcp_folder(tmp_path)
    data = (folder / ".metadata").read_bytes()
    (folder / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or not DCP metadata"):
        safe_dcp_metadata(folder)

