"""The peer check before the process group (toolkit/distributed/network.py) on a real TCPStore and real sockets."""

import datetime
import socket
import threading

import pytest
import torch.distributed as dist

from toolkit.distributed.network import ABORT_KEY, check_peers
from toolkit.errors import FaceCLError


def tcp_store():
    return dist.TCPStore("127.0.0.1", 0, 1, True, timeout=datetime.timedelta(seconds=10))


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_ranks_that_reach_each_other_pass_and_post_no_abort():
    store = tcp_store()
    errors = []

    def rank(number):
        try:
            check_peers(store, number, 2, "127.0.0.1", wait_s=10)
        except FaceCLError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=rank, args=(number,)) for number in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == [] and not store.check([ABORT_KEY])


def test_the_first_failure_stands_for_every_rank():
    """Rank 1 cannot reach rank 0 (its published endpoint refuses), posts its line and stops listening; rank 0,
    whose connect to rank 1 is then refused as well, ends with rank 1's line, not with one blaming rank 1."""
    store = tcp_store()
    store.set("facecl/network/address/0", f"127.0.0.1:{closed_port()}")   # rank 0 as rank 1 sees it
    with pytest.raises(FaceCLError) as first:
        check_peers(store, 1, 2, "127.0.0.1", wait_s=10)
    assert str(first.value).startswith("rank 1 (127.0.0.1) cannot reach rank 0 at 127.0.0.1:")
    # Rank 0 gathered rank 1's endpoint before the abort was posted and connects after rank 1 closed: replay
    # that order with the store rank 0 would have read (rank 1's endpoint, now refused, and the abort line).
    late = tcp_store()
    late.set("facecl/network/address/1", store.get("facecl/network/address/1"))
    original_check = late.check
    calls = {"n": 0}

    class AbortArrivesAfterGather:
        """The real store; the abort key becomes visible after rank 0's gather, as in the race it replays."""
        def __getattr__(self, name):
            return getattr(late, name)

        def check(self, keys):
            if keys == [ABORT_KEY] and calls["n"] == 0:
                calls["n"] += 1
                late.set(ABORT_KEY, store.get(ABORT_KEY))
                return False
            return original_check(keys)

    with pytest.raises(FaceCLError) as second:
        check_peers(AbortArrivesAfterGather(), 0, 2, "127.0.0.1", wait_s=10)
    assert str(second.value) == str(first.value)
