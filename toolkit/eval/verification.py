# Pair verification (LFW / CFP-FP / AgeDB style): flip-sum embeddings, 10 folds, best threshold; kind verification.
"""The standard verification protocol.

embedding = normalise(f(img) + f(flip(img))); distance = squared L2 between normalised embeddings (in
[0, 4]); the pairs are split into `num_folds` consecutive folds (no shuffle); on each fold the threshold
in [0, 4) step 0.01 that maximises accuracy on the other folds is applied to the held-out fold. The
result is the mean and std of the held-out accuracies.

`PairVerification` (end of the module) is the registered benchmark kind `verification`
(toolkit.eval.benchmark): a .bin set, or the synthetic held-out pairs of training.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from toolkit.errors import FaceCLError
from toolkit.eval.benchmark import Benchmark, TableCell, benchmark_label, register_benchmark

THRESHOLDS = torch.arange(0.0, 4.0, 0.01, dtype=torch.float64)  # T


@dataclass(frozen=True)
class VerificationResult:
    accuracy_mean: float
    accuracy_std: float
    best_thresholds: tuple[float, ...]
    num_pairs: int

    def as_dict(self) -> dict:
        return {"accuracy_mean": self.accuracy_mean, "accuracy_std": self.accuracy_std,
                "best_thresholds": list(self.best_thresholds), "num_pairs": self.num_pairs}


def _accuracy_per_threshold(dist_P: torch.Tensor, is_same_P: torch.Tensor) -> torch.Tensor:
    """Accuracy of 'same if distance < threshold' for every threshold: T."""
    predicted_same_TP = dist_P[None, :] < THRESHOLDS[:, None]
    return (predicted_same_TP == is_same_P[None, :]).double().mean(dim=1)


def verification_accuracy(dist_P: torch.Tensor, is_same_P: torch.Tensor, num_folds: int = 10) -> VerificationResult:
    """K-fold accuracy of thresholded distances; folds are consecutive blocks of pairs, in order."""
    num_pairs = dist_P.numel()
    if num_pairs % num_folds:
        raise ValueError(f"{num_pairs} pairs do not split into {num_folds} equal folds")
    dist_P = dist_P.double().cpu()
    is_same_P = is_same_P.bool().cpu()
    fold_of_P = torch.arange(num_pairs) // (num_pairs // num_folds)
    accuracies, thresholds = [], []
    for fold in range(num_folds):
        test = fold_of_P == fold
        train_accuracy_T = _accuracy_per_threshold(dist_P[~test], is_same_P[~test])
        best = int(torch.argmax(train_accuracy_T))  # first maximum, like numpy's argmax
        threshold = float(THRESHOLDS[best])
        accuracies.append(float(((dist_P[test] < threshold) == is_same_P[test]).double().mean()))
        thresholds.append(threshold)
    acc = torch.tensor(accuracies, dtype=torch.float64)
    # std with ddof=0, as numpy's np.std in the reference evaluation scripts.
    return VerificationResult(float(acc.mean()), float(acc.std(unbiased=False)), tuple(thresholds), num_pairs)


@torch.no_grad()
def flip_sum_embeddings(embed: Callable[[torch.Tensor], torch.Tensor], images_NCHW: torch.Tensor) -> torch.Tensor:
    """normalise(f(x) + f(flip(x))): N x D, fp32."""
    emb_ND = embed(images_NCHW).float() + embed(images_NCHW.flip(-1)).float()
    return F.normalize(emb_ND, dim=1)


@torch.no_grad()
def embed_dataset(embed: Callable[[torch.Tensor], torch.Tensor], images, *, device: torch.device,
                  batch_size: int = 256, rank: int = 0, world_size: int = 1, group=None) -> torch.Tensor:
    """Flip-sum embeddings of every image of `images`, in order: N x D on CPU.

    With several ranks each embeds one contiguous chunk (padded to equal length, because sharded
    engines need every rank in every forward) and the chunks are all-gathered.
    """
    num_images = len(images)
    chunk = -(-num_images // world_size)
    my_indices = [min(i, num_images - 1) for i in range(rank * chunk, (rank + 1) * chunk)]
    subset = torch.utils.data.Subset(images, my_indices)
    # Own generator: evaluation must not consume the training RNG stream.
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False,
                                         generator=torch.Generator().manual_seed(0))
    chunks = [flip_sum_embeddings(embed, batch.to(device, non_blocking=True)) for batch in loader]
    emb_MD = torch.cat(chunks)  # M = chunk
    if world_size > 1:
        gathered = [torch.empty_like(emb_MD) for _ in range(world_size)]
        torch.distributed.all_gather(gathered, emb_MD, group=group)
        emb_MD = torch.cat(gathered)
    return emb_MD[:num_images].cpu()


def evaluate_pairs(embed: Callable[[torch.Tensor], torch.Tensor], pair_images, is_same_P: torch.Tensor, *,
                   device: torch.device, batch_size: int = 256, num_folds: int = 10, rank: int = 0,
                   world_size: int = 1, group=None) -> VerificationResult:
    """Embed the images of `pair_images` (image 2k, 2k+1 = pair k) and run the protocol.

    `embed` maps a batch of images to embeddings; the caller puts the model in eval mode.
    """
    emb_ND = embed_dataset(embed, pair_images, device=device, batch_size=batch_size, rank=rank,
                           world_size=world_size, group=group)
    dist_P = (emb_ND[0::2] - emb_ND[1::2]).pow(2).sum(dim=1)
    return verification_accuracy(dist_P, is_same_P, num_folds)


# ----- the benchmark kind: an insightface .bin set (launch/evaluate.py, eval.sets) or pairs in memory -----

class _PairImages(torch.utils.data.Dataset):
    """Pair images as (image, status) items; an image that cannot be decoded is skipped and counted."""

    def __init__(self, pairs, image_size: int):
        self.pairs, self.image_size = pairs, image_size

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        from toolkit.eval.extract import SKIP_MISSING

        try:
            return self.pairs[i], 0
        except FaceCLError:
            return torch.zeros(3, self.image_size, self.image_size), SKIP_MISSING


@register_benchmark("verification", order=10)
class PairVerification(Benchmark):
    """10-fold pair verification (the protocol above) on an insightface `.bin` set (toolkit.data.verification_bin)
    or on pairs already in memory (`from_pairs`: the synthetic held-out pairs of training). Like the pairs it
    holds, it is the sequence of pair images (image 2k, 2k+1 = pair k) with `is_same_P`."""

    description = "a .bin verification set"
    reports_verification_accuracy = True

    def __init__(self, name, path, settings=None):
        super().__init__(name, path, settings)
        self._pairs = None

    @classmethod
    def from_pairs(cls, name: str, pairs, settings=None) -> "PairVerification":
        """A benchmark over `pairs` (len = images, [i] = image i, `is_same_P`), with no file behind it."""
        benchmark = cls(name, None, settings)
        benchmark._pairs = pairs
        return benchmark

    @classmethod
    def detect(cls, path: Path) -> bool:
        return path.is_file() and path.suffix == ".bin"

    def pairs(self, image_size: int | None = None):
        """The pair set; a .bin set is read once and decodes to `image_size` (default: the settings')."""
        if self._pairs is None:
            from toolkit.data.verification_bin import VerificationBin

            self._pairs = VerificationBin(self.path, image_size=image_size or self.settings.image_size)
        if self.path is not None and image_size is not None and self._pairs.image_size != image_size:
            resized = copy.copy(self._pairs)   # the same JPEG bytes, decoded to another size
            resized.image_size = image_size
            return resized
        return self._pairs

    def load(self) -> "PairVerification":
        pairs, folds = self.pairs(), self.settings.num_folds
        if pairs.num_pairs % folds:
            raise FaceCLError(f"{self.path} has {pairs.num_pairs} pairs, not divisible into {folds} folds")
        return self

    @property
    def is_same_P(self) -> torch.Tensor:
        return self.pairs().is_same_P

    def __len__(self) -> int:
        return len(self.pairs())

    def __getitem__(self, image_index: int) -> torch.Tensor:
        return self.pairs()[image_index]

    @property
    def num_images(self) -> int:
        return len(self.pairs())

    def images(self, image_size: int):
        return _PairImages(self.pairs(image_size), image_size)

    def score(self, emb_ND, status_N, *, output_dir=None, rank=0, world_size=1, group=None,
              model_name: str = "model") -> dict:
        result = self.result_head(status_N)
        emb = F.normalize(torch.as_tensor(emb_ND), dim=1)
        dist_P = (emb[0::2] - emb[1::2]).pow(2).sum(dim=1)
        result.update(verification_accuracy(dist_P, self.is_same_P, self.settings.num_folds).as_dict())
        return result

    @classmethod
    def summary_lines(cls, name: str, result: dict) -> list[str]:
        return [f"{name}: accuracy {cls.percent(result['accuracy_mean'])}% +- {cls.percent(result['accuracy_std'])}% "
                f"on {result['num_pairs']} pairs{cls.skipped_note(result)}"]

    @classmethod
    def table_cells(cls, name: str, result: dict) -> list[TableCell]:
        """The mean 10-fold accuracy, in a column named after the set (lfw, cfp_fp, agedb_30 -> LFW, CFP-FP,
        AgeDB-30; any other name as given)."""
        return [TableCell.of_fraction(benchmark_label(name), result["accuracy_mean"])]

    def evaluate(self, embed, *, device="cpu", rank=0, world_size=1, group=None) -> dict:
        """{"accuracy_mean", "accuracy_std", "best_thresholds", "num_pairs"}: `evaluate_pairs` on the pairs."""
        return evaluate_pairs(embed, self.pairs(), self.is_same_P, device=torch.device(device),
                              batch_size=self.settings.batch_size, num_folds=self.settings.num_folds, rank=rank,
                              world_size=world_size, group=group).as_dict()

    @classmethod
    def scalars(cls, result: dict) -> dict[str, float]:
        return {"accuracy": result["accuracy_mean"], "std": result["accuracy_std"]}
