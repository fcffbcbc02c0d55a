# Resume a 2-rank checkpoint on 1 and 3 ranks: every engine, SGD and AdamW; the losses continue as the 2-rank run's.
"""The backbone is tests/distributed/norm_free_train.py's per-sample-normalised net (batch norm would make the
losses depend on how the global batch is split). Global batch 12 = 6 x 2 = 6 x 1 x 2 accumulation = 4 x 3:
`--resume` keeps the checkpoint's global batch (the per-rank batch stays where it divides, else the
accumulation), and says so. What carries over exactly: weights and optimizer state (DCP reshards), the center
shards (resharded by class range), the schedule, and the data position (same global batch: sample for sample).
Per-rank random state does not (the run says so); this recipe uses none after the checkpoint (no dropout,
sample rate 1). DeepSpeed's ZeRO files are partitioned by rank: `--resume` converts them once to DeepSpeed's
universal format (AdamW's exp_avg / exp_avg_sq, or SGD's momentum_buffer, which DeepSpeed 0.19.8's converter
does not know and FaceCL carries through it) and says so. ZeRO-3 is here too: before the strategy repaired
DeepSpeed 0.19.8's ZeRO-3 universal loader (one step tensor shared by all sub-groups, group 0's weight decay
given to every group), its AdamW losses drifted by 2e-2 relative within 5 steps.
"""
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.distributed.conftest import ENGINES as ALL_ENGINES
from tests.distributed.conftest import (JOB_TIMEOUT_S, check_ok, forked_ranks, free_port, in_namespace, job_env,
                                        loss_curve, run_job, train_args)

pytestmark = pytest.mark.slow  # real multi-process jobs

SAVE_STEP, NUM_STEPS, GLOBAL_BATCH = 5, 10, 12
COMMON = ["model.backbone=test_layernorm_net", "data.synthetic.samples_per_identity=10", "train.num_epochs=1",
          "checkpoint.every_steps=5"]
OPTIMIZERS = {"adamw": ["optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.05"],
              "sgd": ["optim.name=sgd", "optim.lr=0.05", "optim.momentum=0.9", "optim.weight_decay=5e-4"]}
SCRIPT = "tests/distributed/norm_free_train.py"
ENGINES = {name: ALL_ENGINES[name] for name in ("ddp", "fsdp", "zero1", "zero2", "zero3")}


def job(root, name: str, world: int, engine: str, optimizer: str, *cli: str, check: bool = True):
    """A job of the 2-rank recipe (6 per rank) on `world` ranks; a resume keeps the global batch by itself."""
    port = free_port()
    overrides = [*COMMON, *ENGINES[engine], *OPTIMIZERS[optimizer], f"data.batch_size={GLOBAL_BATCH // 2}"]
    proc = run_job(forked_ranks(world, port), [*train_args(root, name, *overrides), *cli], port=port, script=SCRIPT)
    if check:
        check_ok(proc)
    return proc


def two_rank_curve(root, engine: str, optimizer: str) -> dict[int, float]:
    job(root, f"{engine}_{optimizer}_w2", 2, engine, optimizer)
    return loss_curve(root / f"{engine}_{optimizer}_w2")


