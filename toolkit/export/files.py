# Output files of the converter: atomic writes, a streaming .safetensors writer, progress, sizes.
"""Writing large files without holding them in memory, and without ever leaving a half-written file.

`.safetensors` is an 8-byte little-endian header length, a JSON header (per tensor: dtype, shape, byte
range in the data section; plus `__metadata__`, a str -> str map) and the raw little-endian tensor bytes,
back to back. `__metadata__` holds `format: pt`, the value Hugging Face loaders (transformers, accelerate)
require there, and the toolkit's own keys each under the prefix `facecl_` (`facecl_format: consolidated`,
`facecl_backbone`, ...); files written before this convention (`format: facecl-consolidated`, keys without
prefix) are read as they are. Because the header only needs shapes and dtypes, it is written first and each
tensor is then streamed in row chunks: a 4.2 GB identity-center matrix never exists in memory. Rows of
memory-mapped inputs are dropped from memory after they are copied (`release_pages`), so the resident set
stays at a chunk, not at the size of the input.

Every output goes to a temporary file in the destination folder, is fsync'ed and renamed over the final
name: an interrupted conversion leaves no partial output.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from toolkit.checkpoint.files import umask_mode
from toolkit.errors import FaceCLError

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}
CHUNK_BYTES = 64 << 20      # rows copied per write: 64 MiB
PROGRESS_MIN_BYTES = 256 << 20


def human_bytes(num: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(num) < 1024 or unit == "TiB":
            return f"{num:.0f} {unit}" if unit == "B" else f"{num:.1f} {unit}"
        num /= 1024
    return f"{num} B"


def check_output_path(out: Path, overwrite: bool) -> None:
    """Refuse an existing output (unless overwrite) and an output folder that cannot be written."""
    if out.exists() and out.is_dir():
        raise FaceCLError(f"output {out} is a folder; give a file name")
    if out.exists() and not overwrite:
        raise FaceCLError(f"output {out} already exists; pass --overwrite to replace it")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise FaceCLError(f"output folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise FaceCLError(f"output folder {folder} is not writable")


def atomic_output(out: Path, write: Callable[[Path], None]) -> int:
    """write(temporary_path) in out's folder, fsync, rename to `out`; returns the final size in bytes."""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent)
    except OSError as exc:
        raise FaceCLError(f"cannot write into {out.parent} ({exc.strerror or exc})") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, umask_mode())
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise FaceCLError(f"writing {out} failed ({exc.strerror or exc})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out.stat().st_size


# ----- page release for memory-mapped inputs ---------------------------------------------------------------

_MADV_PAGEOUT = 21   # Linux >= 5.4: reclaim now, contents preserved (clean file pages are simply dropped)
_libc = None


def release_pages(tensor: torch.Tensor) -> None:
    """Ask the kernel to reclaim the resident pages of a memory-mapped tensor that has been copied out.

    torch.load(mmap=True) maps files privately; pages that were only read are clean and are read from
    the file again if touched. Without this, copying a 4 GB mapped shard would leave 4 GB resident.
    MADV_PAGEOUT never changes contents (unlike MADV_DONTNEED, which zeroes anonymous memory), so a
    tensor that is not file-backed is left as it is. A no-op where madvise or PAGEOUT is unavailable.
    """
    global _libc
    if not sys.platform.startswith("linux") or tensor.numel() == 0:
        return
    if _libc is None:
        try:
            _libc = ctypes.CDLL(None, use_errno=True)
        except OSError:
            _libc = False
    if not _libc:
        return
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    aligned_start = (start + page - 1) // page * page   # only whole pages inside the tensor
    aligned_end = end // page * page
    if aligned_end > aligned_start:
        _libc.madvise(ctypes.c_void_p(aligned_start), ctypes.c_size_t(aligned_end - aligned_start), _MADV_PAGEOUT)


# ----- streaming safetensors -------------------------------------------------------------------------------

@dataclass
class TensorEntry:
    """One output tensor: name, dtype, shape, and an iterator over its rows in order (contiguous chunks)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[torch.Tensor]]

    @property
    def nbytes(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count * torch.empty((), dtype=self.dtype).element_size()


def tensor_entry(name: str, tensor: torch.Tensor) -> TensorEntry:
    """An entry for an in-memory (or memory-mapped) tensor, streamed in row chunks."""
    return TensorEntry(name, tensor.dtype, tuple(tensor.shape), lambda t=tensor: row_chunks(t))


def row_chunks(tensor: torch.Tensor, chunk_bytes: int = CHUNK_BYTES, *, release: bool = False
               ) -> Iterator[torch.Tensor]:
    """Contiguous pieces of `tensor` along dim 0, each at most ~chunk_bytes; with `release` (memory-mapped
    sources) the pages of each piece are reclaimed once it has been written."""
    if tensor.dim() == 0 or tensor.numel() == 0:
        yield tensor.contiguous()
        return
    row_bytes = max(1, tensor[0].numel() * tensor.element_size())
    rows = max(1, chunk_bytes // row_bytes)
    for start in range(0, tensor.shape[0], rows):
        piece = tensor[start:start + rows]
        yield piece.contiguous()
        if release:
            release_pages(piece)


SAFETENSORS_FORMAT = "pt"      # __metadata__["format"] that Hugging Face loaders check for
METADATA_PREFIX = "facecl_"    # the toolkit's own __metadata__ keys, next to `format`


def file_metadata(metadata: dict[str, str]) -> dict[str, str]:
    """A .safetensors file's __metadata__ for the toolkit's string metadata: `format: pt`, every key under
    facecl_."""
    return {"format": SAFETENSORS_FORMAT, **{METADATA_PREFIX + str(k): str(v) for k, v in metadata.items()}}


def toolkit_metadata(stored: dict[str, str]) -> dict[str, str]:
    """The toolkit's string metadata from a .safetensors file's __metadata__: the facecl_ keys without their
    prefix; a file written before them (`format: facecl-consolidated`, bare keys) as it is."""
    if stored.get("format") != SAFETENSORS_FORMAT:
        return dict(stored)
    return {k[len(METADATA_PREFIX):]: v for k, v in stored.items() if k.startswith(METADATA_PREFIX)}


def _safetensors_header(entries: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": file_metadata(metadata)}
    offset = 0
    seen = set()
    for entry in entries:
        if entry.name in seen:
            raise ValueError(f"duplicate tensor name {entry.name!r}")
        seen.add(entry.name)
        if entry.dtype not in SAFETENSORS_DTYPES:
            raise FaceCLError(f"tensor {entry.name} has dtype {entry.dtype}, which .safetensors cannot hold")
        header[entry.name] = {"dtype": SAFETENSORS_DTYPES[entry.dtype], "shape": list(entry.shape),
                              "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)   # the data section starts 8-byte aligned
    return len(raw).to_bytes(8, "little") + raw


def write_safetensors(path: Path, entries: list[TensorEntry], metadata: dict[str, str],
                      progress: "Progress | None" = None) -> None:
    """Write `entries` to `path` (a fresh file) streaming each tensor's chunks after the header; `metadata`
    (the toolkit's keys) goes under facecl_ next to `format: pt` (file_metadata)."""
    with open(path, "wb") as handle:
        handle.write(_safetensors_header(entries, metadata))
        for entry in entries:
            written = 0
            for chunk in entry.chunks():
                if chunk.dtype != entry.dtype:
                    raise AssertionError(f"{entry.name}: chunk dtype {chunk.dtype} != {entry.dtype}")
                data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy() if chunk.numel() else b""
                handle.write(memoryview(data))
                written += chunk.numel() * chunk.element_size()
                if progress is not None:
                    progress.advance(chunk.numel() * chunk.element_size())
            if written != entry.nbytes:
                raise AssertionError(f"{entry.name}: wrote {written} bytes, header says {entry.nbytes}")


def read_safetensors_metadata(path: Path) -> dict[str, str]:
    """The toolkit's string metadata of a .safetensors file (toolkit_metadata), prefixes removed."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return toolkit_metadata(dict(handle.metadata() or {}))
    except Exception as exc:
        raise FaceCLError(f"{path} is not a readable .safetensors file ({str(exc).splitlines()[0][:120]})") from None


# ----- progress ------------------------------------------------------------------------------------------

class Progress:
    """A byte-counting progress bar on stderr for large conversions (quiet below PROGRESS_MIN_BYTES)."""

    def __init__(self, total_bytes: int, description: str, enabled: bool | None = None):
        if enabled is None:
            enabled = total_bytes >= PROGRESS_MIN_BYTES
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_bytes, desc=description, unit="B", unit_scale=True, unit_divisor=1024,
                            file=sys.stderr, mininterval=0.5, dynamic_ncols=True)

    def advance(self, num_bytes: int) -> None:
        if self.bar is not None:
            self.bar.update(num_bytes)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
