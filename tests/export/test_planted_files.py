# Files planted inside a DeepSpeed checkpoint folder, under any name DeepSpeed's readers list, never run code.
"""DeepSpeed 0.19.8's universal converter walks the tag folder at any depth and unpickles, with an unrestricted
torch.load, every file whose name starts with mp_rank_, zero_pp_rank_ (also bf16_/fp16_) or layer_, and globs
*_optim_states.pt / *model_states.pt. Each name below is planted as a raw pickle whose loading creates a marker
file, into a copy of a real 2-rank ZeRO-2 checkpoint. The converter (`convert.py universal`), consolidation and
inspection must each refuse with one line naming the file, and the marker must never appear. The control test
shows the payload is real: DeepSpeed's own converter, run on the same folder without FaceCL's guard, runs it.
"""
import argparse
import contextlib
import io
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.export.conftest import probed_run
from toolkit.errors import CheckpointError

pytestmark = pytest.mark.slow   # a 2-rank training job (shared with the other converter tests)

# Relative to the checkpoint's deepspeed/ tag folder: the three, then one per pattern DeepSpeed lists.
PLANTED = ["mp_rank_00.bak", "mp_rank_00", "a/mp_rank_00_model_states.pt",
           "zero_pp_rank_7_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt.old",
           "fp16_zero_pp_rank_0", "layer_01-model_00_model_states.pt", "evil_optim_states.pt",
           "sub/dir/zero_pp_rank_0_mp_rank_00_model_states.pt", "zero/stem.weight/fp32.pt"]


class Planted:
    """Unpickling this creates the marker file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def planted_copy(run, tmp_path: Path, name: str) -> tuple[Path, Path, Path]:
    """(copy of the step folder, the planted file, the marker it would create)."""
    copy = tmp_path / run.checkpoint.name
    shutil.copytree(run.checkpoint, copy)
    target = copy / "deepspeed" / name
    target.parent.mkdir(parents=True, exist_ok=True)
    marker = tmp_path / "marker"
    target.write_bytes(pickle.dumps({"x": Planted(marker)}))
    return copy, target, marker


@pytest.fixture(scope="module")
def zero2_run(runs_root):
    return probed_run("zero2_adamw", runs_root)


@pytest.mark.parametrize("name", PLANTED)
def test_a_planted_file_is_refused_by_every_reader_and_never_runs(name, zero2_run, tmp_path):
    from toolkit.export.consolidate import consolidate
    from toolkit.export.inspect import inspect_path
    from toolkit.export.resize import resize_checkpoint as to_universal

    copy, target, marker = planted_copy(zero2_run, tmp_path, name)
    with pytest.raises(CheckpointError) as info:
        to_universal(copy, tmp_path / "universal")
    assert str(target) in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "universal").exists()
    with pytest.raises(CheckpointError, match="could run code") as info:
        consolidate(copy, tmp_path / "backbone.safetensors")
    assert str(target) in str(info.value)
    report = inspect_path(copy)
    assert not report["complete"]
    assert any(str(target) in problem for problem in report["problems"]), report["problems"]
    assert not marker.exists(), "the payload ran"


def test_the_command_line_says_one_line_and_exits_2(zero2_run, tmp_path):
    copy, target, marker = planted_copy(zero2_run, tmp_path, "mp_rank_00.bak")
    proc = subprocess.run([sys.executable, "launch/convert.py", "universal", str(copy), "--out", str(tmp_path / "u")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(target) in lines[0], proc.stderr
    assert "could run code" in lines[0]
    assert not marker.exists()


def test_a_clean_but_foreign_file_is_refused_and_reported(zero2_run, tmp_path):
    """A tensors-only file that FaceCL does not write is safe to read, but DeepSpeed's converter would count it
    as a model-state file of another rank: refused by the converter, reported by inspect."""
    from toolkit.export.inspect import inspect_path
    from toolkit.export.resize import resize_checkpoint as to_universal

    copy = tmp_path / zero2_run.checkpoint.name
    shutil.copytree(zero2_run.checkpoint, copy)
    shutil.copy(copy / "deepspeed" / "mp_rank_00_model_states.pt", copy / "deepspeed" / "mp_rank_00_model_states.pt.bak")
    with pytest.raises(CheckpointError, match=r"does not write \(mp_rank_00_model_states\.pt\.bak\)"):
        to_universal(copy, tmp_path / "universal")
    report = inspect_path(copy)
    assert not report["complete"] and any("mp_rank_00_model_states.pt.bak" in p for p in report["problems"])


def test_control_deepspeeds_own_converter_runs_the_payload(zero2_run, tmp_path):
    """Without the guard, DeepSpeed's converter unpickles the planted file: the test above can fail."""
    from deepspeed.checkpoint import ds_to_universal

    copy, _, marker = planted_copy(zero2_run, tmp_path, "mp_rank_00.bak")
    args = argparse.Namespace(input_folder=str(copy / "deepspeed"), output_folder=str(tmp_path / "out" / "x"),
                              num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)
    with contextlib.suppress(Exception), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    assert marker.exists()


