# .safetensors metadata: `format: pt` for Hugging Face loaders, the toolkit's keys under facecl_, old files still read.
"""Every .safetensors the toolkit writes (consolidate, save_consolidated, export) carries `format: pt`, the value
Hugging Face loaders require, and its own keys under `facecl_`; files written before (`format:
facecl-consolidated`, bare keys) still load. transformers' and accelerate's loaders are used when installed;
without them the test checks the key they check."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from toolkit.errors import CheckpointError
from toolkit.export import load_backbone
from toolkit.export.consolidate import FORMAT_NAME, METADATA_FORMAT, save_consolidated
from toolkit.export.deploy import export_model
from toolkit.export.load import read_consolidated
from toolkit.models import create_backbone

BACKBONE = "mobilefacenet"
MODEL_CONFIG = {"backbone": BACKBONE, "embedding_size": 512, "image_size": 112}


def stored_metadata(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


def hugging_face_loaders() -> dict:
    """The state-dict loaders of transformers and accelerate that are installed (they refuse a file whose
    metadata `format` is not pt)."""
    loaders = {}
    try:
        from transformers.modeling_utils import load_state_dict as transformers_load
        loaders["transformers"] = transformers_load
    except ImportError:
        pass
    try:
        from accelerate.utils.modeling import load_state_dict as accelerate_load
        loaders["accelerate"] = accelerate_load
    except ImportError:
        pass
    return loaders


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(BACKBONE).eval()


@pytest.fixture(scope="module")
def written_files(model, tmp_path_factory) -> dict:
    """A consolidated file (with a center matrix) and the export of it, both written by the toolkit."""
    folder = tmp_path_factory.mktemp("written")
    consolidated = folder / "consolidated.safetensors"
    save_consolidated(consolidated, model, MODEL_CONFIG, step=7, num_classes=10, head_centers=torch.randn(10, 512))
    exported = folder / "exported.safetensors"
    export_model(consolidated, "safetensors", exported)
    return {"consolidated": consolidated, "exported": exported}


@pytest.mark.parametrize("kind", ["consolidated", "exported"])
def test_written_files_say_format_pt_and_keep_the_toolkit_keys_under_facecl(written_files, kind):
    stored = stored_metadata(written_files[kind])
    assert stored["format"] == "pt"
    assert stored["facecl_format"] == METADATA_FORMAT and stored["facecl_backbone"] == BACKBONE
    assert stored["facecl_step"] == "7"
    assert all(key == "format" or key.startswith("facecl_") for key in stored), sorted(stored)


@pytest.mark.parametrize("kind", ["consolidated", "exported"])
def test_safetensors_load_file_reads_the_backbone(written_files, model, kind):
    state = load_file(str(written_files[kind]))
    for key, value in model.state_dict().items():
        assert torch.equal(state[key], value.float()), key


@pytest.mark.parametrize("kind", ["consolidated", "exported"])
def test_hugging_face_loaders_take_the_file(written_files, model, kind):
    path = written_files[kind]
    loaders = hugging_face_loaders()
    if not loaders:   # neither transformers nor accelerate in this environment: the key both check
        assert stored_metadata(path)["format"] == "pt"
    for name, load in loaders.items():
        state = load(str(path))
        for key, value in model.state_dict().items():
            assert torch.equal(state[key], value.float()), (name, key)


@pytest.mark.parametrize("kind", ["consolidated", "exported"])
def test_the_toolkit_reads_its_files_back(written_files, model, kind):
    loaded, meta = load_backbone(written_files[kind])
    assert (meta["backbone"], meta["embedding_size"], meta["image_size"], meta["step"]) == (BACKBONE, 512, 112, 7)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    metadata, _ = read_consolidated(written_files[kind], extras=False)
    assert metadata["format"] == METADATA_FORMAT and metadata["backbone"] == BACKBONE


def write_the_old_way(path, model) -> None:
    """A consolidated file as the toolkit wrote it before facecl_ keys: `format: facecl-consolidated`, bare keys."""
    metadata = {"format": FORMAT_NAME, "format_version": "1", "backbone": BACKBONE, "embedding_size": "512",
                "image_size": "112", "input_normalisation": "rgb, (x - 127.5) / 127.5", "step": "5",
                "recipe_sha256": "", "num_classes": "", "engine": "single", "world_size": "1", "parts": "backbone"}
    save_file({key: value.float().contiguous() for key, value in model.state_dict().items()}, str(path), metadata)


def test_a_file_written_before_format_pt_still_loads(model, tmp_path):
    old = tmp_path / "old.safetensors"
    write_the_old_way(old, model)
    loaded, meta = load_backbone(old)
    assert (meta["backbone"], meta["step"], meta["engine"]) == (BACKBONE, 5, "single")
    images = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))
    metadata, _ = read_consolidated(old)
    assert metadata["format"] == FORMAT_NAME


def test_exporting_an_old_file_writes_format_pt(model, tmp_path):
    old = tmp_path / "old.safetensors"
    write_the_old_way(old, model)
    export_model(old, "safetensors", tmp_path / "new.safetensors")
    stored = stored_metadata(tmp_path / "new.safetensors")
    assert stored["format"] == "pt" and stored["facecl_backbone"] == BACKBONE and stored["facecl_step"] == "5"


def test_an_old_pt_file_still_loads(model, tmp_path):
    old = tmp_path / "old.pt"
    metadata = {"format": FORMAT_NAME, "format_version": "1", **{k: str(v) for k, v in MODEL_CONFIG.items()},
                "step": "2"}
    torch.save({"format": FORMAT_NAME, "format_version": 1, "metadata": metadata,
                "tensors": {k: v.float() for k, v in model.state_dict().items()}}, old)
    _, meta = load_backbone(old)
    assert (meta["backbone"], meta["step"]) == (BACKBONE, 2)


def test_another_tools_safetensors_is_refused_in_one_line_naming_it(model, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({key: value.float().contiguous() for key, value in model.state_dict().items()}, str(foreign),
              {"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        load_backbone(foreign)
    message = str(info.value)
    assert "\n" not in message and str(foreign) in message and "not a FaceCL consolidated file" in message, message
