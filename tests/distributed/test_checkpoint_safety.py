# --resume never unpickles a checkpoint file freely: a planted payload in any engine's files is refused.
"""For each engine (single, DDP, ZeRO-1/2/3, FSDP2) a real job writes a checkpoint; then each kind of file
in it is replaced by a torch file whose pickle would run `touch MARKER` (os.system) when loaded unsafely.
Resuming must end with one line `error: ...` naming that file, exit status 2, and no marker.
The control: loading the same planted file unsafely does create the marker (the payload is real).
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

from tests.distributed.conftest import ENGINES as ALL_ENGINES
from tests.distributed.conftest import SINGLE, check_ok, free_port, launcher, run_job, train_args

pytestmark = pytest.mark.slow  # real multi-process jobs (seconds to a minute each)

# (ranks, overrides): one rank where the engine's file kinds do not depend on it, two for DDP's folder.
ENGINES = {"single": (1, SINGLE), "ddp": (2, ALL_ENGINES["ddp"]),
           **{name: (1, ALL_ENGINES[name]) for name in ("zero1", "zero2", "zero3", "fsdp")}}
STEPS = ["train.num_epochs=0.9", "checkpoint.every_steps=5"]  # 5 steps, one checkpoint
# (engine, file inside the step-5 checkpoint): every kind of file each engine writes.
CASES = [
    ("single", "."),
    ("ddp", "trainer.pt"), ("ddp", "head_rank00001.pt"),
    ("zero1", "deepspeed/mp_rank_00_model_states.pt"), ("zero1", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("zero2", "deepspeed/mp_rank_00_model_states.pt"), ("zero2", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"),
    ("zero3", "deepspeed/zero_pp_rank_0_mp_rank_00_model_states.pt"),
    ("zero3", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt"), ("zero3", "head_rank00000.pt"),
    ("fsdp", "fsdp/.metadata"), ("fsdp", "trainer.pt"),
]


class _SystemPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """One real step-5 checkpoint per engine (built lazily, once)."""
    root = tmp_path_factory.mktemp("safety")
    made: dict[str, Path] = {}

    def get(engine: str) -> Path:
        if engine not in made:
            nproc, overrides = ENGINES[engine]
            port = free_port()
            proc = run_job(launcher(nproc, port), train_args(root, engine, *overrides, *STEPS), port=port)
            check_ok(proc)
            made[engine] = root / engine / "checkpoints" / "step_00000005"
            if engine == "single" or (engine == "ddp" and nproc == 1):
                made[engine] = made[engine].with_suffix(".pt")
        return made[engine]

    return get


def _plant(path: Path, marker: Path) -> None:
    if path.name == ".metadata":  # DCP metadata is a plain pickle
        import pickle

        path.write_bytes(pickle.dumps(_SystemPayload(marker)))
    else:
        torch.save({"format": "facecl-checkpoint", "format_version": 1, "step": 5, "evil": _SystemPayload(marker)},
                   path)


@pytest.mark.parametrize(("engine", "member"), CASES, ids=[f"{e}:{m}" for e, m in CASES])
def test_a_planted_payload_is_refused_on_resume(engine, member, checkpoints, tmp_path):
    nproc, overrides = ENGINES[engine]
    source = checkpoints(engine)
    copy = tmp_path / source.name
    (shutil.copytree if source.is_dir() else shutil.copy)(source, copy)
    target = copy if member == "." else copy / member
    assert target.exists(), f"the engine no longer writes {member}"
    marker = tmp_path / "marker"
    _plant(target, marker)
    port = free_port()
    proc = run_job(launcher(nproc, port), [*train_args(tmp_path, "resumed", *overrides, *STEPS), "--resume", str(copy)],
                   port=port, timeout=240)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode != 0 and errors, proc.stderr[-2000:]
    assert not marker.exists(), "the payload ran"
    assert str(target) in errors[0] or target.name in errors[0], errors
    assert "could run code" in errors[0] or "not load" in errors[0], errors
    assert "Check the documentation of torch.load" not in proc.stderr
    if nproc == 1:
        assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]


def test_the_payload_is_real(tmp_path):
    """Control: loading a planted file without restriction does run the payload."""
    marker = tmp_path / "marker"
    _plant(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_a_non_tensor_dcp_entry_is_loaded_with_weights_only(tmp_path):
    """DCP stores non-tensor entries with torch.save inside .distcp and loads them with an unrestricted
    torch.load; the FSDP2 strategy's planner refuses a pickled object there."""
    import torch.distributed.checkpoint as dcp

    from toolkit.errors import CheckpointError
    from toolkit.parallel.dcp_checkpoint import load_dcp_safely

    marker = tmp_path / "marker"
    folder = tmp_path / "dcp"
    dcp.save({"weight": torch.ones(3), "extra": _SystemPayload(marker)}, checkpoint_id=str(folder),
             no_dist=True)
    assert not marker.exists()
    state = {"weight": torch.zeros(3), "extra": None}
    with pytest.raises(CheckpointError, match="could run code"):
        load_dcp_safely(state, folder, no_dist=True)
    assert not marker.exists()
    # A plain entry loads: the planner only refuses what needs unpickling of code.
    dcp.save({"weight": torch.ones(3), "extra": "sgd"}, checkpoint_id=str(tmp_path / "ok"), no_dist=True)
    state = {"weight": torch.zeros(3), "extra": None}
    load_dcp_safely(state, tmp_path / "ok", no_dist=True)
    assert torch.equal(state["weight"], torch.ones(3)) and state["extra"] == "sgd"


def test_a_planted_file_deepspeed_would_find_is_refused_on_resume(checkpoints, tmp_path):
    """Not a file the engine writes: a raw pickle one folder down whose name DeepSpeed's converter would load
    (and a resume of a universal folder would walk). Every file under the tag folder is checked first."""
    import pickle

    source = checkpoints("zero2")
    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    target = copy / "deepspeed" / "a" / "mp_rank_00_model_states.pt"
    target.parent.mkdir()
    marker = tmp_path / "marker"
    target.write_bytes(pickle.dumps(_SystemPayload(marker)))
    nproc, overrides = ENGINES["zero2"]
    port = free_port()
    proc = run_job(launcher(nproc, port), [*train_args(tmp_path, "resumed", *overrides, *STEPS), "--resume", str(copy)],
                   port=port, timeout=240)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(errors) == 1 and str(target) in errors[0], proc.stderr[-2000:]
    assert not marker.exists(), "the payload ran"


@pytest.mark.parametrize(("engine", "member", "damage"), [
    ("zero2", "deepspeed/zero_pp_rank_0_mp_rank_00_optim_states.pt", "missing"),
    ("fsdp", "fsdp/__0_0.distcp", "truncated"),
])
def test_a_missing_or_cut_rank_file_is_one_line_on_resume(engine, member, damage, checkpoints, tmp_path):
    """The resume checks what every rank will read (files present, as long as their metadata says, readable)
    before any library reads it: one line naming the file, exit status 2, no traceback."""
    source = checkpoints(engine)
    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    target = copy / member
    if damage == "missing":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    nproc, overrides = ENGINES[engine]
    port = free_port()
    proc = run_job(launcher(nproc, port), [*train_args(tmp_path, "resumed", *overrides, *STEPS), "--resume", str(copy)],
                   port=port, timeout=240)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert target.name in errors[0] and damage in errors[0], errors
    assert "Traceback" not in proc.stderr
