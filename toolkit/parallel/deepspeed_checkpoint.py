# DeepSpeed ZeRO's checkpoint files, read without a process group: safe checks, merged state, sizes, universal copies.
"""The offline half of the DeepSpeed engine's checkpoints (the strategy in deepspeed_zero.py writes and loads
them in training). A FaceCL step folder holds DeepSpeed's tag folder `deepspeed/`:

    mp_rank_00_model_states.pt                         stages 0-2: the module (and, at stage 0, the optimizer)
    zero_pp_rank_R_mp_rank_00_model_states.pt          stage 3: one per rank (placeholders and shapes)
    zero_pp_rank_R_mp_rank_00_optim_states.pt          stages 1-3: rank R's partition of the fp32 master
                                                       weights and of the optimizer state

and a universal copy (`resize`, DeepSpeed's universal format: any world size) holds instead `zero/<parameter>/`
with one file per state (fp32.pt, exp_avg.pt, exp_avg_sq.pt or momentum_buffer.pt), zero/optimizer_state.pt,
the model-state files, and `module_extras.pt` (see `resize`).

Safety. DeepSpeed opens its files with an unrestricted torch.load:
- its engine loader: the names it builds, and for a universal folder every "*.pt" of zero/<parameter>/ and
  zero/optimizer_state.pt;
- zero_to_fp32: "*_model_states.pt" and "*_optim_states.pt" at the top (glob);
- ds_to_universal: its DeepSpeedCheckpoint walks every file at ANY depth (os.walk) and loads each whose name
  starts with "mp_rank_", "zero_pp_rank_", "bf16_zero_pp_rank_", "fp16_zero_pp_rank_" or "layer_", whatever
  the suffix; it also globs "*_optim_states.pt" and "*model_states.pt" at the top.
So `check` reads every file at any depth with the safe loader (tensors, plain containers and the DeepSpeed
data classes in DEEPSPEED_GLOBALS) and refuses files that FaceCL does not write there; then every library call
runs inside `restricted_torch_load`, so that whatever it opens is read safely too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from toolkit.checkpoint import TRAINER_FILE, read_training_payload
from toolkit.errors import CheckpointError, FaceCLError
from toolkit.parallel.checkpoint_format import CheckpointFormat, register_checkpoint_format
from toolkit.serialization import restricted_torch_load, safe_torch_load

if TYPE_CHECKING:
    from toolkit.checkpoint import CheckpointSource

TAG = "deepspeed"
# Written by `resize` into a universal tag folder: the buffers and frozen parameters (full values) that
# DeepSpeed's universal loader does not restore.
MODULE_EXTRAS_FILE = "module_extras.pt"
# Classes (by "module.qualname") that DeepSpeed 0.19 writes into its checkpoint files, beyond what weights_only
# admits by itself (found by saving ZeRO-0/1/2/3 checkpoints and listing them with
# torch.serialization.get_unsafe_globals_in_checkpoint). Each is data only: instances are rebuilt from their
# attribute dict (or an enum value), no method of theirs runs while loading.
DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",            # optim states: the ZeRO stage
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",          # optim states: static loss scaler attributes
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",   # optim states: dynamic loss scaler attributes
    "deepspeed.utils.tensor_fragment.fragment_address",       # ZeRO-1/2 param slice mappings
    "deepspeed.checkpoint.constants.ZeroStageEnum",           # older spelling of the stage enum
)
_TAG_FILE = re.compile(r"^(mp_rank_\d\d_model_states|(bf16_|fp16_)?zero_pp_rank_\d+_mp_rank_\d\d_(model|optim)_states)\.pt$")
# Per-parameter state files of a universal folder; what each optimizer keeps per parameter.
_UNIVERSAL_STATE_FILE = re.compile(r"^(fp32|exp_avg|exp_avg_sq|momentum_buffer|step)\.pt$")
ADAM_STATE = ("exp_avg", "exp_avg_sq")
SGD_STATE = ("momentum_buffer",)


def safe_load(path: Path, **kwargs) -> Any:
    """safe_torch_load admitting DeepSpeed's data classes."""
    return safe_torch_load(path, extra_allowed=DEEPSPEED_GLOBALS, **kwargs)


def library_reads_safely():
    """Every torch.load DeepSpeed makes inside the block reads tensors and DeepSpeed's data classes only."""
    return restricted_torch_load(extra_allowed=DEEPSPEED_GLOBALS)


