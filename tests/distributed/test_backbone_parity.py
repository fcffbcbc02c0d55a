# The new backbones under 2-rank FSDP2 and ZeRO-3 (blocks sharded, checkpointed) match one process; ViT runs resume exactly.
import json

import pytest

from tests.distributed.conftest import check_ok, forked_ranks, free_port, loss_curve, run_job, train_args

PROBE = "tests/distributed/backbone_parity_probe.py"
# fp32 on CPU: the sharded runs sum gradients in another order than the single process, nothing else.
LOSS_RTOL = 1e-5
PARAM_ATOL = 1e-5

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("backbone", ["vit_t", "mobilefacenet_large"])
@pytest.mark.parametrize("engine", ["fsdp", "zero3"])
def test_sharded_training_matches_one_process(engine, backbone, tmp_path):
    out = tmp_path / "result.json"
    port = free_port()
    proc = run_job(forked_ranks(2, port), ["--engine", engine, "--backbone", backbone, "--steps", "3", "--out", str(out)],
                   port=port, script=PROBE)
    check_ok(proc)
    result = json.loads(out.read_text())
    print(f"\n{engine} {backbone}: losses {result['losses']} vs {result['reference_losses']}; "
          f"max parameter difference {result['max_param_diff']:.2e} (largest change {result['max_param_change']:.2e})")
    assert result["losses"] == pytest.approx(result["reference_losses"], rel=LOSS_RTOL)
    assert result["max_param_diff"] < PARAM_ATOL
    # Training moved the weights far more than the tolerance: agreement is not agreement on a constant.
    assert result["max_param_change"] > 100 * PARAM_ATOL


VIT_OVERRIDES = ["model.backbone=vit_t", "model.patch_size=4", "model.mask_ratio=0.25", "model.drop_path=0.1",
                 "model.activation_checkpointing=true", "optim.name=adamw", "optim.lr=0.001"]
NUM_STEPS = 10  # see tests/distributed/test_engines.py: 1.65 epochs of the small synthetic set
RESUME_STEP = 5


@pytest.mark.parametrize("engine", [["parallel.engine=fsdp"], ["parallel.engine=deepspeed", "parallel.zero_stage=3"]],
                         ids=["fsdp", "zero3"])
def test_vit_resume_gives_the_uninterrupted_losses(engine, tmp_path):
    """Masking and drop path draw random numbers each step: a resumed run must draw the same ones."""
    overrides = [*VIT_OVERRIDES, *engine]
    port = free_port()
    check_ok(run_job(forked_ranks(2, port), train_args(tmp_path, "full", *overrides), port=port))
    checkpoint = tmp_path / "full" / "checkpoints" / f"step_{RESUME_STEP:08d}"
    port = free_port()
    check_ok(run_job(forked_ranks(2, port), [*train_args(tmp_path, "resumed", *overrides), "--resume", str(checkpoint)],
                     port=port))
    full, resumed = loss_curve(tmp_path / "full"), loss_curve(tmp_path / "resumed")
    assert sorted(full) == list(range(1, NUM_STEPS + 1))
    for step in range(RESUME_STEP + 1, NUM_STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], rel=0, abs=1e-6), step
