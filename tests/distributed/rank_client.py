# Test helper: start a job on the rank server (rank_server.py) as if by `torchrun --nproc_per_node N SCRIPT ARGS`.
"""    python tests/distributed/rank_client.py SOCKET N PORT SCRIPT [ARGS...]   (N = 0: `python SCRIPT`)

SOCKET is the server's. This process stands for the job: its stdout and stderr are the
ranks', SIGTERM / SIGINT sent to it reach every rank, killing it kills the job, and its exit status is the job's.
It imports nothing heavy, so it starts in a few tens of milliseconds."""
import json
import os
import signal
import socket
import sys


def main() -> int:
    if len(sys.argv) < 5:
        raise SystemExit("usage: rank_client.py SOCKET N PORT SCRIPT [ARGS...]")
    path, nproc, port, script, args = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:]
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(path)
    spec = {"nproc": nproc, "port": port, "script": script, "args": args, "env": dict(os.environ), "cwd": os.getcwd()}
    socket.send_fds(conn, [json.dumps(spec).encode() + b"\n"], [0, 1, 2])
    reader = conn.makefile("rb")
    leader = reader.readline()
    if not leader.startswith(b"pid "):
        print(f"rank client: the rank server did not start the job ({leader!r})", file=sys.stderr)
        return 1

    def forward(signum, _frame):
        conn.sendall(f"signal {signum}\n".encode())

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    while True:
        line = reader.readline()
        if not line:
            print("rank client: the job's leader ended without a status", file=sys.stderr)
            return 1
        if line.startswith(b"exit "):
            return int(line.split()[1])


if __name__ == "__main__":
    sys.exit(main())