def folder_files(tag_dir: Path) -> list[Path]:
    """Every non-folder entry under `tag_dir`, at any depth, as DeepSpeed's converter lists them (os.walk)."""
    found = []
    for root, _, names in os.walk(tag_dir):
        found += [Path(root) / name for name in names]
    return sorted(found)


def unexpected_files(tag_dir: Path) -> list[Path]:
    """Files under a tag folder that neither FaceCL's engine nor its universal conversion writes."""
    unexpected = []
    for path in folder_files(tag_dir):
        parts = path.relative_to(tag_dir).parts
        if len(parts) == 1 and (_TAG_FILE.match(parts[0]) or parts[0] == MODULE_EXTRAS_FILE):
            continue
        if parts[0] == "zero" and (parts[1:] == ("optimizer_state.pt",)
                                   or (len(parts) == 3 and _UNIVERSAL_STATE_FILE.match(parts[2]))):
            continue
        unexpected.append(path)
    return unexpected


def unexpected_files_message(tag_dir: Path, unexpected: list[Path]) -> str:
    names = ", ".join(str(p.relative_to(tag_dir)) for p in unexpected[:4]) + (" ..." if len(unexpected) > 4 else "")
    return (f"{tag_dir} holds {len(unexpected)} file(s) that FaceCL's DeepSpeed engine does not write ({names}); "
            f"DeepSpeed's readers would open them: remove them or restore the folder from a clean copy")


def check_tag_folder(tag_dir: Path) -> None:
    """Every file under the tag folder read safely, at any depth and whatever its name, then files FaceCL does
    not write there refused; either is a one-line CheckpointError naming the file."""
    files = folder_files(tag_dir)
    if not files:
        raise CheckpointError(f"{tag_dir} holds no DeepSpeed checkpoint files")
    for file in files:
        safe_load(file, mmap=True)
    unexpected = unexpected_files(tag_dir)
    if unexpected:
        raise CheckpointError(unexpected_files_message(tag_dir, unexpected))


def is_universal(step_folder: Path) -> bool:
    """DeepSpeed's universal format: one folder per parameter under zero/."""
    return (step_folder / TAG / "zero").is_dir()


def read_module_extras(step_folder: Path) -> dict[str, torch.Tensor]:
    """The buffers and frozen parameters that `resize` stored beside DeepSpeed's zero/ folder."""
    path = step_folder / TAG / MODULE_EXTRAS_FILE
    if not path.is_file():
        raise CheckpointError(f"{step_folder} is a universal checkpoint without {TAG}/{MODULE_EXTRAS_FILE} (its "
                              f"batch-norm statistics and frozen parameters): convert the original checkpoint "
                              f"again with `python launch/convert.py universal`")
    return safe_load(path)


def model_and_optim_files(tag_dir: Path) -> tuple[list[Path], list[Path]]:
    return sorted(tag_dir.glob("*_model_states.pt")), sorted(tag_dir.glob("*_optim_states.pt"))


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


def _sgd_state_as_adam(tree):
    """What ds_to_universal (Adam-only in DeepSpeed 0.19.8) can convert: SGD's momentum_buffer carried as
    exp_avg, with a zero exp_avg_sq beside it; `resize` renames the results back and drops the zeros."""
    if isinstance(tree, dict):
        tree = {key: _sgd_state_as_adam(value) for key, value in tree.items()}
        if torch.is_tensor(tree.get("momentum_buffer")) and "exp_avg" not in tree:
            tree["exp_avg"] = tree.pop("momentum_buffer")
            tree["exp_avg_sq"] = torch.zeros_like(tree["exp_avg"])
        return tree
    if isinstance(tree, list):
        return [_sgd_state_as_adam(value) for value in tree]
    return tree


def _adam_named_state_as_sgd(tree):
    """The inverse of _sgd_state_as_adam inside files the converter copied (zero/optimizer_state.pt)."""
    if isinstance(tree, dict):
        tree = {key: _adam_named_state_as_sgd(value) for key, value in tree.items()}
        if "exp_avg" in tree and "exp_avg_sq" in tree:
            tree["momentum_buffer"] = tree.pop("exp_avg")
            del tree["exp_avg_sq"]
        return tree
    if isinstance(tree, list):
        return [_adam_named_state_as_sgd(value) for value in tree]
    return tree


@dataclass
class ResizeResult:
    out: Path
    num_bytes: int
    zero_stage: int
    world_size: int
    num_files: int
    optimizer_state: tuple[str, ...]


