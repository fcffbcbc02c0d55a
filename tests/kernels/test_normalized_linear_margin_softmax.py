# Fused linear margin softmax on raw centers (normalisation fused) against F.normalize + the unfused loss.
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import toolkit.ops as ops
from tests.kernels.conftest import (DEVICES, DTYPES, GRAD_RTOL, MARGINS, allocator_peak_bytes, assert_close_relative,
                                    requires_kernels, row_weights)
from toolkit.heads.margin import Margin
from toolkit.ops import unfused

pytestmark = requires_kernels


def raw_case(num_rows: int, num_classes: int, dim: int, seed: int, *, degenerate_rows: bool = True):
    """Unit embeddings, centers of very different norms (one zero row and one below eps), targets with -1 rows."""
    gen = torch.Generator().manual_seed(seed)
    emb_ND = F.normalize(torch.randn(num_rows, dim, generator=gen), dim=1)
    norms_C = torch.exp(torch.randn(num_classes, 1, generator=gen) * 2.0)  # from ~0.02 to ~50
    centers_CD = torch.randn(num_classes, dim, generator=gen) * norms_C
    if degenerate_rows:
        centers_CD[1] = 0.0
        centers_CD[2] = 1e-14  # |w| < eps = 1e-12: F.normalize divides by eps, no projection
    local_target_N = torch.randint(0, num_classes, (num_rows,), generator=gen)
    local_target_N[2::5] = -1
    return emb_ND, centers_CD, local_target_N


def run(loss_fn, emb_ND, centers_CD, local_target_N, margin, weights_N, **kwargs):
    emb = emb_ND.clone().requires_grad_(True)
    centers = centers_CD.clone().requires_grad_(True)
    loss = loss_fn(emb, centers, local_target_N, margin, row_weight_N=weights_N, **kwargs)
    loss.backward()
    return loss.detach(), emb.grad, centers.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("margin", MARGINS)
@pytest.mark.parametrize("shape", [(12, 37, 16), (40, 37, 16)], ids=["N<=D:cached", "N>D:recomputed"])
@pytest.mark.parametrize("block_size", [7, 1, 0])  # 7 does not divide 37; 0 = automatic (one block here)
def test_matches_normalize_then_reference(device, margin, shape, block_size):
    emb_ND, centers_CD, local_target_N = (t.to(device) for t in raw_case(*shape, seed=4))
    weights_N = row_weights(shape[0]).to(device)
    fused = run(ops.distributed_normalized_linear_margin_softmax_ce, emb_ND, centers_CD, local_target_N, margin,
                weights_N, block_size=block_size)
    expected = run(unfused.distributed_normalized_linear_margin_softmax_ce, emb_ND, centers_CD, local_target_N,
                   margin, weights_N)
    for got, want, what in zip(fused, expected, ("loss", "embedding grad", "center grad")):
        assert_close_relative(got, want, GRAD_RTOL[torch.float32], what)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interclass_filter", [0.0, 0.3])
def test_filter_and_degenerate_rows_match_the_plain_pytorch_formula(device, interclass_filter):
    """Ground truth written out here: cos = emb @ normalize(centers)^T, margin on the target, softmax CE."""
    emb_ND, centers_CD, local_target_N = (t.to(device) for t in raw_case(9, 23, 8, seed=11))
    local_target_N[local_target_N < 0] = 0  # every row labeled here (one process owns every class)
    margin = Margin(scale=32.0, m1=1.0, m2=0.3, m3=0.1)
    fused = run(ops.distributed_normalized_linear_margin_softmax_ce, emb_ND, centers_CD, local_target_N, margin,
                None, block_size=5, interclass_filter=interclass_filter)

    emb = emb_ND.clone().requires_grad_(True)
    centers = centers_CD.clone().requires_grad_(True)
    cos_NC = emb @ F.normalize(centers, dim=1).t()
    rows = torch.arange(cos_NC.shape[0], device=device)
    target_cos = cos_NC[rows, local_target_N]
    theta = torch.acos(target_cos.clamp(-1 + 1e-7, 1 - 1e-7))
    target_logit = torch.cos(margin.m1 * theta + margin.m2) - margin.m3
    negatives = cos_NC if interclass_filter <= 0 else cos_NC.masked_fill(cos_NC.detach() > interclass_filter, 0.0)
    logits_NC = negatives.scatter(1, local_target_N[:, None], target_logit[:, None]) * margin.scale
    F.cross_entropy(logits_NC, local_target_N).backward()
    assert_close_relative(fused[1], emb.grad, 1e-4, "embedding grad")
    assert_close_relative(fused[2], centers.grad, 1e-4, "center grad")
    assert torch.isfinite(fused[2]).all()


