# Launch paths on CPU: deepspeed launcher, two-"node" hostfile run, failing ranks, and bad input.
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, SMOKE_RECIPE
from tests.distributed.conftest import (LIBRARY_NOISE, check_ok, deepspeed_launcher, deepspeed_shm_buffers,
                                        forked_ranks, free_port, in_namespace, job_env, loss_curve,
                                        remove_deepspeed_shm_buffers, run_job, torchrun, train_args)

pytestmark = pytest.mark.slow  # real multi-process jobs (seconds to a minute each)

ZERO2 = ["parallel.engine=deepspeed", "parallel.zero_stage=2"]


@pytest.fixture(scope="module")
def torchrun_zero2(dist_root):
    """Reference: the same ZeRO-2 job started by torchrun."""
    port = free_port()
    check_ok(run_job(torchrun(2, port), train_args(dist_root, "launch_ref", *ZERO2), port=port))
    return loss_curve(dist_root / "launch_ref")


def test_deepspeed_launcher_two_ranks_matches_torchrun(dist_root, torchrun_zero2):
    port = free_port()
    proc = run_job(deepspeed_launcher(2, port), train_args(dist_root, "ds_launcher", *ZERO2), port=port)
    check_ok(proc)
    assert "world size 2" in proc.stdout
    assert loss_curve(dist_root / "ds_launcher") == pytest.approx(torchrun_zero2, rel=1e-6)
    assert proc.shm_leftovers == []   # what the job left, looked at before run_job's own clean-up
    # Library noise comes only from the launcher's own processes, which run none of the toolkit's code (hidden by
    # `deepspeed --quiet`; see toolkit/quiet.py): the ranks print none.
    launcher_line = re.compile(r"^\[[^]]+\] \[(INFO|WARNING)\] \[(runner|launch)\.py:\d+:")
    ranks_console = [line for line in (proc.stdout + proc.stderr).splitlines() if not launcher_line.match(line)]
    assert [line for line in ranks_console if any(text in line for text in LIBRARY_NOISE)] == []


def test_forked_ranks_compute_what_torchrun_s_ranks_compute(dist_root, torchrun_zero2):
    """The other test files start most jobs' ranks from the rank server (conftest.forked_ranks); the losses of
    the same ZeRO-2 job are torchrun's, and the ranks saw the launcher's variables."""
    port = free_port()
    proc = run_job(forked_ranks(2, port), train_args(dist_root, "forked", *ZERO2), port=port)
    check_ok(proc)
    assert "world size 2" in proc.stdout
    assert loss_curve(dist_root / "forked") == pytest.approx(torchrun_zero2, rel=1e-6)


