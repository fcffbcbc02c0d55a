# Multi-process test helpers: launch real gloo jobs (torchrun, deepspeed launcher) on CPU and read results.
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, SMOKE_RECIPE

# 2 ranks, 16x16 images, 12 steps, checkpoints every 5 steps: a few seconds per job on 2 cores.
DIST_OVERRIDES = [
    "data.image_size=16", "data.batch_size=8", "data.num_workers=0",
    "data.synthetic.num_identities=12", "data.synthetic.samples_per_identity=8",
    "data.synthetic.num_val_identities=6", "data.synthetic.num_val_pairs=40",
    "model.embedding_size=32", "run.tensorboard=false", "run.log_every=1", "eval.batch_size=40",
    "train.num_epochs=1.65", "checkpoint.every_steps=5", "checkpoint.keep_last=0", "optim.lr=0.02",
    "schedule.warmup_steps=2", "parallel.timeout_s=60",
]
JOB_TIMEOUT_S = 300

# The multi-rank engines, as recipe overrides (shared by the engine, full-state and UniMoCo tests).
ENGINES = {
    "ddp": ["parallel.engine=ddp"],
    "zero1": ["parallel.engine=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.engine=deepspeed", "parallel.zero_stage=3"],
    "fsdp": ["parallel.engine=fsdp"],
}
# UniMoCo on top of the margin softmax, small enough for 2 ranks of 8 images.
UNIMOCO = ["contrastive.weight=1.0", "contrastive.queue_size=64", "contrastive.projection_dim=16",
           "contrastive.projection_hidden=32", "contrastive.momentum=0.9", "data.samples_per_label=2",
           "data.synthetic.labeled_fraction=0.5"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def job_env() -> dict:
    # One thread per rank: reproducible numerics whatever the launcher, and no oversubscription.
    return {**os.environ, "OMP_NUM_THREADS": "1", "FACECL_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
            "PYTHONPATH": str(REPO)}


def deepspeed_shm_buffers(port: int) -> list[Path]:
    """DeepSpeed's CPU shared-memory all-reduce files of the job on `port`."""
    return sorted(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))


def remove_deepspeed_shm_buffers(port: int) -> None:
    """DeepSpeed's CPU shared-memory all-reduce leaves /dev/shm files named after the master port."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"):
        path.unlink(missing_ok=True)


def train_args(output_dir: Path, name: str, *overrides: str) -> list[str]:
    args = ["--recipe", str(SMOKE_RECIPE)]
    for item in [*DIST_OVERRIDES, f"run.output_dir={output_dir}", f"run.name={name}", *overrides]:
        args += ["--set", item]
    return args


def run_job(launcher: list[str], args: list[str], *, port: int, script: str = "launch/train.py",
            timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run([*launcher, script, *args], cwd=REPO, env=job_env(), capture_output=True, text=True,
                              timeout=timeout)
        # What the job left behind, before this helper cleans up after it (tests assert on it).
        proc.shm_leftovers = deepspeed_shm_buffers(port)
        return proc
    finally:
        remove_deepspeed_shm_buffers(port)


def torchrun(nproc: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={port}"]


def launcher(nproc: int, port: int) -> list[str]:
    """Plain python for one process (its exit status reaches us; torchrun reports every failure as 1)."""
    return [sys.executable] if nproc == 1 else torchrun(nproc, port)


def deepspeed_launcher(num_gpus: int, port: int) -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", f"--num_gpus={num_gpus}", f"--master_port={port}"]


def loss_curve(run_dir: Path) -> dict[int, float]:
    results = json.loads((run_dir / "results.json").read_text())
    return {point["step"]: point["loss"] for point in results["loss_curve"]}


def check_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="session")
def dist_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")
