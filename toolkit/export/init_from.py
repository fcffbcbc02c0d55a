# Initial weights from elsewhere: a consolidated FaceCL file, or an arcface_torch backbone + its per-rank softmax files.
"""`load_init_state(path, backbone=..., softmax=...)` -> (backbone state dict with FaceCL registry keys,
identity centers C x D in class order or None), for `train.init_from` (fine-tuning, continuing elsewhere).

Accepted:
- a consolidated file of ours (.safetensors / .pt from `convert.py consolidate`), with its centers when it
  was written with --with-head; a FaceCL run or checkpoint of any engine works the same way;
- an arcface_torch backbone file (`backbone.pth` / `model.pt`: a state dict; or a `checkpoint_gpu_0.pt`
  of train_v2 with `state_dict_backbone`), for every backbone of theirs (toolkit/export/arcface_names.py):
  r18-r200 / r2060 onto iresnet18-iresnet2060, mbf onto mobilefacenet_mbf, mbf_large onto
  mobilefacenet_large, vit_t/s/b/l/h (any of their drop-path / mask variants) onto vit_t/s/b/l/h; every
  tensor mapped by name, every shape checked, one line naming the tensor otherwise.
- with `softmax`: arcface_torch's per-rank Partial FC weights, any rank count, merged in rank order, which
  is class order (rank r holds classes [C//W*r + min(r, C%W), ... + C//W + (r < C%W))). File names:
  `rank_{r}_softmax_weight.pt` / `rank:{r}_softmax_weight.pt` (partial_fc.py, v1), `softmax_fc_gpu_{r}.pt`,
  and `checkpoint_gpu_{r}.pt` (train_v2 `save_all_states`: `state_dict_softmax_fc.weight`). Momentum files
  (`*_softmax_weight_mom.pt`) are not weights and are skipped. A ViT run of train_v2 (AdamW, fp16 autocast,
  Partial FC sample rate 0.3) writes the same `checkpoint_gpu_{r}.pt` (its fp32 `weight` next to AdamW's
  state): nothing differs from an iresnet run.

Everything is read with safe_torch_load (tensors only). Resharding the centers to a job's ranks is the
trainer's (the head's class ranges), e.g. `centers[start:end]` for each rank's range.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

from toolkit.errors import CheckpointError
from toolkit.export.arcface_names import map_arcface_backbone
from toolkit.export.consolidate import HEAD_KEY, check_shards
from toolkit.serialization import safe_torch_load

SOFTMAX_FILE = re.compile(r"^(?:rank[_:](?P<a>\d+)_softmax_weight|softmax_fc_gpu_(?P<b>\d+)|checkpoint_gpu_(?P<c>\d+))\.pt$")


def softmax_files(softmax: str | Path | Sequence[str | Path]) -> list[tuple[int, Path]]:
    """(rank, file) for a folder of per-rank files or an explicit list; ranks must be 0..W-1, each once."""
    if isinstance(softmax, (str, Path)) and Path(softmax).is_dir():
        candidates = sorted(Path(softmax).iterdir())
    elif isinstance(softmax, (str, Path)):
        candidates = [Path(softmax)]
    else:
        candidates = [Path(p) for p in softmax]
    found: dict[int, Path] = {}
    for path in candidates:
        match = SOFTMAX_FILE.match(path.name)
        if not match:
            if not (isinstance(softmax, (str, Path)) and Path(softmax).is_dir()):
                raise CheckpointError(f"{path} is not named like an arcface_torch per-rank softmax file "
                                      f"(rank_R_softmax_weight.pt, softmax_fc_gpu_R.pt, checkpoint_gpu_R.pt)")
            continue
        rank = int(match.group("a") or match.group("b") or match.group("c"))
        if rank in found:
            raise CheckpointError(f"two softmax files for rank {rank}: {found[rank].name} and {path.name}")
        found[rank] = path
    if not found:
        raise CheckpointError(f"{softmax}: no arcface_torch softmax weight files found")
    world = max(found) + 1
    missing = [r for r in range(world) if r not in found]
    if missing:
        raise CheckpointError(f"softmax files of rank(s) {missing[:8]} missing (found {len(found)} of {world})")
    return [(r, found[r]) for r in range(world)]


def _softmax_weight(path: Path) -> torch.Tensor:
    payload = safe_torch_load(path, mmap=True)
    if isinstance(payload, dict):
        payload = payload.get("state_dict_softmax_fc", payload)
        payload = payload.get("weight", payload) if isinstance(payload, dict) else payload
    if not torch.is_tensor(payload) or payload.dim() != 2:
        raise CheckpointError(f"{path} holds no 2-D softmax weight (found {type(payload).__name__})")
    return payload


def merge_arcface_softmax(softmax: str | Path | Sequence[str | Path]) -> torch.Tensor:
    """All ranks' Partial FC weights as one C x D fp32 matrix in class order."""
    files = softmax_files(softmax)
    weights = [_softmax_weight(path) for _, path in files]
    world = len(weights)
    total = sum(w.shape[0] for w in weights)
    dims = {w.shape[1] for w in weights}
    if len(dims) != 1:
        raise CheckpointError(f"softmax files have different widths {sorted(dims)}")
    for (rank, path), weight in zip(files, weights):
        expected = total // world + int(rank < total % world)
        if weight.shape[0] != expected:
            raise CheckpointError(f"{path} holds {weight.shape[0]} classes; rank {rank} of {world} over {total} classes "
                                  f"holds {expected} in arcface_torch's split: files of different runs?")
    return torch.cat([w.float() for w in weights])


