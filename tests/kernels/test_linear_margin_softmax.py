# Fused linear margin softmax (embeddings x centers, blockwise over classes) against the references.
import pytest
import torch
import torch.nn.functional as F

import toolkit.ops as ops
from tests.kernels.conftest import (DEVICES, DTYPES, GRAD_RTOL, MARGINS, TARGET_COSINES, assert_close_relative,
                                    requires_kernels, row_weights, unit_rows)
from toolkit.heads.margin import Margin, margin_softmax_ce_reference
from toolkit.ops import unfused as reference

pytestmark = requires_kernels
F_OPS = torch.ops.facecl if ops.FUSED_KERNELS_AVAILABLE else None


def linear_case(num_rows: int, num_classes: int, dim: int, seed: int):
    """Unit embeddings and centers, targets with some -1 rows, and a few targets at chosen cosines."""
    gen = torch.Generator().manual_seed(seed)
    emb_ND, centers_CD = unit_rows(num_rows, dim, gen), unit_rows(num_classes, dim, gen)
    local_target_N = torch.randint(0, num_classes, (num_rows,), generator=gen)
    # Rotate some embeddings so that their target cosine is one of TARGET_COSINES (fallback region included).
    for row, wanted in zip(range(0, num_rows, 2), TARGET_COSINES[:-1]):
        center = centers_CD[local_target_N[row]]
        orthogonal = F.normalize(emb_ND[row] - (emb_ND[row] @ center) * center, dim=0)
        emb_ND[row] = wanted * center + (1 - wanted ** 2) ** 0.5 * orthogonal
    local_target_N[3::5] = -1
    return emb_ND, centers_CD, local_target_N


def _run(loss_fn, emb_ND, centers_CD, local_target_N, margin, weights_N, **kwargs):
    emb = emb_ND.clone().requires_grad_(True)
    centers = centers_CD.clone().requires_grad_(True)
    loss_N = loss_fn(emb, centers, local_target_N, margin, **kwargs)
    (loss_N * weights_N.to(loss_N.device)).sum().backward()
    return loss_N.detach(), emb.grad, centers.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("block_size", [7, 0])  # 7 does not divide 37; 0 = automatic (one block here)
