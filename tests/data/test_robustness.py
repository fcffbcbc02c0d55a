# Damaged input: corrupt JPEG, missing member, truncated/empty/missing shards are skipped, counted, logged.
from __future__ import annotations

import io
import logging
import tarfile

import pytest

from tests.data.factories import corrupt_jpeg, face_jpeg, identify
from toolkit.data.shard_stream import DataSkipError, ShardBatchStream, ShardedTrainSet
from toolkit.data.shards import Manifest, ShardEntry, ShardWriter, file_sha256

PER_SHARD = 8


def write_good_shard(path, first_identity: int, jpeg_of=None) -> ShardEntry:
    writer = ShardWriter(path)
    for n in range(PER_SHARD):
        identity = (first_identity + n) % 16
        data = jpeg_of(n) if jpeg_of and jpeg_of(n) is not None else face_jpeg(identity, n)
        writer.add(f"{first_identity:03d}{n:03d}_0", data, identity)
    size, checksum = writer.close()
    return ShardEntry(path.name, PER_SHARD, PER_SHARD, checksum, size)


def write_shard_missing_a_jpg(path, first_identity: int) -> ShardEntry:
    """A shard where sample 5 has its label but no image member."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for n in range(PER_SHARD):
            identity = (first_identity + n) % 16
            members = [("cls", str(identity).encode())] + ([] if n == 5 else [("jpg", face_jpeg(identity, n))])
            for ext, data in members:
                info = tarfile.TarInfo(f"{first_identity:03d}{n:03d}_0.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return ShardEntry(path.name, PER_SHARD, PER_SHARD, file_sha256(path), path.stat().st_size)


@pytest.fixture
def damaged_manifest(tmp_path):
    entries = [write_good_shard(tmp_path / "good.tar", 0),
               write_good_shard(tmp_path / "corrupt.tar", 8, lambda n: corrupt_jpeg() if n == 2 else None),
               write_shard_missing_a_jpg(tmp_path / "missing_key.tar", 3)]
    truncated = write_good_shard(tmp_path / "truncated.tar", 5)
    data = (tmp_path / "truncated.tar").read_bytes()
    (tmp_path / "truncated.tar").write_bytes(data[: len(data) // 3])
    entries.append(truncated)
    (tmp_path / "empty.tar").write_bytes(b"")
    entries.append(ShardEntry("empty.tar", PER_SHARD, PER_SHARD, "0" * 64, 0))
    entries.append(ShardEntry("gone.tar", PER_SHARD, PER_SHARD, "0" * 64, 1))
    empty_writer = ShardWriter(tmp_path / "listed_empty.tar")
    size, checksum = empty_writer.close()
    entries.append(ShardEntry("listed_empty.tar", 0, 0, checksum, size))
    manifest = Manifest(num_classes=16, num_samples=PER_SHARD * 6, image_size=16, group_size=1, shards=entries,
                        root=tmp_path)
    (tmp_path / "manifest.json").write_text(manifest.to_json())
    return tmp_path / "manifest.json"


def readable_in_truncated(folder) -> int:
    from toolkit.data.shards import parse_tar

    samples, problem = parse_tar((folder / "truncated.tar").read_bytes())
    assert problem == "truncated"
    return len(samples)


def test_damaged_samples_are_replaced_counted_and_logged(damaged_manifest, caplog):
    train_set = ShardedTrainSet(damaged_manifest)
    assert len(train_set) == 48 and train_set.num_empty_shards == 1
    with caplog.at_level(logging.WARNING, logger="toolkit.data"):
        stream = ShardBatchStream(train_set, 8, seed=0, image_size=16, window_shards=6, max_skipped_fraction=1.0)
        for _ in range(stream.batches_per_epoch):  # one reader, one epoch: every listed sample exactly once
            images, labels = stream.next_batch()
            assert images.shape == (8, 3, 16, 16) and labels.shape == (8,)
            for image, label in zip(images, labels):
                assert identify(image)[0] == int(label)
    lost_to_truncation = PER_SHARD - readable_in_truncated(damaged_manifest.parent)
    assert stream.skip_stats() == {"corrupt_image": 1, "empty_shard": PER_SHARD, "missing_key": 1,
                                   "truncated_shard": lost_to_truncation, "unreadable_shard": PER_SHARD}
    logged = caplog.text
    for reason in ("corrupt_image: corrupt.tar:008002_0", "missing_key: missing_key.tar:003005_0",
                   "truncated_shard: truncated.tar", "empty_shard: empty.tar", "unreadable_shard: gone.tar",
                   "hold no usable sample"):
        assert reason in logged, reason


def test_run_stops_when_the_skipped_share_passes_the_threshold(damaged_manifest):
    stream = ShardBatchStream(ShardedTrainSet(damaged_manifest), 8, seed=0, image_size=16, window_shards=6,
                              max_skipped_fraction=0.2)
    with pytest.raises(DataSkipError) as info:
        for _ in range(stream.batches_per_epoch):
            stream.next_batch()
    message = str(info.value)
    assert "\n" not in message and "data.max_skipped_fraction=0.2" in message and "skipped (" in message


def test_a_batch_without_any_readable_sample_is_an_error(tmp_path):
    manifest = Manifest(num_classes=4, num_samples=16, image_size=16, group_size=1, root=tmp_path,
                        shards=[ShardEntry("gone.tar", 16, 16, "0" * 64, 1)])
    (tmp_path / "manifest.json").write_text(manifest.to_json())
    stream = ShardBatchStream(ShardedTrainSet(tmp_path / "manifest.json"), 8, seed=0, image_size=16,
                              num_workers=1, max_skipped_fraction=1.0)
    with pytest.raises(DataSkipError, match="no readable sample in epoch 0 batch 0"):
        stream.next_batch()
