# The sharded head inside real jobs: resharding a checkpoint to other world sizes, and 2-rank training quality.
import json

import pytest
import torch

from tests.conftest import SMOKE_RECIPE
from tests.distributed.conftest import check_ok, forked_ranks, free_port, run_job, train_args
from toolkit.checkpoint import read_payload
from toolkit.heads.shard_checkpoint import gather_full_centers

pytestmark = pytest.mark.slow  # real multi-process jobs (seconds to a minute each)

# 13 classes: not divisible by 2 or 3, so the shards are uneven at every world size.
RESHARD = ["data.synthetic.num_identities=13", "train.num_epochs=1", "checkpoint.every_steps=3"]


@pytest.mark.parametrize("head_optimizer", ["sgd", "adamw"])
def test_checkpoint_saved_by_2_ranks_reshards_to_3_and_1(dist_root, tmp_path, head_optimizer):
    name = f"reshard_{head_optimizer}"
    overrides = [*RESHARD, "parallel.engine=ddp", f"head.optimizer={head_optimizer}"]
    port = free_port()
    check_ok(run_job(forked_ranks(2, port), train_args(dist_root, name, *overrides), port=port))
    checkpoint = dist_root / name / "checkpoints" / "step_00000003"
    saved = [read_payload(path) for path in sorted(checkpoint.glob("head_rank*.pt"))]
    assert [(s["class_start"], s["class_count"]) for s in saved] == [(0, 7), (7, 6)]
    expected_centers, expected_state = gather_full_centers(saved)
    state_keys = {"sgd": {"momentum_buffer"}, "adamw": {"exp_avg", "exp_avg_sq"}}[head_optimizer]
    assert set(expected_state) == state_keys

    for world in (3, 1):
        out = tmp_path / f"gathered_{world}.pt"
        engine = "parallel.engine=ddp" if world > 1 else "parallel.engine=single"
        args = [*train_args(dist_root, f"{name}_at{world}", *overrides, engine), "--resume", str(checkpoint),
                "--out", str(out)]
        port = free_port()
        launcher = forked_ranks(world if world > 1 else 0, port)   # 0: `python SCRIPT`
        check_ok(run_job(launcher, args, port=port, script="tests/distributed/reshard_probe.py"))
        gathered = torch.load(out, weights_only=True)
        expected_ranges = {3: [(0, 5), (5, 4), (9, 4)], 1: [(0, 13)]}[world]
        assert [tuple(r) for r in gathered["class_ranges"]] == expected_ranges
        assert torch.equal(gathered["centers"], expected_centers)
        assert set(gathered["state"]) == state_keys
        for key in state_keys:
            assert torch.equal(gathered["state"][key], expected_state[key]), key
        assert float(expected_state[next(iter(state_keys))].abs().sum()) > 0  # the state is not just zeros


@pytest.mark.slow
@pytest.mark.parametrize("engine", [["parallel.engine=deepspeed", "parallel.zero_stage=2"], ["parallel.engine=fsdp"]])
def test_two_rank_smoke_training_reaches_the_single_process_bar(tmp_path, engine):
    # The smoke recipe with the same global batch (2 x 32 = 64) and steps as the single-process main job.
    port = free_port()
    args = ["--recipe", str(SMOKE_RECIPE)]
    for item in [*engine, "data.batch_size=32", f"run.output_dir={tmp_path}", "data.num_workers=0"]:
        args += ["--set", item]
    proc = run_job(forked_ranks(2, port), args, port=port, timeout=600)
    check_ok(proc)
    results = json.loads((tmp_path / "smoke_synthetic" / "results.json").read_text())
    assert results["world_size"] == 2 and results["global_batch_size"] == 64
    assert results["final_verification"]["accuracy_mean"] >= 0.90, proc.stdout[-1500:]
