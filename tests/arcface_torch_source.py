# insightface's arcface_torch, as a peer that some tests run from a temporary copy (never part of the package).
"""Where the insightface repository is found: $FACECL_INSIGHTFACE_REPO (a git directory or a checkout), else the
snapshot that a developer's `fetch` leaves at /work/.mirror/deepinsight+insightface/repo. Tests that compare with
insightface's own code use `arcface_torch_copy` and are skipped, naming the variable, where neither exists;
everything else they check is also covered by tests that re-state insightface's naming and formulas."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

import pytest

DEFAULT_REPO = Path("/work/.mirror/deepinsight+insightface/repo")
SUBDIR = "recognition/arcface_torch"


def insightface_repo() -> Path | None:
    """The insightface repository (git dir or checkout) or None."""
    given = os.environ.get("FACECL_INSIGHTFACE_REPO")
    path = Path(given) if given else DEFAULT_REPO
    return path if path.exists() else None


def extract_arcface_torch(into: Path) -> Path:
    """A fresh copy of recognition/arcface_torch under `into`; returns its folder."""
    repo = insightface_repo()
    if repo is None:
        raise FileNotFoundError("no insightface repository (set FACECL_INSIGHTFACE_REPO)")
    if (repo / SUBDIR).is_dir():  # a checkout
        shutil.copytree(repo / SUBDIR, into / "arcface_torch")
        return into / "arcface_torch"
    with tempfile.TemporaryFile() as archive:
        # stderr kept quiet: git names blobs of other folders that a partial snapshot lacks
        subprocess.run(["git", f"--git-dir={repo}", "archive", "HEAD", SUBDIR], stdout=archive,
                       stderr=subprocess.PIPE, check=True)
        archive.seek(0)
        with tarfile.open(fileobj=archive) as tar:
            tar.extractall(into, filter="data")
    shutil.move(into / SUBDIR, into / "arcface_torch")
    shutil.rmtree(into / "recognition")
    return into / "arcface_torch"


@pytest.fixture(scope="session")
def arcface_torch_copy(tmp_path_factory) -> Path:
    """A session-wide temporary copy of insightface's recognition/arcface_torch (skips when there is none)."""
    if insightface_repo() is None:
        pytest.skip(f"insightface's repository is not on this machine (set FACECL_INSIGHTFACE_REPO; looked at "
                    f"{DEFAULT_REPO})")
    return extract_arcface_torch(tmp_path_factory.mktemp("insightface"))
