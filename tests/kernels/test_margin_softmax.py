# Fused margin softmax on a cosine buffer: forward, gradients, split-column protocol, in-place backward, edge cases.
import pytest
import torch
import torch.nn.functional as F

import toolkit.ops as ops
from tests.kernels.conftest import (DEVICES, DTYPES, GRAD_RTOL, MARGINS, assert_close_relative, cosine_case,
                                    requires_kernels, row_weights, unit_rows)
from toolkit.heads.margin import Margin, margin_softmax_ce_reference
from toolkit.ops import unfused as reference

pytestmark = requires_kernels
F_OPS = torch.ops.facecl if ops.FUSED_KERNELS_AVAILABLE else None


def _fused_and_reference(cos_NC, local_target_N, margin, interclass_filter, weights_N):
    """(loss, grad wrt cos) of the fused op and of the reference, on identical inputs."""
    results = []
    for loss_fn in (ops.margin_softmax_ce, reference.margin_softmax_ce):
        leaf_NC = cos_NC.clone().requires_grad_(True)
        loss_N = loss_fn(leaf_NC * 1, local_target_N, margin, interclass_filter=interclass_filter)  # non-leaf buffer
        (loss_N * weights_N.to(loss_N.device)).sum().backward()
        results.append((loss_N.detach(), leaf_NC.grad))
    return results


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("interclass_filter", [0.0, 0.4])
def test_matches_reference(device, dtype, margin, interclass_filter):
    cos_NC, local_target_N = cosine_case(24, 37, seed=1)
    cos_NC, local_target_N = cos_NC.to(device, dtype), local_target_N.to(device)
    (loss, grad), (ref_loss, ref_grad) = _fused_and_reference(cos_NC, local_target_N, margin, interclass_filter,
                                                              row_weights(24))
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_close_relative(loss, ref_loss, 1e-5, "loss")
    assert_close_relative(grad, ref_grad, GRAD_RTOL[dtype], "grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("margin", MARGINS)
def test_mean_equals_ground_truth_on_embeddings(device, margin):
    """All classes local: mean of the per-row loss is margin_softmax_ce_reference, gradients included."""
    gen = torch.Generator().manual_seed(3)
    emb_ND, centers_CD = torch.randn(16, 8, generator=gen), torch.randn(29, 8, generator=gen)
    labels_N = torch.randint(0, 29, (16,), generator=gen)
    grads = []
    for fused in (True, False):
        emb = emb_ND.clone().to(device).requires_grad_(True)
        centers = centers_CD.clone().to(device).requires_grad_(True)
        if fused:
            cos_NC = F.normalize(emb, dim=1) @ F.normalize(centers, dim=1).t()
            loss = ops.margin_softmax_ce(cos_NC, labels_N.to(device), margin).mean()
        else:
            loss = margin_softmax_ce_reference(emb, centers, labels_N.to(device), margin)
        loss.backward()
        grads.append((loss.detach(), emb.grad, centers.grad))
    for got, expected, what in zip(grads[0], grads[1], ("loss", "emb grad", "centers grad")):
        assert_close_relative(got, expected, 1e-5, what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("margin", MARGINS[:2])
def test_partial_stats_over_column_shards_equal_full_softmax(device, margin):
    """The protocol on uneven column shards (rows owned by one shard are -1 in the others) = the full op."""
    cos_NC, labels_N = cosine_case(20, 23, seed=5, with_foreign_rows=False)
    cos_NC, labels_N = cos_NC.to(device), labels_N.to(device)
    params = (margin.scale, margin.m1, margin.m2, margin.m3, 0.0)
    bounds = [(0, 9), (9, 10), (10, 23)]  # 9, 1 and 13 classes
    shard_stats, shard_targets = [], []
    for start, end in bounds:
        owned = (labels_N >= start) & (labels_N < end)
        local_target_N = torch.where(owned, labels_N - start, torch.full_like(labels_N, -1))
        shard_targets.append(local_target_N)
        shard_stats.append(F_OPS.margin_softmax_ce_stats(cos_NC[:, start:end].contiguous(), local_target_N, *params))
    # What combine_partial_stats does with all-reduces, done here by hand over the shards.
    max_N = torch.stack([s[0] for s in shard_stats]).max(dim=0).values
    sum_N = sum(s[1] * torch.exp(s[0] - max_N) for s in shard_stats)
    target_N = sum(s[2] for s in shard_stats)
    full_loss_N, full_max_N, full_sum_N = F_OPS.margin_softmax_ce(cos_NC, labels_N, *params)
    assert_close_relative(torch.log(sum_N) + max_N - target_N, full_loss_N, 1e-6, "loss")
    assert_close_relative(max_N, full_max_N, 0, "row max")

    weights_N = row_weights(20).to(device)
    full_grad_NC = cos_NC.clone()
    F_OPS.margin_softmax_ce_backward_(full_grad_NC, labels_N, full_max_N, full_sum_N, weights_N, *params)
    for (start, end), local_target_N in zip(bounds, shard_targets):
        shard_grad = cos_NC[:, start:end].contiguous()
        F_OPS.margin_softmax_ce_backward_(shard_grad, local_target_N, max_N, sum_N, weights_N, *params)
        assert_close_relative(shard_grad, full_grad_NC[:, start:end], 1e-6, f"grad of columns {start}:{end}")


@pytest.mark.parametrize("device", DEVICES)
def test_backward_writes_into_the_cosine_buffer(device):
    """No second N x C tensor: the gradient handed to the matmul is the forward's cosine buffer itself."""
    gen = torch.Generator().manual_seed(0)
    emb = unit_rows(12, 8, gen).to(device).requires_grad_(True)
    centers = unit_rows(30, 8, gen).to(device).requires_grad_(True)
    local_target_N = torch.randint(0, 30, (12,), generator=gen).to(device)
    cos_NC = emb @ centers.t()
    buffer_ptr = cos_NC.data_ptr()
    seen = []
    cos_NC.register_hook(lambda grad: seen.append(grad.data_ptr()))
    ops.margin_softmax_ce(cos_NC, local_target_N, Margin()).sum().backward()
    assert seen == [buffer_ptr]

    cos_NC = emb @ centers.t()
    cos_NC.register_hook(lambda grad: seen.append(grad.data_ptr()))
    ops.distributed_margin_softmax_ce(cos_NC, local_target_N, Margin()).backward()
    assert seen[-1] == cos_NC.data_ptr()


def test_backward_allocates_nothing_of_rows_x_classes_size():
    """Measured: the largest allocation during backward is far below one N x C fp32 tensor."""
    from torch.profiler import ProfilerActivity, profile

    gen = torch.Generator().manual_seed(0)
    emb = unit_rows(64, 8, gen).requires_grad_(True)
    centers = unit_rows(500, 8, gen).requires_grad_(True)
    local_target_N = torch.randint(0, 500, (64,), generator=gen)
    loss = ops.distributed_margin_softmax_ce(emb @ centers.t(), local_target_N, Margin())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss.backward()
    largest = max(event.cpu_memory_usage for event in prof.events())
    assert 0 < largest < 64 * 500 * 4 // 4, f"largest allocation {largest} bytes"


@pytest.mark.parametrize("make_buffer", [lambda leaf: leaf, lambda leaf: leaf[1:]], ids=["leaf", "view of a leaf"])
def test_user_buffers_are_not_overwritten(make_buffer):
    cos_NC, local_target_N = cosine_case(6, 9, seed=2)
    leaf_NC = cos_NC.clone().requires_grad_(True)
    buffer = make_buffer(leaf_NC)
    ops.margin_softmax_ce(buffer, local_target_N[-buffer.shape[0]:], Margin()).sum().backward()
    assert torch.equal(leaf_NC.detach(), cos_NC)
    assert leaf_NC.grad.data_ptr() != leaf_NC.data_ptr()


@pytest.mark.parametrize("loss_fn", [lambda cos, t: ops.margin_softmax_ce(cos, t, Margin()).sum(),
                                     lambda cos, t: ops.distributed_margin_softmax_ce(cos, t, Margin())],
                         ids=["margin_softmax_ce", "distributed_margin_softmax_ce"])
def test_second_backward_through_a_consumed_buffer_is_refused(loss_fn):
    gen = torch.Generator().manual_seed(0)
    emb, centers = unit_rows(4, 8, gen).requires_grad_(True), unit_rows(6, 8, gen).requires_grad_(True)
    loss = loss_fn(emb @ centers.t(), torch.tensor([0, 1, -1, 5]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("device", DEVICES)
def test_edge_cases(device):
    margin = Margin(m2=0.5, m3=0.0)
    # no rows
    loss_N = ops.margin_softmax_ce(torch.empty(0, 5, device=device), torch.empty(0, dtype=torch.long, device=device),
                                   margin)
    assert loss_N.shape == (0,)
    # one class, the target; every row's target elsewhere; a strided (non-contiguous) buffer
    for cos_NC, local_target_N in [
        (torch.tensor([[0.3], [-0.95]]), torch.tensor([0, 0])),
        (torch.rand(4, 7) * 2 - 1, torch.full((4,), -1)),
        ((torch.rand(7, 5) * 2 - 1).t(), torch.tensor([0, 6, -1, 3, 2])),
    ]:
        (loss, grad), (ref_loss, ref_grad) = _fused_and_reference(cos_NC.to(device), local_target_N.to(device),
                                                                  margin, 0.0, row_weights(len(local_target_N)))
        assert_close_relative(loss, ref_loss, 1e-5, "loss")
        assert_close_relative(grad, ref_grad, 2e-5, "grad")


def test_bad_inputs_are_refused_with_the_value():
    params = (64.0, 1.0, 0.0, 0.4, 0.0)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16, got Double"):
        F_OPS.margin_softmax_ce_stats(torch.zeros(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.long), *params)
    with pytest.raises(RuntimeError, match=r"local_target must lie in \[-1, 3\), got values from 0 to 3"):
        F_OPS.margin_softmax_ce_stats(torch.zeros(2, 3), torch.tensor([0, 3]), *params)
    with pytest.raises(RuntimeError, match=r"local_target must have shape \[2\]"):
        F_OPS.margin_softmax_ce_stats(torch.zeros(2, 3), torch.tensor([0]), *params)
