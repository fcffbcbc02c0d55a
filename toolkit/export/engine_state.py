# The full fp32 state dict of the engine part (backbone, or UniMoCo's encoders) from any engine's files.
"""Read the engine part of a checkpoint into one full (unsharded) state dict, on CPU, with no process group.

- single / DDP: the backbone state dict stored in the trainer file (rank 0 saved the unwrapped module).
- DeepSpeed ZeRO-1/2/3: DeepSpeed's own `zero_to_fp32` merges the fp32 master partitions of every rank.
  It unpickles its files freely (`torch.load(weights_only=False)`), so every file of the tag folder is
  checked first and it runs inside `restricted_torch_load`: every file it opens is read safely.
  ZeRO-0 has no partitions: the model-states file holds the full module.
- FSDP2: torch.distributed.checkpoint (DCP) files, read with a FileSystemReader whose `.metadata` is
  parsed by `safe_dcp_metadata`; only tensor entries under `model.` are requested (DCP would unpickle
  non-tensor entries freely).

The keys are then normalised: engine wrapper prefixes (`module.`, `_orig_mod.`, activation-checkpoint
wrappers) are dropped, and a UniMoCo module (ContrastiveEncoders) is split into its parts: `backbone`,
`projection`, `key_backbone`, `key_projection`.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path
from typing import Any

import torch

from toolkit.errors import CheckpointError
from toolkit.export.checkpoints import DEEPSPEED_TAG, FSDP_FOLDER, CheckpointSource
from toolkit.parallel.deepspeed_zero import DeepSpeedZero
from toolkit.parallel.fsdp2 import safe_dcp_reader
from toolkit.serialization import restricted_torch_load, safe_dcp_metadata, safe_torch_load

ENCODER_PARTS = ("backbone", "projection", "key_backbone", "key_projection")
_WRAPPER_SEGMENTS = re.compile(r"(^|\.)(module|_orig_mod|_checkpoint_wrapped_module|_fsdp_wrapped_module)\.")


def strip_wrapper_prefixes(key: str) -> str:
    """'module._orig_mod.layer1.0.conv1.weight' -> 'layer1.0.conv1.weight' (DDP, DeepSpeed, compile, AC)."""
    previous = None
    while previous != key:
        previous = key
        key = _WRAPPER_SEGMENTS.sub(lambda m: m.group(1), key, count=1)
    return key


def split_parts(state: dict[str, torch.Tensor], contrastive: bool) -> dict[str, dict[str, torch.Tensor]]:
    """{'backbone': {...}} or, for UniMoCo's ContrastiveEncoders, one dict per encoder part."""
    state = {strip_wrapper_prefixes(k): v for k, v in state.items()}
    if not contrastive:
        return {"backbone": state}
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in ENCODER_PARTS}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head not in parts:
            raise CheckpointError(f"UniMoCo checkpoint key {key!r} belongs to none of {', '.join(ENCODER_PARTS)}")
        parts[head][rest] = value
    return parts


# ----- DeepSpeed ------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _deepspeed_reads_safely():
    """DeepSpeed's zero_to_fp32 with every torch.load it makes routed through the safe loader."""
    from deepspeed.utils import zero_to_fp32

    with restricted_torch_load():
        yield zero_to_fp32


def deepspeed_files(tag_dir: Path) -> tuple[list[Path], list[Path]]:
    model = sorted(tag_dir.glob("*_model_states.pt"))
    optim = sorted(tag_dir.glob("*_optim_states.pt"))
    return model, optim


def deepspeed_zero_stage(source: CheckpointSource) -> int:
    """The ZeRO stage: from the recipe, else from the file names (stage 3 writes per-rank model states)."""
    stage = source.parallel.get("zero_stage")
    if stage is not None:
        return int(stage)
    model, optim = deepspeed_files(source.entry / DEEPSPEED_TAG)
    if any(p.name.startswith("zero_pp_rank_") for p in model):
        return 3
    return 1 if optim else 0


