# Streaming loader over WebDataset shards (data.backend: webdataset): sharded, shuffled, exactly resumable.
"""The order of samples is a pure function of (seed, epoch, world size, streams per rank, batch index),
so a run resumed from a checkpoint sees exactly the samples and augmentations the uninterrupted run
would have seen, and the checkpoint needs only the epoch and the number of batches taken.

Readers. Each rank has `S = max(1, num_workers)` sub-streams (one per DataLoader worker); batch i of an
epoch comes from sub-stream i % S, which DataLoader's round-robin over workers preserves. Over all ranks
that makes R = world_size x S readers (split by node, rank and worker).

A reader's shards in epoch e: the eligible shards are permuted with a seed of (seed, e) and dealt out
round-robin, reader q taking every R-th; when those are used up (readers of one epoch need slightly
different amounts) it goes on with shards drawn at random with replacement, so a stream never runs dry
and every epoch has a fixed number of steps.

Shuffle buffer. A reader reads `window_shards` consecutive shards of its list into memory (the JPEG
bytes only) and emits their samples in a seeded random order; the window is also the unit of resume: a
resumed reader re-reads the window it was in and skips what was already emitted. Memory per worker is
one or two windows, whatever the size of the data set. Together with the global shuffle of the
converter, no batch sees an identity-sorted stream.

Identity groups (samples_per_label k > 1, UniMoCo). The converter stores up to `group_size` images of
one identity next to each other (a chunk, see toolkit.data.shards); full chunks are split into groups of
k and the window shuffles whole groups, so each batch holds batch_size / k groups of k images of one
identity each, with memory bounded as above.

Damaged input. A sample that cannot be produced (corrupt JPEG, missing `jpg` or label member, label out
of range, a truncated, corrupt, empty or unreadable shard) is skipped and replaced in its batch by a
copy of a readable sample of the same group or batch (augmented with its own seed), so positions and
batch sizes never shift. Counts by reason are in `skip_stats()`; the run stops with a one-line error
when the skipped share passes `max_skipped_fraction`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from toolkit.data.jpeg import CorruptImageError, decode_rgb, resolve_decoder
from toolkit.data.loader import EpochStream
from toolkit.data.shards import (IMAGE_EXT, LABEL_INT32_EXT, LABEL_TEXT_EXT, Manifest, ShardEntry, chunk_of_key,
                                 load_manifest, parse_tar)
from toolkit.data.transforms import ViewAugmentation, two_views_batch
from toolkit.distributed.signals import ignore_stop_signals_in_worker
from toolkit.errors import FaceCLError

logger = logging.getLogger("toolkit.data")

SKIP_REASONS = ("corrupt_image", "missing_key", "bad_label", "truncated_shard", "corrupt_shard", "empty_shard",
                "short_shard", "unreadable_shard")
# The skipped share is judged once this many samples were read (a few bad images among the first
# batches must not stop a run), or at the end of the first epoch if that comes first.
MIN_SAMPLES_TO_JUDGE = 1000
_IMAGE_KEYS = (IMAGE_EXT, "jpeg", "png")
_SALT_SHARD_ORDER, _SALT_RESAMPLE, _SALT_WINDOW, _SALT_AUGMENT = 11, 12, 13, 14
_WARNINGS_PER_REASON = 5
# An epoch that repeats more of its samples than this is reported at start. Shards that split unevenly
# among the readers repeat a little by design (WebFace42M in 21,000 shards of 2,000 images over 64 ranks x 8
# workers: 1.8%); too few shards for the readers repeat a quarter or more.
REPEATS_WARNING_FRACTION = 0.05


class DataSkipError(FaceCLError):
    """Too much of the data cannot be read: the share skipped passed the recipe's threshold."""


def _rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


