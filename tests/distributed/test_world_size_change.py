# Resume a 2-rank checkpoint on 1 and 3 ranks at the same global batch: the losses continue as the 2-rank run's.
"""The backbone is tests/distributed/norm_free_train.py's per-sample-normalised net (batch norm would make the
losses depend on how the global batch is split). Global batch 12 = 6 x 2 = 12 x 1 = 4 x 3. What carries over
exactly: weights and optimizer state (DCP reshards), the center shards (resharded by class range), the
schedule, and the data position (same global batch: sample for sample). Per-rank random state does not (the
run says so); this recipe uses none after the checkpoint (no dropout, sample rate 1).
"""
import pytest

from tests.distributed.conftest import check_ok, free_port, loss_curve, run_job, torchrun, train_args

pytestmark = pytest.mark.slow  # real multi-process jobs

SAVE_STEP, NUM_STEPS, GLOBAL_BATCH = 5, 10, 12
COMMON = ["model.backbone=test_layernorm_net", "data.synthetic.samples_per_identity=10", "train.num_epochs=1",
          "checkpoint.every_steps=5", "optim.name=adamw", "optim.lr=0.002", "optim.weight_decay=0.05"]
SCRIPT = "tests/distributed/norm_free_train.py"
ENGINES = {"ddp": ["parallel.engine=ddp"], "fsdp": ["parallel.engine=fsdp"]}


def job(root, name: str, world: int, engine: str, *cli: str):
    port = free_port()
    overrides = [*COMMON, *ENGINES[engine], f"data.batch_size={GLOBAL_BATCH // world}"]
    proc = run_job(torchrun(world, port), [*train_args(root, name, *overrides), *cli], port=port, script=SCRIPT)
    check_ok(proc)
    return proc


def two_rank_curve(root, engine: str) -> dict[int, float]:
    job(root, f"{engine}_w2", 2, engine)
    return loss_curve(root / f"{engine}_w2")


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("world_size_change")
    return root, {engine: two_rank_curve(root, engine) for engine in ENGINES}


@pytest.mark.parametrize("engine", list(ENGINES))
@pytest.mark.parametrize("new_world", [1, 3])
def test_resume_at_another_world_size_continues_the_losses(engine, new_world, two_rank_runs):
    root, runs = two_rank_runs
    full = runs[engine]
    assert sorted(full) == list(range(1, NUM_STEPS + 1))
    checkpoint = root / f"{engine}_w2" / "checkpoints" / f"step_{SAVE_STEP:08d}"
    proc = job(root, f"{engine}_w{new_world}", new_world, engine, "--resume", str(checkpoint))
    assert f"written by 2 ranks, this job has {new_world}" in proc.stdout
    assert "the data continues sample for sample (same global batch)" in proc.stdout
    resumed = loss_curve(root / f"{engine}_w{new_world}")
    worst = max(abs(resumed[step] / full[step] - 1) for step in range(SAVE_STEP + 1, NUM_STEPS + 1))
    print(f"\n{engine} 2 -> {new_world} ranks: largest relative loss difference over steps 6-10 {worst:.2e}")
    for step in range(SAVE_STEP + 1, NUM_STEPS + 1):
        assert resumed[step] == pytest.approx(full[step], rel=1e-5, abs=0), (engine, new_world, step)
    # The losses move, so agreement is not agreement on a constant.
    assert abs(full[NUM_STEPS] - full[SAVE_STEP + 1]) > 1e-3
