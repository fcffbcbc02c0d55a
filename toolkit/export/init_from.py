# Initial weights from elsewhere: a consolidated FaceCL file, or an arcface_torch backbone + its per-rank softmax files.
"""`load_init_state(path, backbone=..., softmax=...)` -> (backbone state dict with FaceCL registry keys,
identity centers C x D in class order or None), for `train.init_from` (fine-tuning, continuing elsewhere).

Accepted:
- a consolidated file of ours (.safetensors / .pt from `convert.py consolidate`), with its centers when it
  was written with --with-head; a FaceCL run or checkpoint of any engine works the same way;
- an arcface_torch backbone file (`backbone.pth` / `model.pt`: a state dict; or a `checkpoint_gpu_0.pt`
  of train_v2 with `state_dict_backbone`), for the backbones whose architecture FaceCL has:
  iresnet18/34/50/100/200 (their `iresnet*`, same parameter names), and mobilefacenet_large (their
  `mbf_large`: scale 4, blocks (2, 8, 12, 4); their names `layers.K...`, `conv_sep`, `features.layers.K`
  are mapped onto ours position by position, each pair checked to have the same leaf name and shape).
  Their small `mbf` (scale 2, blocks (1, 4, 6, 2)) has no FaceCL equivalent and is refused by shape.
- with `softmax`: arcface_torch's per-rank Partial FC weights, any rank count, merged in rank order, which
  is class order (rank r holds classes [C//W*r + min(r, C%W), ... + C//W + (r < C%W))). File names:
  `rank_{r}_softmax_weight.pt` / `rank:{r}_softmax_weight.pt` (partial_fc.py, v1), `softmax_fc_gpu_{r}.pt`,
  and `checkpoint_gpu_{r}.pt` (train_v2 `save_all_states`: `state_dict_softmax_fc.weight`). Momentum files
  (`*_softmax_weight_mom.pt`) are not weights and are skipped.

Everything is read with safe_torch_load (tensors only). Resharding the centers to a job's ranks is the
trainer's (the head's class ranges), e.g. `centers[start:end]` for each rank's range.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

import torch

from toolkit.errors import CheckpointError
from toolkit.export.consolidate import HEAD_KEY, build_registry_backbone, check_backbone_keys, check_shards
from toolkit.serialization import safe_torch_load

SOFTMAX_FILE = re.compile(r"^(?:rank[_:](?P<a>\d+)_softmax_weight|softmax_fc_gpu_(?P<b>\d+)|checkpoint_gpu_(?P<c>\d+))\.pt$")
# FaceCL backbones with an arcface_torch counterpart whose parameters correspond one to one.
ARCFACE_COUNTERPARTS = {"iresnet18": "iresnet18", "iresnet34": "iresnet34", "iresnet50": "iresnet50",
                        "iresnet100": "iresnet100", "iresnet200": "iresnet200", "mobilefacenet_large": "mbf_large"}


def _strip_module(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def map_arcface_backbone(their: dict[str, torch.Tensor], backbone: str, *, embedding_size: int = 512,
                         image_size: int = 112, where: str = "") -> dict[str, torch.Tensor]:
    """Their state dict -> ours (registry keys), by name when the names agree, else position by position."""
    if backbone not in ARCFACE_COUNTERPARTS:
        raise CheckpointError(f"{where}: FaceCL has no arcface_torch counterpart for backbone {backbone!r}; "
                              f"supported: {', '.join(sorted(ARCFACE_COUNTERPARTS))}")
    ours = build_registry_backbone({"backbone": backbone, "embedding_size": embedding_size,
                                    "image_size": image_size}).state_dict()
    their = _strip_module(their)
    if set(their) == set(ours):
        mapped = dict(their)
    else:
        their_items, our_items = list(their.items()), list(ours.items())
        if len(their_items) != len(our_items):
            raise CheckpointError(f"{where}: {len(their_items)} tensors, FaceCL {backbone} has {len(our_items)}: not "
                                  f"an arcface_torch {ARCFACE_COUNTERPARTS[backbone]} backbone")
        mapped = {}
        for (their_key, value), (our_key, reference) in zip(their_items, our_items):
            if their_key.rsplit(".", 1)[-1] != our_key.rsplit(".", 1)[-1] or value.shape != reference.shape:
                raise CheckpointError(f"{where}: tensor {their_key} {tuple(value.shape)} does not correspond to FaceCL "
                                      f"{backbone} {our_key} {tuple(reference.shape)}: not an arcface_torch "
                                      f"{ARCFACE_COUNTERPARTS[backbone]} of embedding size {embedding_size}")
            mapped[our_key] = value
    mapped = {k: (v.float() if v.is_floating_point() else v) for k, v in mapped.items()}
    model = build_registry_backbone({"backbone": backbone, "embedding_size": embedding_size, "image_size": image_size})
    check_backbone_keys(mapped, model, where)
    return mapped


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
                    image_size: int | None = None, softmax: str | Path | Iterable[str | Path] | None = None
                    ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """(backbone state dict with registry keys, centers C x D or None) to initialise a run from.

    `backbone` / `embedding_size` / `image_size` are the run's; they are checked against a FaceCL file's
    metadata and needed to map an arcface_torch file (which does not record its architecture). The file is
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
                                 image_size=image_size or 112, where=str(path))
    centers = merge_arcface_softmax(softmax) if softmax is not None else None
    if centers is not None and embedding_size is not None and centers.shape[1] != embedding_size:
        raise CheckpointError(f"softmax weights are {centers.shape[1]} wide; this run's embedding size is {embedding_size}")
    return state, centers