@pytest.mark.parametrize("num_rows", [12, 40], ids=["N<=D:cached", "N>D:recomputed"])
def test_forward_workspace_is_defined_everywhere(num_rows):
    """The workspace starts from uninitialised memory: cached, its first C x N floats are the cosines block by
    block (block b at float offset start_b * N, N x width) and the rest is zero; not cached, it is all zero."""
    num_classes, dim, block = 37, 16, 7
    emb_ND, centers_CD, local_target_N = raw_case(num_rows, num_classes, dim, seed=8)
    junk = [torch.full((num_classes * dim,), float("nan")) for _ in range(16)]
    del junk  # freed blocks of the workspace's size, full of NaN: the allocator hands one out again
    *_, workspace_CD = torch.ops.facecl.normalized_linear_margin_softmax_ce_stats(
        emb_ND, centers_CD, local_target_N, 64.0, 1.0, 0.5, 0.0, 0.0, block)
    flat = workspace_CD.view(-1)
    cached_floats = num_classes * num_rows if num_rows <= dim else 0
    assert (flat[cached_floats:] == 0).all()
    cos_NC = emb_ND @ F.normalize(centers_CD, dim=1).t()
    for start in range(0, num_classes if cached_floats else 0, block):
        width = min(block, num_classes - start)
        cached_NB = flat[start * num_rows:(start + width) * num_rows].view(num_rows, width)
        assert_close_relative(cached_NB, cos_NC[:, start:start + width], 1e-5, f"cached cosines of block {start}")


def test_a_second_backward_is_refused():
    """The forward's workspace became the centers' gradient in the first backward: a second one would read it."""
    emb_ND, centers_CD, local_target_N = raw_case(6, 50, 8, seed=3)
    centers = centers_CD.requires_grad_(True)
    loss = ops.distributed_normalized_linear_margin_softmax_ce(emb_ND, centers, local_target_N, Margin())
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        loss.backward()


@pytest.mark.parametrize("num_rows,expected_max_ratio", [(64, 1.07), (96, 1.11)], ids=["cached", "recomputed"])
def test_peak_memory_is_the_centers_gradient_plus_one_block(num_rows, expected_max_ratio):
    """N <= D: the N x C cosines live in the gradient's storage, so the peak is the gradient plus blocks of
    512 classes (N x 512 and 512 x D floats); N > D: an N x 512 scratch block is added. The unfused path with
    F.normalize holds several N x C and C x D tensors at once: far above either."""
    num_classes, dim, block = 20_000, 64, 512
    emb_ND, centers_CD, local_target_N = raw_case(num_rows, num_classes, dim, seed=5, degenerate_rows=False)
    centers = centers_CD.requires_grad_(True)
    emb = emb_ND.requires_grad_(True)
    grad_bytes = num_classes * dim * 4

    def step(loss_fn, **kwargs):
        def run_step():
            centers.grad, emb.grad = None, None
            loss_fn(emb, centers, local_target_N, Margin(), **kwargs).backward()
        return run_step

    fused_peak = allocator_peak_bytes(step(ops.distributed_normalized_linear_margin_softmax_ce, block_size=block))
    unfused_peak = allocator_peak_bytes(step(unfused.distributed_normalized_linear_margin_softmax_ce))
    print(f'peak/grad: fused {fused_peak / grad_bytes:.3f}, unfused {unfused_peak / grad_bytes:.3f}')
    assert grad_bytes <= fused_peak <= expected_max_ratio * grad_bytes, (fused_peak, grad_bytes)
    assert unfused_peak > 3 * grad_bytes, (unfused_peak, grad_bytes)


@pytest.mark.parametrize("num_rows,products_per_block", [(16, 3), (40, 4)], ids=["cached", "recomputed"])
def test_matrix_products_per_block(num_rows, products_per_block):
    """Cached (N <= D): logits forward, then dE and dW backward = 3 products per block; N > D recomputes the
    logits in backward: 4. Counted from the profiler's aten::mm / aten::addmm_ calls (5 blocks of 7 classes)."""
    from torch.profiler import ProfilerActivity, profile

    emb_ND, centers_CD, local_target_N = raw_case(num_rows, 35, 32, seed=6)
    centers = centers_CD.requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ops.distributed_normalized_linear_margin_softmax_ce(emb_ND, centers, local_target_N, Margin(),
                                                            block_size=7).backward()
    products = sum(event.count for event in prof.key_averages() if event.key in ("aten::mm", "aten::addmm_"))
    assert products == 5 * products_per_block