def test_matches_reference(device, dtype, margin, block_size):
    emb_ND, centers_CD, local_target_N = linear_case(22, 37, 16, seed=4)
    emb_ND, centers_CD = emb_ND.to(device, dtype), centers_CD.to(device, dtype)
    local_target_N = local_target_N.to(device)
    weights_N = row_weights(22)
    loss, grad_emb, grad_centers = _run(ops.linear_margin_softmax_ce, emb_ND, centers_CD, local_target_N, margin,
                                        weights_N, block_size=block_size)
    ref_loss, ref_grad_emb, ref_grad_centers = _run(reference.linear_margin_softmax_ce, emb_ND, centers_CD,
                                                    local_target_N, margin, weights_N)
    assert grad_emb.dtype == dtype and grad_centers.dtype == dtype
    assert_close_relative(loss, ref_loss, 1e-5, "loss")
    assert_close_relative(grad_emb, ref_grad_emb, GRAD_RTOL[dtype], "embedding grad")
    assert_close_relative(grad_centers, ref_grad_centers, GRAD_RTOL[dtype], "center grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("block_size", [1, 5, 64])
@pytest.mark.parametrize("interclass_filter", [0.0, 0.3])
def test_block_sizes_and_filter(device, block_size, interclass_filter):
    emb_ND, centers_CD, local_target_N = linear_case(10, 23, 8, seed=9)
    emb_ND, centers_CD, local_target_N = emb_ND.to(device), centers_CD.to(device), local_target_N.to(device)
    margin, weights_N = Margin(m2=0.5, m3=0.0), row_weights(10)
    fused = _run(ops.linear_margin_softmax_ce, emb_ND, centers_CD, local_target_N, margin, weights_N,
                 block_size=block_size, interclass_filter=interclass_filter)
    expected = _run(reference.linear_margin_softmax_ce, emb_ND, centers_CD, local_target_N, margin, weights_N,
                    interclass_filter=interclass_filter)
    for got, want, what in zip(fused, expected, ("loss", "embedding grad", "center grad")):
        assert_close_relative(got, want, 2e-5, what)


@pytest.mark.parametrize("device", DEVICES)
def test_mean_equals_ground_truth(device):
    gen = torch.Generator().manual_seed(8)
    emb_ND, centers_CD = torch.randn(12, 8, generator=gen).to(device), torch.randn(19, 8, generator=gen).to(device)
    labels_N = torch.randint(0, 19, (12,), generator=gen).to(device)
    margin = Margin(m2=0.5, m3=0.0)
    results = []
    for fused in (True, False):
        emb, centers = emb_ND.clone().requires_grad_(True), centers_CD.clone().requires_grad_(True)
        if fused:
            loss = ops.linear_margin_softmax_ce(F.normalize(emb, dim=1), F.normalize(centers, dim=1), labels_N, margin,
                                                block_size=4).mean()
        else:
            loss = margin_softmax_ce_reference(emb, centers, labels_N, margin)
        loss.backward()
        results.append((loss.detach(), emb.grad, centers.grad))
    for got, want, what in zip(*results, ("loss", "embedding grad", "center grad")):
        assert_close_relative(got, want, 1e-5, what)


@pytest.mark.parametrize("device", DEVICES)
def test_stats_equal_those_of_the_cosine_op(device):
    emb_ND, centers_CD, local_target_N = linear_case(9, 31, 8, seed=2)
    emb_ND, centers_CD, local_target_N = emb_ND.to(device), centers_CD.to(device), local_target_N.to(device)
    params = (64.0, 1.0, 0.5, 0.0, 0.0)
    linear = F_OPS.linear_margin_softmax_ce_stats(emb_ND, centers_CD, local_target_N, *params, 4)
    cosine = F_OPS.margin_softmax_ce_stats(emb_ND @ centers_CD.t(), local_target_N, *params)
    for got, want, what in zip(linear, cosine, ("row max", "sum exp", "target logit")):
        assert_close_relative(got, want, 1e-5, what)


@pytest.mark.parametrize("device", DEVICES)
def test_edge_cases(device):
    margin = Margin()
    gen = torch.Generator().manual_seed(1)
    # no rows: empty loss and zero center gradient
    centers = unit_rows(5, 4, gen).to(device).requires_grad_(True)
    loss_N = ops.linear_margin_softmax_ce(torch.empty(0, 4, device=device, requires_grad=True), centers,
                                          torch.empty(0, dtype=torch.long, device=device), margin)
    loss_N.sum().backward()
    assert loss_N.shape == (0,) and torch.equal(centers.grad, torch.zeros_like(centers))
    # one class; all targets elsewhere
    for num_classes, targets in [(1, [0, 0, -1]), (6, [-1, -1, -1])]:
        emb_ND, centers_CD = unit_rows(3, 4, gen).to(device), unit_rows(num_classes, 4, gen).to(device)
        local_target_N, weights_N = torch.tensor(targets, device=device), row_weights(3)
        fused = _run(ops.linear_margin_softmax_ce, emb_ND, centers_CD, local_target_N, margin, weights_N, block_size=2)
        expected = _run(reference.linear_margin_softmax_ce, emb_ND, centers_CD, local_target_N, margin, weights_N)
        for got, want, what in zip(fused, expected, ("loss", "embedding grad", "center grad")):
            assert_close_relative(got, want, 2e-5, what)


def test_dimension_mismatch_is_refused():
    with pytest.raises(RuntimeError, match="embeddings have 4 dims but centers have 5"):
        F_OPS.linear_margin_softmax_ce_stats(torch.zeros(2, 4), torch.zeros(3, 5), torch.zeros(2, dtype=torch.long),
                                             64.0, 1.0, 0.0, 0.4, 0.0, 0)
