# Converters: image folders and WebFace42M to shards; global shuffle, resumability, DALI index, manifest, CLI.
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO
from tests.data.conftest import quiet
from tests.data.factories import corrupt_jpeg, face_jpeg, face_png, write_folder_tree
from tests.data.test_recordio import shard_images
from toolkit.data import converters
from toolkit.data.converters import ConvertSettings, ImageFolderSource, WebFaceSource, convert, webface_parts
from toolkit.data.shards import dali_index_path, load_manifest, parse_tar
from toolkit.errors import FaceCLError


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_image_folder_with_png_odd_sizes_corrupt_and_foreign_files(tmp_path):
    tree = {
        "alice": [(f"{j}.jpg", face_jpeg(0, j)) for j in range(4)] + [("broken.jpg", corrupt_jpeg())],
        "bob": [("0.png", face_png(1, 0)), ("1.jpg", face_jpeg(1, 1, size=24)), ("notes.txt", b"hello")],
        "carol": [(f"{j}.jpeg", face_jpeg(2, j)) for j in range(3)],
    }
    write_folder_tree(tmp_path / "src", tree)
    (tmp_path / "src" / "empty_identity").mkdir()
    manifest = convert(ImageFolderSource(tmp_path / "src"), tmp_path / "out",
                       ConvertSettings(shard_size=3, group_size=1, image_size=16), progress=False, log=quiet)
    assert manifest.num_classes == 3 and manifest.num_samples == 9
    assert manifest.skipped == {"corrupt_image": 1, "empty_identity_folder": 1, "not_an_image_file": 1}
    assert manifest.settings["converted"] == {"copied": 7, "reencoded": 2}
    found = shard_images(tmp_path / "out")
    # Right-sized JPEGs are copied byte for byte with their folder's label.
    for label, identity in enumerate(["alice", "bob", "carol"]):
        for name, data in tree[identity]:
            if name.endswith((".jpg", ".jpeg")) and data[:2] == b"\xff\xd8" and name != "broken.jpg" and \
                    not (identity == "bob"):
                assert found[sha(data)] == label
    assert sorted(found.values()) == [0] * 4 + [1] * 2 + [2] * 3
    assert (tmp_path / "out" / "labels.txt").read_text().split() == ["alice", "bob", "carol"]


def webface_tree(root, parts=(0, 1, 2), per_part=3, images=4):
    expected = {}
    for part in parts:
        for n in range(per_part):
            identity = f"m.{part}_{n:02d}"
            files = [(f"{j}_{identity}.jpg", face_jpeg(part * per_part + n, j)) for j in range(images)]
            write_folder_tree(root / str(part), {identity: files})
            expected.update({sha(data): (part, n) for _, data in files})
    return expected


@pytest.mark.parametrize("subset, parts", [("webface4m", (0,)), ("webface12m", (0, 1, 2))])
def test_webface_subsets_get_contiguous_global_labels(tmp_path, subset, parts):
    expected = webface_tree(tmp_path / "WebFace42M")
    assert webface_parts(subset) == parts
    manifest = convert(WebFaceSource(tmp_path / "WebFace42M", parts), tmp_path / "out",
                       ConvertSettings(shard_size=4, group_size=2, image_size=16), progress=False, log=quiet)
    assert manifest.num_classes == 3 * len(parts) and manifest.num_samples == 12 * len(parts)
    found = shard_images(tmp_path / "out")
    # Labels are contiguous in (part, identity) order over the chosen parts only.
    assert found == {digest: part * 3 + n for digest, (part, n) in expected.items() if part in parts}


def flat_webface_tree(root, parts=(0, 1, 2), per_part=3, images=4):
    """The same identities and images as webface_tree, unpacked flat as ROOT/P_S_IIIIIII/."""
    expected = {}
    for part in parts:
        for n in range(per_part):
            files = [(f"{j}.jpg", face_jpeg(part * per_part + n, j)) for j in range(images)]
            write_folder_tree(root, {f"{part}_0_{n:07d}": files})
            expected.update({sha(data): (part, n) for _, data in files})
    return expected


