# Multi-process test helpers: launch real gloo jobs (torchrun, deepspeed launcher) on CPU and read results.
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import PROCESS_MARKER, REPO, SMOKE_RECIPE

# 2 ranks, 16x16 images, 12 steps, checkpoints every 5 steps: a few seconds per job on 2 cores.
DIST_OVERRIDES = [
    "data.image_size=16", "data.batch_size=8", "data.num_workers=0",
    "data.synthetic.num_identities=12", "data.synthetic.samples_per_identity=8",
    "data.synthetic.num_val_identities=6", "data.synthetic.num_val_pairs=40",
    "model.embedding_size=32", "run.trackers=[]", "run.log_every=1", "eval.batch_size=40",
    "train.num_epochs=1.65", "checkpoint.every_steps=5", "checkpoint.keep_last=0", "optim.lr=0.02",
    "schedule.warmup_steps=2", "parallel.timeout_s=60",
]
JOB_TIMEOUT_S = 300

# Library messages users reported on every multi-rank CPU run (toolkit/quiet.py lists what silences each and why).
LIBRARY_NOISE = ["Unable to find hostfile", "Setting CUDA_VISIBLE_DEVICES", "untested optimizer",
                 "No CUDA runtime is found", "FutureWarning", "all_gather_into_tensor", "return func(*args, **kwargs)",
                 "Setting accelerator to CPU"]

# Every engine as recipe overrides: the one place the tests name them (tests/export too).
SINGLE = ["parallel.engine=single"]
ENGINES = {
    "ddp": ["parallel.engine=ddp"],
    "zero1": ["parallel.engine=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel.engine=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.engine=deepspeed", "parallel.zero_stage=3"],
    "fsdp": ["parallel.engine=fsdp"],
}
ZERO3_NO_PERSISTENCE = [*ENGINES["zero3"], "parallel.deepspeed_config=tests/distributed/zero3_no_persistence.yaml"]
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


_rank_server: dict = {}


def forked_ranks(nproc: int, port: int) -> list[str]:
    """A job of `nproc` ranks forked from the session's rank server (tests/distributed/rank_server.py: torch,
    DeepSpeed and the toolkit imported once), with torchrun's environment for a static single-node job; nproc 0
    is `python SCRIPT`. For the tests that inspect what a job computed or wrote; what a launcher itself does
    (signals, restarts, failures, library noise) is tested with torchrun and DeepSpeed's launcher."""
    if not _rank_server:
        _start_rank_server()
    return [sys.executable, str(REPO / "tests" / "distributed" / "rank_client.py"), _rank_server["socket"],
            str(nproc), str(port)]


def _start_rank_server() -> None:
    import atexit
    import tempfile
    import time

    folder = Path(tempfile.mkdtemp(prefix="facecl-rank-server-"))
    socket_path, log = folder / "socket", folder / "server.log"
    # Not marked as the current test's process (tests/conftest.py): the server lives for the whole session.
    env = {key: value for key, value in job_env().items() if key != PROCESS_MARKER}
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, str(REPO / "tests" / "distributed" / "rank_server.py"),
                                   str(socket_path)], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def stop() -> None:
        server.kill()
        server.wait(timeout=30)

    atexit.register(stop)
    deadline = time.monotonic() + 180
    while "ready" not in log.read_text():
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the rank server did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.05)
    _rank_server["socket"] = str(socket_path)


def launcher(nproc: int, port: int) -> list[str]:
    """One process as `python SCRIPT` (its exit status reaches us; a launcher reports every failure as 1),
    several as a job of forked ranks."""
    return forked_ranks(0 if nproc == 1 else nproc, port)


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


def worker_pids(launcher_pid: int, timeout: float = 30.0) -> dict[int, int]:
    """{rank: pid} of the training processes a launcher started (read from their RANK variable)."""
    import time

    import psutil

    deadline = time.monotonic() + timeout
    while True:
        found = {}
        for child in psutil.Process(launcher_pid).children(recursive=True):
            try:
                env = child.environ()
            except (psutil.Error, OSError):
                continue
            if "RANK" in env and any("train" in part for part in child.cmdline()):
                found[int(env["RANK"])] = child.pid
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def run_job_and_signal(launcher: list[str], args: list[str], *, port: int, when: str, send,
                       script: str = "launch/train.py", timeout: float = JOB_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run a job; when a line of its stdout contains `when`, call `send(launcher_process)` (e.g. to signal
    some of its ranks); return the finished process with its whole stdout and stderr."""
    import threading

    proc = subprocess.Popen([*launcher, script, *args], cwd=REPO, env=job_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    reader.start()
    lines, sent = [], False
    try:
        for line in proc.stdout:
            lines.append(line)
            if not sent and when in line:
                send(proc)
                sent = True
        proc.wait(timeout=timeout)
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        remove_deepspeed_shm_buffers(port)
    completed = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines), "".join(errors))
    completed.signal_sent = sent
    return completed


@pytest.fixture(scope="session")
def network_namespaces():
    """Two network namespaces joined by a veth pair (10.77.0.1 and 10.77.0.2): two "nodes" on this machine whose
    network stacks are really apart (no shared loopback). Needs root (CAP_NET_ADMIN); skipped otherwise."""
    import shutil as _shutil

    suffix = os.getpid() % 100000
    names, veths = (f"fcl{suffix}a", f"fcl{suffix}b"), (f"fcl{suffix}va", f"fcl{suffix}vb")
    setup = [["ip", "netns", "add", names[0]], ["ip", "netns", "add", names[1]],
             ["ip", "link", "add", veths[0], "type", "veth", "peer", "name", veths[1]],
             ["ip", "link", "set", veths[0], "netns", names[0]], ["ip", "link", "set", veths[1], "netns", names[1]],
             ["ip", "-n", names[0], "addr", "add", "10.77.0.1/24", "dev", veths[0]],
             ["ip", "-n", names[1], "addr", "add", "10.77.0.2/24", "dev", veths[1]],
             *[["ip", "-n", name, "link", "set", device, "up"] for name in names for device in ("lo",)],
             ["ip", "-n", names[0], "link", "set", veths[0], "up"], ["ip", "-n", names[1], "link", "set", veths[1], "up"]]
    if _shutil.which("ip") is None:
        pytest.skip("no `ip` command: network namespaces cannot be made here")
    try:
        for command in setup:
            proc = subprocess.run(command, capture_output=True, text=True)
            if proc.returncode != 0:
                pytest.skip(f"network namespaces cannot be made here ({' '.join(command)}: {proc.stderr.strip()})")
        yield {"namespaces": names, "interfaces": veths, "addresses": ("10.77.0.1", "10.77.0.2")}
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


def in_namespace(name: str) -> list[str]:
    return ["ip", "netns", "exec", name]
