# Consolidation from every engine: registry keys, the trainer's parameters and centers at the save step, DeepSpeed's own merge.
import pytest
import torch
from safetensors import safe_open

from tests.export.conftest import SAVE_STEP, probed_run
from toolkit.export import consolidate, load_backbone
from toolkit.export.consolidate import ENCODER_EXTRA_PREFIXES, FORMAT_NAME, HEAD_KEY, METADATA_FORMAT
from toolkit.export.files import toolkit_metadata
from toolkit.models import create_backbone


def read_all(path):
    """(the toolkit's metadata, prefixes removed; every tensor) of a .safetensors file, read by the library."""
    with safe_open(str(path), framework="pt") as handle:
        stored = dict(handle.metadata())
        assert stored["format"] == "pt", stored
        return toolkit_metadata(stored), {key: handle.get_tensor(key) for key in handle.keys()}


def check_against_trainer(run, out, engine):
    result = consolidate(run.run_dir, out, with_head=True)
    metadata, tensors = read_all(out)
    model = create_backbone(metadata["backbone"], embedding_size=int(metadata["embedding_size"]),
                            input_size=int(metadata["image_size"]))
    backbone = {k: v for k, v in tensors.items() if k != HEAD_KEY}
    assert set(backbone) == set(model.state_dict())            # exactly the registry's keys
    model.load_state_dict(backbone, strict=True)
    trainer_backbone = {k[len("backbone."):] if k.startswith("backbone.") else k: v for k, v in run.state.items()
                        if not k.startswith(("projection.", "key_backbone.", "key_projection."))}
    for key, value in backbone.items():
        assert torch.equal(value, trainer_backbone[key].to(value.dtype)), (engine, key)
    assert torch.equal(tensors[HEAD_KEY], run.centers), engine
    assert metadata["format"] == METADATA_FORMAT and metadata["step"] == str(SAVE_STEP)
    assert metadata["input_normalisation"] == "rgb, (x - 127.5) / 127.5"
    assert metadata["num_classes"] == str(run.centers.shape[0]) and len(metadata["recipe_sha256"]) == 64
    assert result.num_bytes == out.stat().st_size
    return metadata, tensors


def test_single_process_checkpoint(single_run, tmp_path):
    metadata, _ = check_against_trainer(single_run, tmp_path / "single.safetensors", "single")
    assert metadata["engine"] == "single" and metadata["world_size"] == "1"


def test_pt_output_holds_the_same_tensors(single_run, tmp_path):
    consolidate(single_run.checkpoint, tmp_path / "a.safetensors", with_head=True)
    consolidate(single_run.checkpoint, tmp_path / "b.pt", with_head=True)
    _, st = read_all(tmp_path / "a.safetensors")
    payload = torch.load(tmp_path / "b.pt", weights_only=True)
    assert payload["format"] == FORMAT_NAME and set(payload["tensors"]) == set(st)
    assert all(torch.equal(payload["tensors"][k], v) for k, v in st.items())


def test_load_backbone_from_every_kind_of_path(single_run, tmp_path):
    out = tmp_path / "c.safetensors"
    consolidate(single_run.run_dir, out, with_head=True)
    x = torch.randn(3, 3, 16, 16)
    outputs = []
    for path in (single_run.run_dir, single_run.run_dir / "checkpoints", single_run.checkpoint, out):
        model, meta = load_backbone(path)
        assert not model.training
        assert {"backbone", "embedding_size", "image_size", "input_normalisation", "step"} <= set(meta)
        assert meta["step"] == SAVE_STEP and meta["image_size"] == 16 and meta["embedding_size"] == 32
        with torch.no_grad():
            outputs.append(model(x))
    assert all(torch.equal(o, outputs[0]) for o in outputs)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero0", "zero1", "zero2", "zero3", "fsdp"])
def test_every_engine_equals_the_trainer_at_the_save_step(engine, runs_root, tmp_path):
    metadata, _ = check_against_trainer(probed_run(engine, runs_root), tmp_path / f"{engine}.safetensors", engine)
    assert metadata["world_size"] == "2"


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2", "zero3"])
def test_zero_backbone_equals_deepspeeds_zero_to_fp32_bit_for_bit(engine, runs_root, tmp_path):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run = probed_run(engine, runs_root)
    consolidate(run.checkpoint, tmp_path / "z.safetensors")
    _, ours = read_all(tmp_path / "z.safetensors")
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(run.checkpoint), tag="deepspeed")
    params = {k: v for k, v in theirs.items() if "running_" not in k and "num_batches" not in k}
    assert params and set(params) <= set(ours)
    for key, value in params.items():
        assert value.dtype == ours[key].dtype and torch.equal(value, ours[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2_unimoco", "fsdp_unimoco", "single_unimoco"])
def test_unimoco_run_gives_the_query_backbone_and_optionally_the_key_encoder(engine, runs_root, tmp_path):
    run = probed_run(engine, runs_root)
    out = tmp_path / "u.safetensors"
    consolidate(run.run_dir, out, with_key_encoder=True)
    metadata, tensors = read_all(out)
    assert metadata["parts"] == "backbone,key_encoder"
    for key, value in tensors.items():
        for part, prefix in [("backbone", ""), *[(p, pre) for p, pre in ENCODER_EXTRA_PREFIXES.items()]]:
            if prefix and key.startswith(prefix):
                assert torch.equal(value, run.state[f"{part}.{key[len(prefix):]}"]), key
                break
        else:
            assert torch.equal(value, run.state[f"backbone.{key}"]), key
    model, _ = load_backbone(out)   # the extras are ignored
    assert set(model.state_dict()) == {k for k in tensors if not k.startswith("facecl_")}
