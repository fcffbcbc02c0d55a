# Test inputs written from the format specifications: face JPEGs that encode their identity, RecordIO files, folders.
"""Every test image is 16x16: the top half is a flat colour naming the identity, the bottom half a flat
grey naming the sample. JPEG keeps flat 8x8 blocks within a few levels and a horizontal flip keeps both
halves, so a decoded (and flipped) image tells which source image it came from."""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 16
_LEVELS = (20, 80, 140, 200)
MAGIC = 0xCED7230A


def identity_colour(identity: int) -> tuple[int, int, int]:
    assert identity < 64
    return _LEVELS[identity % 4], _LEVELS[(identity // 4) % 4], _LEVELS[identity // 16]


def sample_grey(sample: int) -> int:
    assert sample < 20
    return 10 + 12 * sample


def face_array(identity: int, sample: int, size: int = IMAGE_SIZE) -> np.ndarray:
    image = np.empty((size, size, 3), dtype=np.uint8)
    image[: size // 2] = identity_colour(identity)
    image[size // 2:] = sample_grey(sample)
    return image


def face_jpeg(identity: int, sample: int, size: int = IMAGE_SIZE) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(face_array(identity, sample, size)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def face_png(identity: int, sample: int, size: int = IMAGE_SIZE) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(face_array(identity, sample, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def corrupt_jpeg() -> bytes:
    """The first half of a real JPEG: a decoder must refuse it."""
    data = face_jpeg(0, 0, 32)
    return data[: len(data) // 2]


def identify(image_3HW) -> tuple[int, int]:
    """(identity, sample) of a decoded image in [-1, 1], 3 x H x W, from its two halves."""
    pixels = (np.asarray(image_3HW, dtype=np.float32) + 1.0) * 127.5
    half = pixels.shape[1] // 2
    top = pixels[:, 1: half - 1].mean(axis=(1, 2))
    bottom = pixels[:, half + 1: -1].mean(axis=(1, 2)).mean()
    digits = [int(np.argmin([abs(v - level) for level in _LEVELS])) for v in top]
    return digits[0] + 4 * digits[1] + 16 * digits[2], int(round((bottom - 10) / 12))


# ----- MXNet RecordIO, written from the format description ---------------------------------------------

def pack_payload(image: bytes, label: float = 0.0, labels: tuple[float, ...] = ()) -> bytes:
    flag = len(labels)
    return struct.pack("<IfQQ", flag, 0.0 if flag else label, 0, 0) + struct.pack(f"<{flag}f", *labels) + image


def _record_bytes(payload: bytes) -> bytes:
    """One record; where the magic word sits at an aligned position the payload is split (flags 1/2/3)."""
    magic = struct.pack("<I", MAGIC)
    cuts = [i for i in range(0, len(payload) // 4 * 4, 4) if payload[i: i + 4] == magic]
    out, start = b"", 0
    for number, cut in enumerate(cuts):
        out += struct.pack("<II", MAGIC, ((1 if number == 0 else 2) << 29) | (cut - start)) + payload[start:cut]
        start = cut + 4
    tail = payload[start:]
    out += struct.pack("<II", MAGIC, ((3 if cuts else 0) << 29) | len(tail)) + tail
    return out + bytes(-len(tail) % 4)


def write_recordio(folder: Path, payloads: list[bytes]) -> tuple[Path, Path]:
    """train.rec and train.idx (key = record number, offsets of each record)."""
    folder.mkdir(parents=True, exist_ok=True)
    rec, idx = folder / "train.rec", folder / "train.idx"
    with open(rec, "wb") as rec_file, open(idx, "w") as idx_file:
        for key, payload in enumerate(payloads):
            idx_file.write(f"{key}\t{rec_file.tell()}\n")
            rec_file.write(_record_bytes(payload))
    return rec, idx


def insightface_payloads(images_per_identity: list[list[bytes]]) -> list[bytes]:
    """Header record (flag 2, (a, b)), image records 1..a-1, identity records a..b-1."""
    images = [(identity, data) for identity, datas in enumerate(images_per_identity) for data in datas]
    first_identity_record = 1 + len(images)
    end = first_identity_record + len(images_per_identity)
    payloads = [pack_payload(b"", labels=(float(first_identity_record), float(end)))]
    payloads += [pack_payload(data, label=float(identity)) for identity, data in images]
    start = 1
    for datas in images_per_identity:
        payloads.append(pack_payload(b"", labels=(float(start), float(start + len(datas)))))
        start += len(datas)
    return payloads


def write_folder_tree(root: Path, images_per_identity: dict[str, list[tuple[str, bytes]]]) -> Path:
    for identity, files in images_per_identity.items():
        (root / identity).mkdir(parents=True, exist_ok=True)
        for name, data in files:
            (root / identity / name).write_bytes(data)
    return root
