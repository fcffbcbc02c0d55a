# WebDataset shard format of FaceCL: tar writing with DALI index files, a fast tar parser, the manifest.
"""Shards are plain tar files in the WebDataset convention: the members of one sample are consecutive
and share a key (the member name up to the first dot of its last path component); the rest of the name
is the extension. Each face sample has three members:

- `KEY.jpg`       the aligned face, JPEG;
- `KEY.cls`       its identity label as decimal text (the WebDataset convention);
- `KEY.label.i32` the same label as 4 little-endian bytes (DALI cannot parse text labels).

Keys are `CCCCCCCCC_M`: the global number of the identity chunk the sample belongs to and its position
in that chunk. A chunk is up to `group_size` images of one identity written next to each other, which
is what lets a streaming reader build identity-grouped batches without an index of the whole data set.

Next to every `NAME.tar` lies `NAME.idx`, the index `fn.readers.webdataset` of DALI reads (format v1.2:
a first line "v1.2 NUM_SAMPLES", then per sample "ext data_offset size member_name" for each member).
`manifest.json` describes the whole set (see `Manifest`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import tarfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

IMAGE_EXT = "jpg"
LABEL_TEXT_EXT = "cls"
LABEL_INT32_EXT = "label.i32"
MANIFEST_FORMAT = "facecl-webdataset"
MANIFEST_VERSION = 1
DALI_INDEX_VERSION = "v1.2"
_TAR_BLOCK = 512
_ZERO_BLOCK = bytes(_TAR_BLOCK)


def sample_key(chunk_number: int, member: int) -> str:
    return f"{chunk_number:09d}_{member}"


def chunk_of_key(key: str) -> str:
    """The chunk part of a key; a key without '_' (another writer's) is a chunk of its own."""
    head, sep, _ = key.rpartition("_")
    return head if sep else key


def file_sha256(path: str | Path, block_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(block_size):
            digest.update(block)
    return digest.hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, then rename: `path` is whole or absent, never half."""
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    with open(partial, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(partial, path)


class ShardWriter:
    """Writes one shard under a temporary name; `close()` renames it and writes its DALI index."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.partial_path = self.path.with_name(f"{self.path.name}.partial-{os.getpid()}")
        self._file = open(self.partial_path, "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)
        self._index_lines: list[str] = []
        self.num_samples = 0

    def _add_member(self, name: str, data: bytes) -> tuple[int, int]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = 0      # fixed metadata: a rerun writes byte-identical shards (same checksums)
        info.mode = 0o444
        self._tar.addfile(info, io.BytesIO(data))
        # The archive's position is now past this member's padded data; its data starts that much earlier.
        return self._tar.offset - (len(data) + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK, len(data)

    def add(self, key: str, jpeg: bytes, label: int) -> None:
        parts = []
        for ext, data in ((IMAGE_EXT, jpeg), (LABEL_TEXT_EXT, str(label).encode()),
                          (LABEL_INT32_EXT, struct.pack("<i", label))):
            offset, size = self._add_member(f"{key}.{ext}", data)
            parts.append(f"{ext} {offset} {size} {key}.{ext}")
        self._index_lines.append(" ".join(parts))
        self.num_samples += 1

    def close(self) -> tuple[int, str]:
        """Finish the tar, move it to its final name; returns (size in bytes, sha256)."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        size, checksum = self.partial_path.stat().st_size, file_sha256(self.partial_path)
        index_text = f"{DALI_INDEX_VERSION} {self.num_samples}\n" + "".join(line + "\n" for line in self._index_lines)
        write_atomically(dali_index_path(self.path), index_text.encode())
        os.replace(self.partial_path, self.path)
        return size, checksum

    def abort(self) -> None:
        try:
            self._tar.close()
            self._file.close()
        finally:
            self.partial_path.unlink(missing_ok=True)


def dali_index_path(shard_path: str | Path) -> Path:
    shard_path = Path(shard_path)
    return shard_path.with_name(shard_path.name.rsplit(".tar", 1)[0] + ".idx")


# ----- reading ---------------------------------------------------------------------------------------

@dataclass
class TarSample:
    key: str
    members: dict[str, bytes]


def _octal(field_bytes: bytes) -> int:
    if field_bytes and field_bytes[0] & 0x80:  # GNU base-256 for large sizes
        return int.from_bytes(field_bytes[1:], "big")
    text = field_bytes.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _pax_path(records: bytes) -> str | None:
    """The 'path' entry of a pax extended header, if any."""
    pos = 0
    while pos < len(records):
        space = records.find(b" ", pos)
        if space < 0:
            break
        length = int(records[pos:space])
        key, _, value = records[space + 1: pos + length - 1].partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "replace")
        pos += length
    return None


def parse_tar(data: bytes) -> tuple[list[TarSample], str | None]:
    """Samples of a tar image in order, and what went wrong (None, 'truncated' or 'corrupt_header').

    Everything before a damaged point is returned: a tar cut short still yields its first samples.
    Directories, links and other non-file members are passed over.
    """
    samples: list[TarSample] = []
    pos, size_total = 0, len(data)
    pending_name: str | None = None
    problem: str | None = "truncated"  # until the end-of-archive block is seen
    view = memoryview(data)
    while pos + _TAR_BLOCK <= size_total:
        header = bytes(view[pos: pos + _TAR_BLOCK])
        if header == _ZERO_BLOCK:
            problem = None
            break
        try:
            stored_checksum = _octal(header[148:156])
            size = _octal(header[124:136])
        except ValueError:
            problem = "corrupt_header"
            break
        if stored_checksum != sum(header[:148]) + 8 * 32 + sum(header[156:]):
            problem = "corrupt_header"
            break
        type_flag = header[156:157]
        start = pos + _TAR_BLOCK
        end = start + size
        if end > size_total:
            break  # the member's data is cut short: truncated
        pos = start + (size + _TAR_BLOCK - 1) // _TAR_BLOCK * _TAR_BLOCK
        if type_flag == b"L":          # GNU long name for the next member
            pending_name = data[start:end].split(b"\0", 1)[0].decode("utf-8", "replace")
            continue
        if type_flag == b"x":          # pax extended header for the next member
            pending_name = _pax_path(data[start:end]) or pending_name
            continue
        if type_flag not in (b"0", b"\0", b"7"):
            pending_name = None
            continue
        if pending_name is not None:
            name, pending_name = pending_name, None
        else:
            name = header[0:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            prefix = header[345:500].split(b"\0", 1)[0].decode("utf-8", "replace")
            if prefix:
                name = f"{prefix}/{name}"
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        if dot <= slash + 1:
            continue  # no extension, or a hidden file
        key, ext = name[:dot], name[dot + 1:]
        if samples and samples[-1].key == key:
            samples[-1].members[ext] = data[start:end]
        else:
            samples.append(TarSample(key, {ext: data[start:end]}))
    return samples, problem


# ----- manifest --------------------------------------------------------------------------------------

@dataclass
class ShardEntry:
    name: str            # file name, relative to the manifest's folder
    num_samples: int
    num_groups: int      # chunks holding exactly group_size images of one identity
    sha256: str
    size_bytes: int


@dataclass
class Manifest:
    """What `manifest.json` holds; shards are found in the manifest's folder (`root`)."""

    num_classes: int
    num_samples: int
    image_size: int
    group_size: int
    shards: list[ShardEntry]
    skipped: dict[str, int] = field(default_factory=dict)   # inputs left out at conversion, by reason
    source: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    root: Path = Path(".")

    def to_json(self) -> str:
        payload = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION,
                   "keys": {"image": IMAGE_EXT, "label_text": LABEL_TEXT_EXT, "label_int32": LABEL_INT32_EXT},
                   **{k: v for k, v in asdict(self).items() if k not in ("shards", "root")},
                   "num_shards": len(self.shards), "shards": [asdict(s) for s in self.shards]}
        return json.dumps(payload, indent=1)

    def shard_path(self, entry: ShardEntry) -> Path:
        return self.root / entry.name

    def fingerprint(self) -> str:
        """Short digest of the shard list and checksums: a resumed run must read the same data."""
        digest = hashlib.sha256()
        for entry in self.shards:
            digest.update(f"{entry.name}:{entry.num_samples}:{entry.sha256};".encode())
        return digest.hexdigest()[:16]


def load_manifest(path: str | Path) -> Manifest:
    """Read and check manifest.json; errors name the file and the bad value."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path} (write one with launch/prepare_data.py)")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"manifest {path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict) or raw.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not a FaceCL shard manifest (format {raw.get('format') if isinstance(raw, dict) else None!r}, "
                         f"expected {MANIFEST_FORMAT!r})")
    if raw.get("version") != MANIFEST_VERSION:
        raise ValueError(f"manifest {path} has version {raw.get('version')!r}; this toolkit reads {MANIFEST_VERSION}")
    try:
        shards = [ShardEntry(**entry) for entry in raw["shards"]]
        manifest = Manifest(num_classes=int(raw["num_classes"]), num_samples=int(raw["num_samples"]),
                            image_size=int(raw["image_size"]), group_size=int(raw["group_size"]), shards=shards,
                            skipped=dict(raw.get("skipped", {})), source=dict(raw.get("source", {})),
                            settings=dict(raw.get("settings", {})), root=path.parent)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"manifest {path} is missing or has a malformed field: {exc}") from None
    counted = sum(s.num_samples for s in shards)
    if counted != manifest.num_samples:
        raise ValueError(f"manifest {path}: num_samples is {manifest.num_samples} but its shards hold {counted}")
    if manifest.num_classes < 1 or manifest.group_size < 1:
        raise ValueError(f"manifest {path}: num_classes ({manifest.num_classes}) and group_size "
                         f"({manifest.group_size}) must be positive")
    return manifest
