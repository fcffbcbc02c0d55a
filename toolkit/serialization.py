# Safe loading of checkpoint files: tensors and plain containers only, never code hidden in a pickle.
"""Every file FaceCL reads from disk that is a pickle goes through this module.

A torch file (torch.save) and DCP's `.metadata` are pickles, and unpickling a pickle can run arbitrary
code (`__reduce__`). `safe_torch_load` loads torch files with `torch.load(weights_only=True)`, which only
rebuilds tensors, plain containers and an explicit allowlist of classes. The allowlist holds a few plain
Python types; a caller that reads another library's files adds the data classes that library writes
(`extra_allowed`: the DeepSpeed checkpoint format passes DeepSpeed's). Allowed classes are imported lazily, by
name, only when a file names them, so this module needs neither DeepSpeed nor any other part of the toolkit.
`restricted_torch_load` routes a library's own torch.load calls through the same loader while it runs.

`safe_dcp_metadata` reads torch.distributed.checkpoint's `.metadata` with an unpickler that admits only
DCP's metadata dataclasses and what they are built from (torch.Size, dtypes, layouts, memory formats).

Both raise `CheckpointError` with one line in plain words naming the file and why, e.g.
"... holds a pickled object of type os.system that FaceCL does not load (it could run code)".
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import pickle
import re
import threading
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from toolkit.errors import CheckpointError

# torch.load as imported: `restricted_torch_load` replaces the module attribute for the duration of a library
# call, and the safe loaders below must keep calling the real one.
_TORCH_LOAD = torch.load
_ROUTING = threading.Lock()

# Plain Python types some writers put into torch files (argparse namespaces of other tools are NOT here).
_PLAIN_GLOBALS = ("builtins.set", "builtins.frozenset", "collections.OrderedDict", "collections.defaultdict",
                  "builtins.slice", "torch.torch_version.TorchVersion")


def _resolve(dotted: str):
    """The object named "package.module.Name" (or "module.Outer.Inner"), or None if it is not importable."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        try:
            for name in parts[split:]:
                obj = getattr(obj, name)
        except AttributeError:
            return None
        return obj
    return None


def _allowed_names(extra_allowed: Iterable[str]) -> set[str]:
    return {*_PLAIN_GLOBALS, *extra_allowed}


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise CheckpointError(f"{str(path)} does not exist")
    if not path.is_file():
        raise CheckpointError(f"{str(path)} is not a file")


def _unsupported_global(text: str) -> str | None:
    """The class named in torch's weights_only refusal ("Unsupported global: GLOBAL os.system ..."); None for
    anything else (random bytes make the unpickler report an "unsupported operand", which names no type)."""
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(
        r"(?:Unsupported|unsupported) (?:class|global)[^\w]*([A-Za-z_][\w]*(?:\.[\w]+)+)", text)
    return match.group(1) if match else None


def _first_global_of_a_pickle(path: Path, limit: int = 64 << 20) -> str | None:
    """The first class or function a plain pickle file names (read with pickletools: nothing runs), or None
    when the file is no pickle at all (e.g. random bytes, which torch's unpickler also calls an "unsupported
    operand")."""
    import pickletools

    data = path.read_bytes()[:limit]
    strings: list[str] = []
    try:
        for opcode, argument, _ in pickletools.genops(data):
            if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                strings.append(str(argument))
            elif opcode.name == "GLOBAL":
                return str(argument).replace(" ", ".")
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                return f"{strings[-2]}.{strings[-1]}"
            elif opcode.name == "STOP":
                return None
    except Exception:  # noqa: BLE001 - not a pickle
        return None
    return None


def pickled_object_message(path: Path, type_name: str) -> str:
    return (f"{str(path)} holds a pickled object of type {type_name} that FaceCL does not load "
            f"(it could run code)")


def truncated_message(path: Path, detail: str = "") -> str:
    tail = f" ({detail})" if detail else ""
    return f"{str(path)} is truncated or not a torch file{tail}"


def _precheck_zip_globals(path: Path, allowed: set[str]) -> list[str]:
    """For zip-format torch files: the allowlisted classes the file names, after refusing (by name) the
    first class outside the allowlist, all before any unpickling.

    `get_unsafe_globals_in_checkpoint` only disassembles the pickle (pickletools), it runs nothing. Only
    the classes a file really names are imported afterwards, so reading a plain checkpoint never imports
    DeepSpeed."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # not a zip file, truncated, ...: torch.load below gives the verdict
        return []
    for name in names:
        if name not in allowed:
            raise CheckpointError(pickled_object_message(path, name))
    return list(names)


def safe_torch_load(path: str | os.PathLike, map_location: str | torch.device = "cpu",
                    extra_allowed: Iterable[str] = (), *, mmap: bool = False) -> Any:
    """`torch.load(path, weights_only=True)` admitting only an explicit allowlist of classes.

    `extra_allowed` names further classes ("module.Name") a caller knows to be data only. `mmap=True`
    maps the tensor data instead of reading it (a 4 GB center shard costs no memory until it is read).
    Any failure is a one-line CheckpointError naming the file and why; torch's own message (which
    suggests loading with weights_only=False, i.e. unsafely) is never shown.
    """
    path = Path(path)
    _check_exists(path)
    allowed = _allowed_names(extra_allowed)
    named = _precheck_zip_globals(path, allowed)
    is_zip = zipfile.is_zipfile(path)
    # Legacy (non-zip) files cannot be listed beforehand: they get the plain types only.
    resolved = []
    for name in sorted(named if is_zip else _PLAIN_GLOBALS):
        obj = _resolve(name)
        if obj is not None:
            resolved.append((obj, name))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # foreign pickle protocols warn before being refused
            with torch.serialization.safe_globals(resolved):
                return _TORCH_LOAD(path, map_location=map_location, weights_only=True, mmap=mmap and is_zip)
    except CheckpointError:
        raise
    except Exception as exc:  # torch raises many types for foreign or damaged files
        text = str(exc)
        type_name = _unsupported_global(text) or (None if is_zip else _first_global_of_a_pickle(path))
        if type_name is not None:
            raise CheckpointError(pickled_object_message(path, type_name)) from None
        if path.stat().st_size == 0:
            raise CheckpointError(truncated_message(path, "empty file")) from None
        detail = _short_reason(text)
        raise CheckpointError(truncated_message(path, detail)) from None


def _short_reason(text: str) -> str:
    """A short, plain cause from torch's error text (its advice to load unsafely is dropped)."""
    for pattern, reason in ((r"failed finding central directory", "no zip directory: cut short?"),
                            (r"invalid header or archive is corrupted", "damaged zip archive"),
                            (r"magic number", "not a torch.save file"),
                            (r"EOF|Ran out of input|unpickling stack underflow|truncated", "ends early"),
                            (r"file offset|size mismatch|PytorchStreamReader", "damaged record")):
        if re.search(pattern, text):
            return reason
    return ""


