# Every engine on 2 gloo ranks: same loss sequence as every other engine, and exact resume from a checkpoint.
import pytest

from tests.distributed.conftest import (ENGINES, UNIMOCO, check_ok, free_port, loss_curve, run_job, torchrun,
                                        train_args)

pytestmark = pytest.mark.slow  # real multi-process jobs (seconds to a minute each)

# Resume only (a different objective, so not comparable with the others' losses): UniMoCo's queue and
# momentum encoder must survive DeepSpeed's and DCP's checkpoint formats.
RESUME_ONLY = {
    "zero3_unimoco": [*ENGINES["zero3"], *UNIMOCO,
                      "parallel.deepspeed_config=tests/distributed/zero3_no_persistence.yaml"],
    "fsdp_unimoco": [*ENGINES["fsdp"], *UNIMOCO],
}
NUM_STEPS = 10  # 96 samples / global batch 16 = 6 steps per epoch; 1.65 epochs -> 10 steps
RESUME_STEP = 5

class EngineRuns:
    """Each engine's uninterrupted 10-step job and its job resumed from step 5, run once per session on
    first use, whatever order the tests run in."""

    def __init__(self, root):
        self.root = root
        self.runs: dict[str, dict] = {}

    def __call__(self, engine: str) -> dict:
        if engine not in self.runs:
            self.runs[engine] = self._run(engine)
        return self.runs[engine]

    def _run(self, engine: str) -> dict:
        root, overrides = self.root, {**ENGINES, **RESUME_ONLY}[engine]
        port = free_port()
        full = run_job(torchrun(2, port), train_args(root, f"{engine}_full", *overrides), port=port)
        check_ok(full)
        checkpoint = root / f"{engine}_full" / "checkpoints" / f"step_{RESUME_STEP:08d}"  # a folder: one shard per rank
        port = free_port()
        resumed = run_job(torchrun(2, port), [*train_args(root, f"{engine}_resumed", *overrides),
                                              "--resume", str(checkpoint)], port=port)
        check_ok(resumed)
        return {"full": loss_curve(root / f"{engine}_full"), "resumed": loss_curve(root / f"{engine}_resumed"),
                "stdout": full.stdout, "resumed_stdout": resumed.stdout}


@pytest.fixture(scope="session")
def full_and_resumed(tmp_path_factory) -> EngineRuns:
    return EngineRuns(tmp_path_factory.mktemp("engines"))


@pytest.mark.parametrize("engine", [*ENGINES, *RESUME_ONLY])
def test_resume_gives_the_uninterrupted_losses(engine, full_and_resumed):
    runs = full_and_resumed(engine)
    assert sorted(runs["full"]) == list(range(1, NUM_STEPS + 1))
    assert "resumed from" in runs["resumed_stdout"] and f"at step {RESUME_STEP}" in runs["resumed_stdout"]
    for step in range(RESUME_STEP + 1, NUM_STEPS + 1):
        assert runs["resumed"][step] == pytest.approx(runs["full"][step], rel=0, abs=1e-6), (engine, step)


@pytest.mark.parametrize("engine", [e for e in ENGINES if e != "ddp"])
def test_engine_matches_ddp_loss_sequence(engine, full_and_resumed):
    reference = full_and_resumed("ddp")["full"]
    losses = full_and_resumed(engine)["full"]
    for step in range(1, NUM_STEPS + 1):
        assert losses[step] == pytest.approx(reference[step], rel=1e-5), (engine, step)
    # The sequence moves (training happens), so agreement is not agreement on a constant.
    assert abs(reference[NUM_STEPS] - reference[1]) > 0.1


def test_run_prints_the_data_parallel_shape(full_and_resumed):
    stdout = full_and_resumed("zero2")["stdout"]
    assert "engine deepspeed (ZeRO stage 2) | world size 2" in stdout
    assert "batch 8/rank x 2 ranks x 1 accumulation = global batch 16" in stdout
    config = (full_and_resumed.root / "zero2_full" / "deepspeed_config.json").read_text()
    assert '"train_batch_size": 16' in config and '"stage": 2' in config


def test_every_engine_prints_the_whole_backbone_size(full_and_resumed):
    """ZeRO-3 and FSDP2 hold shards; the startup line counts the whole model (ZeRO-3 printed 0.00M)."""
    def size_line(stdout: str) -> str:
        return next(line for line in stdout.splitlines() if line.startswith("backbone ")).split(" | ")[0]

    reference = size_line(full_and_resumed("ddp")["stdout"])
    assert not reference.endswith(": 0.00M params")
    for engine in ("zero3", "fsdp"):
        assert size_line(full_and_resumed(engine)["stdout"]) == reference, engine
