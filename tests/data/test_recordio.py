# RecordIO: the three insightface layouts, split records and corrupt images, read without mxnet and converted.
from __future__ import annotations

import hashlib
import json
import struct

import pytest

from tests.data.conftest import quiet
from tests.data.factories import (corrupt_jpeg, face_jpeg, insightface_payloads, pack_payload, write_recordio)
from toolkit.data.converters import ConvertSettings, RecordIOSource, convert
from toolkit.data.recordio import RecordIOFile, parse_payload
from toolkit.data.shards import parse_tar

MAGIC_AS_FLOAT = struct.unpack("<f", struct.pack("<I", 0xCED7230A))[0]


def shard_images(out_dir) -> dict[str, int]:
    """sha256 of every image in the shards -> its label (asserting each appears once)."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    found = {}
    for entry in manifest["shards"]:
        samples, problem = parse_tar((out_dir / entry["name"]).read_bytes())
        assert problem is None and len(samples) == entry["num_samples"]
        for sample in samples:
            digest = hashlib.sha256(sample.members["jpg"]).hexdigest()
            assert digest not in found, "an image was written twice"
            assert int(sample.members["cls"]) == struct.unpack("<i", sample.members["label.i32"])[0]
            found[digest] = int(sample.members["cls"])
    return found


def test_insightface_layout_with_header_and_identity_records(tmp_path):
    images = [[face_jpeg(i, j) for j in range(3 + i)] for i in range(4)]
    rec, idx = write_recordio(tmp_path, insightface_payloads(images))
    listing = RecordIOFile(rec, idx).scan()
    assert listing.header_range == (1 + 18, 1 + 18 + 4)
    assert listing.num_non_image_records == 1 + 4
    assert sorted(label for _, label in listing.images) == sorted(i for i in range(4) for _ in range(3 + i))

    convert(RecordIOSource(rec, idx), tmp_path / "out", ConvertSettings(shard_size=5, group_size=2, image_size=16),
            progress=False, log=quiet)
    expected = {hashlib.sha256(data).hexdigest(): i for i, datas in enumerate(images) for data in datas}
    assert shard_images(tmp_path / "out") == expected
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["num_classes"] == 4 and manifest["num_samples"] == 18 and manifest["skipped"] == {}


def test_headerless_layout_with_scalar_labels_and_a_corrupt_image(tmp_path):
    payloads = [pack_payload(face_jpeg(i % 3, i), label=float(i % 3)) for i in range(9)]
    payloads.insert(4, pack_payload(corrupt_jpeg(), label=1.0))
    rec, idx = write_recordio(tmp_path, payloads)
    assert RecordIOFile(rec, idx).scan().header_range is None
    convert(RecordIOSource(rec, idx), tmp_path / "out", ConvertSettings(shard_size=4, group_size=1, image_size=16),
            progress=False, log=quiet)
    expected = {hashlib.sha256(face_jpeg(i % 3, i)).hexdigest(): i % 3 for i in range(9)}
    assert shard_images(tmp_path / "out") == expected
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["skipped"] == {"corrupt_image": 1}
    assert manifest["num_samples"] == 9


def test_multi_label_layout_takes_the_first_label_and_joins_split_records(tmp_path):
    # Label vectors of 6 floats; the second is the magic word's bit pattern at an aligned position, so the
    # writer splits those records in two parts that the reader must join with the magic put back.
    payloads = [pack_payload(face_jpeg(i % 2, i), labels=(float(5 + i % 2), MAGIC_AS_FLOAT, 0.5, 1.0, 2.0, 3.0))
                for i in range(6)]
    rec, idx = write_recordio(tmp_path, payloads)
    assert rec.read_bytes().count(struct.pack("<I", 0xCED7230A)) == 12  # two parts per record
    with RecordIOFile(rec, idx) as file:
        records = [record for _, record in file.iter_images()]
    assert [r.flag for r in records] == [6] * 6
    assert [r.labels[1] for r in records] == [pytest.approx(MAGIC_AS_FLOAT)] * 6
    assert [r.image for r in records] == [face_jpeg(i % 2, i) for i in range(6)]

    convert(RecordIOSource(rec, idx), tmp_path / "out", ConvertSettings(shard_size=3, group_size=1, image_size=16),
            progress=False, log=quiet)
    # Original labels 5 and 6 are renumbered to 0 and 1; labels.txt keeps the originals.
    assert shard_images(tmp_path / "out") == {hashlib.sha256(face_jpeg(i % 2, i)).hexdigest(): i % 2 for i in range(6)}
    assert (tmp_path / "out" / "labels.txt").read_text().split() == ["5", "6"]


def test_parse_payload_rejects_a_short_label_vector():
    with pytest.raises(ValueError, match="announces 4 labels"):
        parse_payload(struct.pack("<IfQQ", 4, 0.0, 0, 0) + b"\0" * 8)