@pytest.mark.parametrize("subset, parts", [("webface4m", (0,)), ("webface12m", (0, 1, 2))])
def test_flat_webface_layout_gives_the_same_labels_as_the_nested_one(tmp_path, subset, parts):
    expected = flat_webface_tree(tmp_path / "flat")
    (tmp_path / "flat" / "README.txt").write_text("not an identity")
    (tmp_path / "flat" / "misc").mkdir()   # not a P_S_IIIIIII folder: not an identity
    source = WebFaceSource(tmp_path / "flat", parts)
    assert source.layout == "flat"
    manifest = convert(source, tmp_path / "out", ConvertSettings(shard_size=4, group_size=2, image_size=16),
                       progress=False, log=quiet)
    assert manifest.num_classes == 3 * len(parts) and manifest.num_samples == 12 * len(parts)
    found = shard_images(tmp_path / "out")
    assert found == {digest: part * 3 + n for digest, (part, n) in expected.items() if part in parts}


def test_flat_webface_missing_part_is_a_clear_error(tmp_path):
    flat_webface_tree(tmp_path / "flat", parts=(0,))
    with pytest.raises(FaceCLError, match=r"part folders \[1, 2\] not found"):
        WebFaceSource(tmp_path / "flat", webface_parts("webface12m"))


def test_webface_missing_part_is_a_clear_error(tmp_path):
    webface_tree(tmp_path / "W", parts=(0,))
    with pytest.raises(FaceCLError, match=r"part folders \[1, 2\] not found"):
        WebFaceSource(tmp_path / "W", webface_parts("webface12m"))


def test_global_shuffle_mixes_identities_and_keeps_chunks_together(tmp_path):
    tree = {f"id{i:02d}": [(f"{j}.jpg", face_jpeg(i, j)) for j in range(8)] for i in range(12)}
    write_folder_tree(tmp_path / "src", tree)
    manifest = convert(ImageFolderSource(tmp_path / "src"), tmp_path / "out",
                       ConvertSettings(shard_size=16, group_size=2, image_size=16), progress=False, log=quiet)
    labels_per_shard, all_labels = [], []
    for entry in manifest.shards:
        samples, _ = parse_tar(manifest.shard_path(entry).read_bytes())
        labels = [int(s.members["cls"]) for s in samples]
        # Chunk members are adjacent and share a label.
        for first, second in zip(samples[::2], samples[1::2]):
            assert first.key.split("_")[0] == second.key.split("_")[0]
            assert first.members["cls"] == second.members["cls"]
        assert entry.num_groups == len(samples) // 2
        labels_per_shard.append(labels)
        all_labels += labels
    # Not identity-sorted: most shards hold several identities and the stream is not in label order.
    assert np.mean([len(set(labels)) for labels in labels_per_shard]) >= 4
    assert all_labels != sorted(all_labels)
    assert sorted(all_labels) == sorted(i for i in range(12) for _ in range(8))


def test_dali_index_points_at_every_member(even_shards):
    manifest = load_manifest(even_shards)
    for entry in manifest.shards[:2]:
        data = manifest.shard_path(entry).read_bytes()
        lines = dali_index_path(manifest.shard_path(entry)).read_text().splitlines()
        assert lines[0] == f"v1.2 {entry.num_samples}"
        samples, _ = parse_tar(data)
        for line, sample in zip(lines[1:], samples):
            fields = line.split()
            for ext, offset, size, name in zip(fields[0::4], fields[1::4], fields[2::4], fields[3::4]):
                assert name == f"{sample.key}.{ext}"
                assert data[int(offset): int(offset) + int(size)] == sample.members[ext]


def test_webdataset_library_reads_the_shards(even_shards):
    webdataset = pytest.importorskip("webdataset")
    manifest = load_manifest(even_shards)
    path = str(manifest.shard_path(manifest.shards[0]))
    samples = list(webdataset.WebDataset(path, shardshuffle=False))
    ours, _ = parse_tar(manifest.shard_path(manifest.shards[0]).read_bytes())
    assert [s["__key__"] for s in samples] == [s.key for s in ours]
    assert [int(s["cls"]) for s in samples] == [int(s.members["cls"]) for s in ours]
    assert all(s["jpg"] == o.members["jpg"] for s, o in zip(samples, ours))


