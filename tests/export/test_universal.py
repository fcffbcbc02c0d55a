# convert.py universal: DeepSpeed's universal checkpoint of a ZeRO-2/3 run holds the trainer's parameters; SGD is refused.
import pytest
import torch

from tests.export.conftest import probed_run
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
def test_universal_refuses_sgd_state_and_other_engines(runs_root, tmp_path):
    assert_user_error(convert("universal", probed_run("zero2", runs_root).run_dir, "--out", tmp_path / "u"),
                      "Adam-family optimizer state", "momentum_buffer")
    assert_user_error(convert("universal", probed_run("fsdp", runs_root).run_dir, "--out", tmp_path / "u"),
                      "written by the fsdp engine")
    assert not (tmp_path / "u").exists()
