# Real training checkpoints for the converter tests: one job per engine (cached), plus what the trainer held.
from pathlib import Path

import pytest
import torch

from tests.distributed.conftest import ENGINES as DISTRIBUTED_ENGINES
from tests.distributed.conftest import (UNIMOCO, ZERO3_NO_PERSISTENCE, check_ok, forked_ranks, free_port, run_job,
                                        train_args)

ENGINES = {"single": [], **DISTRIBUTED_ENGINES, "zero0": ["parallel.engine=deepspeed", "parallel.zero_stage=0"],
           "zero3": ZERO3_NO_PERSISTENCE}
ENGINES["zero2_unimoco"] = [*ENGINES["zero2"], *UNIMOCO]
ADAMW = ["optim.name=adamw", "optim.lr=0.001"]
ENGINES["zero2_adamw"] = [*ENGINES["zero2"], *ADAMW]
ENGINES["zero3_adamw"] = [*ENGINES["zero3"], *ADAMW]
ENGINES["fsdp_unimoco"] = [*ENGINES["fsdp"], *UNIMOCO]
# Batch norm, a frozen key encoder, AdamW with a no-decay group; ZeRO-3 with DeepSpeed's default persistence.
ENGINES["zero2_adamw_unimoco"] = [*ENGINES["zero2"], *ADAMW, *UNIMOCO, "optim.weight_decay=0.05"]
ENGINES["zero3_adamw_unimoco"] = ["parallel.engine=deepspeed", "parallel.zero_stage=3", *ADAMW, *UNIMOCO,
                                  "optim.weight_decay=0.05"]
ENGINES["single_unimoco"] = UNIMOCO
# The WebFace42M flagship's own settings at tiny size: iresnet, SGD with momentum, ZeRO-2, bf16, Partial FC 0.2.
ENGINES["flagship"] = ["parallel.engine=deepspeed", "parallel.zero_stage=2", "model.backbone=iresnet18",
                       "parallel.precision=bf16", "head.sample_rate=0.2", "optim.name=sgd", "optim.momentum=0.9"]
SAVE_STEP = 3


class ProbedRun:
    """A run folder with one checkpoint (step 3) and the full parameters / centers its trainer held then;
    `full_state` is the same job's full_state_dict round trip (save_probe.py --full-state-out)."""

    def __init__(self, run_dir: Path, probe: Path, full_state: Path):
        self.run_dir = run_dir
        self.full_state = full_state
        payload = torch.load(probe, weights_only=True)
        self.step = payload["step"]
        self.state = payload["state"]
        self.centers = payload["centers"]

    @property
    def checkpoint(self) -> Path:
        folder = self.run_dir / "checkpoints" / f"step_{SAVE_STEP:08d}"
        return folder if folder.is_dir() else folder.with_suffix(".pt")


_runs: dict[str, ProbedRun] = {}


def probed_run(engine: str, root: Path) -> ProbedRun:
    """Train 3 steps with `engine` (2 gloo ranks; one process for single*), save, probe (cached per session: the
    export, consolidation, universal-checkpoint and full-state tests all inspect the same job of an engine)."""
    if engine not in _runs:
        port = free_port()
        launcher = forked_ranks(0 if engine.startswith("single") else 2, port)   # 0: `python SCRIPT`
        probe, full_state = root / f"{engine}_probe.pt", root / f"{engine}_full_state.pt"
        proc = run_job(launcher, [*train_args(root, engine, *ENGINES[engine]), "--steps", str(SAVE_STEP),
                                  "--out", str(probe), "--full-state-out", str(full_state)],
                       port=port, script="tests/export/save_probe.py")
        check_ok(proc)
        _runs[engine] = ProbedRun(root / engine, probe, full_state)
    return _runs[engine]


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export_runs")


@pytest.fixture(scope="session")
def single_run(runs_root) -> ProbedRun:
    return probed_run("single", runs_root)
