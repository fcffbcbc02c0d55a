# Divergence on every engine: non-finite steps are skipped and counted, the run stops with exit status 3,
# no checkpoint is written from non-finite weights, and results.json stays strict JSON.
import json
import math

import pytest
import torch

from tests.distributed.conftest import ENGINES as ALL_ENGINES
from tests.distributed.conftest import SINGLE, free_port, launcher, run_job, train_args

pytestmark = pytest.mark.slow  # real multi-process jobs (seconds to a minute each)

ENGINES = {"single": (1, SINGLE), **{name: (2, ALL_ENGINES[name]) for name in ("ddp", "zero2", "fsdp")}}
# lr 1e6: step 1 is finite, its update blows the weights up, and every later loss is nan.
DIVERGING = ["optim.lr=1e6", "schedule.warmup_steps=0", "checkpoint.every_steps=1", "checkpoint.keep_last=1"]


def _all_finite(path) -> bool:
    from toolkit.parallel.deepspeed_checkpoint import DEEPSPEED_GLOBALS
    from toolkit.serialization import safe_torch_load

    files = [path] if path.is_file() else sorted(path.rglob("*.pt"))
    tensors = []
    for file in files:
        stack = [safe_torch_load(file, extra_allowed=DEEPSPEED_GLOBALS)]
        while stack:
            item = stack.pop()
            if torch.is_tensor(item):
                tensors.append(item)
            elif isinstance(item, dict):
                stack.extend(item.values())
            elif isinstance(item, (list, tuple)):
                stack.extend(item)
    floating = [t for t in tensors if t.is_floating_point()]
    return bool(floating) and all(bool(torch.isfinite(t).all()) for t in floating)


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_diverging_run_stops_with_status_3_and_keeps_finite_checkpoints(engine, tmp_path):
    nproc, overrides = ENGINES[engine]
    port = free_port()
    proc = run_job(launcher(nproc, port), train_args(tmp_path, engine, *overrides, *DIVERGING,
                                                     "train.max_nonfinite_steps=3"), port=port)
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error")]
    assert len(errors) == 1, proc.stderr[-3000:]  # rank 0 speaks for all ranks
    assert errors[0].startswith("error: training diverged at step 4: the loss or gradients were not finite for 3 "
                                "consecutive steps"), errors
    assert "skipped on every part" in proc.stdout
    if nproc == 1:
        assert proc.returncode == 3
    checkpoints = tmp_path / engine / "checkpoints"
    kept = [p for p in checkpoints.iterdir() if p.name.startswith("step_")]
    assert len(kept) == 1, kept   # keep_last=1
    assert _all_finite(kept[0]), f"{kept[0]} holds non-finite values"
    # The run's own status is in results.json, whatever the launcher reports (torchrun: 1).
    results = json.loads((tmp_path / engine / "results.json").read_text())
    assert (results["status"], results["exit_status"], results["final_step"]) == ("diverged", 3, 3)
    assert results["message"].startswith("training diverged at step 4") and len(results["loss_curve"]) == 3


def test_skipped_steps_are_counted_and_results_json_is_strict(tmp_path):
    port = free_port()
    proc = run_job(launcher(1, port), train_args(tmp_path, "counted", "parallel.engine=single", *DIVERGING,
                                                 "train.max_nonfinite_steps=100"), port=port)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def refuse(constant):
        raise ValueError(f"non-strict JSON constant {constant}")

    results = json.loads((tmp_path / "counted" / "results.json").read_text(), parse_constant=refuse)
    steps = results["final_step"]
    assert results["nonfinite_steps"] == steps - 1 and results["skipped_steps"] == steps - 1
    assert results["has_nonfinite_values"] is True
    losses = [point["loss"] for point in results["loss_curve"]]
    assert math.isfinite(losses[0]) and all(value is None for value in losses[1:])
    # Every later step was skipped: the weights are those after step 1, finite, in every checkpoint.
    assert _all_finite(tmp_path / "counted" / "checkpoints" / f"step_{steps:08d}.pt")
