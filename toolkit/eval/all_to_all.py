# All-to-all 1:1 verification (the MFR protocol): exact TAR at FAR over all pairs, no N x N matrix; kind all_to_all.
"""Every unordered pair (i < j) of a labelled set is scored: same label = genuine, else impostor. MFR-ALL has
1.6M images: 4.7M genuine and 2.6e12 impostor pairs, so the impostor scores are never stored. The threshold at
FAR f is the k-th largest impostor score, k = ceil(f * num_impostors) (the convention of toolkit.eval.roc:
accept when score >= threshold; ties count once each), found exactly in passes over the score tiles:

1. pass 1: every tile of scores S = E_I @ E_J^T (rows I, columns J >= I, strict upper triangle on the
   diagonal) is computed; genuine scores are kept (there are few), impostor scores go into a histogram of
   `num_bins` bins over [-r, r], r >= every |score| (r = max squared norm: Cauchy-Schwarz);
2. for each FAR the bin holding the k-th largest is found from the top; the bracket [lo, hi] is that bin
   widened by one bin each side (so float rounding of the binning cannot put the k-th value outside);
3. pass 2 recomputes the tiles and, per bracket, counts impostors > hi and keeps those in [lo, hi]; the
   threshold is the (k - count_above)-th largest kept value. If a bracket would hold more than
   `max_kept` values, a histogram pass inside the bracket narrows it first (memory never depends on N^2).

The result is checked (count_above < k <= count_above + kept) and the bracket widened if it ever fails.

One-pass shortcut: when the largest k is small (4 x k_max scores fit in `max_kept`, e.g. FAR <= 1e-4 at
N = 100,000), a floor with about 4 x k_max impostor scores above it is estimated from ~1M impostor pairs
(random rows x random columns), and pass 1 keeps every impostor score >= floor instead of the histogram:
the thresholds are read from those directly. If fewer than k were kept (the estimate was off), that FAR
falls back to the histogram passes, so the result stays exact either way. At MFR-ALL scale with FAR 1e-4
in the list (k = 2.6e8) the two-pass path is taken.

Memory: the embeddings, one tile (row_block x col_block fp32 and a few temporaries), the genuine scores and
the kept values. Tiles are cut from label-sorted embeddings, so only tiles near the diagonal contain
genuine pairs; all other tiles need no mask at all.

bf16/fp16: `compute_dtype` rounds the (normalised) embeddings to that type; the products are accumulated
in fp32 (CUDA: torch.mm with out_dtype=float32; CPU: the rounded values are upcast, which is the same
arithmetic). Under torchrun, rank r takes the row blocks I with I % world_size == r; histograms and counts
are summed, genuine and kept scores gathered, and every rank returns the same result.

`AllToAll` (end of the module) is the registered benchmark kind `all_to_all` (toolkit.eval.benchmark): one
kind with three inputs (an identity folder, a shard manifest, a .npz of features and labels).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from toolkit.eval.benchmark import Benchmark, TableCell, benchmark_label, register_benchmark, tar_at_far_cells
from toolkit.eval.roc import far_key, num_accepted_impostors, operating_point, unmeasured_point

MFR_FARS = (1e-6, 1e-5, 1e-4)


@dataclass
class _Bracket:
    far: float
    k: int            # rank of the threshold among impostor scores, from the top (1-based)
    lo: float
    hi: float
    mode: str         # "hist" (narrow it with a histogram pass) or "collect" (keep the values)
    from_floor: bool = False  # a "collect" bracket [sampled floor, radius] (the one-pass path)
    threshold: float | None = None
    num_accepted: int | None = None  # impostors >= threshold


class _Tiles:
    """Iterates the strict upper triangle of E E^T in tiles, yielding (genuine values, impostor scores), the
    latter a flat view of the tile in which every non-impostor entry is -inf.

    The tile and its masks live in buffers allocated once: a fresh 64 MB tile plus masks of varying sizes
    per step fragments the C heap, and the resident memory then creeps up over hundreds of tiles (measured:
    +1.3 GB over a 100,000-image run). The yielded view is only valid until the next tile.
    """

    def __init__(self, emb_ND: torch.Tensor, labels_N: torch.Tensor, *, row_block: int, col_block: int,
                 compute_dtype: torch.dtype | None, rank: int, world_size: int):
        self.emb_ND, self.labels_N = emb_ND, labels_N
        self.row_block, self.col_block = row_block, col_block
        self.compute_dtype = compute_dtype
        self.rank, self.world_size = rank, world_size
        n = emb_ND.shape[0]
        self.row_starts = [s for i, s in enumerate(range(0, n, row_block)) if i % world_size == rank]
        self.num_tiles = sum(math.ceil((n - s) / col_block) for s in self.row_starts)
        size = min(row_block, n) * min(col_block, n)
        device = emb_ND.device
        self._scores = torch.empty(size, dtype=torch.float32, device=device)
        self._masks = [torch.empty(size, dtype=torch.bool, device=device) for _ in range(3)]

    def _matmul(self, a_RD: torch.Tensor, b_CD: torch.Tensor, out_RC: torch.Tensor) -> None:
        if a_RD.dtype == torch.float32:
            torch.mm(a_RD, b_CD.T, out=out_RC)
        elif a_RD.is_cuda:
            out_RC.copy_(torch.mm(a_RD, b_CD.T, out_dtype=torch.float32))
        else:
            torch.mm(a_RD.float(), b_CD.float().T, out=out_RC)  # exact upcast of the rounded inputs; fp32 sums

    def select_at_least(self, flat: torch.Tensor, lowest: float) -> torch.Tensor:
        """The values of `flat` (a yielded tile) that are >= lowest, through the preallocated mask."""
        mask = self._masks[0][: flat.numel()]
        torch.ge(flat, lowest, out=mask)
        return flat[mask]

    def __iter__(self):
        n = self.emb_ND.shape[0]
        emb, labels = self.emb_ND, self.labels_N
        for r0 in self.row_starts:
            r1 = min(r0 + self.row_block, n)
            a_RD, la_R = emb[r0:r1], labels[r0:r1]
            for c0 in range(r0, n, self.col_block):
                c1 = min(c0 + self.col_block, n)
                rc = (r1 - r0) * (c1 - c0)
                s_RC = self._scores[:rc].view(r1 - r0, c1 - c0)
                self._matmul(a_RD, emb[c0:c1], s_RC)
                lb_C = labels[c0:c1]
                diagonal = c0 < r1  # the tile crosses i == j
                shares_labels = bool(lb_C[0] <= la_R[-1])  # sorted labels: overlap iff this holds
                if not diagonal and not shares_labels:
                    yield None, s_RC.view(-1)
                    continue
                same_RC, upper_RC, genuine_RC = (m[:rc].view(r1 - r0, c1 - c0) for m in self._masks)
                torch.eq(la_R[:, None], lb_C[None, :], out=same_RC)
                if diagonal:
                    rows = torch.arange(r0, r1, device=emb.device)[:, None]
                    cols = torch.arange(c0, c1, device=emb.device)[None, :]
                    torch.gt(cols, rows, out=upper_RC)
                    torch.logical_and(same_RC, upper_RC, out=genuine_RC)
                    genuine = s_RC[genuine_RC]
                    same_RC.logical_or_(upper_RC.logical_not_())  # now: not an impostor pair
                else:
                    genuine = s_RC[same_RC]
                # Everything that is not an impostor pair becomes -inf in place: histc ignores it and the
                # tail selections never keep it.
                s_RC.masked_fill_(same_RC, -math.inf)
                yield genuine, s_RC.view(-1)


def _all_reduce_sum(t: torch.Tensor, world_size: int, group) -> torch.Tensor:
    if world_size > 1:
        torch.distributed.all_reduce(t, group=group)
    return t


def _gather_cat(values: torch.Tensor, world_size: int, group) -> np.ndarray:
    arr = values.cpu().numpy()
    if world_size == 1:
        return arr
    parts: list = [None] * world_size
    torch.distributed.all_gather_object(parts, arr, group=group)
    return np.concatenate(parts)


@torch.no_grad()
def all_to_all_tar_at_far(emb_ND: torch.Tensor, labels_N: torch.Tensor | np.ndarray,
                          fars: Sequence[float] = MFR_FARS, *, normalize: bool = True,
                          device: torch.device | str | None = None, compute_dtype: torch.dtype | None = None,
                          row_block: int = 2048, col_block: int = 8192, num_bins: int = 1 << 16,
                          max_kept: int = 1 << 24, sample_floor: bool = True, rank: int = 0, world_size: int = 1,
                          group=None, progress: bool = False) -> dict:
    """Exact TAR at each FAR over all pairs of (emb_ND, labels_N); see the module docstring.

    Returns {"num_images", "num_identities", "num_genuine", "num_impostor", "num_passes",
    "tar_at_far": {far_key: {"tar", "threshold", "achieved_far"}}}; TAR is None where f * num_impostor < 1,
    and that point carries the `reason`.
    `normalize=False` scores raw dot products (tests use integer features to get exact ties).
    """
    labels_N = torch.as_tensor(np.asarray(labels_N)).long().reshape(-1)
    if emb_ND.ndim != 2 or emb_ND.shape[0] != labels_N.shape[0]:
        raise ValueError(f"expected N x D embeddings and N labels, got {tuple(emb_ND.shape)} and "
                         f"{tuple(labels_N.shape)}")
    n = emb_ND.shape[0]
    if n < 2:
        raise ValueError(f"all-to-all needs at least 2 images, got {n}")
    device = torch.device(device) if device is not None else emb_ND.device
    order = torch.argsort(labels_N, stable=True)
    labels_N = labels_N[order].to(device)
    emb_ND = emb_ND[order].float()  # one copy, label-sorted; normalised in place (N x D can be GBs)
    if normalize:
        emb_ND.div_(emb_ND.norm(dim=1, keepdim=True).clamp_(min=1e-12))
    if compute_dtype is not None and compute_dtype != torch.float32:
        emb_ND = emb_ND.to(compute_dtype)
    emb_ND = emb_ND.to(device).contiguous()

    _, counts = torch.unique_consecutive(labels_N.cpu(), return_counts=True)
    num_genuine = int(sum(int(c) * (int(c) - 1) // 2 for c in counts.tolist()))
    num_impostor = n * (n - 1) // 2 - num_genuine
    max_sq_norm = float(torch.linalg.vector_norm(emb_ND, dim=1, dtype=torch.float32).max()) ** 2
    radius = max_sq_norm * (1 + 1e-4) + 1e-6  # every |score| is <= max |e|^2 (Cauchy-Schwarz)

    tiles = _Tiles(emb_ND, labels_N, row_block=row_block, col_block=col_block, compute_dtype=compute_dtype,
                   rank=rank, world_size=world_size)

    def tile_iter(desc: str):
        if not progress or rank != 0:
            return iter(tiles)
        from tqdm import tqdm
        return iter(tqdm(tiles, total=tiles.num_tiles, desc=desc, unit="tile", leave=False))

    results: dict[str, dict] = {}
    brackets: list[_Bracket] = []
    for far in fars:
        if num_impostor == 0 or far * num_impostor < 1.0 - 1e-9:
            results[far_key(far)] = unmeasured_point(far, num_impostor)
            continue
        brackets.append(_Bracket(far=far, k=num_accepted_impostors(far, num_impostor), lo=-radius, hi=radius,
                                 mode="hist"))
    floor = None
    if sample_floor and brackets:
        floor = _sampled_floor(emb_ND, labels_N, max(b.k for b in brackets), num_impostor, max_kept)
    if floor is not None:  # one pass: keep every impostor score >= floor (a few times k_max of them)
        for b in brackets:
            b.lo, b.mode, b.from_floor = floor, "collect", True

    genuine_parts: list[torch.Tensor] = []
    num_passes = 0
    while num_passes == 0 or any(b.threshold is None for b in brackets):
        pending = [b for b in brackets if b.threshold is None]
        num_passes += 1
        # Brackets asking the same thing share one histogram / one list of kept values.
        requests = sorted({(b.mode, b.lo, b.hi) for b in pending})
        counts_above = torch.zeros(len(requests), dtype=torch.float64, device=device)
        hists = [torch.zeros(num_bins, dtype=torch.float64, device=device) if mode == "hist" else None
                 for mode, _, _ in requests]
        kept: list[list[torch.Tensor]] = [[] for _ in requests]
        lowest = min((lo for _, lo, _ in requests), default=radius)
        for genuine, impostor in tile_iter(f"all-to-all pass {num_passes}"):
            if num_passes == 1 and genuine is not None and genuine.numel():
                genuine_parts.append(genuine.float().cpu())
            if not requests:
                continue
            # The whole tile in a full-range histogram pass (-inf entries, non-impostors, are ignored by
            # histc), else only the upper tail (usually tiny).
            tail = impostor if lowest <= -radius and not any(m == "collect" for m, _, _ in requests) \
                else tiles.select_at_least(impostor, lowest)
            if tail.numel() == 0:
                continue
            for i, (mode, lo, hi) in enumerate(requests):
                if hi < radius:
                    counts_above[i] += (tail > hi).sum()
                if mode == "hist":
                    hists[i] += torch.histc(tail, bins=num_bins, min=lo, max=hi).double()
                elif lo <= lowest and hi >= radius:
                    kept[i].append(tail.float().cpu())
                else:
                    kept[i].append(tail[(tail >= lo) & (tail <= hi)].float().cpu())
        if num_passes == 1:
            genuine_G = _gather_cat(torch.cat(genuine_parts) if genuine_parts else torch.zeros(0), world_size, group)
            genuine_asc_G = np.sort(genuine_G.astype(np.float64))
            del genuine_parts
        counts_above_list = _all_reduce_sum(counts_above, world_size, group).cpu().tolist()
        hist_of = {}
        values_of = {}
        for i, request in enumerate(requests):
            if request[0] == "hist":
                hist_of[request] = _all_reduce_sum(hists[i], world_size, group)
            else:
                gathered = _gather_cat(torch.cat(kept[i]) if kept[i] else torch.zeros(0), world_size, group)
                values_of[request] = np.sort(gathered)[::-1]  # descending
        for b in pending:
            request = (b.mode, b.lo, b.hi)
            above = int(round(counts_above_list[requests.index(request)]))
            if b.mode == "hist":
                new = _bracket_from_histogram(hist_of[request], b.lo, b.hi, b.k, b.far, max_kept, count_above=above)
                b.lo, b.hi, b.mode = new.lo, new.hi, new.mode
                continue
            desc = values_of[request]
            rank_in_bracket = b.k - above  # 1-based, from the top of the kept values
            if above >= b.k or rank_in_bracket > desc.size:
                if b.from_floor:
                    # The sampled floor was too high for this FAR (unlikely): fall back to the histogram.
                    b.lo, b.hi, b.mode, b.from_floor = -radius, radius, "hist", False
                else:
                    # Rounding put the k-th value outside the bracket (not expected): widen and retry.
                    width = b.hi - b.lo
                    b.lo, b.hi = b.lo - width, b.hi + width
                continue
            b.threshold = float(desc[rank_in_bracket - 1])
            b.num_accepted = above + int(np.count_nonzero(desc >= b.threshold))

    for b in brackets:
        results[far_key(b.far)] = operating_point(genuine_asc_G, b.threshold,
                                                  num_impostors_accepted=b.num_accepted,
                                                  num_impostors=num_impostor) if genuine_asc_G.size else \
            {"tar": None, "threshold": b.threshold, "achieved_far": b.num_accepted / num_impostor}
    ordered = {far_key(f): results[far_key(f)] for f in fars}
    return {"num_images": n, "num_identities": int(counts.numel()), "num_genuine": num_genuine,
            "num_impostor": num_impostor, "num_passes": num_passes,
            "compute_dtype": str(compute_dtype or torch.float32).replace("torch.", ""), "tar_at_far": ordered}


def _sampled_floor(emb_ND: torch.Tensor, labels_N: torch.Tensor, k_max: int, num_impostor: int, max_kept: int,
                   num_samples: int = 1 << 20, seed: int = 0) -> float | None:
    """A score with about 4 x k_max impostor scores above it, estimated from ~1M impostor pairs (1024 random
    rows x 1024 random columns); None when keeping that many scores could exceed max_kept or the FAR reaches
    into the bulk (then the histogram path is used). Only a guess: the pass checks that at least k scores were kept and falls back otherwise."""
    fraction = 4.0 * k_max / num_impostor
    if fraction >= 0.05:
        return None
    n = emb_ND.shape[0]
    gen = torch.Generator().manual_seed(seed)  # the same pairs on every rank: the same floor
    # Random rows x random columns: ~num_samples pairs from one small matmul (a gather per pair is far slower).
    side = min(n, math.isqrt(num_samples))
    rows = torch.randperm(n, generator=gen)[:side].to(emb_ND.device)
    cols = torch.randperm(n, generator=gen)[:side].to(emb_ND.device)
    scores_RC = emb_ND[rows].float() @ emb_ND[cols].float().T
    scores = scores_RC[labels_N[rows][:, None] != labels_N[cols][None, :]]  # impostors (so never i == j)
    if scores.numel() < 1000:
        return None
    rank = max(math.ceil(fraction * scores.numel()), 64)
    if rank > scores.numel() // 10 or rank / scores.numel() * num_impostor * 2 > max_kept:
        return None
    return float(torch.topk(scores, rank).values[-1])


def _bracket_from_histogram(hist_B: torch.Tensor, lo: float, hi: float, k: int, far: float, max_kept: int, *,
                            count_above: int) -> _Bracket:
    """The bins around the one holding the k-th largest value (k counted over everything, `count_above`
    of which lie above `hi`); 'collect' when they hold at most max_kept values, else 'hist'."""
    num_bins = hist_B.numel()
    width = (hi - lo) / num_bins
    from_top_B = torch.flip(torch.cumsum(torch.flip(hist_B, [0]), 0), [0]).cpu().numpy() + count_above
    # Largest bin index whose count of values at or above it reaches k (the bin holding the k-th largest).
    reaching = np.nonzero(from_top_B >= k)[0]
    b = int(reaching[-1]) if reaching.size else 0
    first, last = max(0, b - 1), min(num_bins - 1, b + 1)
    new_lo = lo + first * width - (width if first == 0 else 0.0)
    new_hi = lo + (last + 1) * width + (width if last == num_bins - 1 else 0.0)
    inside = float(hist_B[first:last + 1].sum())
    mode = "collect" if inside <= max_kept or width < 1e-7 * max(1.0, abs(lo)) else "hist"
    return _Bracket(far=far, k=k, lo=new_lo, hi=new_hi, mode=mode)


# ----- the benchmark kind ----------------------------------------------------------------------------------

@register_benchmark("all_to_all", order=90)   # last: it takes any folder of sub-folders
class AllToAll(Benchmark):
    """All-to-all 1:1 TAR at FAR (MFR_FARS) over a labelled set given as one of three inputs: a folder of
    identity sub-folders or the manifest.json of FaceCL shards (toolkit.data.labelled_images: embedded with
    the model), or a .npz with arrays `features` (N x D) and `labels` (N), or a feature file holding one
    all-to-all benchmark (toolkit.eval.features.load_labelled_features: it needs no model)."""

    description = "a folder of identity sub-folders, a shard manifest.json or a .npz of features and labels"

    def __init__(self, name, path, settings=None):
        super().__init__(name, path, settings)
        self._faces = None                                    # LabelledFolder or ShardFaces
        self._features: tuple[np.ndarray, np.ndarray] | None = None   # (N x D, labels N) of a .npz

    @classmethod
    def detect(cls, path: Path) -> bool:
        if path.is_file():
            return path.suffix in (".npz", ".json")
        return path.is_dir() and any(p.is_dir() for p in path.iterdir())

    @classmethod
    def default_name(cls, path: Path) -> str:
        return path.parent.name if path.suffix == ".json" else path.stem

    @property
    def carries_embeddings(self) -> bool:
        return self.path.suffix == ".npz"

    def faces(self, image_size: int | None = None):
        """The labelled images (read once; decoded to `image_size`, default the settings')."""
        from toolkit.data.labelled_images import LabelledFolder, ShardFaces

        size = image_size or self.settings.image_size
        if self._faces is None:
            self._faces = (ShardFaces if self.path.suffix == ".json" else LabelledFolder)(self.path, size)
        elif self._faces.image_size != size:
            self._faces = copy.copy(self._faces)
            self._faces.image_size = size
        return self._faces

    def own_embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        features_ND, labels_N = self._labelled_features()
        return features_ND, np.zeros(len(labels_N), dtype=np.int8)

    def _labelled_features(self) -> tuple[np.ndarray, np.ndarray]:
        if self._features is None:
            from toolkit.eval.features import load_labelled_features

            self._features = load_labelled_features(self.path)
        return self._features

    @property
    def labels_N(self) -> np.ndarray:
        return self._labelled_features()[1] if self.carries_embeddings else self.faces().labels_N

    def load(self) -> "AllToAll":
        self.labels_N
        return self

    @property
    def num_images(self) -> int:
        return len(self.labels_N)

    def images(self, image_size: int):
        return self.faces(image_size)

    def saved_arrays(self) -> dict[str, np.ndarray]:
        return {"labels": self.labels_N}

    @property
    def saved_kind(self) -> str:
        return "all_to_all_shards" if self.path.suffix == ".json" else self.kind

    def score(self, emb_ND, status_N, *, output_dir=None, rank=0, world_size=1, group=None,
              model_name: str = "model") -> dict:
        result = self.result_head(status_N)
        usable = np.asarray(status_N) == 0
        device = "cuda" if torch.cuda.is_available() else "cpu"
        result.update(all_to_all_tar_at_far(torch.as_tensor(emb_ND[usable]), self.labels_N[usable], MFR_FARS,
                                            device=device, compute_dtype=self.settings.compute_dtype, rank=rank,
                                            world_size=world_size, group=group, progress=self.settings.progress))
        return result

    @classmethod
    def summary_lines(cls, name: str, result: dict) -> list[str]:
        tars = ", ".join(f"{k}: {cls.percent(v['tar'], 3)}" for k, v in result["tar_at_far"].items())
        return [f"{name} (all-to-all over {result['num_images']} images, {result['num_genuine']} genuine / "
                f"{result['num_impostor']} impostor pairs) TAR% at FAR {tars}{cls.skipped_note(result)}"]

    @classmethod
    def table_cells(cls, name: str, result: dict) -> list[TableCell]:
        """TAR at every FAR of the entry, 'NAME 1e-6' ... (the FARs the set is too small for say why)."""
        return tar_at_far_cells(benchmark_label(name), result["tar_at_far"], result.get("num_impostor"))

    @classmethod
    def scalars(cls, result: dict) -> dict[str, float]:
        """TAR@FAR=<f> for the FARs the set is large enough for (as IJB in training)."""
        return {f"TAR@FAR={far}": point["tar"] for far, point in result["tar_at_far"].items()
                if point["tar"] is not None}
