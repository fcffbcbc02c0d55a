# Resumable, rank-aware batch stream over a map-style data set: the data order is a function of (seed, epoch).
"""Epoch-based shuffled batches with an exact, checkpointable position.

Each epoch is a seeded permutation of the data set, cut into global batches of
`batch_size * world_size` samples (the tail that does not fill a global batch is dropped, so every
rank always gets a full batch); rank r takes its contiguous slice of each global batch. With
`samples_per_label` k > 1 the permutation is of identity groups: k samples of one identity stay
adjacent, so every batch holds k images per identity (UniMoCo's positives). Every sample also gets an
augmentation seed drawn from the same stream, so augmentation is part of the order and resumes exactly.
The position is the number of batches consumed in the current epoch; DataLoader workers may prefetch
ahead, but the position counts what the trainer took.
"""

from __future__ import annotations

import atexit
import weakref
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from toolkit.distributed.signals import ignore_stop_signals_in_worker

# Streams whose epoch iterator may hold DataLoader worker processes. The workers ignore SIGTERM (a scheduler
# signals every process of the job; see ignore_stop_signals_in_worker), but multiprocessing's exit handler
# stops daemonic children with SIGTERM and then joins them: a stream still open when the process ends (an
# exception on the way out, a script that never calls close()) would keep the process waiting forever. So every
# open stream is closed at exit first, which ends its workers the regular way (DataLoader's shutdown). This
# handler is registered after multiprocessing's (torch imported it above), and atexit runs handlers last-in
# first-out, so it runs before it.
_OPEN_STREAMS: "weakref.WeakSet[EpochStream]" = weakref.WeakSet()


def close_open_streams() -> None:
    for stream in list(_OPEN_STREAMS):
        stream.close()


atexit.register(close_open_streams)


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def grouped_permutation(labels_N: torch.Tensor, group_size: int, gen: torch.Generator) -> torch.Tensor:
    """A permutation of sample indices in which runs of `group_size` share a label (leftovers dropped)."""
    shuffled = torch.randperm(labels_N.numel(), generator=gen)
    order_by_label = shuffled[torch.argsort(labels_N[shuffled], stable=True)]
    sorted_labels = labels_N[order_by_label]
    # Position of each sample within its label's run; a group is group_size consecutive positions.
    starts = torch.searchsorted(sorted_labels, sorted_labels, side="left")
    rank_in_label = torch.arange(labels_N.numel()) - starts
    group_key = sorted_labels * labels_N.numel() + rank_in_label // group_size
    unique_groups, group_of_sample, counts = torch.unique(group_key, return_inverse=True, return_counts=True)
    full = counts[group_of_sample] == group_size
    kept, kept_group = order_by_label[full], group_of_sample[full]
    group_order = torch.randperm(unique_groups.numel(), generator=gen)
    rank_of_group = torch.empty_like(group_order)
    rank_of_group[group_order] = torch.arange(group_order.numel())
    return kept[torch.argsort(rank_of_group[kept_group] * group_size + torch.arange(kept.numel()) % group_size,
                              stable=True)]


class EpochBatchSampler(Sampler[list[tuple[int, int]]]):
    """Yields this rank's batches of (index, augmentation seed) keys for one epoch, from `start_batch`."""

    def __init__(self, num_samples: int, batch_size: int, *, seed: int, epoch: int, start_batch: int = 0,
                 rank: int = 0, world_size: int = 1, labels_N: torch.Tensor | None = None,
                 samples_per_label: int = 1, grad_accum_steps: int = 1):
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.grad_accum_steps = grad_accum_steps
        self.seed, self.epoch, self.start_batch = seed, epoch, start_batch
        self.rank, self.world_size = rank, world_size
        self.labels_N, self.samples_per_label = labels_N, samples_per_label

    @staticmethod
    def batches_per_epoch(num_samples: int, batch_size: int, world_size: int, grad_accum_steps: int = 1) -> int:
        """Whole optimizer steps of global batches: the tail that fills no step is dropped."""
        return num_samples // (batch_size * world_size * grad_accum_steps) * grad_accum_steps

    def __len__(self) -> int:
        return self.batches_per_epoch(self.num_samples, self.batch_size, self.world_size,
                                      self.grad_accum_steps) - self.start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        gen = _epoch_generator(self.seed, self.epoch)
        if self.samples_per_label > 1:
            order_N = grouped_permutation(self.labels_N, self.samples_per_label, gen)
        else:
            order_N = torch.randperm(self.num_samples, generator=gen)
        aug_seeds_N = torch.randint(0, 2**62, (order_N.numel(),), generator=gen)
        global_batch = self.batch_size * self.world_size
        total = self.batches_per_epoch(order_N.numel(), self.batch_size, self.world_size, self.grad_accum_steps)
        for batch in range(self.start_batch, total):
            start = batch * global_batch + self.rank * self.batch_size
            keys = order_N[start: start + self.batch_size].tolist()
            seeds = aug_seeds_N[start: start + self.batch_size].tolist()
            yield list(zip(keys, seeds))


