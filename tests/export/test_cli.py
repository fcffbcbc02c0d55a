# convert.py for people and scripts: inspect table / JSON, where each subcommand wrote and how big, progress bar.
import json

import pytest
import torch

from tests.export.conftest import SAVE_STEP
from tests.export.test_bad_input import convert
from toolkit.export import consolidate


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_inspect_table_and_json(single_run):
    table = convert("inspect", single_run.run_dir)
    assert table.returncode == 0, table.stderr
    for fragment in ("engine", "none (one process)", "world size", "step", str(SAVE_STEP), "mobilefacenet",
                     "bytes: backbone", "bytes: optimizer state", "bytes: center shards", "bytes: trainer state",
                     "complete"):
        assert fragment in table.stdout, fragment
    info = json.loads(convert("inspect", single_run.run_dir, "--json", "--checksums").stdout)
    assert info["complete"] is True and info["problems"] == []
    assert info["checksums"]["files"] == 1 and info["checksums"]["zip_records"] > 10   # what --checksums verified
    table = convert("inspect", single_run.run_dir, "--checksums").stdout
    assert f"{info['checksums']['zip_records']} zip records in 1 files verified: no problem(s)" in table
    assert (info["engine"], info["world_size"], info["step"]) == ("single", 1, SAVE_STEP)
    assert (info["backbone"], info["embedding_size"], info["image_size"], info["num_classes"]) == \
        ("mobilefacenet", 32, 16, single_run.centers.shape[0])
    assert info["precision"] == "fp32"
    # centers plus their optimizer rows (SGD momentum: one more C x D)
    assert info["bytes"]["center_shards"] == 2 * single_run.centers.numel() * 4


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_consolidate_and_export_say_where_and_how_big(single_run, tmp_path):
    out = tmp_path / "c.safetensors"
    proc = convert("consolidate", single_run.run_dir, "--out", out, "--with-head")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out} (" in proc.stdout and "MiB)" in proc.stdout and "backbone, head" in proc.stdout
    info = json.loads(convert("inspect", out, "--json").stdout)
    assert info["kind"] == "consolidated" and info["step"] == SAVE_STEP and info["file_bytes"] == out.stat().st_size
    onnx_out = tmp_path / "m.onnx"
    proc = convert("export", out, "--format", "onnx", "--out", onnx_out)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {onnx_out} (" in proc.stdout and "opset 17" in proc.stdout and "(x - 127.5) / 127.5" in proc.stdout


def test_progress_bar_for_large_conversions(single_run, tmp_path, capsys):
    consolidate(single_run.run_dir, tmp_path / "p.safetensors", with_head=True, progress=True)
    err = capsys.readouterr().err
    assert "consolidate -> p.safetensors" in err and "100%" in err
    consolidate(single_run.run_dir, tmp_path / "q.safetensors", with_head=True)   # small: no bar by default
    assert "consolidate ->" not in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["ddp", "zero1", "zero3", "fsdp"])
def test_inspect_every_engine(engine, runs_root):
    from tests.export.conftest import probed_run

    run = probed_run(engine, runs_root)
    info = json.loads(convert("inspect", run.run_dir, "--json", "--checksums").stdout)
    assert info["complete"] is True, info["problems"]
    assert info["world_size"] == 2 and info["step"] == SAVE_STEP
    expected = {"ddp": "DDP", "zero1": "DeepSpeed ZeRO-1", "zero3": "DeepSpeed ZeRO-3", "fsdp": "FSDP2"}[engine]
    assert info["sharding"].startswith(expected)
    backbone_bytes = sum(v.numel() * v.element_size() for v in run.state.values())
    if engine != "fsdp":   # DCP counts its own serialised entries
        assert info["bytes"]["backbone"] == backbone_bytes
    assert info["bytes"]["optimizer_state"] > 0 and info["bytes"]["center_shards"] > 0


@pytest.mark.slow
def test_onnx_export_counts_the_folded_batch_norms_and_warns_about_insightfaces_input_rule(single_run, tmp_path):
    """The 16 x 16 test model: insightface's model zoo routes square inputs >= 112 and multiple of 16 only."""
    from toolkit.export import load_backbone

    model, _ = load_backbone(single_run.run_dir)
    num_bn = sum(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    out = tmp_path / "m.onnx"
    proc = convert("export", single_run.run_dir, "--format", "onnx", "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f"{num_bn} batch norms of the model folded: " in proc.stdout and num_bn > 10, proc.stdout
    assert "warning: insightface's model zoo loads recognition models of square inputs of at least 112 pixels" \
        in proc.stdout and "takes 16 x 16" in proc.stdout