def test_a_failing_forked_rank_ends_the_job_as_torchrun_does(dist_root):
    """As under torchrun: the job's status is 1 when a rank fails, and the other rank does not keep it waiting
    (it is stopped within the server's 10 s grace, far below the 60 s collective timeout)."""
    port = free_port()
    env = {**job_env(), "FACECL_TEST_FAIL_RANK": "1", "FACECL_TEST_FAIL_STEP": "3"}
    args = train_args(dist_root, "fail_forked", "parallel.engine=ddp", "parallel.timeout_s=600")
    start = time.monotonic()
    proc = subprocess.run([*forked_ranks(2, port), "tests/distributed/fail_on_rank.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    elapsed = time.monotonic() - start
    assert proc.returncode == 1 and "fails on purpose at step 3" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    assert elapsed < 30, f"job took {elapsed:.0f} s to stop"


def test_deepspeed_jobs_leave_no_shared_memory_files(tmp_path):
    """DeepSpeed's CPU all-reduce maps one /dev/shm file per rank; the toolkit unlinks them once every rank
    has mapped them, so nothing is left after a user error or even SIGKILL."""
    port = free_port()
    proc = run_job(torchrun(2, port), [*train_args(tmp_path, "shm_error", *ZERO2), "--resume", str(tmp_path / "none")],
                   port=port)
    assert proc.returncode != 0 and "does not exist" in proc.stderr
    assert proc.shm_leftovers == []

    port = free_port()
    job = subprocess.Popen([*torchrun(2, port), "launch/train.py", *train_args(tmp_path, "shm_kill", *ZERO2,
                                                                             "train.num_epochs=50")],
                           cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        for line in job.stdout:   # training has started: every rank is past the process-group start
            if line.startswith("step "):
                break
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
        time.sleep(1)
        assert deepspeed_shm_buffers(port) == []
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        remove_deepspeed_shm_buffers(port)


def test_two_nodes_from_a_hostfile_match_one_node(dist_root, tmp_path, torchrun_zero2):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    port = free_port()
    procs = []
    try:
        for node_rank in (0, 1):
            args = train_args(dist_root / f"node{node_rank}", "two_nodes", *ZERO2)
            procs.append(subprocess.Popen(
                ["bash", "launch/multinode.sh", str(hostfile), str(node_rank), "127.0.0.1", str(port), "--", *args],
                cwd=REPO, env=job_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = [proc.communicate(timeout=300)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
        remove_deepspeed_shm_buffers(port)
    for proc, output in zip(procs, outputs):
        assert proc.returncode == 0, output[-4000:]
    assert "world size 2" in outputs[0]
    # Node 0 holds rank 0, which writes the results; the losses equal the single-node job's.
    assert loss_curve(dist_root / "node0" / "two_nodes") == pytest.approx(torchrun_zero2, rel=1e-6)


def multinode_in_namespaces(nets, hostfile, root, name: str, port: int, env_per_node=({}, {})) -> list:
    """launch/multinode.sh on node 0 and node 1, each in its own network namespace; (status, output, seconds)."""
    hostfile.write_text(f"{nets['addresses'][0]} slots=1\n{nets['addresses'][1]} slots=1\n")
    procs, started = [], time.monotonic()
    try:
        for node_rank in (0, 1):
            args = train_args(root / f"node{node_rank}", name, *ZERO2)
            procs.append(subprocess.Popen(
                [*in_namespace(nets["namespaces"][node_rank]), "bash", "launch/multinode.sh", str(hostfile),
                 str(node_rank), nets["addresses"][0], str(port), "--", *args],
                cwd=REPO, env={**job_env(), **env_per_node[node_rank]}, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, text=True))
        outputs = [(proc.communicate(timeout=300)[0], time.monotonic() - started) for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
    return [(proc.returncode, output, seconds) for proc, (output, seconds) in zip(procs, outputs)]


def test_two_nodes_with_their_own_network_stacks_train_as_one(dist_root, tmp_path, torchrun_zero2, network_namespaces):
    """Nodes really apart (two network namespaces, addresses 10.77.0.1 / 10.77.0.2, nothing set by the user):
    each picks the interface that routes to MASTER_ADDR and says so; without that, gloo took the loopback
    address that the host name resolves to and the job failed."""
    nets = network_namespaces
    results = multinode_in_namespaces(nets, tmp_path / "hosts", dist_root / "netns", "apart", free_port())
    for node, (status, output, _) in enumerate(results):
        assert status == 0, output[-4000:]
        interface, address = nets["interfaces"][node], nets["addresses"][node]
        assert f"network: GLOO_SOCKET_IFNAME={interface} ({address}), the interface that routes to MASTER_ADDR " \
               f"{nets['addresses'][0]}" in output
    assert loss_curve(dist_root / "netns" / "node0" / "apart") == pytest.approx(torchrun_zero2, rel=1e-6)


def test_a_node_that_cannot_reach_its_peer_ends_both_nodes_within_seconds(tmp_path, network_namespaces):
    """Node 0 told to use its loopback interface (GLOO_SOCKET_IFNAME=lo) publishes 127.0.0.1, which node 1 cannot
    reach: both nodes end within seconds (parallel.timeout_s is 60) with one line saying what to set."""
    nets = network_namespaces
    results = multinode_in_namespaces(nets, tmp_path / "hosts", tmp_path, "unreachable", free_port(),
                                      env_per_node=({"GLOO_SOCKET_IFNAME": "lo"}, {}))
    for status, output, seconds in results:
        assert status != 0 and seconds < 40, (seconds, output[-3000:])
        errors = [line for line in output.splitlines() if line.startswith("error:")]
        assert errors and "rank 1 (10.77.0.2) cannot reach rank 0 at 127.0.0.1:" in errors[0], output[-3000:]
        assert "set GLOO_SOCKET_IFNAME" in errors[0]


@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_a_failing_rank_stops_the_whole_job(dist_root, launcher):
    port = free_port()
    command = torchrun(2, port) if launcher == "torchrun" else deepspeed_launcher(2, port)
    env = {**job_env(), "FACECL_TEST_FAIL_RANK": "1", "FACECL_TEST_FAIL_STEP": "3"}
    # Long timeout for collectives: the job must end because the launcher stops it, not by timing out.
    args = train_args(dist_root, f"fail_{launcher}", "parallel.engine=ddp", "parallel.timeout_s=600")
    start = time.monotonic()
    try:
        proc = subprocess.run([*command, "tests/distributed/fail_on_rank.py", *args], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=240)
    finally:
        remove_deepspeed_shm_buffers(port)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert "fails on purpose at step 3" in proc.stdout + proc.stderr
    assert elapsed < 120, f"job took {elapsed:.0f} s to stop"


@pytest.mark.parametrize("failing_rank", [0, 1])
def test_an_error_the_toolkit_recognises_is_one_line_for_the_whole_job(tmp_path, failing_rank):
    """A rank ending with a FaceCLError (as a full disk during a DeepSpeed save) posts it; the other rank, whose
    collective then fails on the closed connection, ends quietly instead of printing its gloo traceback."""
    port = free_port()
    env = {**job_env(), "FACECL_TEST_FAIL_RANK": str(failing_rank), "FACECL_TEST_FAIL_STEP": "3",
           "FACECL_TEST_FAIL_KIND": "user"}
    try:
        proc = subprocess.run([*deepspeed_launcher(2, port), "tests/distributed/fail_on_rank.py",
                               *train_args(tmp_path, "user_error", *ZERO2)], cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=240)
    finally:
        remove_deepspeed_shm_buffers(port)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert proc.returncode != 0
    assert len(errors) == 1 and f"rank {failing_rank} fails on purpose at step 3" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "Connection closed" not in proc.stderr, proc.stderr[-3000:]
    results = json.loads((tmp_path / "user_error" / "results.json").read_text())   # rank 0 writes it either way
    assert results["status"] == "failed" and f"rank {failing_rank} fails on purpose" in results["message"]


def run_single(*overrides: str) -> subprocess.CompletedProcess:
    args = ["--recipe", str(SMOKE_RECIPE)]
    for item in overrides:
        args += ["--set", item]
    return subprocess.run([sys.executable, "launch/train.py", *args], cwd=REPO, env=job_env(), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("overrides,expected", [
    (["parallel.engine=deepspeed", "parallel.zero_stage=4"], "parallel.zero_stage must be 0, 1, 2 or 3, got 4"),
    (["parallel.precision=fp16", "train.device=cpu"], "'fp16' needs a CUDA device"),
    (["parallel.engine=deepspeeed"], "'parallel.engine' must be one of 'single', 'ddp', 'deepspeed', 'fsdp', got "
                                     "'deepspeeed'"),
    (["data.batch_size=9000"], "global batch 9000 (9000 per rank x parallel.grad_accum_steps=1 x 1 ranks) is "
                               "larger than the data set (8000 samples)"),
    (["data.batch_size=0", "data.global_batch_size=100", "parallel.grad_accum_steps=3"],
     "data.global_batch_size=100 does not divide into 1 ranks x parallel.grad_accum_steps=3"),
    (["data.global_batch_size=64"], "give exactly one of data.batch_size"),
])
def test_bad_parallel_settings_are_one_line_errors(overrides, expected, tmp_path):
    proc = run_single(*overrides, f"run.output_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], proc.stderr


def test_single_engine_refuses_several_ranks(dist_root):
    port = free_port()
    proc = run_job(torchrun(2, port), train_args(dist_root, "single_two", "parallel.engine=single"), port=port)
    assert proc.returncode != 0
    assert "parallel.engine 'single' runs one process, but the launcher started 2 ranks" in proc.stderr


@pytest.mark.parametrize("content,expected", [
    ("node1 slots=8\nnode2 slots=x\n", "line 2: 'node2 slots=x' is not 'HOST slots=N'"),
    ("node1 slots=8\nnode1 slots=8\n", "line 2: host node1 is listed twice"),
    ("# nothing\n", "lists no hosts"),
])
def test_bad_hostfile_is_a_one_line_error(tmp_path, content, expected):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(content)
    proc = subprocess.run(["bash", "launch/multinode.sh", str(hostfile), "0", "127.0.0.1", "--", "--recipe", "x"],
                          cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr


def test_example_hostfile_parses():
    from toolkit.distributed.hostfile import parse_hostfile

    assert parse_hostfile(REPO / "launch" / "hostfile.example") == {"node1": 8, "node2": 8}


def test_a_dying_node_stops_the_other_node(dist_root, tmp_path):
    """Two launchers (as on two machines): node 1's rank fails, node 0's launcher cannot see it, yet exits."""
    hostfile = tmp_path / "hosts"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    port = free_port()
    env = {**job_env(), "FACECL_TEST_FAIL_RANK": "1", "FACECL_TEST_FAIL_STEP": "3"}
    procs = []
    start = time.monotonic()
    try:
        for node_rank in (0, 1):
            args = train_args(dist_root / f"dying{node_rank}", "dying", "parallel.engine=ddp", "parallel.timeout_s=30")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), "--no_ssh",
                 "--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                 "tests/distributed/fail_on_rank.py", *args],
                cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = [proc.communicate(timeout=180)[0] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
        remove_deepspeed_shm_buffers(port)
    elapsed = time.monotonic() - start
    assert procs[1].returncode != 0 and "fails on purpose" in outputs[1]
    assert procs[0].returncode != 0, outputs[0][-3000:]
    assert elapsed < 90, f"{elapsed:.0f} s"


TIMEOUT_S = 15


@pytest.mark.parametrize("engine", [["parallel.engine=ddp"], ZERO2, ["parallel.engine=fsdp"]],
                         ids=["ddp", "zero2", "fsdp"])
def test_a_frozen_rank_ends_the_job_within_the_timeout(tmp_path, engine):
    """SIGSTOP on rank 1 at step 3: the other rank's watchdog names it and ends the job after about
    parallel.timeout_s (plus the launcher's grace period for stopping the frozen process)."""
    port = free_port()
    env = {**job_env(), "FACECL_TEST_STALL_RANK": "1", "FACECL_TEST_STALL_STEP": "3"}
    args = train_args(tmp_path, "stall", *engine, f"parallel.timeout_s={TIMEOUT_S}", "train.num_epochs=5")
    start = time.monotonic()
    job = subprocess.Popen([*torchrun(2, port), "tests/distributed/stall_on_rank.py", *args], cwd=REPO, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=TIMEOUT_S + 120)
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        os.killpg(job.pid, signal.SIGKILL) if _group_alive(job.pid) else None
        remove_deepspeed_shm_buffers(port)
    elapsed = time.monotonic() - start
    assert "rank 1 freezes at step 3" in stdout
    assert job.returncode != 0
    lines = [line for line in stderr.splitlines() if "no progress for" in line]
    assert lines and lines[0].startswith("error: [rank 0] no progress for ") and "rank 1 (last at step 2," in lines[0], \
        stderr[-3000:]   # rank 1 froze before its step 3: its last heartbeat is step 2's
    assert elapsed < TIMEOUT_S + 60, f"the job took {elapsed:.0f} s to end"
    # The run's own status is in results.json (the launchers report 1 or a signal status).
    results = json.loads((tmp_path / "stall" / "results.json").read_text())
    assert (results["status"], results["exit_status"]) == ("stalled", 4) and "no progress for" in results["message"]


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