def test_rerun_skips_finished_shards_and_rewrites_an_interrupted_one(tmp_path, monkeypatch):
    tree = {f"id{i}": [(f"{j}.jpg", face_jpeg(i, j)) for j in range(6)] for i in range(6)}
    write_folder_tree(tmp_path / "src", tree)
    settings = ConvertSettings(shard_size=6, group_size=2, image_size=16)
    first = convert(ImageFolderSource(tmp_path / "src"), tmp_path / "out", settings, progress=False, log=quiet)

    # Interrupt: shard 2 was being written (only a partial file, no record), shard 4 lost its record.
    out = tmp_path / "out"
    (out / first.shards[2].name).rename(out / f"{first.shards[2].name}.partial-999")
    (out / ".convert" / f"{first.shards[4].name}.json").unlink()
    written = []
    original = converters.write_shard
    monkeypatch.setattr(converters, "write_shard", lambda task, *a, **k: written.append(task.name) or original(task, *a, **k))
    again = convert(ImageFolderSource(tmp_path / "src"), out, settings, progress=False, log=quiet)
    assert sorted(written) == sorted([first.shards[2].name, first.shards[4].name])
    assert not list(out.glob("*.partial-*"))
    assert [s.sha256 for s in again.shards] == [s.sha256 for s in first.shards]  # byte-identical rewrite

    with pytest.raises(FaceCLError, match="different conversion"):
        convert(ImageFolderSource(tmp_path / "src"), out, ConvertSettings(shard_size=5, group_size=2, image_size=16),
                progress=False, log=quiet)


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_cli_converts_and_verifies(tmp_path):
    tree = {f"id{i}": [(f"{j}.jpg", face_jpeg(i, j)) for j in range(3)] for i in range(3)}
    write_folder_tree(tmp_path / "src", tree)
    script = str(REPO / "launch" / "prepare_data.py")
    done = subprocess.run([sys.executable, script, "folder", "--root", str(tmp_path / "src"), "--out",
                           str(tmp_path / "out"), "--shard-size", "4", "--image-size", "16", "--workers", "2",
                           "--no-progress"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "9 images, 3 classes" in done.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_samples"] == 9 and manifest["group_size"] == 2
    ok = subprocess.run([sys.executable, script, "verify", "--manifest", str(tmp_path / "out" / "manifest.json")],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "0 problem(s)" in ok.stdout
    shard = tmp_path / "out" / manifest["shards"][0]["name"]
    damaged = bytearray(shard.read_bytes())
    damaged[600] ^= 0xFF  # a byte of the first image
    shard.write_bytes(bytes(damaged))
    bad = subprocess.run([sys.executable, script, "verify", "--manifest", str(tmp_path / "out" / "manifest.json")],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "checksum" in bad.stdout
    missing = subprocess.run([sys.executable, script, "folder", "--root", str(tmp_path / "nowhere"), "--out",
                              str(tmp_path / "o2")], capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: image folder not found")


def test_without_a_shard_size_a_small_set_still_makes_many_shards(tmp_path):
    tree = {f"id{i:02d}": [(f"{j}.jpg", face_jpeg(i, j)) for j in range(9)] for i in range(16)}  # 144 images
    write_folder_tree(tmp_path / "src", tree)
    lines = []
    manifest = convert(ImageFolderSource(tmp_path / "src"), tmp_path / "out", ConvertSettings(group_size=1, image_size=16),
                       progress=False, log=lines.append)
    assert converters.auto_shard_size(144, 1) == 2 and converters.auto_shard_size(10**7, 2) == 2000
    assert any(line.startswith("shard size: 2 images (chosen for 144 images") for line in lines), lines
    assert len(manifest.shards) == 72 >= converters.MIN_AUTO_SHARDS