# ---- sampled (Partial FC): the kept rows read in place, the gradient written into the dense C x D one ----------

def kept_case(num_classes: int, num_kept: int, seed: int, *, first: bool = False) -> torch.Tensor:
    """Sorted kept rows; the degenerate rows 1 and 2 of raw_case kept; first: rows 0..S-1 (kept[j] == j, the
    tightest case of the cosine cache's layout)."""
    if first:
        return torch.arange(num_kept)
    gen = torch.Generator().manual_seed(seed)
    others = torch.randperm(num_classes - 3, generator=gen)[:num_kept - 2] + 3
    return torch.cat([torch.tensor([1, 2]), others]).sort().values


def sampled_case(num_rows, num_classes, num_kept, dim, seed, *, first=False, degenerate_rows=True):
    emb_ND, centers_CD, _ = raw_case(num_rows, num_classes, dim, seed, degenerate_rows=degenerate_rows)
    kept_S = kept_case(num_classes, num_kept, seed, first=first)
    gen = torch.Generator().manual_seed(seed + 1)
    local_target_N = torch.randint(0, num_kept, (num_rows,), generator=gen)
    local_target_N[2::5] = -1
    return emb_ND, centers_CD, kept_S, local_target_N


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("margin", MARGINS[:1])  # the margin math is the unsampled op's (tested above)
@pytest.mark.parametrize("shape", [(12, 37, 15, 16), (12, 37, 15, 16, "first"), (40, 37, 15, 16), (16, 30, 30, 16, "first")],
                         ids=["N<=D:cached", "N<=D:cached:kept-first-rows", "N>D:recomputed", "all-kept"])
@pytest.mark.parametrize("block_size", [4, 1, 0])  # 4 does not divide 15; 0 = automatic (one block here)
def test_sampled_matches_gather_then_reference(device, margin, shape, block_size):
    """Same kept classes: the fused op on the whole C x D centers with kept_S equals the unfused path on the
    gathered copy centers[kept_S], gradient of every center included (zero in the rows not kept)."""
    num_rows, num_classes, num_kept, dim, *first = shape
    emb_ND, centers_CD, kept_S, local_target_N = (t.to(device) for t in sampled_case(
        num_rows, num_classes, num_kept, dim, seed=4, first=bool(first)))
    weights_N = row_weights(num_rows).to(device)
    fused = run(ops.distributed_normalized_linear_margin_softmax_ce, emb_ND, centers_CD, local_target_N, margin,
                weights_N, block_size=block_size, kept_S=kept_S)
    expected = run(unfused.distributed_normalized_linear_margin_softmax_ce, emb_ND, centers_CD[kept_S].clone(),
                   local_target_N, margin, weights_N)
    dense_expected = torch.zeros_like(centers_CD).index_copy_(0, kept_S, expected[2])
    for got, want, what in zip(fused, (*expected[:2], dense_expected), ("loss", "embedding grad", "center grad")):
        assert_close_relative(got, want, GRAD_RTOL[torch.float32], what)
    not_kept = torch.ones(num_classes, dtype=torch.bool, device=device).index_fill_(0, kept_S, False)
    assert (fused[2][not_kept] == 0).all()  # exactly zero, not small


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_sampled_low_precision_centers(device, dtype):
    """bf16/fp16 centers (nothing cached): gathered and converted per block, gradient in their dtype (no
    rows shorter than eps here: their gradient, scaled by 1/eps, overflows fp16 on both paths)."""
    emb_ND, centers_CD, kept_S, local_target_N = (t.to(device) for t in sampled_case(10, 29, 11, 16, seed=9,
                                                                                      degenerate_rows=False))
    centers_CD = centers_CD.to(dtype)
    margin = Margin(scale=32.0, m1=1.0, m2=0.3, m3=0.1)
    fused = run(ops.distributed_normalized_linear_margin_softmax_ce, emb_ND, centers_CD, local_target_N, margin,
                None, block_size=4, kept_S=kept_S)
    expected = run(unfused.distributed_normalized_linear_margin_softmax_ce, emb_ND, centers_CD[kept_S].clone(),
                   local_target_N, margin, None)
    assert fused[2].dtype == dtype
    assert_close_relative(fused[0], expected[0], 1e-5, "loss")
    assert_close_relative(fused[1], expected[1], 1e-4, "embedding grad")
    assert_close_relative(fused[2][kept_S], expected[2], GRAD_RTOL[dtype], "kept center grad")
    not_kept = torch.ones(29, dtype=torch.bool, device=device).index_fill_(0, kept_S, False)
    assert (fused[2][not_kept] == 0).all()