def _seed_of(*parts: int) -> int:
    """A 62-bit seed for torch.Generator from a tuple of ints (stable across processes)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1, np.uint64)[0]) >> 2


class ShardedTrainSet:
    """The training set described by a manifest: `num_classes`, `len` (samples per epoch) and shards."""

    def __init__(self, manifest_path: str | Path, *, samples_per_label: int = 1):
        try:
            self.manifest: Manifest = load_manifest(manifest_path)
        except (FileNotFoundError, ValueError) as exc:
            raise FaceCLError(f"data.manifest: {exc}") from None
        self.manifest_path = Path(manifest_path)
        self.samples_per_label = samples_per_label
        if samples_per_label > 1 and self.manifest.group_size % samples_per_label:
            raise FaceCLError(f"data.samples_per_label={samples_per_label} needs shards whose identity chunks are a "
                              f"multiple of it, but {manifest_path} was written with group_size "
                              f"{self.manifest.group_size}: convert again with --group-size {samples_per_label}")
        self.units_per_shard = np.array([self.units_of(entry) for entry in self.manifest.shards], dtype=np.int64)
        self.eligible_shards = np.flatnonzero(self.units_per_shard > 0)
        self.num_empty_shards = len(self.manifest.shards) - len(self.eligible_shards)
        if len(self.eligible_shards) == 0:
            raise FaceCLError(f"data.manifest {manifest_path}: no shard holds a usable sample "
                              f"(samples_per_label={samples_per_label})")

    def units_of(self, entry: ShardEntry) -> int:
        """Units a shard contributes: samples, or groups of samples_per_label images of one identity."""
        if self.samples_per_label == 1:
            return entry.num_samples
        return entry.num_groups * (self.manifest.group_size // self.samples_per_label)

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def image_size(self) -> int:
        return self.manifest.image_size

    def __len__(self) -> int:
        """Samples one epoch reads (with identity groups: the images in full groups)."""
        return int(self.units_per_shard.sum()) * self.samples_per_label


@dataclass(frozen=True)
class StreamPlan:
    """Everything that fixes the order of samples; shared by the main process and its workers."""

    seed: int
    rank: int
    world_size: int
    num_streams: int
    batch_size: int
    samples_per_label: int
    window_shards: int

    @property
    def units_per_batch(self) -> int:
        return self.batch_size // self.samples_per_label

    @property
    def num_readers(self) -> int:
        return self.world_size * self.num_streams

    def reader_of(self, stream: int) -> int:
        return self.rank * self.num_streams + stream


def reader_shards(train_set: ShardedTrainSet, plan: StreamPlan, epoch: int, reader: int) -> Iterator[int]:
    """The endless list of shard indices of one reader in one epoch: its deal of the epoch's permutation,
    then shards resampled with replacement."""
    eligible = train_set.eligible_shards
    dealt = eligible[_rng(plan.seed, _SALT_SHARD_ORDER, epoch).permutation(len(eligible))][reader::plan.num_readers]
    yield from dealt.tolist()
    resample = _rng(plan.seed, _SALT_RESAMPLE, epoch, reader)
    while True:
        yield from eligible[resample.integers(0, len(eligible), size=64)].tolist()


def reader_windows(train_set: ShardedTrainSet, plan: StreamPlan, epoch: int,
                   reader: int) -> Iterator[tuple[int, list[int], int]]:
    """(window number, its shard indices, its unit count) for one reader, endlessly."""
    shards = reader_shards(train_set, plan, epoch, reader)
    window = 0
    while True:
        members = [next(shards) for _ in range(plan.window_shards)]
        yield window, members, int(train_set.units_per_shard[members].sum())
        window += 1


def window_order(plan: StreamPlan, epoch: int, reader: int, window: int, num_units: int) -> np.ndarray:
    """The order in which a reader takes the units of one window (a permutation of its units)."""
    return _rng(plan.seed, _SALT_WINDOW, epoch, reader, window).permutation(num_units)


@dataclass(frozen=True)
class EpochRepeats:
    """How many of one epoch's units all readers together take, and how many distinct ones among them."""

    units_read: int
    distinct_units: int

    @property
    def repeated_fraction(self) -> float:
        return 1.0 - self.distinct_units / self.units_read if self.units_read else 0.0


def epoch_repeats(train_set: ShardedTrainSet, plan: StreamPlan, batches_per_epoch: int, epoch: int = 0) -> EpochRepeats:
    """Replays the shard plan of one epoch for every reader of the job (all ranks, all loader streams) using
    the manifest's counts only, without reading a shard, and counts the units read and the distinct ones.
    A reader with too few shards of its own reads resampled ones, which repeat what others read: with one
    shard for two ranks, both ranks read the same images every epoch. O(units of the epoch) in time, one
    byte per unit in memory."""
    offsets = np.concatenate([[0], np.cumsum(train_set.units_per_shard)])
    seen = np.zeros(int(offsets[-1]), dtype=bool)      # unit id = offset of its shard + position in the shard
    units_read = 0
    for rank in range(plan.world_size):
        for stream in range(plan.num_streams):
            # stream s of a rank serves batches s, s + S, s + 2S, ... of the epoch (as _EpochBatches does)
            needed = len(range(stream, batches_per_epoch, plan.num_streams)) * plan.units_per_batch
            reader = rank * plan.num_streams + stream
            windows = reader_windows(train_set, plan, epoch, reader)
            while needed > 0:
                number, shards, count = next(windows)
                ids = np.concatenate([np.arange(offsets[shard], offsets[shard + 1]) for shard in shards])
                if count > needed:  # the last window of the epoch is read in part, in the reader's order
                    ids = ids[window_order(plan, epoch, reader, number, count)[:needed]]
                seen[ids] = True
                units_read += len(ids)
                needed -= len(ids)
    return EpochRepeats(units_read, int(seen.sum()))


