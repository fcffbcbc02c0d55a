# Output files: the streaming .safetensors writer against the safetensors library; page release keeps contents.
import pytest
import torch
from safetensors import safe_open

from toolkit.export.files import TensorEntry, release_pages, row_chunks, tensor_entry, write_safetensors


def test_streamed_safetensors_reads_back_with_the_library(tmp_path):
    big = torch.randn(1000, 37)
    ints = torch.arange(7, dtype=torch.int64)
    scalar = torch.tensor(3)
    bf = torch.randn(5, 3).bfloat16()
    entries = [TensorEntry("big", big.dtype, tuple(big.shape), lambda: row_chunks(big, chunk_bytes=1000)),
               tensor_entry("ints", ints), tensor_entry("scalar", scalar), tensor_entry("bf", bf)]
    path = tmp_path / "x.safetensors"
    write_safetensors(path, entries, {"step": "4", "backbone": "iresnet18"})
    with safe_open(str(path), framework="pt") as handle:
        # format: pt for Hugging Face loaders; the toolkit's keys under facecl_.
        assert handle.metadata() == {"format": "pt", "facecl_step": "4", "facecl_backbone": "iresnet18"}
        for name, value in {"big": big, "ints": ints, "scalar": scalar, "bf": bf}.items():
            assert torch.equal(handle.get_tensor(name), value)


def test_writer_refuses_a_short_stream(tmp_path):
    entry = TensorEntry("t", torch.float32, (4, 2), lambda: iter([torch.zeros(3, 2)]))
    with pytest.raises(AssertionError, match="wrote 24 bytes, header says 32"):
        write_safetensors(tmp_path / "y.safetensors", [entry], {})


def test_release_pages_never_changes_an_in_memory_tensor():
    tensor = torch.randn(4096, 1024)        # 16 MiB of anonymous memory: whole pages inside
    copy = tensor.clone()
    release_pages(tensor)
    assert torch.equal(tensor, copy)


def test_release_pages_keeps_memory_mapped_contents(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"w": torch.randn(2048, 1024)}, path)
    mapped = torch.load(path, mmap=True, weights_only=True)["w"]
    expected = torch.load(path, weights_only=True)["w"]
    pieces = list(row_chunks(mapped, chunk_bytes=1 << 20, release=True))
    assert torch.equal(torch.cat(pieces), expected) and torch.equal(mapped, expected)