def universal_checkpoint(checkpoint):
    """`launch/convert.py universal` once per checkpoint (both new world sizes load the same folder)."""
    out = checkpoint.with_name(checkpoint.name + "_universal")
    if not out.exists():
        proc = subprocess.run([sys.executable, "launch/convert.py", "universal", str(checkpoint), "--out", str(out)],
                              cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("world_size_change")
    return root, {(engine, optimizer): two_rank_curve(root, engine, optimizer)
                  for engine in ENGINES for optimizer in OPTIMIZERS}


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_at_another_world_size_continues_the_losses(engine, optimizer, new_world, two_rank_runs):
    root, runs = two_rank_runs
    full = runs[engine, optimizer]
    assert sorted(full) == list(range(1, NUM_STEPS + 1))
    checkpoint = root / f"{engine}_{optimizer}_w2" / "checkpoints" / f"step_{SAVE_STEP:08d}"
    name = f"{engine}_{optimizer}_w{new_world}"
    proc = job(root, name, new_world, engine, optimizer, "--resume", str(checkpoint))
    assert f"written by 2 ranks, this job has {new_world}" in proc.stdout
    assert "the data continues sample for sample (same global batch)" in proc.stdout
    per_rank, accum = (6, 2) if new_world == 1 else (4, 1)
    assert (f"global batch kept across the world-size change: the checkpoint's 6 per rank x 2 ranks x 1 accumulation "
            f"= 12; now {per_rank} per rank x {new_world} ranks x {accum} accumulation = 12") in proc.stdout
    if engine.startswith("zero"):   # converted once, by rank 0, next to this run's checkpoints; gone after a save
        converted = root / name / "checkpoints" / f"step_{SAVE_STEP:08d}.universal"
        assert f"converting it for any world size into {converted} (once)" in proc.stdout
        assert not converted.exists()
    resumed = loss_curve(root / name)
    worst = max(abs(resumed[step] / full[step] - 1) for step in range(SAVE_STEP + 1, NUM_STEPS + 1))
    print(f"\n{engine} {optimizer} 2 -> {new_world} ranks: largest relative loss difference over steps 6-10 {worst:.2e}")
    for step in range(SAVE_STEP + 1, NUM_STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=0), (engine, optimizer, new_world, step)
    # The losses move, so agreement is not agreement on a constant.
    assert abs(full[NUM_STEPS] - full[SAVE_STEP + 1]) > 1e-3


def test_a_universal_folder_without_the_module_extras_is_refused(two_rank_runs):
    """A universal folder lacking module_extras.pt (buffers, frozen parameters) would resume with them freshly
    initialised; it is refused with one line saying how to convert again."""
    root, _ = two_rank_runs
    universal = universal_checkpoint(root / "zero2_adamw_w2" / "checkpoints" / f"step_{SAVE_STEP:08d}")
    stripped = root / "zero2_stripped_universal"
    shutil.copytree(universal, stripped)
    (stripped / "deepspeed" / "module_extras.pt").unlink()
    port = free_port()
    overrides = [*COMMON, *ENGINES["zero2"], *OPTIMIZERS["adamw"], f"data.batch_size={GLOBAL_BATCH}"]
    proc = run_job(forked_ranks(1, port), [*train_args(root, "zero2_stripped", *overrides), "--resume", str(stripped)],
                   port=port, script=SCRIPT)
    assert proc.returncode != 0
    assert "universal checkpoint without deepspeed/module_extras.pt" in proc.stdout + proc.stderr
    assert "python launch/convert.py universal" in proc.stdout + proc.stderr


ELASTIC_STEPS = 40   # 4 epochs of 10 steps: long enough that a node can be killed mid-run


def elastic_node_command(root, name: str, endpoint: str, local_addr: str | None = None) -> list[str]:
    """One "node" of an elastic job: a torchrun agent with one rank, 1 to 2 nodes, up to 3 restarts, and the
    job script's `--resume auto` (the same command line at every restart). `local_addr`: the address the other
    node reaches this one at (torchrun otherwise publishes the host name, which here resolves to loopback, and
    cannot tell by the name whether it hosts the rendezvous: is_host says so)."""
    overrides = [*COMMON, *ENGINES["ddp"], *OPTIMIZERS["sgd"], f"data.batch_size={GLOBAL_BATCH // 2}",
                 f"train.num_epochs={ELASTIC_STEPS // 10}"]
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", "--nproc-per-node=1", "--max-restarts=3",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--monitor-interval=0.5",
            "--rdzv-conf=last_call_timeout=2,keep_alive_interval=1,keep_alive_max_attempt=3"
            + (f",is_host={int(local_addr == endpoint.rsplit(':', 1)[0])}" if local_addr else ""),
            *([f"--local-addr={local_addr}"] if local_addr else []),
            SCRIPT, *train_args(root, name, *overrides), "--resume", "auto"]


@pytest.fixture(scope="module")
def uninterrupted_elastic_reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("elastic_reference")
    job(root, "elastic_reference", 2, "ddp", "sgd", "--set", f"train.num_epochs={ELASTIC_STEPS // 10}")
    return loss_curve(root / "elastic_reference")