# ----- reading windows (worker side) -------------------------------------------------------------------

@dataclass
class SampleSlot:
    """One sample position of a window: its bytes and label, or why it cannot be produced."""

    image: bytes | None
    label: int
    problem: str | None
    where: str


def _label_of(members: dict[str, bytes]) -> int | None:
    if LABEL_TEXT_EXT in members:
        try:
            return int(members[LABEL_TEXT_EXT].decode().strip())
        except (UnicodeDecodeError, ValueError):
            return None
    if LABEL_INT32_EXT in members and len(members[LABEL_INT32_EXT]) == 4:
        return int(np.frombuffer(members[LABEL_INT32_EXT], dtype="<i4")[0])
    return None


def _shard_units(train_set: ShardedTrainSet, shard_index: int) -> list[list[SampleSlot]]:
    """The units of one shard as the manifest counts them; positions the file cannot fill are holes."""
    entry = train_set.manifest.shards[shard_index]
    path = train_set.manifest.shard_path(entry)
    expected = int(train_set.units_per_shard[shard_index])
    k = train_set.samples_per_label
    try:
        data = path.read_bytes()
    except OSError as exc:
        return [[SampleSlot(None, -1, "unreadable_shard", f"{entry.name} ({exc.strerror or exc})")] * k] * expected
    samples, problem = parse_tar(data)
    if k == 1:
        groups = [[sample] for sample in samples]
    else:
        chunks: dict[str, list] = {}
        for sample in samples:
            chunks.setdefault(chunk_of_key(sample.key), []).append(sample)
        groups = []
        for members in chunks.values():
            if len(members) == train_set.manifest.group_size:
                groups.extend(members[i: i + k] for i in range(0, len(members), k))
    units = []
    for group in groups[:expected]:
        slots = []
        for sample in group:
            image = next((sample.members[ext] for ext in _IMAGE_KEYS if ext in sample.members), None)
            label = _label_of(sample.members)
            where = f"{entry.name}:{sample.key}"
            if image is None or label is None:
                slots.append(SampleSlot(None, -1, "missing_key", where))
            elif not 0 <= label < train_set.num_classes:
                slots.append(SampleSlot(None, -1, "bad_label", f"{where} (label {label})"))
            else:
                slots.append(SampleSlot(image, label, None, where))
        units.append(slots)
    if len(units) < expected:
        if not data:
            reason = "empty_shard"
        else:
            reason = {"truncated": "truncated_shard", "corrupt_header": "corrupt_shard"}.get(
                problem, "empty_shard" if not samples else "short_shard")
        hole = [SampleSlot(None, -1, reason, f"{entry.name} ({len(units)} of {expected} readable)")] * k
        units.extend([hole] * (expected - len(units)))
    return units


class _SubStreamReader:
    """Units of one reader in one epoch, from a given unit position on; holds at most the current window."""

    def __init__(self, train_set: ShardedTrainSet, plan: StreamPlan, epoch: int, reader: int, first_unit: int):
        self.train_set, self.plan, self.epoch, self.reader = train_set, plan, epoch, reader
        self._windows = reader_windows(train_set, plan, epoch, reader)
        self._units: list[list[SampleSlot]] = []
        self._order: np.ndarray = np.zeros(0, dtype=np.int64)
        self._next = 0
        skipped = 0
        while True:  # seek: whole windows are passed over using the manifest's counts, without reading
            number, shards, count = next(self._windows)
            if skipped + count > first_unit:
                self._load(number, shards)
                self._next = first_unit - skipped
                break
            skipped += count

    def _load(self, number: int, shards: list[int]) -> None:
        self._units = [unit for shard in shards for unit in _shard_units(self.train_set, shard)]
        self._order = window_order(self.plan, self.epoch, self.reader, number, len(self._units))
        self._next = 0

    def take(self, count: int) -> list[list[SampleSlot]]:
        units = []
        while len(units) < count:
            if self._next >= len(self._order):
                number, shards, _ = next(self._windows)
                self._load(number, shards)
                continue
            units.append(self._units[int(self._order[self._next])])
            self._next += 1
        return units


