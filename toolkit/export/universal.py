# DeepSpeed universal checkpoint: a ZeRO-1/2/3 FaceCL checkpoint rewritten so it can resume at another world size.
"""`to_universal(checkpoint, out)` writes a FaceCL checkpoint folder whose `deepspeed/` tag folder holds
DeepSpeed's universal format (`deepspeed.checkpoint.ds_to_universal`: one file per parameter and optimizer
state, not per rank), next to byte-for-byte copies of `trainer.pt` and the center shards (which already
reshard by class range). `--resume` on any number of ranks loads it (the DeepSpeed strategy turns on
`"checkpoint": {"load_universal": true}` for that load, then repairs what DeepSpeed 0.19.8 leaves out or gets
wrong; see toolkit/parallel/deepspeed_zero.py).

DeepSpeed's universal format holds only the parameters the optimizer updates, and its loader skips the module
state dict: batch-norm running statistics and frozen parameters (the UniMoCo key encoder) would come back as
freshly initialised. The converter therefore also writes `deepspeed/module_extras.pt`: every entry of the
engine module's state dict without optimizer state under `zero/` (buffers and frozen parameters, full values,
merged from the rank files by DeepSpeed's zero_to_fp32 read safely), which the strategy loads after DeepSpeed.

Safety and limits:
- ds_to_universal unpickles freely every file it finds under the tag folder, at any depth, whose name starts
  with mp_rank_, zero_pp_rank_ or layer_ (and globs *_optim_states.pt / *model_states.pt). So every file
  under the tag folder is first read with safe_torch_load (tensors only) and files FaceCL does not write
  there are refused (DeepSpeedZero.check_files); then the converter runs with every torch.load routed
  through the safe loader (`restricted_torch_load`), its own intermediate files included.
- DeepSpeed 0.19.8's converter only knows Adam-family state (`exp_avg`, `exp_avg_sq`): a checkpoint of
  an SGD run (`momentum_buffer`) is refused with that reason rather than DeepSpeed's KeyError.
- ZeRO-0 writes full weights and optimizer state per model, not partitions: nothing to convert.
- The output appears atomically (built in a hidden sibling folder, then renamed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import CheckpointError, FaceCLError
from toolkit.export.checkpoints import DEEPSPEED_TAG, TRAINER_FILE, open_checkpoint, read_training_payload
from toolkit.export.engine_state import deepspeed_files, deepspeed_state, deepspeed_zero_stage
from toolkit.parallel.deepspeed_zero import MODULE_EXTRAS_FILE, DeepSpeedZero
from toolkit.serialization import restricted_torch_load, safe_torch_load


@dataclass
class UniversalResult:
    out: Path
    num_bytes: int
    zero_stage: int
    world_size: int
    num_files: int


def _string_keys(tree, depth: int = 0, found: set | None = None) -> set:
    """Every string dict key in a nested structure (bounded depth): how optimizer state is named."""
    found = set() if found is None else found
    if depth > 6:
        return found
    if isinstance(tree, dict):
        for key, value in tree.items():
            if isinstance(key, str):
                found.add(key)
            _string_keys(value, depth + 1, found)
    elif isinstance(tree, (list, tuple)):
        for value in tree[:64]:
            _string_keys(value, depth + 1, found)
    return found


def to_universal(path: str | Path, out: str | Path, *, overwrite: bool = False) -> UniversalResult:
    """Convert the DeepSpeed checkpoint at `path` (run, checkpoints folder or step folder) into `out`."""
    out = Path(out)
    source = open_checkpoint(path)
    if source.engine != "deepspeed":
        raise FaceCLError(f"{source.entry} was written by the {source.engine} engine; universal checkpoints are "
                          f"DeepSpeed's (FSDP2's DCP files and the center shards reshard as they are)")
    if out.exists() and not overwrite:
        raise FaceCLError(f"output {out} already exists; pass --overwrite to replace it")
    if out.exists() and not out.is_dir():
        raise FaceCLError(f"output {out} exists and is not a folder")
    if not out.parent.is_dir():
        raise FaceCLError(f"output folder {out.parent} does not exist")
    if out.resolve() == source.entry.resolve() or out.resolve().is_relative_to(source.entry.resolve()):
        raise FaceCLError(f"output {out} would overwrite the checkpoint being read ({source.entry})")
    stage = deepspeed_zero_stage(source)
    if stage == 0:
        raise FaceCLError(f"{source.entry} is a ZeRO-0 checkpoint: it holds full weights and optimizer state, "
                          f"nothing is partitioned by rank, so there is nothing to convert")
    tag_dir = source.entry / DEEPSPEED_TAG
    DeepSpeedZero.check_files(source.entry)   # every file DeepSpeed's converter may open, before it runs
    model_files, optim_files = deepspeed_files(tag_dir)
    if len(optim_files) != source.world_size:
        raise CheckpointError(f"{tag_dir} is incomplete: {len(optim_files)} ZeRO optimizer files for "
                              f"{source.world_size} ranks")
    keys: set = set()
    for file in optim_files:
        payload = safe_torch_load(file, mmap=True)
        _string_keys(payload.get("optimizer_state_dict", {}), found=keys)
    if "exp_avg" not in keys:
        named = sorted(k for k in keys if k in ("momentum_buffer", "square_avg", "sum", "exp_avg_sq")) or ["none"]
        raise FaceCLError(f"{source.entry}: DeepSpeed's universal converter handles Adam-family optimizer state "
                          f"(exp_avg, exp_avg_sq) only; this checkpoint's optimizer state has {', '.join(named)} "
                          f"(optim.name sgd?)")
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        raise FaceCLError(f"cannot write into {out.parent} ({exc.strerror or exc})") from None
    try:
        shutil.copy2(source.entry / TRAINER_FILE, staging / TRAINER_FILE)
        for head in source.head_files():
            read_training_payload(head)   # checked before it is copied (a resume would refuse it only later)
            shutil.copy2(head, staging / head.name)
        _run_ds_to_universal(tag_dir, staging / DEEPSPEED_TAG)
        _write_module_extras(source, staging / DEEPSPEED_TAG)
        if out.exists():
            trash = out.with_name(f".{out.name}.replaced")
            os.replace(out, trash)
            os.replace(staging, out)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = [p for p in out.rglob("*") if p.is_file()]
    return UniversalResult(out=out, num_bytes=sum(p.stat().st_size for p in files), zero_stage=stage,
                           world_size=source.world_size, num_files=len(files))


def _write_module_extras(source, target_tag_dir: Path) -> None:
    """The module state DeepSpeed's universal loader does not restore: entries without optimizer state under
    `zero/<name>/` (ZeRO-1/2 folders also hold buffers and frozen parameters, as fp32.pt alone, never read)."""
    import torch

    optimized = {folder.name for folder in (target_tag_dir / "zero").iterdir() if (folder / "exp_avg.pt").is_file()}
    state = deepspeed_state(source)
    missing = sorted(optimized - set(state))
    if missing:
        raise CheckpointError(f"{source.entry}: DeepSpeed's universal folder names parameters the checkpoint's "
                              f"module does not have ({', '.join(missing[:3])})")
    extras = {name: value.contiguous() for name, value in state.items() if name not in optimized}
    torch.save(extras, target_tag_dir / MODULE_EXTRAS_FILE)


def _run_ds_to_universal(tag_dir: Path, target: Path) -> None:
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)   # FaceCL does not record DeepSpeed's client state
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), restricted_torch_load():
            ds_to_universal.main(args)
    except (AssertionError, KeyError, ValueError, FileNotFoundError) as exc:
        raise CheckpointError(f"{tag_dir}: DeepSpeed's universal converter failed ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from None