def run_elastic_pair(root, name: str, endpoint: str, prefixes=([], []), local_addrs=(None, None),
                     victim: int | None = None) -> tuple:
    """Start two nodes; after the checkpoint of step 10 kill one (agent and rank, SIGKILL): `victim`, or the node
    whose agent does not host the rendezvous store. Returns (survivor's output, victim, seconds)."""
    import threading
    import time

    import psutil

    started = time.monotonic()
    nodes = [subprocess.Popen([*prefixes[i], *elastic_node_command(root, name, endpoint, local_addrs[i])], cwd=REPO, env=job_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs: list[list[str]] = [[], []]
    readers = [threading.Thread(target=lambda i=i: logs[i].extend(nodes[i].stdout), daemon=True) for i in range(2)]
    for reader in readers:
        reader.start()
    try:
        killed = None
        while killed is None and all(node.poll() is None for node in nodes) and time.monotonic() - started < JOB_TIMEOUT_S:
            if any("checkpoint saved:" in line and "step_00000010" in line for log in logs for line in log):
                if victim is None:
                    port = int(endpoint.rsplit(":", 1)[1])
                    hosts = [i for i, node in enumerate(nodes) if any(
                        c.laddr.port == port and c.status == psutil.CONN_LISTEN
                        for c in psutil.Process(node.pid).net_connections())]
                    victim = 1 - hosts[0]
                top = psutil.Process(nodes[victim].pid)
                for process in [top, *top.children(recursive=True)]:
                    process.kill()
                killed = victim
            time.sleep(0.02)
        assert killed is not None, "".join(logs[0] + logs[1])[-4000:]
        survivor = nodes[1 - killed]
        status = survivor.wait(timeout=JOB_TIMEOUT_S)
        readers[1 - killed].join(timeout=10)
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    output = "".join(logs[1 - killed])
    assert status == 0, output[-4000:]
    return output, killed, time.monotonic() - started


def check_elastic_result(root, name: str, output: str, reference: dict[int, float], label: str, seconds: float):
    resumed_at = int(output.split("resumed from ")[1].split(" at step ")[1].split()[0])
    print(f"\n{label}: a node was killed after the step-10 checkpoint; the other resumed at step {resumed_at} on 1 rank "
          f"and finished in {seconds:.1f} s")
    assert resumed_at >= 10 and "this job has 1" in output
    assert "now 6 per rank x 1 ranks x 2 accumulation = 12" in output
    elastic = loss_curve(root / name)
    assert sorted(elastic) == list(range(1, ELASTIC_STEPS + 1))
    for step in range(resumed_at + 1, ELASTIC_STEPS + 1):
        assert elastic[step] == pytest.approx(reference[step], rel=1e-5, abs=0), step


def test_an_elastic_job_that_loses_a_node_carries_on_by_itself(tmp_path, uninterrupted_elastic_reference):
    """Two torchrun agents on this machine as two nodes; after the checkpoint of step 10 one node is killed
    (agent and rank, SIGKILL). The other rank fails on the closed connection, its agent restarts it with
    WORLD_SIZE=1, and the same command line resumes from step 10 with the global batch kept (2 accumulation
    steps): the job finishes by itself with the losses of an uninterrupted 2-rank run."""
    output, _, seconds = run_elastic_pair(tmp_path, "elastic", f"127.0.0.1:{free_port()}")
    check_elastic_result(tmp_path, "elastic", output, uninterrupted_elastic_reference, "elastic job", seconds)


def test_an_elastic_job_across_network_namespaces_carries_on(tmp_path, uninterrupted_elastic_reference,
                                                             network_namespaces):
    """The same with the two nodes in network namespaces of their own (10.77.0.1 hosts the rendezvous; each agent
    is told its address with --local-addr, as across real hosts whose names do not resolve to the shared network);
    the node at 10.77.0.2 is killed."""
    nets = network_namespaces
    prefixes = tuple(in_namespace(name) for name in nets["namespaces"])
    output, _, seconds = run_elastic_pair(tmp_path, "elastic_apart", f"{nets['addresses'][0]}:{free_port()}",
                                          prefixes=prefixes, local_addrs=nets["addresses"], victim=1)
    check_elastic_result(tmp_path, "elastic_apart", output, uninterrupted_elastic_reference,
                         "elastic job across network namespaces", seconds)
