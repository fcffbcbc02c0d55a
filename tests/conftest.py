# Shared fixtures: repository paths and a fast variant of the smoke recipe.
import contextlib
import os
import signal
import time
import uuid
from pathlib import Path

import pytest

pytest_plugins = ["tests.arcface_torch_source"]  # arcface_torch_copy: insightface's code as a reference

REPO = Path(__file__).resolve().parent.parent
SMOKE_RECIPE = REPO / "recipes" / "smoke_synthetic.yaml"

# Small enough that a few steps take well under a second on 2 cores.
TINY_OVERRIDES = [
    "data.image_size=16", "data.batch_size=8", "data.num_workers=0",
    "data.synthetic.num_identities=12", "data.synthetic.samples_per_identity=4",
    "data.synthetic.num_val_identities=6", "data.synthetic.num_val_pairs=40",
    "model.embedding_size=32", "run.trackers=[]", "run.log_every=1", "eval.batch_size=40",
    "train.num_epochs=3",  # 18 steps, as before the smoke recipe itself went from 3 epochs to 1
]


@pytest.fixture
def tiny_recipe(tmp_path):
    """load_config for the smoke recipe shrunk to a few-second run in tmp_path; extra overrides win."""
    from toolkit.config import load_config

    def make(*extra: str):
        return load_config(SMOKE_RECIPE, [*TINY_OVERRIDES, f"run.output_dir={tmp_path}", *extra])

    return make


# ---------------------------------------------------------------------------------------------------------------
# Leaked processes. A test that starts jobs (torchrun, deepspeed, elastic nodes, killed runs) must end them all: a
# process left behind keeps the terminal's pipe open, and a CI runner that waits for the end of the output then
# waits until its own time limit although every test passed. Each test's processes inherit a marker in their
# environment (children of children too, orphans included), so after the test every survivor is found in /proc,
# given a few seconds to finish, then killed, and the test fails naming it.
PROCESS_MARKER = "FACECL_TEST_PROCESS"
# Helpers that a library starts once for the pytest process itself and that end with it (they watch a pipe
# from it): multiprocessing's resource tracker and fork server, torch.compile's worker pool; and the session's
# rank server (tests/distributed/rank_server.py), started without the marker, whose jobs end with their clients.
SESSION_HELPERS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver", "compile_worker",
                   "rank_server.py")
LEAK_GRACE_S = 10.0
_SESSION = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"


def processes_marked(prefix: str) -> dict[int, str]:
    """pid -> command line of every live process (not this one) whose marker starts with `prefix`."""
    needle = f"\0{PROCESS_MARKER}={prefix}".encode()
    found = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = Path(entry.path, "environ").read_bytes()
            command = Path(entry.path, "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle not in b"\0" + environ:  # a zombie has an empty environ: it holds no pipe and is skipped
            continue
        text = command.replace(b"\0", b" ").decode(errors="replace").strip()
        if parent_pid(entry.path) == os.getpid() and any(helper in text for helper in SESSION_HELPERS):
            continue
        found[int(entry.name)] = text[:200]
    return found


def parent_pid(proc_path: str) -> int | None:
    try:
        stat = Path(proc_path, "stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # fields after "(command)": state, ppid, ...


@pytest.fixture(autouse=True)
def no_leaked_processes(request):
    if not Path("/proc/self/environ").is_file():  # only Linux has /proc; CI runs on Linux
        yield
        return
    os.environ[PROCESS_MARKER] = f"{_SESSION}/{request.node.nodeid}"
    yield
    deadline = time.monotonic() + LEAK_GRACE_S
    while (left := processes_marked(_SESSION)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if left:
        pytest.fail(f"{len(left)} process(es) still running {LEAK_GRACE_S:.0f} s after the test, now killed: "
                    + "; ".join(f"pid {pid}: {command}" for pid, command in sorted(left.items())), pytrace=False)


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every live descendant of `pid` (forked children included: they do not show the
    marker, /proc/PID/environ holds the environment a program was started with)."""
    children: dict[int, list[int]] = {}
    commands = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (parent := parent_pid(entry.path)) is not None:
            children.setdefault(parent, []).append(int(entry.name))
            with contextlib.suppress(OSError):
                commands[int(entry.name)] = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace").strip()[:200]
    found, stack = {}, list(children.get(pid, []))
    while stack:
        child = stack.pop()
        found[child] = commands.get(child, "?")
        stack.extend(children.get(child, []))
    return found


def pytest_sessionfinish(session, exitstatus):
    """Processes the session's own code forked or started and left running (e.g. the loader workers of a stream
    a test never closed) are named and killed here, so that the pytest process can always exit: at exit,
    multiprocessing joins its children, and a child that does not end would keep CI waiting until its limit."""
    if not Path("/proc/self/stat").is_file():
        return
    left = {pid: command for pid, command in descendants(os.getpid()).items()
            if command and not any(helper in command for helper in SESSION_HELPERS)}
    for pid in left:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    if left:
        print(f"\nconftest: {len(left)} process(es) of this session still running at its end, killed: "
              + "; ".join(f"pid {pid}: {command}" for pid, command in sorted(left.items())), flush=True)