@pytest.mark.parametrize("num_rows", [12, 40], ids=["N<=D:cached", "N>D:recomputed"])
def test_sampled_workspace_is_defined_everywhere_and_norms_are_of_the_kept_rows(num_rows):
    """From NaN-filled memory: the forward's workspace is the kept columns' cosines block by block (cached)
    then zero; its backward leaves no NaN anywhere (the rows that held cosines and are not kept are zeroed)."""
    num_classes, num_kept, dim, block = 37, 15, 16, 4
    emb_ND, centers_CD, kept_S, local_target_N = sampled_case(num_rows, num_classes, num_kept, dim, seed=8)
    junk = [torch.full((num_classes * dim,), float("nan")) for _ in range(16)]
    del junk  # freed blocks of the workspace's size, full of NaN: the allocator hands one out again
    params = (64.0, 1.0, 0.5, 0.0, 0.0)
    row_max_N, sum_exp_N, _, inv_norm_S, workspace_CD = torch.ops.facecl.sampled_normalized_linear_margin_softmax_ce_stats(
        emb_ND, centers_CD, kept_S, local_target_N, *params, block)
    assert_close_relative(inv_norm_S, 1 / centers_CD[kept_S].norm(dim=1).clamp(min=1e-12), 1e-6, "inverse norms")
    flat = workspace_CD.view(-1)
    cached_floats = num_kept * num_rows if num_rows <= dim else 0
    assert (flat[cached_floats:] == 0).all()
    cos_NS = emb_ND @ F.normalize(centers_CD[kept_S], dim=1).t()
    for start in range(0, num_kept if cached_floats else 0, block):
        width = min(block, num_kept - start)
        cached_NB = flat[start * num_rows:(start + width) * num_rows].view(num_rows, width)
        assert_close_relative(cached_NB, cos_NS[:, start:start + width], 1e-5, f"cached cosines of block {start}")
    torch.ops.facecl.sampled_normalized_linear_margin_softmax_ce_backward_(
        torch.full((num_rows,), 1.0 / num_rows), emb_ND, centers_CD, kept_S, local_target_N, row_max_N, sum_exp_N,
        inv_norm_S, workspace_CD, *params, block)
    not_kept = torch.ones(num_classes, dtype=torch.bool).index_fill_(0, kept_S, False)
    assert torch.isfinite(workspace_CD).all() and (workspace_CD[not_kept] == 0).all()


def test_sampled_kept_indices_are_checked():
    emb_ND, centers_CD, kept_S, local_target_N = sampled_case(6, 20, 8, 8, seed=1)
    stats = torch.ops.facecl.sampled_normalized_linear_margin_softmax_ce_stats
    params = (64.0, 1.0, 0.5, 0.0, 0.0, 0)
    with pytest.raises(RuntimeError, match="strictly increasing"):
        stats(emb_ND, centers_CD, kept_S.flip(0), local_target_N, *params)
    with pytest.raises(RuntimeError, match="kept must lie in"):
        stats(emb_ND, centers_CD, kept_S + 20, local_target_N, *params)
    with pytest.raises(RuntimeError, match="local_target must lie in"):
        stats(emb_ND, centers_CD, kept_S[:4], local_target_N, *params)  # targets index the 8 kept columns


