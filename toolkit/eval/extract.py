# Batched embedding extraction: DataLoader workers, flip TTA, progress bar, skipped images, rank slices.
"""`extract_embeddings(embedder, dataset)` returns the raw flip-summed embeddings f(x) + f(flip(x)) of every
item (N x D float32, not normalised: each protocol normalises where it says) and a status per item.
Every rank runs the same number of equal-sized batches (see _Slice), so it can be called from a training
job whose backbone is sharded.

Datasets yield (image 3 x S x S float32 in [-1, 1], status): status 0 = usable, otherwise the reason the
item was skipped (its embedding is set to zeros and it is counted). Under torchrun (world_size > 1) rank r
embeds the contiguous slice r of the items and the slices are all-gathered, so every rank holds the same
result and rank 0 can compute and write the metrics.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from toolkit.data.labelled_images import SKIP_MISSING, to_model_input
from toolkit.errors import FaceCLError

SKIP_LANDMARKS = 2   # landmarks outside the image, not finite or degenerate
SKIP_REASONS = {SKIP_MISSING: "missing or unreadable image", SKIP_LANDMARKS: "unusable landmarks"}
__all__ = ["SKIP_LANDMARKS", "SKIP_MISSING", "SKIP_REASONS", "check_skipped", "extract_embeddings", "skip_counts",
           "to_model_input"]


def skip_counts(status_N: np.ndarray) -> dict[str, int]:
    """{reason: count} of the skipped items."""
    status_N = np.asarray(status_N)
    return {SKIP_REASONS.get(int(code), f"status {int(code)}"): int(np.count_nonzero(status_N == code))
            for code in np.unique(status_N) if code != 0}


def check_skipped(status_N: np.ndarray, max_skipped_fraction: float, what: str) -> None:
    """Fail when more than `max_skipped_fraction` of the items were skipped (like the training loader)."""
    status_N = np.asarray(status_N)
    num_skipped = int(np.count_nonzero(status_N))
    if status_N.size and num_skipped / status_N.size > max_skipped_fraction:
        raise FaceCLError(f"{what}: {num_skipped} of {status_N.size} images skipped ({skip_counts(status_N)}), "
                          f"more than --max-skipped-fraction={max_skipped_fraction}")


class _Slice(torch.utils.data.Dataset):
    """Items start .. start + length - 1 of `dataset`, indices past its end repeating the last item: every
    rank gets the same number of batches of the same sizes, which sharded engines (FSDP, ZeRO-3) need,
    because every rank must take part in every forward."""

    def __init__(self, dataset, start: int, length: int):
        self.dataset, self.start, self.length = dataset, start, length
        self.last = len(dataset) - 1

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        image, status = self.dataset[min(self.start + i, self.last)]
        return image, int(status)


@torch.no_grad()
def extract_embeddings(embed, dataset, *, batch_size: int = 128, num_workers: int = 2, flip: bool = True,
                       rank: int = 0, world_size: int = 1, group=None, progress: bool = True,
                       desc: str = "embedding") -> tuple[np.ndarray, np.ndarray]:
    """(raw embeddings N x D float32, status N int8); `embed` maps a CPU batch to N x D embeddings."""
    n = len(dataset)
    if n == 0:
        raise FaceCLError(f"{desc}: no images to embed")
    chunk = -(-n // world_size)  # every rank embeds `chunk` items (the last rank's tail repeats item n - 1)
    loader = torch.utils.data.DataLoader(_Slice(dataset, rank * chunk, chunk), batch_size=batch_size,
                                         shuffle=False, num_workers=num_workers, persistent_workers=False)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = tqdm(total=chunk, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)
    emb_parts, status_parts = [], []
    for images_BCHW, status_B in loader:
        emb_BD = embed(images_BCHW).float()
        if flip:
            emb_BD = emb_BD + embed(images_BCHW.flip(-1)).float()
        emb_BD = emb_BD.cpu()
        emb_BD[status_B != 0] = 0.0
        emb_parts.append(emb_BD)
        status_parts.append(status_B.to(torch.int8))
        if bar is not None:
            bar.update(len(images_BCHW))
    if bar is not None:
        bar.close()
    emb_MD = torch.cat(emb_parts)  # M = chunk
    status_M = torch.cat(status_parts)
    if world_size > 1:
        parts: list = [None] * world_size
        torch.distributed.all_gather_object(parts, (emb_MD.numpy(), status_M.numpy()), group=group)
        emb = np.concatenate([p[0] for p in parts])[:n]
        status = np.concatenate([p[1] for p in parts])[:n]
        return emb.astype(np.float32), status.astype(np.int8)
    return emb_MD.numpy().astype(np.float32), status_M.numpy().astype(np.int8)