@register_checkpoint_format
class DeepSpeedCheckpointFormat(CheckpointFormat):
    name = "deepspeed"
    folder = TAG
    resized_suffix = ".universal"

    @classmethod
    def resumes_at_any_world_size(cls, entry: Path) -> bool:
        return is_universal(entry)

    @classmethod
    def engine(cls, source) -> str:
        return "deepspeed"

    @classmethod
    def zero_stage(cls, source: "CheckpointSource") -> int:
        """The ZeRO stage: from the DeepSpeed config that the model-state files record (also in a universal copy
        or a step folder moved out of its run), else from the run's recipe, else from the file names."""
        model, optim = model_and_optim_files(source.entry / TAG)
        for model_file in model[:1]:
            try:
                config = safe_load(model_file, mmap=True).get("ds_config") or {}
                return int(config["zero_optimization"]["stage"])
            except (FaceCLError, AttributeError, KeyError, TypeError, ValueError):
                pass
        stage = source.parallel.get("zero_stage")
        if stage is not None:
            return int(stage)
        if any(p.name.startswith("zero_pp_rank_") for p in model):
            return 3
        return 1 if optim else 0

    @classmethod
    def describe(cls, source) -> str:
        universal = " (universal: any world size)" if is_universal(source.entry) else ""
        return f"DeepSpeed ZeRO-{cls.zero_stage(source)}{universal}"

    @classmethod
    def details(cls, source) -> dict[str, Any]:
        return {"zero_stage": cls.zero_stage(source)}

    @classmethod
    def _rank_problems(cls, source) -> list[str]:
        """Files of ranks that are missing (a universal folder holds no per-rank optimizer files)."""
        tag_dir = source.entry / TAG
        model, optim = model_and_optim_files(tag_dir)
        stage, world = cls.zero_stage(source), source.world_size
        problems = []
        if not model:
            problems.append(f"{tag_dir}: no model-state file")
        if is_universal(source.entry):
            if not (tag_dir / "zero" / "optimizer_state.pt").is_file():
                problems.append(f"{tag_dir}/zero/optimizer_state.pt is missing")
            return problems
        expected_optim = [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(world)] if stage >= 1 else []
        missing = [name for name in expected_optim if not (tag_dir / name).is_file()]
        if stage == 3:
            missing += [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)
                        if not (tag_dir / f"zero_pp_rank_{r}_mp_rank_00_model_states.pt").is_file()]
        if missing:
            problems.append(f"{tag_dir} is incomplete: {len(missing)} rank file(s) of a {world}-rank ZeRO-{stage} "
                            f"checkpoint missing ({', '.join(missing[:4])})")
        return problems

    @classmethod
    def check(cls, source) -> None:
        tag_dir = source.entry / TAG
        check_tag_folder(tag_dir)
        problems = cls._rank_problems(source)
        if problems:
            raise CheckpointError(problems[0])

    @classmethod
    def problems(cls, source) -> list[str]:
        tag_dir = source.entry / TAG
        problems = []
        for file in folder_files(tag_dir):   # every file DeepSpeed's readers might open
            try:
                safe_load(file, mmap=True)
            except FaceCLError as exc:
                problems.append(str(exc))
        unexpected = unexpected_files(tag_dir)
        if unexpected:
            problems.append(unexpected_files_message(tag_dir, unexpected))
        return problems + cls._rank_problems(source)

    @classmethod
    def files(cls, source) -> list[Path]:
        return [p for p in folder_files(source.entry / TAG) if p.suffix == ".pt"]

    @classmethod
    def part_bytes(cls, source, problems: list[str]) -> dict[str, int]:
        model, optim = model_and_optim_files(source.entry / TAG)
        return {"backbone": cls._model_bytes(model[0], problems) if model else 0,
                "optimizer_state": sum(p.stat().st_size for p in optim)}

    @classmethod
    def bytes_in_trainer_file(cls, source, parts) -> int:
        return 0

    @staticmethod
    def _model_bytes(model_file: Path, problems: list[str]) -> int:
        """fp32 bytes of the model's parameters (DeepSpeed's param_shapes, frozen ones too) and its buffers.

        The model-state files themselves say little: ZeRO-3 keeps only placeholders there, the fp32 values
        live in the optimizer partitions."""
        try:
            states = safe_load(model_file, mmap=True)
        except FaceCLError as exc:
            problems.append(str(exc))
            return 0
        if not isinstance(states, dict):
            return 0
        from toolkit.parallel.checkpoint_format import tensor_bytes

        numel = 0
        for group in states.get("param_shapes") or []:
            numel += sum(int(torch.Size(shape).numel()) for shape in group.values())
        numel += sum(int(torch.Size(shape).numel()) for shape in (states.get("frozen_param_shapes") or {}).values())
        buffers = set(states.get("buffer_names") or [])
        module = states.get("module") or {}
        return numel * 4 + tensor_bytes({k: v for k, v in module.items() if k in buffers})

    @classmethod
    def full_state(cls, source) -> dict[str, torch.Tensor]:
        """The full fp32 module state: DeepSpeed's own zero_to_fp32 merges every rank's fp32 partitions (ZeRO-0
        has none: its model-state file holds the full module)."""
        tag_dir = source.entry / TAG
        model_files, optim_files = model_and_optim_files(tag_dir)
        if not model_files:
            raise CheckpointError(f"{tag_dir} holds no DeepSpeed model states (*_model_states.pt)")
        check_tag_folder(tag_dir)   # name a bad or foreign file before DeepSpeed gets to it
        if is_universal(source.entry):
            return cls._universal_state(tag_dir)
        stage = cls.zero_stage(source)
        if stage == 0 or not optim_files:
            states = safe_load(model_files[0])
            module = states.get("module") if isinstance(states, dict) else None
            if not isinstance(module, dict):
                raise CheckpointError(f"{model_files[0]} holds no module state dict")
            return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
        problems = cls._rank_problems(source)
        if problems:
            raise CheckpointError(problems[0])
        from deepspeed.utils import zero_to_fp32

        # DeepSpeed prints and draws its own bars for each file; the converter reports for itself.
        with library_reads_safely(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            try:
                state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(source.entry), tag=TAG)
            except (ValueError, FileNotFoundError) as exc:
                raise CheckpointError(f"{tag_dir}: DeepSpeed cannot merge these files ({exc})") from None
        return dict(state)

    @staticmethod
    def _universal_state(tag_dir: Path) -> dict[str, torch.Tensor]:
        """A universal folder's full state: every parameter's zero/<name>/fp32.pt (ZeRO-3 stores it flat: the
        model-state files' param_shapes give its shape), plus module_extras.pt (the buffers and frozen parameters,
        which DeepSpeed's universal files leave out)."""
        state = dict(read_module_extras(tag_dir.parent))
        shapes: dict[str, torch.Size] = {}
        for model_file in model_and_optim_files(tag_dir)[0]:
            for group in safe_load(model_file, mmap=True).get("param_shapes") or []:
                shapes.update({name: torch.Size(shape) for name, shape in group.items()})
        for folder in sorted((tag_dir / "zero").iterdir()):
            if folder.is_dir() and (folder / "fp32.pt").is_file() and folder.name not in state:
                saved = safe_load(folder / "fp32.pt")
                value = (saved["param"] if isinstance(saved, dict) else saved).float()
                shape = shapes.get(folder.name)
                state[folder.name] = value.reshape(shape) if shape is not None and shape.numel() == value.numel() \
                    else value
        return state

    # ----- world-size change -------------------------------------------------------------------------------
    @classmethod
    def optimizer_state_kind(cls, source) -> tuple[str, ...]:
        """ADAM_STATE or SGD_STATE, from the names in the optimizer files; FaceCLError for anything else."""
        keys: set = set()
        for file in model_and_optim_files(source.entry / TAG)[1]:
            _string_keys(safe_load(file, mmap=True).get("optimizer_state_dict", {}), found=keys)
        if "exp_avg" in keys:
            return ADAM_STATE
        if "momentum_buffer" in keys:
            return SGD_STATE
        named = sorted(k for k in keys if k in ("square_avg", "sum", "exp_avg_sq", "acc_delta")) or ["none"]
        raise FaceCLError(f"{source.entry}: FaceCL converts Adam-family (exp_avg, exp_avg_sq) and SGD-momentum "
                          f"(momentum_buffer) optimizer state to DeepSpeed's universal format; this checkpoint's "
                          f"optimizer state has {', '.join(named)}")

    @classmethod
    def resize(cls, source, out: Path, *, overwrite: bool = False) -> ResizeResult:
        """Write a FaceCL checkpoint folder at `out` whose tag folder is DeepSpeed's universal format (any world
        size), next to checked copies of trainer.pt and the center shards (which reshard by class range).

        DeepSpeed's universal files hold only what the optimizer updates, and its loader skips the module state
        dict: batch-norm statistics and frozen parameters (the UniMoCo key encoder) would come back freshly
        initialised. So `module_extras.pt` holds every module entry without optimizer state (full values,
        merged by zero_to_fp32). DeepSpeed 0.19.8's converter knows only Adam's exp_avg / exp_avg_sq: SGD's
        momentum_buffer, a per-parameter state of the same shape, goes through it in exp_avg's place and is
        written as momentum_buffer.pt. The output appears atomically (built in a hidden sibling folder)."""
        out = Path(out)
        if out.exists() and not overwrite:
            raise FaceCLError(f"output {out} already exists; pass --overwrite to replace it")
        if out.exists() and not out.is_dir():
            raise FaceCLError(f"output {out} exists and is not a folder")
        if not out.parent.is_dir():
            raise FaceCLError(f"output folder {out.parent} does not exist")
        if out.resolve() == source.entry.resolve() or out.resolve().is_relative_to(source.entry.resolve()):
            raise FaceCLError(f"output {out} would overwrite the checkpoint being read ({source.entry})")
        cls.check(source)
        if is_universal(source.entry):
            raise FaceCLError(f"{source.entry} is already a universal checkpoint: it resumes at any world size")
        stage = cls.zero_stage(source)
        if stage == 0:
            raise FaceCLError(f"{source.entry} is a ZeRO-0 checkpoint: it holds full weights and optimizer state, "
                              f"nothing is partitioned by rank, so there is nothing to convert")
        kind = cls.optimizer_state_kind(source)
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
        except OSError as exc:
            raise FaceCLError(f"cannot write into {out.parent} ({exc.strerror or exc})") from None
        try:
            shutil.copy2(source.entry / TRAINER_FILE, staging / TRAINER_FILE)
            for head in source.head_files():
                read_training_payload(head)   # checked before it is copied (a resume would refuse it only later)
                shutil.copy2(head, staging / head.name)
            _run_ds_to_universal(source.entry / TAG, staging / TAG, sgd=kind == SGD_STATE)
            if kind == SGD_STATE:
                _rename_sgd_state(staging / TAG)
            _write_module_extras(cls.full_state(source), staging / TAG, source.entry)
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
        return ResizeResult(out=out, num_bytes=sum(p.stat().st_size for p in files), zero_stage=stage,
                            world_size=source.world_size, num_files=len(files), optimizer_state=kind)


