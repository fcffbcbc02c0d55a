# Pure-Python reader of insightface MXNet RecordIO files (train.rec + train.idx), without mxnet.
"""MXNet RecordIO as insightface writes it.

A record on disk: uint32 magic 0xced7230a, uint32 `lrec` (lower 29 bits: length of this part, upper 3
bits: continuation flag), the part's bytes, zero padding to a multiple of 4. The writer splits a payload
wherever the magic word occurs at a 4-byte aligned position (flag 1 = first part, 2 = middle, 3 = last;
0 = whole record) and drops that magic word; the reader puts it back between the parts.

The payload starts with the header '<IfQQ' (flag, label, id, id2). When flag > 0, `flag` float32 labels
follow (the identity is the first of them) and `label` is unused; then come the image bytes.

Three layouts exist: insightface's (MS1MV3, Glint360K, ...) with a header record 0 (flag 2, empty
image, labels (a, b): image records are 1..a-1) and identity records a..b-1 (flag 2, no image, label
(first, end) = the half-open range of that identity's image records); headerless
files of image records with scalar labels; and headerless files whose image records carry a long label
vector (flag > 1) next to a pickled train.meta, which this reader never opens. All three are read the
same way: every record with image bytes is an image whose identity is its scalar label or its first
vector label; records without image bytes (header, identity ranges) are counted and passed over. This
trusts train.idx and the records, not the header's float32 numbers, which are inexact above 2^24.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterator

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_PART_HEADER = struct.Struct("<II")
IMAGE_HEADER = struct.Struct("<IfQQ")
_LENGTH_MASK = (1 << 29) - 1
# Enough bytes to read a record's headers and a short label vector in one read.
_PEEK_BYTES = 256


class RecordIOError(ValueError):
    """A file that is not valid RecordIO at the named offset."""


@dataclass(frozen=True)
class ImageRecord:
    """One parsed record: `flag`, the identity label (None for records without image bytes), labels, image."""

    flag: int
    label: float | None
    labels: tuple[float, ...]
    image: bytes

    @property
    def has_image(self) -> bool:
        return len(self.image) > 0


def read_index(idx_path: str | Path) -> list[tuple[int, int]]:
    """(key, byte offset) pairs of train.idx ("key<TAB>offset" per line), sorted by key."""
    entries = []
    with open(idx_path, "rb") as idx_file:
        for line_number, line in enumerate(idx_file, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise RecordIOError(f"{idx_path} line {line_number}: expected 'key<TAB>offset', got {line!r}")
            try:
                entries.append((int(parts[0]), int(parts[1])))
            except ValueError:
                raise RecordIOError(f"{idx_path} line {line_number}: key and offset must be integers, "
                                    f"got {line!r}") from None
    entries.sort()
    return entries


def read_record_at(rec_file: BinaryIO, offset: int, path: str = "train.rec") -> bytes:
    """The payload of the record starting at `offset`, continuation parts joined."""
    rec_file.seek(offset)
    payload = bytearray()
    position = offset
    while True:
        head = rec_file.read(_PART_HEADER.size)
        if len(head) < _PART_HEADER.size:
            raise RecordIOError(f"{path}: record at offset {offset} is cut short at offset {position}")
        magic, lrec = _PART_HEADER.unpack(head)
        if magic != RECORDIO_MAGIC:
            raise RecordIOError(f"{path}: no RecordIO magic at offset {position} (found {magic:#010x}, "
                                f"expected {RECORDIO_MAGIC:#010x})")
        continuation, length = lrec >> 29, lrec & _LENGTH_MASK
        padded = (length + 3) & ~3
        part = rec_file.read(padded)
        if len(part) < padded:
            raise RecordIOError(f"{path}: record at offset {offset} is cut short ({len(part)} of {padded} bytes)")
        payload += part[:length]
        position += _PART_HEADER.size + padded
        if continuation in (0, 3):
            return bytes(payload)
        payload += _MAGIC_BYTES


def parse_payload(payload: bytes) -> ImageRecord:
    """Split a record payload into header, labels and image bytes."""
    if len(payload) < IMAGE_HEADER.size:
        raise RecordIOError(f"record payload of {len(payload)} bytes is shorter than its {IMAGE_HEADER.size}-byte "
                            "header")
    flag, scalar_label, _, _ = IMAGE_HEADER.unpack_from(payload)
    start = IMAGE_HEADER.size
    if flag > 0:
        end = start + 4 * flag
        if end > len(payload):
            raise RecordIOError(f"record header announces {flag} labels but the payload has only "
                                f"{len(payload) - start} bytes after the header")
        labels = struct.unpack_from(f"<{flag}f", payload, start)
        start = end
    else:
        labels = (scalar_label,)
    image = payload[start:]
    return ImageRecord(flag=flag, label=labels[0] if image else None, labels=tuple(labels), image=image)


@dataclass
class RecordIOListing:
    """What a scan of train.rec found: image records (offset, identity label) and the other records."""

    images: list[tuple[int, int]] = field(default_factory=list)   # (byte offset, label)
    num_non_image_records: int = 0                               # header and identity-range records
    header_range: tuple[float, float] | None = None               # (a, b) of a header record, if any
    unreadable: list[tuple[int, str]] = field(default_factory=list)  # (offset, why)


class RecordIOFile:
    """Random access to train.rec through train.idx; open per process (file handles do not pickle)."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None):
        self.rec_path = Path(rec_path)
        self.idx_path = Path(idx_path) if idx_path else self.rec_path.with_suffix(".idx")
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise FileNotFoundError(f"RecordIO file not found: {path}")
        self._file: BinaryIO | None = None

    def _handle(self) -> BinaryIO:
        if self._file is None:
            self._file = open(self.rec_path, "rb")
        return self._file

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> "RecordIOFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"rec_path": self.rec_path, "idx_path": self.idx_path, "_file": None}

    def read(self, offset: int) -> ImageRecord:
        return parse_payload(read_record_at(self._handle(), offset, str(self.rec_path)))

    def _peek(self, offset: int) -> ImageRecord:
        """Parse a record from its first bytes only (the image is not read; `image` is a 1-byte stand-in)."""
        handle = self._handle()
        handle.seek(offset)
        head = handle.read(_PEEK_BYTES)
        if len(head) < _PART_HEADER.size + IMAGE_HEADER.size:
            raise RecordIOError(f"{self.rec_path}: record at offset {offset} is cut short")
        magic, lrec = _PART_HEADER.unpack_from(head)
        if magic != RECORDIO_MAGIC:
            raise RecordIOError(f"{self.rec_path}: no RecordIO magic at offset {offset} (found {magic:#010x})")
        continuation, length = lrec >> 29, lrec & _LENGTH_MASK
        flag = IMAGE_HEADER.unpack_from(head, _PART_HEADER.size)[0]
        label_bytes = 4 * flag
        if continuation != 0 or _PART_HEADER.size + IMAGE_HEADER.size + label_bytes > len(head):
            return self.read(offset)  # split records and long label vectors: read the whole record
        if length < IMAGE_HEADER.size + label_bytes:
            raise RecordIOError(f"{self.rec_path}: record at offset {offset} announces {flag} labels but holds "
                                f"{length} bytes")
        shown = head[_PART_HEADER.size:_PART_HEADER.size + min(length, IMAGE_HEADER.size + label_bytes + 1)]
        return parse_payload(shown)

    def scan(self) -> RecordIOListing:
        """Classify every record of train.idx (in offset order, so the disk reads forward)."""
        listing = RecordIOListing()
        entries = sorted(read_index(self.idx_path), key=lambda entry: entry[1])
        for key, offset in entries:
            try:
                record = self._peek(offset)
            except RecordIOError as exc:
                listing.unreadable.append((offset, str(exc)))
                continue
            if record.has_image:
                listing.images.append((offset, int(record.label)))
            else:
                listing.num_non_image_records += 1
                if key == 0 and len(record.labels) == 2:
                    listing.header_range = (record.labels[0], record.labels[1])
        return listing

    def iter_images(self) -> Iterator[tuple[int, ImageRecord]]:
        """Every image record in train.idx key order (for tools and tests; conversion uses scan + read)."""
        for _, offset in read_index(self.idx_path):
            record = self.read(offset)
            if record.has_image:
                yield offset, record