def _safe_load_stream(handle, map_location, extra_allowed: Iterable[str]) -> Any:
    """weights_only load of an open file object (its globals cannot be listed beforehand: plain types only)."""
    resolved = [(obj, name) for name in sorted(_allowed_names(extra_allowed)) if (obj := _resolve(name)) is not None]
    name = getattr(handle, "name", "an in-memory torch file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with torch.serialization.safe_globals(resolved):
                return _TORCH_LOAD(handle, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for foreign or damaged data
        type_name = _unsupported_global(str(exc))
        if type_name is not None:
            raise CheckpointError(pickled_object_message(Path(str(name)), type_name)) from None
        raise CheckpointError(truncated_message(Path(str(name)), _short_reason(str(exc)))) from None


@contextlib.contextmanager
def restricted_torch_load(extra_allowed: Iterable[str] = (),
                          transform: Callable[[Path | None, Any], Any] | None = None) -> Iterator[None]:
    """Inside the block, every `torch.load` (by a library reading checkpoint files for us, e.g. DeepSpeed's
    converter and loaders, which pass weights_only=False) is `safe_torch_load`: whatever file the library
    decides to open, by name pattern or directory walk, is read as tensors and plain containers only.

    `transform(path, loaded)` may adapt what the library receives (the path is None for file objects). The
    replacement is process-wide while the block runs; one block at a time (a lock), and nested blocks
    keep the outer one's loader.
    """
    allowed = tuple(extra_allowed)

    def load(f, map_location=None, pickle_module=None, *, weights_only=None, mmap=None, **_ignored):
        if isinstance(f, (str, os.PathLike)):
            loaded = safe_torch_load(f, map_location=map_location, extra_allowed=allowed, mmap=bool(mmap))
            path = Path(f)
        else:
            loaded, path = _safe_load_stream(f, map_location, allowed), None
        return transform(path, loaded) if transform is not None else loaded

    if getattr(torch.load, "facecl_restricted", False):   # already routed by an outer block
        yield
        return
    load.facecl_restricted = True
    with _ROUTING:
        previous, torch.load = torch.load, load
        try:
            yield
        finally:
            torch.load = previous


# ----- DCP .metadata -------------------------------------------------------------------------------------

# Modules whose classes may appear in a DCP .metadata pickle: DCP's metadata dataclasses and storage
# info. Only classes (dataclasses and enums) from these modules are admitted, never functions.
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                "torch.distributed.checkpoint._extension", "torch.distributed.checkpoint.planner")
# torch.Size, layouts (pickled as a call of torch.serialization._get_layout("torch.strided"), a lookup
# in a table of layouts) and the checkpoint id DCP records (a path).
_DCP_OTHER_NAMES = {("torch", "Size"), ("torch", "device"), ("collections", "OrderedDict"),
                    ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
                    ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                    ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath")}


class _DCPMetadataUnpickler(pickle.Unpickler):
    """Admits DCP metadata classes, torch.Size/dtype/layout/memory_format; refuses everything else."""

    def __init__(self, handle, path: Path):
        super().__init__(handle)
        self.path = path

    def find_class(self, module: str, name: str):
        dotted = f"{module}.{name}"
        if module in _DCP_MODULES:
            obj = _resolve(dotted)
            if isinstance(obj, type) and not issubclass(obj, BaseException):
                return obj
        elif (module, name) in _DCP_OTHER_NAMES:
            return _resolve(dotted) if module != "builtins" else getattr(__import__("builtins"), name)
        elif module == "torch":
            obj = getattr(torch, name, None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        raise CheckpointError(pickled_object_message(self.path, dotted))

    def persistent_load(self, pid):
        raise CheckpointError(f"{str(self.path)} is not DCP metadata (it references tensor storage)")


def safe_dcp_metadata(path: str | os.PathLike):
    """torch.distributed.checkpoint's `Metadata` from a `.metadata` file (or the folder holding it),
    read with a restricted unpickler (DCP itself unpickles it freely)."""
    path = Path(path)
    if path.is_dir():
        path = path / ".metadata"
    _check_exists(path)
    from torch.distributed.checkpoint.metadata import Metadata

    data = path.read_bytes()
    try:
        metadata = _DCPMetadataUnpickler(io.BytesIO(data), path).load()
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{str(path)} is truncated or not DCP metadata ({type(exc).__name__})") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{str(path)} is not DCP metadata (it holds a {type(metadata).__name__})")
    return metadata