def _run_ds_to_universal(tag_dir: Path, target: Path, *, sgd: bool) -> None:
    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(tag_dir), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)   # FaceCL does not record DeepSpeed's client state
    transform = (lambda path, loaded: _sgd_state_as_adam(loaded)
                 if path is not None and path.name.endswith("_optim_states.pt") else loaded) if sgd else None
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
                restricted_torch_load(extra_allowed=DEEPSPEED_GLOBALS, transform=transform):
            ds_to_universal.main(args)
    except (AssertionError, KeyError, ValueError, FileNotFoundError, RuntimeError) as exc:
        raise CheckpointError(f"{tag_dir}: DeepSpeed's universal converter failed ({type(exc).__name__}: "
                              f"{str(exc)[:200]})") from None
    (target.parent / "latest_universal").unlink(missing_ok=True)   # DeepSpeed's pointer, unused by FaceCL


def _rename_sgd_state(tag_dir: Path) -> None:
    """exp_avg.pt -> momentum_buffer.pt, the zero exp_avg_sq.pt dropped, optimizer_state.pt renamed back."""
    for folder in (tag_dir / "zero").iterdir():
        if folder.is_dir() and (folder / "exp_avg.pt").is_file():
            os.replace(folder / "exp_avg.pt", folder / "momentum_buffer.pt")
            (folder / "exp_avg_sq.pt").unlink(missing_ok=True)
    state_file = tag_dir / "zero" / "optimizer_state.pt"
    torch.save(_adam_named_state_as_sgd(safe_load(state_file)), state_file)


def _write_module_extras(state: dict[str, torch.Tensor], target_tag_dir: Path, where: Path) -> None:
    """The module state DeepSpeed's universal loader does not restore: entries without optimizer state under
    `zero/<name>/` (ZeRO-1/2 folders also hold buffers and frozen parameters, as fp32.pt alone, never read)."""
    optimized = {folder.name for folder in (target_tag_dir / "zero").iterdir()
                 if any(p.name not in ("fp32.pt", "step.pt") for p in folder.glob("*.pt"))}
    missing = sorted(optimized - set(state))
    if missing:
        raise CheckpointError(f"{where}: DeepSpeed's universal folder names parameters the checkpoint's module does "
                              f"not have ({', '.join(missing[:3])})")
    extras = {name: value.contiguous() for name, value in state.items() if name not in optimized}
    torch.save(extras, target_tag_dir / MODULE_EXTRAS_FILE)
