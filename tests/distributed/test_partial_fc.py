# Sharded identity-center layer on 1, 2 and 3 gloo ranks against the single-process full-softmax reference.

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from toolkit.heads import Margin, margin_softmax_ce_reference
from toolkit.heads.partial_fc import ShardedIdentityCenterHead, shard_range

pytestmark = pytest.mark.slow  # real multi-process jobs (seconds to a minute each)

B, D = 4, 16  # rows per rank, embedding size


def _case_tensors(world: int, num_classes: int, seed: int):
    """Identical on every rank: full embeddings (W*B x D), labels with repeats and shard boundaries, centers."""
    gen = torch.Generator().manual_seed(seed)
    emb_ND = torch.randn(world * B, D, generator=gen)
    centers_CD = torch.randn(num_classes, D, generator=gen)
    boundaries = [shard_range(num_classes, world, r).start for r in range(world)]
    boundaries += [shard_range(num_classes, world, r).end - 1 for r in range(world)]
    labels_N = torch.randint(0, num_classes, (world * B,), generator=gen)
    labels_N[: len(boundaries)] = torch.tensor(boundaries)   # labels on both sides of every shard boundary
    labels_N[-1] = labels_N[-2]                               # a repeated label
    return emb_ND, centers_CD, labels_N


def _worker(rank, world, init_file, num_classes, sample_rate, interclass_filter, margin, implementation, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        emb_ND, centers_CD, labels_N = _case_tensors(world, num_classes, seed=7)
        shard = shard_range(num_classes, world, rank)
        head = ShardedIdentityCenterHead(num_classes, D, margin, rank=rank, world_size=world,
                                         group=dist.group.WORLD, sample_rate=sample_rate,
                                         interclass_filter=interclass_filter, implementation=implementation)
        with torch.no_grad():
            head.centers_CD.copy_(centers_CD[shard.start:shard.end])
        torch.manual_seed(100 + rank)  # the sampling draws differ per rank, as in a real job
        emb_BD = emb_ND[rank * B:(rank + 1) * B].clone().requires_grad_(True)
        loss = head(emb_BD, labels_N[rank * B:(rank + 1) * B])
        loss.backward()

        # Reference on one process: the same rows against the classes every rank kept.
        kept = [torch.empty(0, dtype=torch.long)] * world
        dist.all_gather_object(kept, head.last_sampled_classes)
        kept_K = torch.cat(kept)
        ref_emb = emb_ND.clone().requires_grad_(True)
        ref_centers = centers_CD.clone().requires_grad_(True)
        position = torch.full((num_classes,), -1, dtype=torch.long)
        position[kept_K] = torch.arange(kept_K.numel())
        assert bool((position[labels_N] >= 0).all()), "a positive class was not kept"
        if interclass_filter > 0:
            ref_loss = _filtered_reference(ref_emb, ref_centers[kept_K], position[labels_N], margin, interclass_filter)
        else:
            ref_loss = margin_softmax_ce_reference(ref_emb, ref_centers[kept_K], position[labels_N], margin)
        ref_loss.backward()
        results[rank] = {
            "loss": (float(loss), float(ref_loss)),
            "emb_err": float((emb_BD.grad - ref_emb.grad[rank * B:(rank + 1) * B]).abs().max()),
            "centers_err": float((head.centers_CD.grad - ref_centers.grad[shard.start:shard.end]).abs().max()),
            "emb_grad_scale": float(ref_emb.grad.abs().max()),
            "num_kept": int(kept_K.numel()),
        }
    finally:
        dist.destroy_process_group()


def _filtered_reference(emb, centers, labels, margin, threshold):
    """Plain-PyTorch inter-class filtering: zero negative cosines above the threshold, then margin softmax."""
    cos = torch.nn.functional.normalize(emb, dim=1) @ torch.nn.functional.normalize(centers, dim=1).t()
    target_mask = torch.zeros_like(cos, dtype=torch.bool)
    target_mask[torch.arange(len(labels)), labels] = True
    cos = torch.where((cos.detach() > threshold) & ~target_mask, torch.zeros_like(cos), cos)
    from toolkit.heads.margin import margin_logits

    return torch.nn.functional.cross_entropy(margin_logits(cos, labels, margin), labels)


def run_case(tmp_path, world, num_classes, sample_rate=1.0, interclass_filter=0.0, margin=None,
             implementation="reference"):
    margin = margin or Margin(scale=16.0, m1=1.0, m2=0.3, m3=0.1)
    results = mp.Manager().dict()
    init_file = tmp_path / f"init_{world}_{num_classes}_{sample_rate}_{implementation}"
    mp.spawn(_worker, args=(world, str(init_file), num_classes, sample_rate, interclass_filter, margin,
                            implementation, results), nprocs=world, join=True)
    return [results[r] for r in range(world)]


@pytest.mark.parametrize("world,num_classes", [(1, 10), (2, 10), (2, 11), (3, 11), (3, 20)])
def test_full_softmax_equals_single_process_reference(tmp_path, world, num_classes):
    results = run_case(tmp_path, world, num_classes)
    losses = {round(r["loss"][0], 6) for r in results}
    assert len(losses) == 1, "every rank must report the same loss"
    for r in results:
        assert abs(r["loss"][0] - r["loss"][1]) < 1e-5
        assert r["emb_err"] < 1e-5 and r["centers_err"] < 1e-5
        assert r["emb_grad_scale"] > 1e-3  # the gradients compared are not all zero
        assert r["num_kept"] == num_classes


@pytest.mark.parametrize("world,num_classes,rate", [(2, 40, 0.25), (3, 41, 0.3), (1, 30, 0.2)])
def test_sampled_softmax_equals_reference_on_the_same_classes(tmp_path, world, num_classes, rate):
    results = run_case(tmp_path, world, num_classes, sample_rate=rate)
    for r in results:
        assert abs(r["loss"][0] - r["loss"][1]) < 1e-5
        assert r["emb_err"] < 1e-5 and r["centers_err"] < 1e-5
        assert r["num_kept"] < num_classes  # sampling did drop classes


def test_interclass_filtering_equals_reference(tmp_path):
    results = run_case(tmp_path, 2, 12, interclass_filter=0.1, margin=Margin(scale=16.0, m3=0.4))
    for r in results:
        assert abs(r["loss"][0] - r["loss"][1]) < 1e-5
        assert r["emb_err"] < 1e-5 and r["centers_err"] < 1e-5


@pytest.mark.parametrize("implementation", ["fused", "fused_linear"])
@pytest.mark.parametrize("world,num_classes,rate,filter_", [(2, 11, 1.0, 0.0), (3, 41, 0.3, 0.1)])
def test_fused_head_equals_single_process_reference(tmp_path, implementation, world, num_classes, rate, filter_):
    from toolkit import ops

    if not ops.FUSED_KERNELS_AVAILABLE:
        pytest.skip(f"fused kernels not built: {ops.UNAVAILABLE_REASON}")
    results = run_case(tmp_path, world, num_classes, sample_rate=rate, interclass_filter=filter_,
                       implementation=implementation)
    for r in results:
        assert abs(r["loss"][0] - r["loss"][1]) < 1e-5
        assert r["emb_err"] < 1e-5 and r["centers_err"] < 1e-5


def test_shard_ranges_cover_classes_with_the_remainder_first():
    ranges = [shard_range(11, 3, r) for r in range(3)]
    assert [(s.start, s.count) for s in ranges] == [(0, 4), (4, 4), (8, 3)]
    with pytest.raises(ValueError, match="cannot be split"):
        shard_range(2, 3, 0)