class EpochStream:
    """Endless items across epochs at a resumable (epoch, batch_in_epoch) position.

    Subclasses set `batches_per_epoch` and implement `_start_epoch()`, an iterator over the current epoch's
    batches from `batch_in_epoch` on; they advance `batch_in_epoch` for every batch the trainer takes.
    """

    epoch: int = 0
    batch_in_epoch: int = 0
    batches_per_epoch: int
    resumes_sample_exactly: bool = False  # set by load_state_dict: the same samples as the saved run from here on
    _iterator: Iterator | None = None

    def _start_epoch(self) -> Iterator:
        raise NotImplementedError

    def _next_item(self):
        """The next item of the epoch's iterator, moving to the next epoch (and a new iterator) when done."""
        if self.batch_in_epoch >= self.batches_per_epoch:
            self.epoch += 1
            self.batch_in_epoch = 0
            self._iterator = None
        if self._iterator is None:
            self._iterator = self._start_epoch()
            _OPEN_STREAMS.add(self)
        return next(self._iterator)

    @property
    def fractional_epoch(self) -> float:
        return self.epoch + self.batch_in_epoch / self.batches_per_epoch

    def close(self) -> None:
        """Drop the epoch's iterator, which stops its loader worker processes; the position is kept."""
        self._iterator = None


class ResumableBatchStream(EpochStream):
    """Endless stream of (images, labels) batches across epochs, with `state_dict()` for checkpoints."""

    def __init__(self, dataset: Dataset, batch_size: int, *, seed: int, num_workers: int = 0, rank: int = 0,
                 world_size: int = 1, samples_per_label: int = 1, pin_memory: bool = False, grad_accum_steps: int = 1):
        self.dataset = dataset
        self.batch_size = batch_size
        self.grad_accum_steps = grad_accum_steps
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.samples_per_label = samples_per_label
        if samples_per_label > 1 and batch_size % samples_per_label:
            raise ValueError(f"a batch of {batch_size} cannot hold whole groups of {samples_per_label} "
                             "samples per identity")
        self.labels_N = dataset.labels() if samples_per_label > 1 else None
        usable = len(dataset)
        if self.labels_N is not None:
            usable = int((torch.bincount(self.labels_N) // samples_per_label).sum()) * samples_per_label
        self.batches_per_epoch = EpochBatchSampler.batches_per_epoch(usable, batch_size, world_size, grad_accum_steps)
        if self.batches_per_epoch < 1:
            raise ValueError(f"data set of {len(dataset)} samples is smaller than one global batch of "
                             f"{batch_size} x {world_size} ranks")
        self.epoch = 0
        self.batch_in_epoch = 0
        self._iterator: Iterator | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "seed": self.seed,
                "world_size": self.world_size, "batch_size": self.batch_size,
                "grad_accum_steps": self.grad_accum_steps}

    def load_state_dict(self, state: dict, allow_world_size_change: bool = False) -> None:
        """Continue from a saved position.

        With another world size (allowed on request) and the same global batch per optimizer step (batch_size x
        world_size x accumulation steps), the resume is sample for sample: the epoch's order and every sample's
        augmentation seed do not depend on the world size, and a step's global batch is the same samples cut
        into other rank slices and micro-batches. With another global batch the position is converted through
        the number of samples consumed in the epoch: same epoch, not the same samples (`resumes_sample_exactly`
        says which).
        """
        keys = ("seed", "world_size", "batch_size")
        if allow_world_size_change and state["world_size"] != self.world_size:
            keys = ("seed",)  # the per-rank batch changes with the world size
        for key in keys:
            if state[key] != getattr(self, key):
                raise ValueError(f"data position was saved with {key}={state[key]}, this run has "
                                 f"{key}={getattr(self, key)}; exact resume needs the same value")
        self.epoch, self.batch_in_epoch = int(state["epoch"]), int(state["batch_in_epoch"])
        saved_micro = state["batch_size"] * state["world_size"]
        saved_step = saved_micro * int(state.get("grad_accum_steps", 1))
        micro = self.batch_size * self.world_size
        consumed = self.batch_in_epoch * saved_micro
        self.resumes_sample_exactly = saved_step == micro * self.grad_accum_steps and consumed % micro == 0
        self.batch_in_epoch = min(consumed // micro, self.batches_per_epoch)
        self._iterator = None

    def _start_epoch(self) -> Iterator:
        sampler = EpochBatchSampler(len(self.dataset), self.batch_size, seed=self.seed, epoch=self.epoch,
                                    start_batch=self.batch_in_epoch, rank=self.rank, world_size=self.world_size,
                                    labels_N=self.labels_N, samples_per_label=self.samples_per_label,
                                    grad_accum_steps=self.grad_accum_steps)
        # An explicit generator keeps DataLoader from drawing its worker seed from the global RNG, which
        # would shift dropout and other random ops after a resume (the iterator starts at a new point).
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.num_workers,
                            worker_init_fn=ignore_stop_signals_in_worker,
                            generator=torch.Generator().manual_seed(self.seed + self.epoch),
                            pin_memory=self.pin_memory, persistent_workers=False,
                            prefetch_factor=4 if self.num_workers > 0 else None)
        return iter(loader)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._next_item()
        self.batch_in_epoch += 1
        return batch

    def skip_stats(self) -> dict[str, int]:
        """Skipped inputs by reason (the same interface as the shard streams); in-memory data skips none."""
        return {}