def deepspeed_state(source: CheckpointSource) -> dict[str, torch.Tensor]:
    tag_dir = source.entry / DEEPSPEED_TAG
    model_files, optim_files = deepspeed_files(tag_dir)
    if not model_files:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed model states (*_model_states.pt)")
    DeepSpeedZero.check_files(source.entry)   # name a bad or foreign file before DeepSpeed gets to it
    stage = deepspeed_zero_stage(source)
    if stage == 0 or not optim_files:
        states = safe_torch_load(model_files[0])
        module = states.get("module") if isinstance(states, dict) else None
        if not isinstance(module, dict):
            raise CheckpointError(f"{model_files[0]} holds no module state dict")
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    _check_deepspeed_ranks(source, tag_dir, stage, model_files, optim_files)
    # DeepSpeed prints and draws its own bars for each file; the converter reports for itself.
    with _deepspeed_reads_safely() as zero_to_fp32, contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        try:
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(source.entry), tag=DEEPSPEED_TAG)
        except (ValueError, FileNotFoundError) as exc:
            raise CheckpointError(f"{tag_dir}: DeepSpeed cannot merge these files ({exc})") from None
    return dict(state)


def _check_deepspeed_ranks(source: CheckpointSource, tag_dir: Path, stage: int, model_files: list[Path],
                           optim_files: list[Path]) -> None:
    """Every rank's ZeRO files present (DeepSpeed's own message for this is about overwritten checkpoints)."""
    world = source.world_size
    expected_optim = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)]
    missing = [name for name in expected_optim if not (tag_dir / name).is_file()]
    if stage == 3:
        missing += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)
                    if not (tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").is_file()]
    if missing:
        raise CheckpointError(f"{tag_dir} is incomplete: {len(missing)} rank file(s) of a {world}-rank ZeRO-{stage} "
                              f"checkpoint missing ({', '.join(missing[:4])})")


# ----- FSDP2 (DCP) ------------------------------------------------------------------------------------------

def dcp_storage_problems(folder: Path, metadata) -> list[str]:
    """Files that DCP's metadata refers to but which are missing or shorter than the data they must hold."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        end = int(info.offset) + int(info.length)
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), end)
    problems = []
    for name, end in sorted(needed.items()):
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif path.stat().st_size < end:
            problems.append(f"{name} truncated ({path.stat().st_size} of at least {end} bytes)")
    return problems


def fsdp_state(source: CheckpointSource) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    folder = source.entry / FSDP_FOLDER
    metadata = safe_dcp_metadata(folder / ".metadata")
    problems = dcp_storage_problems(folder, metadata)
    if problems:
        raise CheckpointError(f"{folder} is incomplete: {'; '.join(problems[:4])}")
    keys = {key for key, meta in metadata.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    if not keys:
        raise CheckpointError(f"{folder} holds no model tensors (no 'model.' entries in its metadata)")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "loading without a process group" is the intent here
        loaded = _load_state_dict_from_keys(keys, storage_reader=safe_dcp_reader(folder))
    model = loaded["model"] if "model" in loaded else {k[len("model."):]: v for k, v in loaded.items()}
    return {key: value for key, value in _flatten(model).items()}


def _flatten(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


# ----- every engine ----------------------------------------------------------------------------------------

def engine_state(source: CheckpointSource) -> dict[str, torch.Tensor]:
    """The full engine-module state dict (parameters in fp32 and buffers), keys as the engine saved them."""
    if source.engine == "deepspeed":
        return deepspeed_state(source)
    if source.engine == "fsdp":
        return fsdp_state(source)
    engine = source.trainer.get("engine") or {}
    state = engine.get("backbone")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{source.entry}: the trainer file holds no backbone state (engine "
                              f"{source.engine!r})")
    return dict(state)


def encoder_parts(source: CheckpointSource) -> dict[str, dict[str, torch.Tensor]]:
    """{'backbone': state} (plus projection / key_backbone / key_projection for UniMoCo runs)."""
    return split_parts(engine_state(source), source.contrastive)