@dataclass(frozen=True)
class Augmentation:
    image_size: int
    flip: bool
    views: ViewAugmentation | None    # two MoCo views when set
    decoder: str


class _EpochBatches(IterableDataset):
    """One epoch of one rank from `start_batch` on; each DataLoader worker serves one sub-stream."""

    def __init__(self, train_set: ShardedTrainSet, plan: StreamPlan, augmentation: Augmentation, epoch: int,
                 start_batch: int, batches_per_epoch: int):
        self.train_set, self.plan, self.augmentation = train_set, plan, augmentation
        self.epoch, self.start_batch, self.batches_per_epoch = epoch, start_batch, batches_per_epoch
        self._warned: Counter = Counter()

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info else (0, 1)
        assert num_workers == self.plan.num_streams, (num_workers, self.plan.num_streams)
        first = self.start_batch + worker
        if first >= self.batches_per_epoch:
            return
        S = self.plan.num_streams
        stream = first % S
        reader = _SubStreamReader(self.train_set, self.plan, self.epoch, self.plan.reader_of(stream),
                                  (first // S) * self.plan.units_per_batch)
        for batch in range(first, self.batches_per_epoch, S):
            try:
                yield self._batch(reader.take(self.plan.units_per_batch), batch)
            except FaceCLError as exc:
                yield ("error", str(exc))
                return

    def _batch(self, units: list[list[SampleSlot]], batch: int):
        aug = self.augmentation
        skipped: Counter = Counter()
        decoded: list[list[tuple[np.ndarray, int] | None]] = []
        for unit in units:
            row = []
            for slot in unit:
                if slot.problem is None:
                    try:
                        row.append((self._decode(slot.image), slot.label))
                        continue
                    except CorruptImageError as exc:
                        slot = SampleSlot(None, -1, "corrupt_image", f"{slot.where} ({exc})")
                skipped[slot.problem] += 1
                self._warn(slot)
                row.append(None)
            decoded.append(row)
        samples = _fill_holes(decoded, f"epoch {self.epoch} batch {batch} of rank {self.plan.rank}")
        images_BHW3 = np.stack([image for image, _ in samples])
        labels_B = torch.tensor([label for _, label in samples], dtype=torch.int64)
        gen = torch.Generator().manual_seed(_seed_of(self.plan.seed, _SALT_AUGMENT, self.epoch, self.plan.rank, batch))
        if aug.views is not None and images_BHW3.shape[1] == aug.image_size:
            # The views read the decoded bytes directly (their colour map includes the [-1, 1] conversion).
            sample_seeds = torch.randint(0, 2**62, (len(samples),), generator=gen).tolist()
            views_B23HW = two_views_batch(torch.from_numpy(images_BHW3), sample_seeds, aug.views)
            return views_B23HW, labels_B, dict(skipped)
        if aug.views is None and aug.flip:
            # Flip the uint8 pixels before the float conversion: a quarter of the bytes to move.
            flip_B = (torch.rand(len(samples), generator=gen) < 0.5).numpy()
            images_BHW3[flip_B] = images_BHW3[flip_B, :, ::-1]
        images_B3HW = torch.empty((len(samples), 3) + images_BHW3.shape[1:3], dtype=torch.float32)
        images_B3HW.copy_(torch.from_numpy(images_BHW3).permute(0, 3, 1, 2)).mul_(1 / 127.5).sub_(1.0)
        if images_B3HW.shape[-1] != aug.image_size:
            images_B3HW = F.interpolate(images_B3HW, size=(aug.image_size, aug.image_size), mode="bilinear",
                                        antialias=True, align_corners=False).clamp_(-1.0, 1.0)
        if aug.views is None:
            return images_B3HW, labels_B, dict(skipped)
        sample_seeds = torch.randint(0, 2**62, (len(samples),), generator=gen).tolist()
        views_B23HW = two_views_batch(images_B3HW, sample_seeds, aug.views)   # each sample from its own seed
        return views_B23HW, labels_B, dict(skipped)

    def _decode(self, data: bytes) -> np.ndarray:
        rgb = decode_rgb(data, self.augmentation.decoder)
        size = self.train_set.image_size
        if rgb.shape[:2] != (size, size):  # stored faces of another size: bring them to the manifest's
            rgb = np.asarray(torch.nn.functional.interpolate(
                torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None].float(), size=(size, size),
                mode="bilinear", antialias=True, align_corners=False)[0].permute(1, 2, 0).round().clamp(0, 255)
                .to(torch.uint8))
        return rgb

    def _warn(self, slot: SampleSlot) -> None:
        self._warned[slot.problem] += 1
        if self._warned[slot.problem] <= _WARNINGS_PER_REASON:
            more = " (further ones of this kind are only counted)" if self._warned[slot.problem] == _WARNINGS_PER_REASON else ""
            logger.warning("data: skipped a sample, %s: %s%s", slot.problem, slot.where, more)


def _fill_holes(decoded: list[list[tuple[np.ndarray, int] | None]], where: str) -> list[tuple[np.ndarray, int]]:
    """Replace each unreadable sample by the next readable one of its group, and each group without any by
    the next readable group of the batch, so that batch size and identity groups are kept."""
    units = []
    for row in decoded:
        good = [i for i, item in enumerate(row) if item is not None]
        units.append(None if not good else [row[i] if row[i] is not None else row[min(good, key=lambda g: (g - i) % len(row))]
                                            for i in range(len(row))])
    good_units = [i for i, unit in enumerate(units) if unit is not None]
    if not good_units:
        raise DataSkipError(f"data: no readable sample in {where}; the shards it reads are damaged or missing")
    filled = []
    for i, unit in enumerate(units):
        if unit is None:
            unit = units[min(good_units, key=lambda g: (g - i) % len(units))]
        filled.extend(unit)
    return filled


def _no_collate(batch):
    return batch


class ShardBatchStream(EpochStream):
    """Endless (images, labels) batches over shards, with `state_dict()` for checkpoints and skip counts."""

    backend = "webdataset"

    def __init__(self, train_set: ShardedTrainSet, batch_size: int, *, seed: int, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, flip: bool = True, views: ViewAugmentation | None = None, image_size: int = 112,
                 window_shards: int = 4, decoder: str = "auto", max_skipped_fraction: float = 0.01,
                 pin_memory: bool = False, prefetch_batches: int = 2):
        k = train_set.samples_per_label
        if batch_size % k:
            raise ValueError(f"a batch of {batch_size} cannot hold whole groups of {k} samples per identity")
        self.train_set = train_set
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.pin_memory, self.prefetch_batches = num_workers, pin_memory, prefetch_batches
        self.plan = StreamPlan(seed=seed, rank=rank, world_size=world_size, num_streams=max(1, num_workers),
                               batch_size=batch_size, samples_per_label=k, window_shards=window_shards)
        self.augmentation = Augmentation(image_size=image_size, flip=flip, views=views,
                                         decoder=resolve_decoder(decoder))
        self.max_skipped_fraction = max_skipped_fraction
        self.batches_per_epoch = len(train_set) // (batch_size * world_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f"data set of {len(train_set)} samples is smaller than one global batch of "
                             f"{batch_size} x {world_size} ranks")
        self.epoch = 0
        self.batch_in_epoch = 0
        self._iterator: Iterator | None = None
        self._skipped: Counter = Counter()
        self._samples_read = 0
        if train_set.num_empty_shards:
            logger.warning("data: %d shard(s) of %s hold no usable sample and are passed over",
                           train_set.num_empty_shards, train_set.manifest_path)
        if rank == 0:
            warning = self.repeats_warning()
            if warning:
                logger.warning(warning)

    def repeats_warning(self) -> str | None:
        """One line when an epoch reads some samples more than once because there are too few shards for the
        job's readers (ranks x loader streams) and their windows; None under REPEATS_WARNING_FRACTION."""
        repeats = epoch_repeats(self.train_set, self.plan, self.batches_per_epoch)
        if repeats.repeated_fraction < REPEATS_WARNING_FRACTION:
            return None
        plan, manifest = self.plan, self.train_set.manifest
        usable = len(self.train_set.eligible_shards)
        shards_wanted = plan.num_readers * plan.window_shards
        if usable < shards_wanted:
            cause = f"{usable} usable shard(s) for {plan.num_readers} reader(s)"
            target = shards_wanted
        else:  # enough shards, but they do not split evenly: some readers run out before the epoch ends
            cause = f"{usable} usable shards split unevenly among {plan.num_readers} readers"
            target = 4 * usable
        shard_size = manifest.num_samples // target
        if shard_size >= manifest.group_size:
            advice = (f"prepare the data with smaller shards (launch/prepare_data.py --shard-size {shard_size} gives "
                      f"about {target})")
        else:
            advice = "the data set is too small to split further: lower data.num_workers or data.webdataset.window_shards"
        k = self.train_set.samples_per_label
        return (f"data: {100 * repeats.repeated_fraction:.0f}% of each epoch's samples are repeats "
                f"({repeats.distinct_units * k} distinct of {repeats.units_read * k} read): {cause} "
                f"({plan.world_size} rank(s) x {plan.num_streams} loader stream(s), windows of {plan.window_shards} "
                f"shard(s)) in {self.train_set.manifest_path}; {advice}")

    # ----- position ----------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"backend": self.backend, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                "seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size,
                "num_streams": self.plan.num_streams, "samples_per_label": self.plan.samples_per_label,
                "window_shards": self.plan.window_shards, "data": self.train_set.manifest.fingerprint()}

    def load_state_dict(self, state: dict, allow_world_size_change: bool = False) -> None:
        """Continue from a saved position. Another world size or worker count (allowed on request) keeps
        the epoch and the share of it already read, but not the samples."""
        if state.get("backend") != self.backend:
            raise ValueError(f"data position was saved by the {state.get('backend', 'synthetic')!r} backend, this "
                             f"run reads {self.backend!r}")
        current = self.state_dict()
        exact = ["seed", "batch_size", "samples_per_label", "window_shards", "data"]
        if not allow_world_size_change:
            exact += ["world_size", "num_streams"]
        for key in exact:
            if state.get(key) != current[key]:
                raise ValueError(f"data position was saved with {key}={state.get(key)!r}, this run has "
                                 f"{key}={current[key]!r}; exact resume needs the same value")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        if (state["world_size"], state["num_streams"]) != (self.world_size, self.plan.num_streams):
            consumed = self.batch_in_epoch * state["batch_size"] * state["world_size"]
            self.batch_in_epoch = min(consumed // (self.batch_size * self.world_size), self.batches_per_epoch)
            logger.warning("data: resuming with %d ranks x %d streams instead of %d x %d: same epoch and share of "
                           "it, other samples", self.world_size, self.plan.num_streams, state["world_size"],
                           state["num_streams"])
        self._iterator = None

    # ----- batches -----------------------------------------------------------------------------------
    def _start_epoch(self) -> Iterator:
        epoch_data = _EpochBatches(self.train_set, self.plan, self.augmentation, self.epoch, self.batch_in_epoch,
                                   self.batches_per_epoch)
        loader = DataLoader(epoch_data, batch_size=None, collate_fn=_no_collate, num_workers=self.num_workers,
                            worker_init_fn=ignore_stop_signals_in_worker,
                            pin_memory=self.pin_memory, persistent_workers=False,
                            prefetch_factor=self.prefetch_batches if self.num_workers > 0 else None,
                            generator=torch.Generator().manual_seed(self.seed + self.epoch))
        return iter(loader)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        item = self._next_item()
        if item[0] == "error":
            self._iterator = None
            raise DataSkipError(item[1])
        images, labels, skipped = item
        self.batch_in_epoch += 1
        self._samples_read += labels.numel()
        self._skipped.update(skipped)
        self._check_skipped_share()
        return images, labels

    def skip_stats(self) -> dict[str, int]:
        """Samples skipped (and replaced) since this stream started, by reason."""
        return dict(sorted(self._skipped.items()))

    def _check_skipped_share(self) -> None:
        num_skipped = sum(self._skipped.values())
        if not num_skipped:
            return
        judged = self._samples_read >= min(MIN_SAMPLES_TO_JUDGE, self.batches_per_epoch * self.batch_size)
        share = num_skipped / self._samples_read
        if judged and share > self.max_skipped_fraction:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(self._skipped.items()))
            raise DataSkipError(f"data: {num_skipped} of {self._samples_read} samples read on rank {self.rank} were "
                                f"skipped ({share:.2%}: {reasons}), more than data.max_skipped_fraction="
                                f"{self.max_skipped_fraction}; check the shards of {self.train_set.manifest_path}")
