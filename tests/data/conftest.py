# Shared data fixtures: a small converted shard set whose images tell their identity and sample number.
from __future__ import annotations

import pytest

from tests.data.factories import face_jpeg, write_folder_tree
from toolkit.data.converters import ConvertSettings, ImageFolderSource, convert

NUM_IDENTITIES = 16
IMAGES_PER_IDENTITY = 5  # 80 images; with group size 2 every identity leaves one partial chunk


def quiet(*_args, **_kwargs) -> None:
    pass


@pytest.fixture(scope="session")
def even_shards(tmp_path_factory):
    """80 images of 16 identities, 8 shards of exactly 10 (chunks of 1), for exact-coverage tests."""
    root = tmp_path_factory.mktemp("even")
    tree = {f"id{i:02d}": [(f"{j}.jpg", face_jpeg(i, j)) for j in range(IMAGES_PER_IDENTITY)]
            for i in range(NUM_IDENTITIES)}
    write_folder_tree(root / "src", tree)
    convert(ImageFolderSource(root / "src"), root / "out", ConvertSettings(shard_size=10, group_size=1, image_size=16),
            progress=False, log=quiet)
    return root / "out" / "manifest.json"


@pytest.fixture(scope="session")
def grouped_shards(tmp_path_factory):
    """16 identities with 6-9 images each, chunks of 4 images of one identity, shards of about 12."""
    root = tmp_path_factory.mktemp("grouped")
    tree = {f"id{i:02d}": [(f"{j}.jpg", face_jpeg(i, j)) for j in range(6 + i % 4)] for i in range(NUM_IDENTITIES)}
    write_folder_tree(root / "src", tree)
    convert(ImageFolderSource(root / "src"), root / "out", ConvertSettings(shard_size=12, group_size=4, image_size=16),
            progress=False, log=quiet)
    return root / "out" / "manifest.json"
