# The network a multi-node job talks over: the interface towards MASTER_ADDR, and a quick check that ranks reach each other.
"""Two things go wrong when nodes are really apart (their own network stacks and addresses):

- gloo (and NCCL) pick an interface from the host name when GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME are not
  set; a host name that resolves to a loopback address makes a rank publish 127.0.0.1 to its peers, and the
  job fails on one node (`Gloo connectFullMesh failed ... remote=[127.0.0.1]`) while the other waits for its
  whole timeout. `interface_towards(master_addr)` is the interface whose address the kernel would use to reach
  MASTER_ADDR; launch/train.py sets the variables to it when they are not set, and says so.
- a rank that cannot reach a peer learns it only inside the collectives' connect, and the peers keep waiting.
  `check_peers` runs before the process group starts: every rank listens on the address its collectives will
  use, publishes it in the rendezvous store, and connects to every other rank's; a failure is posted in the
  store too, so every rank ends within a second of the first that sees it, with the same one line.
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

from toolkit.errors import FaceCLError

ABORT_KEY = "facecl/network/abort"


@dataclass(frozen=True)
class Interface:
    name: str
    address: str


def _ipv4_addresses() -> dict[str, list[str]]:
    """{interface name: its IPv4 addresses} of this host (psutil, a dependency of DeepSpeed and of FaceCL)."""
    import psutil

    return {name: [entry.address for entry in entries if entry.family == socket.AF_INET]
            for name, entries in psutil.net_if_addrs().items()}


def interface_towards(host: str) -> Interface:
    """The interface (and its address) that this host's routing table uses to reach `host`; a FaceCLError with
    one line when `host` does not resolve or no route leads to it. A UDP "connect" sends nothing."""
    try:
        target = socket.gethostbyname(host)
    except OSError:
        raise FaceCLError(f"MASTER_ADDR {host!r} does not resolve to an IPv4 address on this host") from None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect((target, 9))
            local = probe.getsockname()[0]
    except OSError as exc:
        raise FaceCLError(f"no route from this host to MASTER_ADDR {host} ({target}): {exc.strerror or exc}; set "
                          f"GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) to the interface of the network the nodes "
                          f"share") from None
    for name, addresses in _ipv4_addresses().items():
        if local in addresses:
            return Interface(name, local)
    raise FaceCLError(f"the address {local} this host uses to reach MASTER_ADDR {host} belongs to no interface; set "
                      f"GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) to the interface of the network the nodes share")


def interface_named(name: str) -> Interface:
    """The interface a user named (GLOO_SOCKET_IFNAME); a FaceCLError when this host has no IPv4 address on it."""
    addresses = _ipv4_addresses().get(name)
    if not addresses:
        raise FaceCLError(f"GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME names {name!r}, which has no IPv4 address on this "
                          f"host (interfaces: {', '.join(sorted(_ipv4_addresses()))})")
    return Interface(name, addresses[0])


def check_peers(store, rank: int, world_size: int, address: str, wait_s: float, connect_timeout_s: float = 5.0,
                poll_s: float = 0.1) -> None:
    """Every rank listens on `address` (what its collectives will use) and connects to every other rank's; any
    failure ends every rank with the same FaceCLError line within a poll or two (it is posted in `store`).
    `wait_s` bounds the wait for ranks that have not arrived yet."""
    server = socket.create_server((address, 0))
    try:
        store.set(f"facecl/network/address/{rank}", f"{address}:{server.getsockname()[1]}")
        peers = _gather(store, rank, world_size, "address", wait_s, poll_s)
        failures = []
        for peer, endpoint in sorted(peers.items()):
            host, port = endpoint.rsplit(":", 1)
            try:
                socket.create_connection((host, int(port)), timeout=connect_timeout_s).close()
            except OSError as exc:
                failures.append(f"rank {rank} ({address}) cannot reach rank {peer} at {endpoint} "
                                f"({exc.strerror or type(exc).__name__})")
        if failures:
            message = (f"{failures[0]}{f' (and {len(failures) - 1} more)' if len(failures) > 1 else ''}: the ranks "
                       f"must reach each other on one network; set GLOO_SOCKET_IFNAME (NCCL_SOCKET_IFNAME on GPUs) "
                       f"on every node to its interface on that network")
            raise FaceCLError(_post_first(store, message))
        store.set(f"facecl/network/reached/{rank}", "1")
        _gather(store, rank, world_size, "reached", wait_s, poll_s)
    finally:
        server.close()


def _post_first(store, message: str) -> str:
    """Post `message` as the job's abort line unless a rank posted one before; return the line that stands.
    The first failure is the cause: a peer that failed first stops listening, so a later rank's connect to it is
    refused too, and its own line would blame the wrong rank. compare_set with an empty expected value sets
    the key only when it is absent, atomically."""
    posted = store.compare_set(ABORT_KEY, "", message)
    return posted.decode() if isinstance(posted, bytes) else str(posted)


def _gather(store, rank: int, world_size: int, what: str, wait_s: float, poll_s: float) -> dict[int, str]:
    """Every other rank's `facecl/network/<what>/<rank>` value, polling; an abort posted by any rank ends the wait."""
    found: dict[int, str] = {}
    deadline = time.monotonic() + wait_s
    while True:
        if store.check([ABORT_KEY]):
            raise FaceCLError(store.get(ABORT_KEY).decode())
        for peer in range(world_size):
            key = f"facecl/network/{what}/{peer}"
            if peer != rank and peer not in found and store.check([key]):
                found[peer] = store.get(key).decode()
        if len(found) == world_size - 1:
            return found
        if time.monotonic() > deadline:
            missing = sorted(set(range(world_size)) - set(found) - {rank})
            raise FaceCLError(f"rank {rank}: rank(s) {missing[:8]} did not reach the job's rendezvous within {wait_s:.0f} "
                              f"s (parallel.timeout_s)")
        time.sleep(poll_s)
