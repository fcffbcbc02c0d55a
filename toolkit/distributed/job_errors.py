# One error line per job: a rank that ends with a known error tells the others, which then end without a traceback.
"""When one rank ends with an error the toolkit recognises (a FaceCLError: a full disk, a bad file), the other
ranks are waiting in a collective; the closing connection then ends each of them with a long library traceback
(`Connection closed by peer`) that hides the one line that matters. So the failing rank posts its line in the
job's rendezvous store and stays a moment; the other ranks learn it there, from their step watchdog's thread
(a rank blocked in a collective cannot look itself) or when a collective of theirs fails, and end quietly,
since that rank has said why. The store is held from the start of the job (the process group may be gone by
the time a rank looks)."""

from __future__ import annotations

import time

KEY = "facecl/job_error"
_store = None
_posted_here = False


def attach(store) -> None:
    """Keep the job's store (call once the process group exists)."""
    global _store
    _store = store


def post(message: str) -> None:
    """Tell the other ranks why this rank ends (best effort: the store may be gone)."""
    global _posted_here
    _posted_here = True
    if _store is None:
        return
    try:
        _store.set(KEY, message)
    except Exception:  # noqa: BLE001
        pass


def posted(wait_s: float = 3.0) -> str | None:
    """The error a rank posted, waiting up to `wait_s` for one to arrive; None when none did."""
    if _store is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if _store.check([KEY]):
                return _store.get(KEY).decode()
        except Exception:  # noqa: BLE001 - the store went away with the rank that held it
            return None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.1)


def posted_by_a_peer() -> str | None:
    """An error another rank posted (no waiting); None when none did, or when this rank posted it."""
    if _posted_here or _store is None:
        return None
    try:
        return _store.get(KEY).decode() if _store.check([KEY]) else None
    except Exception:  # noqa: BLE001
        return None
