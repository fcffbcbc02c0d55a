# convert.py universal: DeepSpeed's universal checkpoint of a ZeRO-2/3 run holds the trainer's parameters; SGD is refused.
import shutil

import pytest
import torch

from tests.distributed.conftest import check_ok, forked_ranks, free_port, run_job, train_args
from tests.export.conftest import ENGINES, probed_run
from tests.export.test_bad_input import assert_user_error, convert
from toolkit.serialization import safe_torch_load


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2_adamw", "zero3_adamw"])
def test_universal_checkpoint_holds_the_trainers_parameters(engine, runs_root, tmp_path):
    run = probed_run(engine, runs_root)
    out = tmp_path / "universal"
    proc = convert("universal", run.run_dir, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out} (" in proc.stdout
    assert (out / "trainer.pt").read_bytes() == (run.checkpoint / "trainer.pt").read_bytes()
    assert sorted(p.name for p in out.glob("head_rank*.pt")) == ["head_rank00000.pt", "head_rank00001.pt"]
    checked = 0
    for name, value in run.state.items():
        folder = out / "deepspeed" / "zero" / name
        if "running_" in name or "num_batches" in name:
            continue
        saved = safe_torch_load(folder / "fp32.pt")
        saved = saved["param"] if isinstance(saved, dict) else saved
        assert torch.equal(saved.reshape(value.shape), value), name
        assert (folder / "exp_avg.pt").is_file() and (folder / "exp_avg_sq.pt").is_file()
        checked += 1
    assert checked > 100
    assert not list(tmp_path.glob(".*partial"))


@pytest.mark.slow
def test_universal_carries_sgd_momentum_and_refuses_other_engines(runs_root, tmp_path):
    """DeepSpeed 0.19.8's converter knows only Adam's state; SGD's momentum_buffer goes through it in exp_avg's
    place and comes out as momentum_buffer.pt, next to the exact fp32 weights."""
    run = probed_run("zero2", runs_root)   # SGD with momentum
    out = tmp_path / "u"
    proc = convert("universal", run.run_dir, "--out", out)
    assert proc.returncode == 0, proc.stderr
    assert "(momentum_buffer state)" in proc.stdout
    checked = 0
    for name, value in run.state.items():
        folder = out / "deepspeed" / "zero" / name
        if not (folder / "momentum_buffer.pt").is_file():
            continue
        saved = safe_torch_load(folder / "fp32.pt")
        assert torch.equal(saved["param"].reshape(value.shape), value), name
        momentum = safe_torch_load(folder / "momentum_buffer.pt")["param"]
        assert momentum.numel() == value.numel() and bool(momentum.abs().sum() > 0), name
        assert not (folder / "exp_avg.pt").exists() and not (folder / "exp_avg_sq.pt").exists()
        checked += 1
    assert checked > 50
    assert_user_error(convert("universal", probed_run("fsdp", runs_root).run_dir, "--out", tmp_path / "f"),
                      "written by the fsdp engine")
    assert not (tmp_path / "f").exists()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero2_adamw_unimoco", "zero3_adamw_unimoco"])
def test_resuming_a_universal_checkpoint_on_4_ranks_restores_the_whole_module(engine, runs_root, tmp_path):
    """DeepSpeed's universal loader restores only what the optimizer updates; batch-norm statistics and the
    frozen key encoder come from the converter's module_extras.pt. Saved by 2 ranks x 8, resumed by 4 x 4 (the
    UniMoCo queue needs a global batch that divides it): every parameter and buffer equals what the 2-rank
    trainer held at the save step, and under ZeRO-3 every rank's partition is its slice of that value."""
    run = probed_run(engine, runs_root)
    out = tmp_path / "universal"
    assert convert("universal", run.run_dir, "--out", out).returncode == 0
    extras = safe_torch_load(out / "deepspeed" / "module_extras.pt")
    assert any("running_mean" in name for name in extras) and any(name.startswith("key_") for name in extras)
    port = free_port()
    probe = tmp_path / "resumed.pt"
    proc = run_job(forked_ranks(4, port), [*train_args(tmp_path, "resumed", *ENGINES[engine], "data.batch_size=4"),
                                       "--resume", str(out),
                                       "--steps", "0", "--out", str(probe)], port=port,
                   script="tests/export/save_probe.py")
    check_ok(proc)
    resumed = torch.load(probe, weights_only=True)
    assert sorted(resumed["state"]) == sorted(run.state)
    differ = [name for name, value in run.state.items() if not torch.equal(resumed["state"][name], value)]
    assert differ == []
    assert resumed["partition_mismatches"] == []
    # A fresh model's running variances are ones: the saved ones moved, so equality is not with a fresh start.
    assert not any(torch.equal(value, torch.ones_like(value)) for name, value in run.state.items()
                   if name.endswith("running_var"))


@pytest.mark.slow
@pytest.mark.parametrize("new_world", [1, 3])
def test_the_flagship_settings_resume_at_another_world_size(new_world, runs_root, tmp_path):
    """iresnet + SGD momentum + ZeRO-2 + bf16 + Partial FC 0.2, saved by 2 ranks: `--resume` on 1 and 3 ranks
    converts the checkpoint by itself (SGD's momentum carried through DeepSpeed's universal format) and the
    trainer then holds exactly the saved weights, batch-norm statistics and identity centers. (Losses cannot be
    compared with the 2-rank run here: batch norm and the sampled negative classes depend on the split.)"""
    run = probed_run("flagship", runs_root)
    port = free_port()
    probe = tmp_path / "resumed.pt"
    proc = run_job(forked_ranks(new_world, port), [*train_args(tmp_path, "resumed", *ENGINES["flagship"]),
                                               "--resume", str(run.checkpoint), "--steps", "0", "--out", str(probe)],
                   port=port, script="tests/export/save_probe.py")
    check_ok(proc)
    resumed = torch.load(probe, weights_only=True)
    assert sorted(resumed["state"]) == sorted(run.state)
    assert [name for name, value in run.state.items() if not torch.equal(resumed["state"][name], value)] == []
    assert torch.equal(resumed["centers"], run.centers)
    converted = tmp_path / "resumed" / "checkpoints" / f"{run.checkpoint.name}.universal"
    momentum = [safe_torch_load(p)["param"] for p in sorted((converted / "deepspeed" / "zero").glob("*/momentum_buffer.pt"))]
    assert len(momentum) > 20 and all(bool(m.abs().sum() > 0) for m in momentum[:5])


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["zero1", "zero2_adamw", "zero3_adamw"])
def test_every_reader_reads_a_universal_folder(engine, runs_root, tmp_path):
    """What the converter writes is read by inspect (complete, labelled with its ZeRO stage), consolidate and
    export (the trainer's weights exactly: ZeRO-3 stores them flat), load_backbone (what evaluate uses) and
    init_from; a step folder moved out of its run folder keeps its label (the stage is read from the files)."""
    from toolkit.export import consolidate, load_backbone
    from toolkit.export.init_from import load_init_state
    from toolkit.export.inspect import inspect_path

    run = probed_run(engine, runs_root)
    stage = {"zero1": 1, "zero2_adamw": 2, "zero3_adamw": 3}[engine]
    out = tmp_path / "universal"
    assert convert("universal", run.run_dir, "--out", out).returncode == 0
    report = inspect_path(out, checksums=True)
    assert report["complete"], report["problems"]
    assert report["sharding"] == f"DeepSpeed ZeRO-{stage} (universal: any world size)"
    moved = tmp_path / "moved_step"
    shutil.copytree(run.checkpoint, moved)
    assert inspect_path(moved)["sharding"] == f"DeepSpeed ZeRO-{stage}"
    result = consolidate(out, tmp_path / "backbone.safetensors", with_head=True)
    from safetensors.torch import load_file

    tensors = load_file(tmp_path / "backbone.safetensors")
    model, meta = load_backbone(out)
    state, centers = load_init_state(out, backbone=meta["backbone"], embedding_size=meta["embedding_size"],
                                     image_size=meta["image_size"])
    for name, value in model.state_dict().items():
        expected = run.state[name]
        assert torch.equal(tensors[name], expected.float() if expected.is_floating_point() else expected), name
        assert torch.equal(value.to(expected.dtype), expected) and torch.equal(state[name].to(expected.dtype), expected)
    assert torch.equal(centers, run.centers) and result.metadata["zero_stage"] == str(stage)
