# Hostfile parsing and checking (`host slots=N` per line), as the deepspeed launcher reads it.
"""`python -m toolkit.distributed.hostfile HOSTFILE` checks a hostfile before a multi-node launch and
prints one line per host; a malformed file is a one-line error naming the line (exit status 2)."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from toolkit.errors import FaceCLError

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.\-]+)\s+slots=(?P<slots>\d+)\s*$")


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """{host: slots} in file order; comments (#) and blank lines are ignored."""
    path = Path(path)
    if not path.is_file():
        raise FaceCLError(f"hostfile not found: {path}")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if not match:
            raise FaceCLError(f"{path} line {number}: {raw.strip()!r} is not 'HOST slots=N'")
        host, slots = match.group("host"), int(match.group("slots"))
        if slots < 1:
            raise FaceCLError(f"{path} line {number}: host {host} has slots={slots}; need at least 1")
        if host in hosts:
            raise FaceCLError(f"{path} line {number}: host {host} is listed twice")
        hosts[host] = slots
    if not hosts:
        raise FaceCLError(f"{path} lists no hosts")
    return hosts


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m toolkit.distributed.hostfile HOSTFILE", file=sys.stderr)
        return 2
    try:
        hosts = parse_hostfile(args[0])
    except FaceCLError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for rank, (host, slots) in enumerate(hosts.items()):
        print(f"node_rank {rank}: {host} slots={slots}")
    print(f"{len(hosts)} nodes, {sum(hosts.values())} ranks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
