# Test helper: one process imports torch, DeepSpeed and the toolkit once; every job's ranks are forked from it.
"""Why: a rank started by torchrun spends 4-5 s importing torch, torch._dynamo (every torch optimizer imports it
on first use), torch._inductor (DeepSpeed's ZeRO optimizer check imports its Muon kernels) and DeepSpeed, and
torchrun itself 1.8 s more; a 2-rank test job did 5-7 s of that before its first step. Here those imports happen
once per test session and a job's ranks start in milliseconds.

What a job gets is what torchrun gives a static single-node job: one process per rank (real processes, gloo over
TCP, the launcher's env:// rendezvous variables RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
MASTER_PORT), the job's environment and working folder, its script run as __main__; when a rank fails the others
get SIGTERM (SIGKILL 10 s later) and the job ends with status 1, as torchrun does; SIGTERM / SIGINT to the client
reach every rank. One process (--nproc 0) is `python SCRIPT` instead: no launcher variables, its own exit status.
What is not the same: modules are imported before the job's environment is set (the server starts with the
tests' job environment; variables a library reads at import time must not differ per job), and library messages
printed at import time are not in the job's output. The launchers themselves are tested with torchrun and
DeepSpeed's launcher (test_launchers.py, the preemption and elastic tests), never through this server.

Protocol (a Unix socket): the client sends one JSON line {nproc, port, script, args, env, cwd} with its stdin,
stdout and stderr attached (SCM_RIGHTS); the job leader answers "pid N", then the client may send "signal S"
lines; the leader ends with "exit STATUS". A closed client connection kills the job.

    python tests/distributed/rank_server.py SOCKET
"""
import json
import os
import select
import signal
import socket
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# As `python SCRIPT` would have it, less the script's own folder (this file's folder here).
INTERPRETER_PATH = list(sys.path[1:])
FAILED_RANK_GRACE_S = 10.0


# Everything a job's ranks import anyway, each for the reason in the module docstring.
PRELOADED = ["torch", "torch._dynamo", "torch._inductor.compile_fx", "deepspeed",
             "deepspeed.runtime.zero.muon.muon_optimizer", "deepspeed.checkpoint.ds_to_universal",
             "torch.distributed.checkpoint", "torch.distributed.checkpoint.state_dict", "torch.distributed.fsdp",
             "launch.train", "toolkit.training.trainer", "toolkit.parallel.deepspeed_zero", "toolkit.parallel.fsdp2"]


def preload() -> None:
    import importlib

    sys.path.insert(0, str(REPO))
    for name in PRELOADED:
        importlib.import_module(name)


def run_rank(spec: dict, fds: list[int], rank: int | None) -> None:
    """In a forked child: become `python SCRIPT ARGS` of this rank, then leave with the script's status."""
    status = 1
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            os.close(fd)
        for name in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(name, signal.SIG_DFL)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        os.chdir(spec["cwd"])
        os.environ.clear()
        os.environ.update(spec["env"])
        if rank is not None:
            os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(spec["nproc"]),
                               "LOCAL_WORLD_SIZE": str(spec["nproc"]), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
                               "ROLE_WORLD_SIZE": str(spec["nproc"]), "MASTER_ADDR": "127.0.0.1",
                               "MASTER_PORT": str(spec["port"])})
        script = str(Path(spec["script"]).resolve())
        sys.argv = [spec["script"], *spec["args"]]
        sys.path[:] = [str(Path(script).parent), *INTERPRETER_PATH]
        import runpy

        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as exc:
        code = exc.code
        status = code if isinstance(code, int) else (0 if code is None else 1)
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
        status = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(status)


def lead_job(conn: socket.socket, spec: dict, fds: list[int]) -> None:
    """In a forked child of the server: start the ranks, relay signals, end them all when one fails."""
    for name in (signal.SIGTERM, signal.SIGINT):
        signal.signal(name, signal.SIG_DFL)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    ranks = [None] if spec["nproc"] == 0 else list(range(spec["nproc"]))
    children = []
    for rank in ranks:
        pid = os.fork()
        if pid == 0:
            conn.close()
            run_rank(spec, fds, rank)
        children.append(pid)
    for fd in fds:
        os.close(fd)
    conn.sendall(f"pid {os.getpid()}\n".encode())
    statuses: dict[int, int] = {}
    failed_at = None
    buffer = b""
    while len(statuses) < len(children):
        readable, _, _ = select.select([conn], [], [], 0.05)
        if readable:
            data = conn.recv(4096)
            if not data:   # the client is gone (killed by its test): so is the job
                _signal_running(children, statuses, signal.SIGKILL)
                os._exit(1)
            buffer += data
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                if line.startswith(b"signal "):
                    _signal_running(children, statuses, int(line.split()[1]))
        for pid, code in finished_children():
            statuses[pid] = code
            if code != 0 and failed_at is None:
                failed_at = time.monotonic()
                _signal_running(children, statuses, signal.SIGTERM)
        if failed_at is not None and time.monotonic() - failed_at > FAILED_RANK_GRACE_S:
            _signal_running(children, statuses, signal.SIGKILL)
    codes = list(statuses.values())
    if spec["nproc"] == 0:
        status = codes[0] if codes[0] >= 0 else 128 - codes[0]
    else:
        status = 0 if all(code == 0 for code in codes) else 1
    try:
        conn.sendall(f"exit {status}\n".encode())
    finally:
        os._exit(0)


def finished_children():
    """(pid, exit code) of each child that has ended since the last call (negative code: killed by that signal)."""
    while True:
        try:
            pid, raw = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, os.waitstatus_to_exitcode(raw)


def _signal_running(children: list[int], statuses: dict, signum: int) -> None:
    """Send `signum` to every child that has not ended yet."""
    for pid in children:
        if pid not in statuses:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def receive_job(conn: socket.socket) -> tuple[dict, list[int]]:
    """One JSON line and the client's three standard streams."""
    message, fds, _, _ = socket.recv_fds(conn, 1 << 20, 3)
    while not message.endswith(b"\n"):
        more = conn.recv(1 << 20)
        if not more:
            raise ConnectionError("the client closed the connection before its job was complete")
        message += more
    return json.loads(message), list(fds)


def serve(path: str) -> None:
    preload()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(16)
    print("ready", flush=True)
    while True:
        readable, _, _ = select.select([server], [], [], 0.5)
        for _ in finished_children():   # reap the job leaders that have ended
            pass
        if os.getppid() == 1:   # the test session that started this server is gone
            return
        if not readable:
            continue
        conn, _ = server.accept()
        try:
            spec, fds = receive_job(conn)
        except (ConnectionError, ValueError, OSError) as exc:
            print(f"rank server: bad request: {exc}", file=sys.stderr, flush=True)
            conn.close()
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            server.close()
            lead_job(conn, spec, fds)
        conn.close()
        for fd in fds:
            os.close(fd)


if __name__ == "__main__":
    serve(sys.argv[1])
