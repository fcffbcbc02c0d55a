# Converters to shuffled WebDataset shards: insightface RecordIO, image folders, the WebFace42M layout.
"""One conversion = list the source, plan, write shards in parallel, write the manifest.

Plan: every image gets a contiguous class label; the images of each identity are shuffled and cut into
chunks of `group_size` (the last chunk of an identity may be shorter); all chunks of all identities are
shuffled globally and cut into shards of about `shard_size` images at chunk boundaries. No shard, and
so no reader, sees an identity-sorted stream, while every chunk keeps up to `group_size` images of one
identity together for identity-grouped (UniMoCo) batches. The plan is a pure function of the source
listing and the settings, so a rerun computes the same plan.

Resumability: each shard is written under a temporary name and renamed when complete, then a small
record of it (counts, checksum) is written to `.convert/`; a rerun skips shards with a record and
rewrites any other. A rerun whose plan differs (other source or settings) refuses to mix the two
unless told to start over.

Robustness: an image that cannot be read or decoded is left out and counted by reason in the
manifest; nothing about a single input is fatal.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import os
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Iterable

import numpy as np

from toolkit.data.jpeg import CorruptImageError, normalise_face_image
from toolkit.data.recordio import RecordIOError, RecordIOFile
from toolkit.data.shards import (Manifest, ShardEntry, ShardWriter, dali_index_path, sample_key,
                                 write_atomically)
from toolkit.errors import FaceCLError

IMAGE_FILE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
STATE_FOLDER = ".convert"
WEBFACE_SUBSETS = {"webface4m": (0,), "webface12m": (0, 1, 2), "webface42m": tuple(range(10))}


class ConversionError(FaceCLError):
    """A source that cannot be converted as asked (missing folder, empty set, conflicting output)."""


@dataclass(frozen=True)
class ConvertSettings:
    shard_size: int | None = None   # images per shard (cut at chunk boundaries, so about this many); None: auto
    group_size: int = 2         # images of one identity kept together (a multiple of samples_per_label)
    image_size: int = 112       # side of the stored faces; other sizes are resized
    seed: int = 0               # of the global shuffle
    num_workers: int = 1        # processes writing shards

    def check(self) -> None:
        for name in ("shard_size", "group_size", "image_size", "num_workers"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConversionError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.shard_size is not None and self.shard_size < self.group_size:
            raise ConversionError(f"shard_size ({self.shard_size}) must be >= group_size ({self.group_size})")


DEFAULT_SHARD_SIZE = 2000   # images per shard of a large set: about 100-250 MB of 112 x 112 JPEGs
MIN_AUTO_SHARDS = 64        # a smaller set gets smaller shards, so that it still makes about this many


def auto_shard_size(num_images: int, group_size: int) -> int:
    """The shard size when none is given: DEFAULT_SHARD_SIZE images, or fewer for sets under 128,000 images so
    that they still make about MIN_AUTO_SHARDS shards. A training job hands each of its readers (ranks x
    loader workers) shards of its own, window by window; a set in fewer shards than that repeats samples
    across readers in every epoch. Never below group_size (a shard holds whole identity chunks)."""
    return max(group_size, min(DEFAULT_SHARD_SIZE, num_images // MIN_AUTO_SHARDS))


@dataclass
class SourceListing:
    """Every image of a source: a reference the source can read, and its class label."""

    refs: list                    # offsets (RecordIO) or relative paths (folders)
    labels: np.ndarray            # int64, contiguous 0..num_classes-1
    class_names: list[str]        # name of each class (folder name or original label)
    skipped: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# ----- sources ---------------------------------------------------------------------------------------

class RecordIOSource:
    """insightface train.rec + train.idx (all three layouts, see toolkit.data.recordio)."""

    kind = "recordio"

    def __init__(self, rec_path: str | Path, idx_path: str | Path | None = None):
        try:
            self.file = RecordIOFile(rec_path, idx_path)
        except FileNotFoundError as exc:
            raise ConversionError(str(exc)) from None

    def describe(self) -> dict:
        return {"kind": self.kind, "rec": str(self.file.rec_path), "idx": str(self.file.idx_path)}

    def list_items(self) -> SourceListing:
        scan = self.file.scan()
        if not scan.images:
            raise ConversionError(f"{self.file.rec_path} holds no image records "
                                  f"({scan.num_non_image_records} records without image bytes)")
        offsets = [offset for offset, _ in scan.images]
        raw_labels = np.array([label for _, label in scan.images], dtype=np.int64)
        original, labels = np.unique(raw_labels, return_inverse=True)
        listing = SourceListing(refs=offsets, labels=labels.astype(np.int64),
                                class_names=[str(int(v)) for v in original])
        if scan.unreadable:
            listing.skipped["unreadable_record"] += len(scan.unreadable)
        if scan.header_range is not None:
            first_identity_record = scan.header_range[0]
            # Exact only below 2^24 (float32 labels); above it the records themselves are trusted.
            if first_identity_record < 2**24 and int(first_identity_record) - 1 != len(scan.images) + len(scan.unreadable):
                listing.notes.append(f"header record says image records are 1..{int(first_identity_record) - 1}, "
                                     f"found {len(scan.images)} readable and {len(scan.unreadable)} unreadable")
        if not np.array_equal(original, np.arange(len(original))):
            listing.notes.append(f"labels were not contiguous (min {int(original[0])}, max {int(original[-1])}, "
                                 f"{len(original)} distinct): renumbered, see labels.txt")
        return listing

    def read(self, ref: int) -> bytes:
        return self.file.read(int(ref)).image


class ImageFolderSource:
    """root/IDENTITY/IMAGE: one folder per identity; labels follow the sorted folder names."""

    kind = "folder"

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ConversionError(f"image folder not found: {self.root}")

    def describe(self) -> dict:
        return {"kind": self.kind, "root": str(self.root)}

    def identity_folders(self) -> Iterable[tuple[str, Path]]:
        """(class name, folder) in label order."""
        for entry in sorted(os.scandir(self.root), key=lambda e: e.name):
            if entry.is_dir() and not entry.name.startswith("."):
                yield entry.name, Path(entry.path)

    def list_items(self) -> SourceListing:
        refs, labels, names, skipped = [], [], [], Counter()
        for name, folder in self.identity_folders():
            files = sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))
            images = [f for f in files if f.lower().endswith(IMAGE_FILE_EXTENSIONS)]
            skipped["not_an_image_file"] += len(files) - len(images)
            if not images:
                skipped["empty_identity_folder"] += 1
                continue
            relative = folder.relative_to(self.root).as_posix()
            refs.extend(f"{relative}/{f}" for f in images)
            labels.extend([len(names)] * len(images))
            names.append(name)
        if not refs:
            raise ConversionError(f"no images found under {self.root} (expected {self.root}/IDENTITY/IMAGE.jpg)")
        return SourceListing(refs=refs, labels=np.array(labels, dtype=np.int64), class_names=names,
                             skipped=+skipped)

    def read(self, ref: str) -> bytes:
        return (self.root / ref).read_bytes()


_FLAT_WEBFACE_IDENTITY = re.compile(r"^(\d)_\d+_\d+$")   # P_S_IIIIIII: the first digit names the part


class WebFaceSource(ImageFolderSource):
    """WebFace42M in either of its two unpacked layouts: root/PART/IDENTITY/IMAGE with parts 0-9, or flat
    root/P_S_IIIIIII/IMAGE identity folders whose first digit P names the part. Labels are contiguous over
    the chosen parts in (part, identity) order. WebFace4M is part 0, WebFace12M parts 0-2."""

    kind = "webface"

    def __init__(self, root: str | Path, parts: Iterable[int]):
        super().__init__(root)
        self.parts = tuple(sorted(set(int(p) for p in parts)))
        if not self.parts or any(p < 0 or p > 9 for p in self.parts):
            raise ConversionError(f"WebFace parts must be in 0..9, got {list(self.parts)}")
        nested = [p for p in range(10) if (self.root / str(p)).is_dir()]
        self.layout = "nested" if nested else "flat"
        present = set(nested) if nested else self._flat_parts()
        if not present:
            raise ConversionError(f"no WebFace42M identity folders under {self.root} (expected {self.root}/0 ... "
                                  f"{self.root}/9, or flat {self.root}/P_S_IIIIIII folders)")
        missing = [p for p in self.parts if p not in present]
        if missing:
            where = (f"expected {self.root}/0 ... {self.root}/9" if nested
                     else f"no {self.root}/{{P}}_S_IIIIIII identity folders for those parts")
            raise ConversionError(f"WebFace42M part folders {missing} not found under {self.root} ({where})")

    def _flat_parts(self) -> set[int]:
        return {int(m.group(1)) for entry in os.scandir(self.root)
                if entry.is_dir() and (m := _FLAT_WEBFACE_IDENTITY.match(entry.name))}

    def describe(self) -> dict:
        return {"kind": self.kind, "root": str(self.root), "parts": list(self.parts), "layout": self.layout}

    def identity_folders(self) -> Iterable[tuple[str, Path]]:
        if self.layout == "flat":
            wanted = set(self.parts)
            entries = [(int(m.group(1)), entry.name, entry.path) for entry in os.scandir(self.root)
                       if entry.is_dir() and (m := _FLAT_WEBFACE_IDENTITY.match(entry.name))]
            for part, name, path in sorted(entries):
                if part in wanted:
                    yield name, Path(path)
            return
        for part in self.parts:
            part_folder = self.root / str(part)
            for entry in sorted(os.scandir(part_folder), key=lambda e: e.name):
                if entry.is_dir() and not entry.name.startswith("."):
                    yield f"{part}/{entry.name}", Path(entry.path)


def webface_parts(subset: str) -> tuple[int, ...]:
    try:
        return WEBFACE_SUBSETS[subset.lower()]
    except KeyError:
        raise ConversionError(f"unknown WebFace subset {subset!r}; expected one of {sorted(WEBFACE_SUBSETS)}") from None


# ----- plan ------------------------------------------------------------------------------------------

@dataclass
class ShardPlan:
    index: int
    items: np.ndarray      # indices into the listing, in write order
    chunks: np.ndarray     # global chunk number of each item
    members: np.ndarray    # position of each item in its chunk

    @property
    def name(self) -> str:
        return f"shard-{self.index:06d}.tar"


def plan_shards(labels: np.ndarray, settings: ConvertSettings) -> list[ShardPlan]:
    """Chunks of up to group_size images of one identity, shuffled globally, cut into shards."""
    num_items = labels.size
    rng = np.random.default_rng(settings.seed)
    shuffled = rng.permutation(num_items)
    by_label = shuffled[np.argsort(labels[shuffled], kind="stable")]      # random order within each identity
    sorted_labels = labels[by_label]
    rank_in_label = np.arange(num_items) - np.searchsorted(sorted_labels, sorted_labels, side="left")
    chunk_of_position = np.cumsum(rank_in_label % settings.group_size == 0) - 1
    num_chunks = int(chunk_of_position[-1]) + 1
    new_chunk_number = np.empty(num_chunks, dtype=np.int64)
    new_chunk_number[rng.permutation(num_chunks)] = np.arange(num_chunks)
    chunk_numbers = new_chunk_number[chunk_of_position]
    write_order = np.lexsort((rank_in_label, chunk_numbers))
    items, chunks = by_label[write_order], chunk_numbers[write_order]
    members = rank_in_label[write_order] % settings.group_size
    chunk_first_position = np.flatnonzero(members == 0)                  # indexed by chunk number
    shard_of_item = chunk_first_position[chunks] // settings.shard_size
    bounds = np.flatnonzero(np.diff(shard_of_item)) + 1
    return [ShardPlan(index, items[s], chunks[s], members[s])
            for index, s in enumerate(np.split(np.arange(num_items), bounds))]


def plan_fingerprint(source: object, listing: SourceListing, settings: ConvertSettings) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"source": source.describe(), "settings": asdict(settings) | {"num_workers": 0}},
                             sort_keys=True).encode())
    digest.update(listing.labels.tobytes())
    digest.update("\n".join(map(str, listing.refs)).encode())
    return digest.hexdigest()


# ----- writing ---------------------------------------------------------------------------------------

@dataclass
class ShardTask:
    name: str
    refs: list
    labels: list[int]
    chunks: list[int]


@dataclass
class ShardResult:
    name: str
    num_samples: int
    num_groups: int
    sha256: str
    size_bytes: int
    skipped: dict[str, int]
    converted: dict[str, int]


_worker_source = None
_worker_settings: ConvertSettings | None = None
_worker_out_dir: Path | None = None


def _init_worker(source, settings: ConvertSettings, out_dir: Path) -> None:
    global _worker_source, _worker_settings, _worker_out_dir
    _worker_source, _worker_settings, _worker_out_dir = source, settings, out_dir


def write_shard(task: ShardTask, source=None, settings: ConvertSettings | None = None,
                out_dir: Path | None = None) -> ShardResult:
    """Read, check and write the images of one shard; unreadable or corrupt images are counted, not fatal."""
    source = source or _worker_source
    settings = settings or _worker_settings
    out_dir = out_dir or _worker_out_dir
    skipped, converted = Counter(), Counter()
    writer = ShardWriter(out_dir / task.name)
    chunk_sizes: Counter = Counter()
    member_in_chunk: Counter = Counter()
    try:
        for ref, label, chunk in zip(task.refs, task.labels, task.chunks):
            try:
                raw = source.read(ref)
            except (OSError, RecordIOError):
                skipped["unreadable_file" if source.kind != "recordio" else "unreadable_record"] += 1
                continue
            try:
                jpeg, action = normalise_face_image(raw, settings.image_size)
            except CorruptImageError:
                skipped["corrupt_image"] += 1
                continue
            converted[action] += 1
            # Members are renumbered after skips so that a chunk's keys stay 0..n-1.
            writer.add(sample_key(chunk, member_in_chunk[chunk]), jpeg, int(label))
            member_in_chunk[chunk] += 1
            chunk_sizes[chunk] += 1
        size, checksum = writer.close()
    except BaseException:
        writer.abort()
        raise
    num_groups = sum(1 for n in chunk_sizes.values() if n == settings.group_size)
    return ShardResult(task.name, writer.num_samples, num_groups, checksum, size, dict(skipped), dict(converted))


def _write_shard_in_worker(task: ShardTask) -> ShardResult:
    return write_shard(task)


def _finished_results(out_dir: Path, names: list[str]) -> dict[str, ShardResult]:
    """Shards whose record exists and whose files are all there with the recorded size."""
    done = {}
    for name in names:
        record = out_dir / STATE_FOLDER / f"{name}.json"
        shard = out_dir / name
        if not (record.is_file() and shard.is_file() and dali_index_path(shard).is_file()):
            continue
        try:
            result = ShardResult(**json.loads(record.read_text()))
        except (json.JSONDecodeError, TypeError):
            continue
        if shard.stat().st_size == result.size_bytes:
            done[name] = result
    return done


def _check_plan(out_dir: Path, fingerprint: str, num_shards: int, overwrite: bool) -> None:
    state = out_dir / STATE_FOLDER
    plan_file = state / "plan.json"
    if plan_file.is_file():
        previous = json.loads(plan_file.read_text()).get("fingerprint")
        if previous != fingerprint:
            if not overwrite:
                raise ConversionError(f"{out_dir} holds shards of a different conversion (other source or settings); "
                                      "use another output folder or pass --overwrite to start over")
            for path in list(out_dir.glob("shard-*")) + list(state.glob("*")):
                path.unlink()
            (out_dir / "manifest.json").unlink(missing_ok=True)
    state.mkdir(parents=True, exist_ok=True)
    write_atomically(plan_file, json.dumps({"fingerprint": fingerprint, "num_shards": num_shards}).encode())
    for stale in out_dir.glob("*.partial-*"):
        stale.unlink()  # left by an interrupted run; never under a final name


def convert(source, out_dir: str | Path, settings: ConvertSettings = ConvertSettings(), *, overwrite: bool = False,
            progress: bool = True, log=print) -> Manifest:
    """Convert `source` into shards + manifest.json in `out_dir`; returns the manifest."""
    settings.check()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"listing {source.describe()} ...")
    listing = source.list_items()
    for note in listing.notes:
        log(f"note: {note}")
    if settings.shard_size is None:
        settings = replace(settings, shard_size=auto_shard_size(len(listing.refs), settings.group_size))
        log(f"shard size: {settings.shard_size} images (chosen for {len(listing.refs)} images: "
            f"{DEFAULT_SHARD_SIZE}, or fewer so that a small set still makes about {MIN_AUTO_SHARDS} shards; "
            f"--shard-size to choose)")
    plans = plan_shards(listing.labels, settings)
    _check_plan(out_dir, plan_fingerprint(source, listing, settings), len(plans), overwrite)
    done = _finished_results(out_dir, [p.name for p in plans])
    todo = [p for p in plans if p.name not in done]
    log(f"{len(listing.refs)} images of {listing.num_classes} identities -> {len(plans)} shards in {out_dir} "
        f"({len(done)} already written, {len(todo)} to write, {settings.num_workers} workers)")
    tasks = (ShardTask(p.name, [listing.refs[i] for i in p.items], listing.labels[p.items].tolist(),
                       p.chunks.tolist()) for p in todo)
    bar = _progress_bar(len(listing.refs), sum(r.num_samples for r in done.values()), progress)
    try:
        if settings.num_workers == 1:
            results = (write_shard(task, source, settings, out_dir) for task in tasks)
            for result in results:
                _record(out_dir, result, done, bar)
        else:
            with multiprocessing.get_context("fork").Pool(settings.num_workers, initializer=_init_worker,
                                                          initargs=(source, settings, out_dir)) as pool:
                for result in pool.imap_unordered(_write_shard_in_worker, tasks):
                    _record(out_dir, result, done, bar)
    finally:
        bar.close()
    manifest = _assemble_manifest(out_dir, source, listing, settings, [done[p.name] for p in plans])
    _write_class_names(out_dir, listing.class_names)
    write_atomically(out_dir / "manifest.json", manifest.to_json().encode())
    log(f"wrote {manifest.num_samples} images of {manifest.num_classes} identities in {len(manifest.shards)} shards; "
        f"skipped: {manifest.skipped or 'none'}")
    return manifest


def _record(out_dir: Path, result: ShardResult, done: dict, bar) -> None:
    write_atomically(out_dir / STATE_FOLDER / f"{result.name}.json", json.dumps(asdict(result)).encode())
    done[result.name] = result
    bar.update(result.num_samples + sum(result.skipped.values()))


def _assemble_manifest(out_dir: Path, source, listing: SourceListing, settings: ConvertSettings,
                       results: list[ShardResult]) -> Manifest:
    skipped, converted = Counter(listing.skipped), Counter()
    for result in results:
        skipped.update(result.skipped)
        converted.update(result.converted)
    shards = [ShardEntry(r.name, r.num_samples, r.num_groups, r.sha256, r.size_bytes) for r in results]
    return Manifest(num_classes=listing.num_classes, num_samples=sum(s.num_samples for s in shards),
                    image_size=settings.image_size, group_size=settings.group_size, shards=shards,
                    skipped=dict(sorted(skipped.items())), source=source.describe(),
                    settings={**asdict(settings), "converted": dict(converted), "notes": listing.notes},
                    root=out_dir)


def _write_class_names(out_dir: Path, names: list[str]) -> None:
    """labels.txt: line i names class i (identity folder, or the original RecordIO label)."""
    write_atomically(out_dir / "labels.txt", "".join(f"{name}\n" for name in names).encode())


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="img", smoothing=0.05, desc="shards")