def test_sampled_peak_memory_is_the_centers_gradient_plus_one_block():
    """C = 20,000 x 64, S = 4,000 (r = 0.2), N = 64 <= D (cached): peak = the C x D gradient + one gathered
    block of 512 x D floats + O(N x D + S); gathering the kept rows into an S x D copy first (the path without
    kept_S) adds 0.2x the gradient."""
    num_classes, num_kept, dim, block = 20_000, 4_000, 64, 512
    emb_ND, centers_CD, kept_S, local_target_N = sampled_case(64, num_classes, num_kept, dim, seed=5)
    centers = centers_CD.requires_grad_(True)
    emb = emb_ND.requires_grad_(True)
    grad_bytes = num_classes * dim * 4

    def step(gather_first: bool):
        def run_step():
            centers.grad, emb.grad = None, None
            if gather_first:
                loss = ops.distributed_normalized_linear_margin_softmax_ce(emb, centers[kept_S], local_target_N,
                                                                           Margin(), block_size=block)
            else:
                loss = ops.distributed_normalized_linear_margin_softmax_ce(emb, centers, local_target_N, Margin(),
                                                                           block_size=block, kept_S=kept_S)
            loss.backward()
        return run_step

    sampled_peak = allocator_peak_bytes(step(False))
    centers.grad, emb.grad = None, None  # freed outside the next profile (a free inside it would lower its start)
    gathered_peak = allocator_peak_bytes(step(True))
    print(f'peak/grad: in place {sampled_peak / grad_bytes:.3f}, gathered {gathered_peak / grad_bytes:.3f}')
    assert grad_bytes <= sampled_peak <= 1.05 * grad_bytes, (sampled_peak, grad_bytes)
    assert gathered_peak > 1.15 * grad_bytes, (gathered_peak, grad_bytes)


def test_sampled_matrix_products_per_block():
    """Cached (N <= D), 15 kept of 37 in blocks of 4: 3 products per block, as without sampling."""
    from torch.profiler import ProfilerActivity, profile

    emb_ND, centers_CD, kept_S, local_target_N = sampled_case(12, 37, 15, 16, seed=6)
    centers = centers_CD.requires_grad_(True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        ops.distributed_normalized_linear_margin_softmax_ce(emb_ND, centers, local_target_N, Margin(), block_size=4,
                                                            kept_S=kept_S).backward()
    products = sum(event.count for event in prof.key_averages() if event.key in ("aten::mm", "aten::addmm_"))
    assert products == 4 * 3


def _mapping_fields(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields (AnonHugePages, VmFlags, ...) of this process's mapping that holds `address`."""
    fields: dict[str, str] = {}
    inside = False
    for line in open("/proc/self/smaps"):
        first = line.split()[0]
        if "-" in first and ":" not in first:  # a mapping's header: start-end perms ...
            if inside:
                break
            start, end = (int(value, 16) for value in first.split("-"))
            inside = start <= address < end
        elif inside:
            fields[first.rstrip(":")] = line.split(":", 1)[1].strip()
    return fields


@pytest.mark.skipif(not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists()
                    or "[never]" in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(),
                    reason="no transparent huge pages on this machine")
@pytest.mark.parametrize("sampled", [False, True], ids=["all-rows", "kept-rows"])
def test_the_cpu_workspace_gets_huge_pages(sampled):
    """The C x D workspace (here 32 MiB) is advised to use 2 MB pages before its first touch (blockwise.h,
    advise_huge_pages): its first touch then costs a page fault per 2 MB, not per 4 KB."""
    num_classes, dim = 32_768, 256
    emb_ND, centers_CD, kept_S, local_target_N = sampled_case(8, num_classes, 6_000, dim, seed=2,
                                                              degenerate_rows=False)
    params = (64.0, 1.0, 0.5, 0.0, 0.0, 0)
    if sampled:
        *_, workspace_CD = torch.ops.facecl.sampled_normalized_linear_margin_softmax_ce_stats(
            emb_ND, centers_CD, kept_S, local_target_N, *params)
    else:
        local_target_N = torch.randint(0, num_classes, (8,))
        *_, workspace_CD = torch.ops.facecl.normalized_linear_margin_softmax_ce_stats(
            emb_ND, centers_CD, local_target_N, *params)
    # What the kernel does: MADV_HUGEPAGE on the workspace ("hg" in the mapping's VmFlags; the old build had none).
    # Whether Linux then backs it with 2 MB pages depends on the machine (free contiguous memory, and memory the
    # allocator hands out again was touched before), so AnonHugePages is reported, not asserted.
    fields = _mapping_fields(workspace_CD.data_ptr() + workspace_CD.nbytes // 2)
    assert "hg" in fields["VmFlags"].split(), fields.get("VmFlags")
    print(f"AnonHugePages of the workspace's mapping: {fields.get('AnonHugePages')}")
