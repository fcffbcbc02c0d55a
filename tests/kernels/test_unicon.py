# Fused UniCon loss (blockwise over keys, masks from labels on the fly) against unicon_loss_reference.
import pytest
import torch

import toolkit.ops as ops
from tests.kernels.conftest import DEVICES, DTYPES, GRAD_RTOL, assert_close_relative, requires_kernels, unit_rows
from toolkit.contrastive.unicon import unicon_loss_reference

pytestmark = requires_kernels
F_OPS = torch.ops.facecl if ops.FUSED_KERNELS_AVAILABLE else None


def unicon_case(num_queries: int, num_queue: int, dim: int, seed: int):
    """Queries, keys = [the batch's own keys; a queue], labels with repeats and -1 (unlabeled) on both sides."""
    gen = torch.Generator().manual_seed(seed)
    query_BD = unit_rows(num_queries, dim, gen)
    keys_KD = unit_rows(num_queries + num_queue, dim, gen)
    keys_KD[:num_queries] = torch.nn.functional.normalize(query_BD + 0.3 * keys_KD[:num_queries], dim=1)
    query_labels_B = torch.randint(-1, 5, (num_queries,), generator=gen)
    key_labels_K = torch.cat([query_labels_B, torch.randint(-1, 5, (num_queue,), generator=gen)])
    own_key_B = torch.arange(num_queries)
    return query_BD, keys_KD, query_labels_B, key_labels_K, own_key_B


def _run(loss_fn, query_BD, keys_KD, labels_and_own, temperature, margin, *, keys_need_grad=True, **kwargs):
    query = query_BD.clone().requires_grad_(True)
    keys = keys_KD.clone().requires_grad_(keys_need_grad)
    loss_B = loss_fn(query, keys, *labels_and_own, temperature, margin, **kwargs)
    weights_B = torch.linspace(0.5, 1.5, loss_B.numel(), device=loss_B.device)
    (loss_B * weights_B).sum().backward()
    return loss_B.detach(), query.grad, keys.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature,margin", [(0.07, 0.0), (0.2, 0.3)])
@pytest.mark.parametrize("block_size", [9, 0])  # 9 does not divide 45 keys
def test_matches_reference(device, dtype, temperature, margin, block_size):
    query_BD, keys_KD, *labels_and_own = unicon_case(9, 36, 16, seed=0)
    query_BD, keys_KD = query_BD.to(device, dtype), keys_KD.to(device, dtype)
    labels_and_own = [tensor.to(device) for tensor in labels_and_own]
    loss, grad_query, grad_keys = _run(ops.unicon_loss, query_BD, keys_KD, labels_and_own, temperature, margin,
                                       block_size=block_size)
    ref_loss, ref_grad_query, ref_grad_keys = _run(unicon_loss_reference, query_BD, keys_KD, labels_and_own,
                                                   temperature, margin)
    assert loss.dtype == torch.float32 and grad_query.dtype == dtype and grad_keys.dtype == dtype
    assert_close_relative(loss, ref_loss, 1e-5, "loss")
    assert_close_relative(grad_query, ref_grad_query, GRAD_RTOL[dtype], "query grad")
    assert_close_relative(grad_keys, ref_grad_keys, GRAD_RTOL[dtype], "keys grad")


@pytest.mark.parametrize("device", DEVICES)
def test_keys_without_grad_get_none(device):
    query_BD, keys_KD, *labels_and_own = [t.to(device) for t in unicon_case(5, 20, 8, seed=1)]
    loss, grad_query, grad_keys = _run(ops.unicon_loss, query_BD, keys_KD, labels_and_own, 0.1, 0.0,
                                       keys_need_grad=False, block_size=6)
    ref_loss, ref_grad_query, _ = _run(unicon_loss_reference, query_BD, keys_KD, labels_and_own, 0.1, 0.0,
                                       keys_need_grad=False)
    assert grad_keys is None
    assert_close_relative(loss, ref_loss, 1e-5, "loss")
    assert_close_relative(grad_query, ref_grad_query, 2e-5, "query grad")


@pytest.mark.parametrize("device", DEVICES)
def test_degenerate_label_patterns(device):
    gen = torch.Generator().manual_seed(2)
    query_BD, keys_KD = unit_rows(4, 8, gen).to(device), unit_rows(10, 8, gen).to(device)
    own_key_B = torch.tensor([0, 1, 7, 9], device=device)  # own keys anywhere among the keys
    cases = {
        "every key a positive of query 0 (no negatives: loss 0)": (
            torch.tensor([3, -1, -1, 2]), torch.tensor([3] * 10)),
        "all unlabeled (plain MoCo)": (torch.full((4,), -1), torch.full((10,), -1)),
        "labels shared across queries": (torch.tensor([1, 1, 2, 2]), torch.tensor([1, 2, 1, 2, -1, 1, 0, 2, 0, 1])),
    }
    for what, (query_labels_B, key_labels_K) in cases.items():
        labels_and_own = [query_labels_B.to(device), key_labels_K.to(device), own_key_B]
        fused = _run(ops.unicon_loss, query_BD, keys_KD, labels_and_own, 0.1, 0.2, block_size=3)
        expected = _run(unicon_loss_reference, query_BD, keys_KD, labels_and_own, 0.1, 0.2)
        for got, want, part in zip(fused, expected, ("loss", "query grad", "keys grad")):
            assert_close_relative(got, want, 2e-5, f"{what}: {part}")
        if what.startswith("every key"):
            assert float(fused[0][0]) == 0.0 and float(fused[1][0].abs().max()) == 0.0


def test_one_positive_is_infonce():
    query_BD, keys_KD, _, _, own_key_B = unicon_case(6, 10, 8, seed=3)
    unlabeled_B, unlabeled_K = torch.full((6,), -1), torch.full((16,), -1)
    loss_B = ops.unicon_loss(query_BD, keys_KD, unlabeled_B, unlabeled_K, own_key_B, 0.07)
    infonce_B = torch.nn.functional.cross_entropy(query_BD @ keys_KD.t() / 0.07, own_key_B, reduction="none")
    assert_close_relative(loss_B, infonce_B, 1e-5, "InfoNCE")


def test_no_queries_and_bad_own_key():
    empty = ops.unicon_loss(torch.empty(0, 4), torch.randn(3, 4), torch.empty(0, dtype=torch.long),
                            torch.zeros(3, dtype=torch.long), torch.empty(0, dtype=torch.long), 0.1)
    assert empty.shape == (0,)
    with pytest.raises(RuntimeError, match=r"own_key must lie in \[0, 3\), got values from 0 to 3"):
        F_OPS.unicon_loss(torch.randn(2, 4), torch.randn(3, 4), torch.zeros(2, dtype=torch.long),
                          torch.zeros(3, dtype=torch.long), torch.tensor([0, 3]), 0.1, 0.0, 0)
    with pytest.raises(RuntimeError, match="temperature must be > 0, got 0"):
        F_OPS.unicon_loss(torch.randn(2, 4), torch.randn(3, 4), torch.zeros(2, dtype=torch.long),
                          torch.zeros(3, dtype=torch.long), torch.tensor([0, 1]), 0.0, 0.0, 0)
