# Bad input to convert.py: one line `error: ...`, exit status 2, no partial output, the source never modified.
import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from tests.distributed.conftest import job_env
from tests.export.conftest import probed_run


def convert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "convert.py"), *map(str, args)], cwd=REPO,
                          env=job_env(), capture_output=True, text=True, timeout=300)


def fingerprint(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def assert_user_error(proc, *fragments):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in proc.stderr
    return lines[0]


def no_partial_files(folder: Path) -> bool:
    return not any(p.name.endswith(".partial") for p in folder.iterdir())


@pytest.fixture
def single_copy(single_run, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(single_run.run_dir, target)
    return target


@pytest.fixture
def ddp_copy(runs_root, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(probed_run("ddp", runs_root).run_dir, target)
    return target


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_truncated_single_process_checkpoint(single_copy, tmp_path):
    step_file = next((single_copy / "checkpoints").glob("step_*.pt"))
    step_file.write_bytes(step_file.read_bytes()[: step_file.stat().st_size // 2])
    before = fingerprint(single_copy)
    proc = convert("consolidate", single_copy, "--out", tmp_path / "o.safetensors")
    assert_user_error(proc, step_file.name, "is truncated or not a torch file")
    assert not (tmp_path / "o.safetensors").exists() and no_partial_files(tmp_path)
    assert fingerprint(single_copy) == before


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_checkpoint_of_another_tool(tmp_path):
    foreign = tmp_path / "model.pt"        # e.g. an arcface_torch backbone: a bare state dict
    torch.save({"conv1.weight": torch.randn(4, 3, 3, 3)}, foreign)
    assert_user_error(convert("consolidate", foreign, "--out", tmp_path / "o.safetensors"),
                      "is not a FaceCL checkpoint")
    folder = tmp_path / "hf_model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    assert_user_error(convert("inspect", folder), "not a FaceCL run")


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_pickled_object_payload_never_runs(single_copy, tmp_path):
    marker = tmp_path / "marker"
    step_file = next((single_copy / "checkpoints").glob("step_*.pt"))

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload = torch.load(step_file, weights_only=True)
    payload["planted"] = Planted()
    torch.save(payload, step_file)
    for command in (["consolidate", single_copy, "--out", tmp_path / "o.safetensors"], ["inspect", single_copy],
                    ["export", single_copy, "--format", "onnx", "--out", tmp_path / "o.onnx"]):
        assert_user_error(convert(*command), "holds a pickled object of type", "it could run code")
    assert not marker.exists()


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_existing_output_is_refused_unless_overwrite(single_copy, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_bytes(b"keep me")
    assert_user_error(convert("consolidate", single_copy, "--out", out), "already exists", "--overwrite")
    assert out.read_bytes() == b"keep me"
    proc = convert("consolidate", single_copy, "--out", out, "--overwrite")
    assert proc.returncode == 0 and out.read_bytes() != b"keep me"
    assert_user_error(convert("export", single_copy, "--format", "onnx", "--out", out), "already exists")


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_unwritable_output_folder(single_copy, tmp_path):
    if os.geteuid() == 0:      # root writes through permission bits: use a folder nobody can create files in
        out = Path("/proc/facecl_convert_test.safetensors")
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o555)
        out = locked / "o.safetensors"
    before = fingerprint(single_copy)
    line = assert_user_error(convert("consolidate", single_copy, "--out", out))
    assert str(out.parent) in line
    assert_user_error(convert("consolidate", single_copy, "--out", tmp_path / "missing" / "o.safetensors"),
                      "does not exist")
    assert fingerprint(single_copy) == before


@pytest.mark.slow
def test_truncated_rank_file(ddp_copy, tmp_path):
    shard = ddp_copy / "checkpoints" / "step_00000003" / "head_rank00001.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    before = fingerprint(ddp_copy)
    assert_user_error(convert("consolidate", ddp_copy, "--with-head", "--out", tmp_path / "o.safetensors"),
                      "head_rank00001.pt is truncated or not a torch file")
    assert no_partial_files(tmp_path) and not (tmp_path / "o.safetensors").exists()
    assert fingerprint(ddp_copy) == before
    proc = convert("inspect", ddp_copy)
    assert proc.returncode == 1 and "problem:" in proc.stdout and "head_rank00001.pt" in proc.stdout
    assert [line.split()[-1] for line in proc.stdout.splitlines() if line.startswith("complete")] == ["NO"]


@pytest.mark.slow
def test_missing_rank_file(ddp_copy, tmp_path):
    (ddp_copy / "checkpoints" / "step_00000003" / "head_rank00001.pt").unlink()
    assert_user_error(convert("consolidate", ddp_copy, "--with-head", "--out", tmp_path / "o.safetensors"),
                      "incomplete", "head_rank00001.pt")
    proc = convert("inspect", ddp_copy, "--json")
    assert proc.returncode == 1 and '"complete": false' in proc.stdout and "head_rank00001.pt" in proc.stdout


@pytest.mark.slow
def test_missing_and_planted_zero_rank_file(runs_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(probed_run("zero2", runs_root).run_dir, run)
    tag = run / "checkpoints" / "step_00000003" / "deepspeed"
    optim = tag / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    saved = optim.read_bytes()
    optim.unlink()
    assert_user_error(convert("consolidate", run, "--out", tmp_path / "o.safetensors"),
                      "incomplete", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    marker = tmp_path / "marker"
    optim.write_bytes(saved)
    model_states = tag / "mp_rank_00_model_states.pt"
    payload = torch.load(model_states, weights_only=False)   # our own test file

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    payload["planted"] = Planted()
    torch.save(payload, model_states)
    assert_user_error(convert("consolidate", run, "--out", tmp_path / "o.safetensors"),
                      "mp_rank_00_model_states.pt holds a pickled object of type")
    assert not marker.exists()


@pytest.mark.slow
def test_planted_dcp_metadata_never_runs(runs_root, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(probed_run("fsdp", runs_root).run_dir, run)
    metadata_file = run / "checkpoints" / "step_00000003" / "fsdp" / ".metadata"
    marker = tmp_path / "marker"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    metadata = pickle.loads(metadata_file.read_bytes())   # our own test file
    metadata.planted = Planted()
    metadata_file.write_bytes(pickle.dumps(metadata))
    assert_user_error(convert("consolidate", run, "--out", tmp_path / "o.safetensors"), "pickled object of type")
    assert not marker.exists()
