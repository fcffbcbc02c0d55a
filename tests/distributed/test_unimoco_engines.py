# UniMoCo on 2 gloo ranks with every engine: the EMA equals its formula, and every rank holds the same queue.
import pytest
import torch

from tests.distributed.conftest import ENGINES as BASE_ENGINES
from tests.distributed.conftest import UNIMOCO, check_ok, forked_ranks, free_port, run_job, train_args

pytestmark = pytest.mark.slow  # real multi-process jobs (seconds to a minute each)

ENGINES = {
    **BASE_ENGINES,
    # Every parameter partitioned (none kept whole as "persistent"): the EMA runs on ds_tensor partitions.
    "zero3_partitioned": ["parallel.engine=deepspeed", "parallel.zero_stage=3",
                          "parallel.deepspeed_config=tests/distributed/zero3_no_persistence.yaml"],
}


@pytest.mark.parametrize("engine", list(ENGINES))
def test_momentum_update_and_queue_on_two_ranks(engine, dist_root, tmp_path):
    out = tmp_path / "probe.pt"
    port = free_port()
    args = [*train_args(dist_root, f"unimoco_{engine}", *ENGINES[engine], *UNIMOCO), "--out", str(out)]
    check_ok(run_job(forked_ranks(2, port), args, port=port, script="tests/distributed/unimoco_probe.py"))
    probe = torch.load(out, weights_only=True)
    m = probe["momentum"]
    assert m == pytest.approx(0.9)
    moved = 0
    for q0, k0, q1, k1 in zip(probe["query_before"], probe["key_before"], probe["query_after"], probe["key_after"]):
        assert torch.equal(q0, k0)                       # the key encoder starts as a copy
        torch.testing.assert_close(k1, m * k0 + (1 - m) * q1, rtol=0, atol=1e-6)
        moved += int(not torch.equal(q0, q1))
    assert moved > len(probe["query_before"]) // 2     # the optimizer did change the query encoder
    # Both ranks hold the same queue: 16 keys (2 ranks x 8) enqueued at the start, labels in rank order.
    labels_0, labels_1 = probe["queue_labels_per_rank"]
    keys_0, keys_1 = probe["queue_keys_per_rank"]
    assert torch.equal(labels_0, labels_1) and torch.equal(keys_0, keys_1)
    filled = labels_0[:16]
    assert int((filled >= 0).sum()) > 0 and bool((labels_0[16:] == -1).all())
    assert torch.allclose(keys_0[:16].norm(dim=1), torch.ones(16), atol=1e-5)