def test_routed_loads_refuse_a_pickle_that_no_check_saw(tmp_path):
    """restricted_torch_load: inside the block, a library's torch.load(weights_only=False) is the safe loader."""
    from toolkit.serialization import restricted_torch_load

    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Planted(marker)}, path)
    with restricted_torch_load(), pytest.raises(CheckpointError, match="could run code"):
        torch.load(path, map_location="cpu", weights_only=False)
    with restricted_torch_load(), pytest.raises(CheckpointError, match="could run code"):
        torch.load(io.BytesIO(path.read_bytes()), weights_only=False)
    assert not marker.exists()
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    with restricted_torch_load():
        assert torch.equal(torch.load(tmp_path / "ok.pt", weights_only=False)["w"], torch.ones(2))
    assert torch.load is not None and not getattr(torch.load, "facecl_restricted", False)   # restored


def plant_in_a_dcp_tensor_record(run, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of an FSDP2 checkpoint whose first model tensor record is replaced by a pickle of a payload: the
    record is appended to its .distcp file and the (trusted, test-made) .metadata points at it."""
    copy = tmp_path / run.checkpoint.name
    shutil.copytree(run.checkpoint, copy)
    folder = copy / "fsdp"
    metadata = pickle.loads((folder / ".metadata").read_bytes())   # our own test file
    index = next(key for key in metadata.storage_data if key.fqn.startswith("model."))
    info = metadata.storage_data[index]
    marker = tmp_path / "marker"
    record = io.BytesIO()
    torch.save({"x": Planted(marker)}, record)
    data_file = folder / info.relative_path
    offset = data_file.stat().st_size
    with open(data_file, "ab") as handle:
        handle.write(record.getvalue())
    info.offset, info.length = offset, len(record.getvalue())
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return copy, data_file, marker


def test_a_pickle_in_a_dcp_tensor_record_is_one_line_for_every_reader(runs_root, tmp_path):
    from toolkit.export.consolidate import consolidate
    from toolkit.export.inspect import inspect_path

    copy, data_file, marker = plant_in_a_dcp_tensor_record(probed_run("fsdp", runs_root), tmp_path)
    with pytest.raises(CheckpointError) as info:
        consolidate(copy, tmp_path / "backbone.safetensors")
    message = str(info.value)
    assert str(data_file) in message and "could run code" in message and "\n" not in message
    assert "weights_only" not in message
    report = inspect_path(copy, checksums=True)
    assert not report["complete"] and any(str(data_file) in p and "could run code" in p for p in report["problems"])
    proc = subprocess.run([sys.executable, "launch/convert.py", "export", str(copy), "--format", "safetensors",
                           "--out", str(tmp_path / "b.safetensors")], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and str(data_file) in lines[0], proc.stderr
    assert "Re-running torch.load" not in proc.stderr
    assert not marker.exists()


def test_a_pickle_in_a_dcp_tensor_record_is_refused_on_resume(runs_root, tmp_path):
    from tests.distributed.conftest import forked_ranks, free_port, run_job, train_args
    from tests.export.conftest import ENGINES

    copy, data_file, marker = plant_in_a_dcp_tensor_record(probed_run("fsdp", runs_root), tmp_path)
    port = free_port()
    proc = run_job(forked_ranks(2, port), [*train_args(tmp_path, "resumed", *ENGINES["fsdp"]), "--resume", str(copy)],
                   port=port)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode != 0 and errors and str(data_file) in errors[0], proc.stderr[-3000:]
    assert "could run code" in errors[0] and "Re-running torch.load" not in proc.stderr
    assert not marker.exists()
