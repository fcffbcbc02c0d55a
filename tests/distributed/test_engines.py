# Every engine on 2 gloo ranks: same loss sequence as every other engine, and exact resume from a checkpoint.
"""For DDP, ZeRO-2 and FSDP2 the resumed job continues a preempted one: a stop signal reaches the job before
its first step (SIGTERM to rank 1 only, SIGTERM to torchrun, which forwards it; SIGUSR1 to every rank and
a second one during the save), every rank finishes the step in flight and saves it, the job exits with status
75, and the same command line with `--resume auto` continues from that checkpoint. The other engines resume
from the periodic checkpoint of step 5 with `--resume PATH`."""
import json
import os
import signal
import time

import pytest

from tests.distributed.conftest import (ENGINES, LIBRARY_NOISE, UNIMOCO, ZERO3_NO_PERSISTENCE, check_ok, forked_ranks,
                                        free_port, loss_curve, run_job, run_job_and_signal, torchrun, train_args,
                                        worker_pids)

pytestmark = pytest.mark.slow  # real multi-process jobs (seconds to a minute each)

# Resume only (a different objective, so not comparable with the others' losses): UniMoCo's queue and
# momentum encoder must survive DeepSpeed's and DCP's checkpoint formats.
RESUME_ONLY = {
    "zero3_unimoco": [*ZERO3_NO_PERSISTENCE, *UNIMOCO],
    "fsdp_unimoco": [*ENGINES["fsdp"], *UNIMOCO],
}
NUM_STEPS = 10  # 96 samples / global batch 16 = 6 steps per epoch; 1.65 epochs -> 10 steps
RESUME_STEP = 5
EXIT_PREEMPTED = 75


def _signal_rank_1(proc) -> None:
    os.kill(worker_pids(proc.pid)[1], signal.SIGTERM)


def _signal_launcher(proc) -> None:
    proc.send_signal(signal.SIGTERM)


def _signal_every_rank_twice(proc) -> None:
    pids = worker_pids(proc.pid)
    for pid in pids.values():
        os.kill(pid, signal.SIGUSR1)
    time.sleep(0.2)
    os.kill(pids[0], signal.SIGUSR1)


# Who gets the stop signal, per engine; sent when the job prints its shape, just before its first step.
PREEMPTED = {"ddp": ("SIGTERM", _signal_rank_1), "zero2": ("SIGTERM", _signal_launcher),
             "fsdp": ("SIGUSR1", _signal_every_rank_twice)}

# Started by torchrun itself (the others' ranks are forked from the rank server, conftest.forked_ranks): the
# stop-signal jobs (the signal goes to torchrun or to ranks it started) and ZeRO-2's uninterrupted job, whose
# console is checked for library noise, including what libraries print at import time.
BY_TORCHRUN = {"zero2"}


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
        start = torchrun if engine in BY_TORCHRUN else forked_ranks
        full = run_job(start(2, port), train_args(root, f"{engine}_full", *overrides), port=port)
        check_ok(full)
        runs = {"full": loss_curve(root / f"{engine}_full"), "stdout": full.stdout, "stderr": full.stderr}
        if engine in PREEMPTED:
            return {**runs, **self._preempted_then_resumed(engine, overrides)}
        checkpoint = root / f"{engine}_full" / "checkpoints" / f"step_{RESUME_STEP:08d}"  # a folder: one shard per rank
        port = free_port()
        resumed = run_job(forked_ranks(2, port), [*train_args(root, f"{engine}_resumed", *overrides),
                                              "--resume", str(checkpoint)], port=port)
        check_ok(resumed)
        return {**runs, "resumed": loss_curve(root / f"{engine}_resumed"), "resumed_stdout": resumed.stdout,
                "resume_step": RESUME_STEP}

    def _preempted_then_resumed(self, engine: str, overrides: list[str]) -> dict:
        """Stop the job with a signal before its first step, then run the same command with --resume auto."""
        args = [*train_args(self.root, f"{engine}_resumed", *overrides), "--resume", "auto"]
        port = free_port()
        stopped = run_job_and_signal(torchrun(2, port), args, port=port, when="global batch 16",
                                     send=PREEMPTED[engine][1])
        results = json.loads((self.root / f"{engine}_resumed" / "results.json").read_text())
        port = free_port()
        resumed = run_job(forked_ranks(2, port), args, port=port)
        check_ok(resumed)
        return {"resumed": loss_curve(self.root / f"{engine}_resumed"), "resumed_stdout": resumed.stdout,
                "resume_step": results["final_step"], "stopped": stopped, "stopped_results": results}


