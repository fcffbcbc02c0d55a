# The production sharded head gives the same loss and gradients fused and unfused (1 process, 2 gloo ranks;
# 3 ranks with sampling: tests/distributed/test_partial_fc.py).
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.kernels.conftest import requires_kernels
from toolkit.heads.margin import Margin
from toolkit.heads.partial_fc import ShardedIdentityCenterHead

pytestmark = requires_kernels
ROWS_PER_RANK, DIM = 5, 16

# (classes, sample rate, inter-class filter, margin, fused path, unlabeled rows); 11 classes on 2 ranks: shards of
# 6 and 5. Unlabeled rows (label -1) are left out of the head's loss.
CASES = [
    (11, 1.0, 0.0, Margin(scale=64.0, m2=0.5, m3=0.0), "cosine", "some"),
    (11, 1.0, 0.0, Margin(scale=64.0, m2=0.5, m3=0.0), "linear", "some"),
    (11, 1.0, 0.2, Margin(scale=64.0, m3=0.4), "cosine", "some"),
    (11, 1.0, 0.2, Margin(scale=64.0, m3=0.4), "linear", "some"),
    (41, 0.3, 0.0, Margin(scale=32.0, m1=1.0, m2=0.3, m3=0.2), "cosine", "some"),
    (41, 0.3, 0.0, Margin(scale=32.0, m1=1.0, m2=0.3, m3=0.2), "linear", "some"),
    (11, 1.0, 0.0, Margin(scale=64.0, m3=0.4), "cosine", "none"),
    (11, 1.0, 0.0, Margin(scale=64.0, m3=0.4), "linear", "all"),
    # fused_linear sampling reads the kept rows in place (kernels' kept_S): most classes dropped, a filter
    (90, 0.2, 0.2, Margin(scale=64.0, m2=0.5, m3=0.0), "linear", "some"),
    (90, 0.3, 0.0, Margin(scale=64.0, m3=0.4), "linear", "none"),
]


def compare_heads(rank: int, world: int, group) -> list[dict]:
    """Reference head vs fused head on identical data, centers and class sampling, for every case."""
    results = []
    for case_index, (num_classes, sample_rate, interclass_filter, margin, path, unlabeled) in enumerate(CASES):
        gen = torch.Generator().manual_seed(case_index)
        emb_ND = torch.randn(world * ROWS_PER_RANK, DIM, generator=gen)
        centers_CD = torch.randn(num_classes, DIM, generator=gen)
        labels_N = torch.randint(0, num_classes, (world * ROWS_PER_RANK,), generator=gen)
        unlabeled_rows = {"none": slice(0, 0), "some": slice(None, None, 3), "all": slice(None)}[unlabeled]
        labels_N[unlabeled_rows] = -1
        outputs = []
        fused = {"cosine": "fused", "linear": "fused_linear"}[path]
        for implementation in ("reference", fused):  # the production head, unfused and fused
            head = ShardedIdentityCenterHead(num_classes, DIM, margin, rank=rank, world_size=world, group=group,
                                             sample_rate=sample_rate, interclass_filter=interclass_filter,
                                             implementation=implementation)
            assert head.implementation == implementation
            with torch.no_grad():
                head.centers_CD.copy_(centers_CD[head.shard.start:head.shard.end])
            emb_BD = emb_ND[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK].clone().requires_grad_(True)
            torch.manual_seed(100 + rank)  # the same class sampling for both heads
            loss = head(emb_BD, labels_N[rank * ROWS_PER_RANK:(rank + 1) * ROWS_PER_RANK])
            loss.backward()
            outputs.append((float(loss.detach()), emb_BD.grad, head.centers_CD.grad, head.last_sampled_classes))
        (ref_loss, ref_emb_grad, ref_centers_grad, ref_kept), (loss, emb_grad, centers_grad, kept) = outputs
        not_kept = torch.ones(centers_grad.shape[0], dtype=torch.bool)
        not_kept[kept - head.shard.start] = False
        relative = lambda got, want: float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))  # noqa: E731
        results.append({
            "case": case_index,
            "same_classes": bool(torch.equal(kept, ref_kept)),
            "loss_error": relative(torch.tensor(loss), torch.tensor(ref_loss)),
            "emb_error": relative(emb_grad, ref_emb_grad),
            "centers_error": relative(centers_grad, ref_centers_grad),
            "all_unlabeled_gives_zero": unlabeled != "all" or (loss == 0.0 and float(emb_grad.abs().max()) == 0.0),
            "sampled_out_rows_zero": bool((centers_grad[not_kept] == 0).all()),
            "sampled": bool(not_kept.any()),
        })
    return results


def _check(results: list[dict]) -> None:
    for r in results:
        assert r["same_classes"] and r["all_unlabeled_gives_zero"] and r["sampled_out_rows_zero"], r
        assert r["loss_error"] < 1e-5 and r["emb_error"] < 1e-5 and r["centers_error"] < 1e-5, r


def test_fused_head_equals_reference_head_on_one_process():
    results = compare_heads(0, 1, None)
    _check(results)
    assert [r["sampled"] for r in results] == [rate < 1 for _, rate, *_ in CASES]  # sampling did drop classes


def _worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        results[rank] = compare_heads(rank, world, dist.group.WORLD)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # over 3 s: full suite (CI) only, not the inner loop
def test_fused_head_equals_reference_head_on_two_ranks_with_uneven_shards(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    for rank in range(2):
        _check(results[rank])