def load_init_state(path: str | Path, *, backbone: str | None = None, embedding_size: int | None = None,
                    image_size: int | None = None, softmax: str | Path | Iterable[str | Path] | None = None,
                    patch_size: int | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(backbone state dict with registry keys, centers C x D or None) to initialise a run from.

    `backbone` / `embedding_size` / `image_size` are the run's; they are checked against a FaceCL file's
    metadata and needed to map an arcface_torch file (which does not record its architecture), as is a ViT
    run's `patch_size` when it sets one. The file is
    opened once: its kind is told from what that one read finds (read_weights).
    """
    from toolkit.export.load import CHECKPOINT, CONSOLIDATED, backbone_state_and_metadata, read_weights

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"init-from file {path} does not exist")
    weights = read_weights(path)
    if weights.kind in (CONSOLIDATED, CHECKPOINT):
        state, metadata = backbone_state_and_metadata(weights)
        for key, wanted in (("backbone", backbone), ("embedding_size", embedding_size), ("image_size", image_size)):
            if wanted is not None and str(metadata.get(key)) != str(wanted):
                raise CheckpointError(f"{path} holds a {key}={metadata.get(key)} model; this run has {key}={wanted}")
        if softmax is not None:
            centers = merge_arcface_softmax(softmax)
        elif weights.kind == CONSOLIDATED:
            centers = weights.tensors.get(HEAD_KEY)
        else:
            shards, _, _ = check_shards(weights.source.head_shards(), str(weights.source.entry))
            centers = torch.cat([s["centers"].float() for s in shards])
        return state, centers
    if backbone is None:
        raise CheckpointError(f"{path} is not a FaceCL file; to read it as an arcface_torch backbone, name the "
                              f"backbone (model.backbone)")
    payload = weights.payload
    if isinstance(payload, dict) and "state_dict_backbone" in payload:
        payload = payload["state_dict_backbone"]
    if not isinstance(payload, dict) or not all(torch.is_tensor(v) for v in payload.values()):
        raise CheckpointError(f"{path} is not a backbone state dict (a dict of tensors)")
    state = map_arcface_backbone(payload, backbone, embedding_size=embedding_size or 512,
                                 image_size=image_size or 112, patch_size=patch_size, where=str(path))
    centers = merge_arcface_softmax(softmax) if softmax is not None else None
    if centers is not None and embedding_size is not None and centers.shape[1] != embedding_size:
        raise CheckpointError(f"softmax weights are {centers.shape[1]} wide; this run's embedding size is {embedding_size}")
    return state, centers