@pytest.fixture(scope="session")
def full_and_resumed(tmp_path_factory) -> EngineRuns:
    return EngineRuns(tmp_path_factory.mktemp("engines"))


@pytest.mark.parametrize("engine", [*ENGINES, *RESUME_ONLY])
def test_resume_gives_the_uninterrupted_losses(engine, full_and_resumed):
    runs = full_and_resumed(engine)
    resume_step = runs["resume_step"]
    assert sorted(runs["full"]) == list(range(1, NUM_STEPS + 1))
    assert "resumed from" in runs["resumed_stdout"] and f"at step {resume_step}" in runs["resumed_stdout"]
    for step in range(resume_step + 1, NUM_STEPS + 1):
        assert runs["resumed"][step] == pytest.approx(runs["full"][step], rel=0, abs=1e-6), (engine, step)


@pytest.mark.parametrize("engine", list(PREEMPTED))
def test_a_stop_signal_saves_the_step_in_flight_and_the_job_continues_from_it(engine, full_and_resumed):
    runs = full_and_resumed(engine)
    stopped, results, name = runs["stopped"], runs["stopped_results"], PREEMPTED[engine][0]
    assert stopped.signal_sent
    step = results["final_step"]
    assert 1 <= step < NUM_STEPS and results["stopped_by"] == name, (stopped.returncode, stopped.stderr[-3000:])
    assert f"stopped by {name} after step {step} of {NUM_STEPS}" in stopped.stdout
    saved = full_and_resumed.root / f"{engine}_resumed" / "checkpoints" / f"step_{step:08d}"
    assert f"checkpoint saved: {saved}" in stopped.stdout
    assert stopped.returncode != 0 and "Traceback" not in stopped.stdout
    # Both ranks took the same decision at the same step: its checkpoint is complete (both center shards).
    assert sorted(p.name for p in saved.glob("head_rank*.pt")) == ["head_rank00000.pt", "head_rank00001.pt"]
    assert f"resumed from {saved} at step {step}" in runs["resumed_stdout"]
    # The whole loss curve (the stopped part, carried in the checkpoint, and the resumed part) is the full run's.
    assert sorted(runs["resumed"]) == list(range(1, NUM_STEPS + 1))
    for index in range(1, NUM_STEPS + 1):
        assert runs["resumed"][index] == pytest.approx(runs["full"][index], rel=0, abs=1e-6), (engine, index)


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


def test_a_deepspeed_job_prints_no_known_library_noise(full_and_resumed):
    runs = full_and_resumed("zero2")
    assert runs["stderr"] == ""
    assert [text for text in LIBRARY_NOISE if text in runs["stdout"]] == []
    assert "step 10/10 | epoch" in runs["stdout"]   # the run's own lines are there


def test_every_engine_prints_the_whole_backbone_size(full_and_resumed):
    """ZeRO-3 and FSDP2 hold shards; the startup line counts the whole model (ZeRO-3 printed 0.00M)."""
    def size_line(stdout: str) -> str:
        return next(line for line in stdout.splitlines() if line.startswith("backbone ")).split(" | ")[0]

    reference = size_line(full_and_resumed("ddp")["stdout"])
    assert not reference.endswith(": 0.00M params")
    for engine in ("zero3", "fsdp"):
        assert size_line(full_and_resumed(engine)["stdout"]) == reference, engine
