# insightface's arcface_torch, as a peer that some tests run from a temporary copy (never part of the package).
"""Where the insightface repository is found: $FACECL_INSIGHTFACE_REPO (a git directory or a checkout), else the
snapshot that a developer's `fetch` leaves at /work/.mirror/deepinsight+insightface/repo. Tests that compare with
insightface's own code use `arcface_torch_copy` and are skipped, naming the variable, where neither exists;
everything else they check is also covered by tests that re-state insightface's naming and formulas.

The finding and copying is benchmarks/arcface_torch_peer.py's (bench_train.py --peer arcface_torch uses the same
copy); this module re-exports it for the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

_PEER_FILE = Path(__file__).resolve().parent.parent / "benchmarks" / "arcface_torch_peer.py"


def peer_module():
    """benchmarks/arcface_torch_peer.py, imported once."""
    name = "facecl_benchmarks_arcface_torch_peer"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, _PEER_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module   # dataclasses look their module up by name
        spec.loader.exec_module(module)
    return sys.modules[name]


_peer = peer_module()
DEFAULT_REPO = _peer.DEFAULT_REPO
SUBDIR = _peer.SUBDIR
insightface_repo = _peer.insightface_repo
extract_arcface_torch = _peer.extract_arcface_torch


@pytest.fixture(scope="session")
def arcface_torch_copy(tmp_path_factory) -> Path:
    """A session-wide temporary copy of insightface's recognition/arcface_torch (skips when there is none)."""
    if insightface_repo() is None:
        pytest.skip(f"insightface's repository is not on this machine (set FACECL_INSIGHTFACE_REPO; looked at "
                    f"{DEFAULT_REPO})")
    return extract_arcface_torch(tmp_path_factory.mktemp("insightface"))
