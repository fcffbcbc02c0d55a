# torch.library.opcheck for every facecl op (CPU, and CUDA when present) and torch.compile(fullgraph=True) on CPU.
import pytest
import torch

import toolkit.ops as ops
from tests.kernels.conftest import DEVICES, assert_close_relative, requires_kernels, unit_rows
from toolkit.heads.margin import Margin
from toolkit.ops import unfused as reference

pytestmark = requires_kernels
PARAMS = (64.0, 1.0, 0.5, 0.0, 0.3)  # scale, m1, m2, m3, inter-class filter: every branch of the kernels


def _tiny_inputs(device):
    gen = torch.Generator().manual_seed(0)
    emb_ND, centers_CD = unit_rows(4, 8, gen).to(device), unit_rows(6, 8, gen).to(device)
    local_target_N = torch.tensor([1, -1, 5, 0], device=device)
    query_labels_B = torch.tensor([0, 1, -1, 0], device=device)
    key_labels_K = torch.tensor([0, 1, 1, -1, 0, 2], device=device)
    own_key_B = torch.tensor([0, 1, 2, 3], device=device)
    return emb_ND, centers_CD, local_target_N, query_labels_B, key_labels_K, own_key_B


def _op_cases(device):
    """(op name, args) for every op; differentiable inputs require grad where the op has autograd."""
    facecl = torch.ops.facecl
    emb_ND, centers_CD, target_N, query_labels_B, key_labels_K, own_key_B = _tiny_inputs(device)
    cos_NC = emb_ND @ centers_CD.t()
    row_max_N, sum_exp_N, _ = facecl.margin_softmax_ce_stats(cos_NC, target_N, *PARAMS)
    _, lse_negatives_B, lse_positives_B = facecl.unicon_loss(emb_ND, centers_CD, query_labels_B, key_labels_K,
                                                             own_key_B, 0.1, 0.2, 4)
    grad_N = torch.rand(4, device=device)
    raw_centers_CD = centers_CD * torch.linspace(0.5, 3.0, 6, device=device)[:, None]  # not unit rows
    stats = facecl.normalized_linear_margin_softmax_ce_stats(emb_ND, raw_centers_CD, target_N, *PARAMS, 4)
    kept_S = torch.tensor([0, 2, 3, 5], device=device)  # sampled: targets index these 4 kept rows
    kept_target_N = torch.tensor([1, -1, 3, 0], device=device)
    sampled = facecl.sampled_normalized_linear_margin_softmax_ce_stats(emb_ND, raw_centers_CD, kept_S, kept_target_N,
                                                                       *PARAMS, 3)
    with_grad = lambda tensor: tensor.clone().requires_grad_(True)  # noqa: E731
    unicon_args = (query_labels_B, key_labels_K, own_key_B)
    return {
        "margin_softmax_ce_stats": (cos_NC, target_N, *PARAMS),
        "margin_softmax_ce": (with_grad(cos_NC), target_N, *PARAMS),
        "margin_softmax_ce_backward_": (cos_NC.clone(), target_N, row_max_N, sum_exp_N, grad_N, *PARAMS),
        "linear_margin_softmax_ce_stats": (emb_ND, centers_CD, target_N, *PARAMS, 4),
        "linear_margin_softmax_ce": (with_grad(emb_ND), with_grad(centers_CD), target_N, *PARAMS, 4),
        "linear_margin_softmax_ce_backward": (grad_N, emb_ND, centers_CD, target_N, row_max_N, sum_exp_N, *PARAMS, 4),
        "normalized_linear_margin_softmax_ce_stats": (emb_ND, raw_centers_CD, target_N, *PARAMS, 4),
        "normalized_linear_margin_softmax_ce_backward_": (grad_N, emb_ND, raw_centers_CD, target_N, stats[0], stats[1],
                                                          stats[3], stats[4].clone(), *PARAMS, 4),
        "sampled_normalized_linear_margin_softmax_ce_stats": (emb_ND, raw_centers_CD, kept_S, kept_target_N, *PARAMS,
                                                              3),
        "sampled_normalized_linear_margin_softmax_ce_backward_": (grad_N, emb_ND, raw_centers_CD, kept_S, kept_target_N,
                                                                  sampled[0], sampled[1], sampled[3],
                                                                  sampled[4].clone(), *PARAMS, 3),
        "unicon_loss": (with_grad(emb_ND), with_grad(centers_CD), *unicon_args, 0.1, 0.2, 4),
        "unicon_loss_backward": (grad_N, emb_ND, centers_CD, *unicon_args, lse_negatives_B, lse_positives_B, 0.1, 0.2,
                                 4, True),
    }


OP_NAMES = ["margin_softmax_ce_stats", "margin_softmax_ce", "margin_softmax_ce_backward_",
            "linear_margin_softmax_ce_stats", "linear_margin_softmax_ce", "linear_margin_softmax_ce_backward",
            "normalized_linear_margin_softmax_ce_stats", "normalized_linear_margin_softmax_ce_backward_",
            "sampled_normalized_linear_margin_softmax_ce_stats", "sampled_normalized_linear_margin_softmax_ce_backward_",
            "unicon_loss", "unicon_loss_backward"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op_name", OP_NAMES)
def test_opcheck(device, op_name):
    args = _op_cases(device)[op_name]
    torch.library.opcheck(getattr(torch.ops.facecl, op_name).default, args)


def test_every_registered_op_is_checked():
    registered = {name.split("::")[1] for name in torch._C._dispatch_get_all_op_names() if name.startswith("facecl::")}
    assert registered == set(OP_NAMES)


# ---- torch.compile(fullgraph=True): forward and backward of each public op, compared with the reference ----

MARGIN = Margin(scale=64.0, m1=1.0, m2=0.5, m3=0.0)


def _cosine_loss(loss_fn, emb, centers, target, *_):
    return (loss_fn(emb @ centers.t(), target, MARGIN, interclass_filter=0.3) ** 2).sum()


def _linear_loss(loss_fn, emb, centers, target, *_):
    return (loss_fn(emb, centers, target, MARGIN, interclass_filter=0.3) ** 2).sum()


def _unicon_loss(loss_fn, query, keys, _, query_labels, key_labels, own_key):
    return (loss_fn(query, keys, query_labels, key_labels, own_key, 0.1, 0.2) ** 2).sum()


@pytest.mark.parametrize("loss, fused_fn, reference_fn", [
    (_cosine_loss, ops.margin_softmax_ce, reference.margin_softmax_ce),
    (_linear_loss, ops.linear_margin_softmax_ce, reference.linear_margin_softmax_ce),
    (_unicon_loss, ops.unicon_loss, reference.unicon_loss),
], ids=["margin_softmax_ce", "linear_margin_softmax_ce", "unicon_loss"])
def test_torch_compile_fullgraph(loss, fused_fn, reference_fn):
    torch._dynamo.reset()
    emb_ND, centers_CD, *rest = _tiny_inputs("cpu")
    compiled = torch.compile(lambda emb, centers: loss(fused_fn, emb, centers, *rest), fullgraph=True)
    results = []
    for fn in (compiled, lambda emb, centers: loss(reference_fn, emb, centers, *rest)):
        emb, centers = emb_ND.clone().requires_grad_(True), centers_CD.clone().requires_grad_(True)
        value = fn(emb, centers)
        value.backward()
        results.append((value.detach(), emb.grad, centers.grad))
    for got, want, what in zip(*results, ("loss", "first grad", "second grad")):
        assert_close_relative(got, want, 2e-5, what)


def test_torch_compile_fullgraph_of_the_protocol_ops():
    """The statistics and backward ops (what the distributed helpers call) inside one compiled graph."""
    torch._dynamo.reset()
    emb_ND, centers_CD, target_N, query_labels_B, key_labels_K, own_key_B = _tiny_inputs("cpu")
    grad_N = torch.rand(4)

    def protocol(emb, centers):
        facecl = torch.ops.facecl
        cos_NC = emb @ centers.t()
        row_max_N, sum_exp_N, target_logit_N = facecl.margin_softmax_ce_stats(cos_NC, target_N, *PARAMS)
        linear_stats = facecl.linear_margin_softmax_ce_stats(emb, centers, target_N, *PARAMS, 4)
        grad_NC = cos_NC.clone()
        facecl.margin_softmax_ce_backward_(grad_NC, target_N, row_max_N, sum_exp_N, grad_N, *PARAMS)
        linear_grads = facecl.linear_margin_softmax_ce_backward(grad_N, emb, centers, target_N, row_max_N, sum_exp_N,
                                                                *PARAMS, 4)
        _, lse_negatives_B, lse_positives_B = facecl.unicon_loss(emb, centers, query_labels_B, key_labels_K,
                                                                 own_key_B, 0.1, 0.2, 4)
        unicon_grads = facecl.unicon_loss_backward(grad_N, emb, centers, query_labels_B, key_labels_K, own_key_B,
                                                   lse_negatives_B, lse_positives_B, 0.1, 0.2, 4, True)
        raw_centers = centers * 2.5  # the normalised op's centers are raw
        normalized_stats = facecl.normalized_linear_margin_softmax_ce_stats(emb, raw_centers, target_N, *PARAMS, 4)
        workspace_CD = normalized_stats[4]
        normalized_grad_emb = facecl.normalized_linear_margin_softmax_ce_backward_(
            grad_N, emb, raw_centers, target_N, normalized_stats[0], normalized_stats[1], normalized_stats[3],
            workspace_CD, *PARAMS, 4)  # workspace_CD now holds the centers' gradient
        kept_S, kept_target_N = torch.tensor([0, 2, 3, 5]), torch.tensor([1, -1, 3, 0])  # sampled: 4 of 6 kept
        sampled_stats = facecl.sampled_normalized_linear_margin_softmax_ce_stats(emb, raw_centers, kept_S,
                                                                                 kept_target_N, *PARAMS, 3)
        sampled_workspace_CD = sampled_stats[4]
        sampled_grad_emb = facecl.sampled_normalized_linear_margin_softmax_ce_backward_(
            grad_N, emb, raw_centers, kept_S, kept_target_N, sampled_stats[0], sampled_stats[1], sampled_stats[3],
            sampled_workspace_CD, *PARAMS, 3)  # the gradient of all 6 centers, rows 1 and 4 zero
        return (row_max_N, sum_exp_N, target_logit_N, *linear_stats, grad_NC, *linear_grads, *unicon_grads,
                *normalized_stats[:4], normalized_grad_emb, workspace_CD, *sampled_stats[:4], sampled_grad_emb,
                sampled_workspace_CD)

    for got, want in zip(torch.compile(protocol, fullgraph=True)(emb_ND, centers_CD), protocol(emb_ND, centers_CD)):
        assert_close_relative(got, want, 1e-6, "compiled vs eager")


@pytest.mark.parametrize("sampled", [False, True], ids=["all-rows", "kept-rows"])
def test_torch_compile_fullgraph_of_the_normalized_head_function(sampled):
    """distributed_normalized_linear_margin_softmax_ce (the head's fused_linear path, single process), with and
    without kept rows, compiled whole: the same loss and gradients (every center's) as eager."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    emb_ND, centers_CD = unit_rows(6, 8, gen), unit_rows(9, 8, gen) * 3.0
    kept_S = torch.tensor([1, 2, 4, 7, 8]) if sampled else None
    target_N = torch.tensor([0, 4, -1, 2, 3, 1])

    def loss(emb, centers):
        return ops.distributed_normalized_linear_margin_softmax_ce(emb, centers, target_N, MARGIN, block_size=2,
                                                                   interclass_filter=0.3, kept_S=kept_S)

    results = []
    for fn in (torch.compile(loss, fullgraph=True), loss):
        emb, centers = emb_ND.clone().requires_grad_(True), centers_CD.clone().requires_grad_(True)
        value = fn(emb, centers)
        value.backward()
        results.append((value.detach(), emb.grad, centers.grad))
    for got, want, what in zip(*results, ("loss", "embedding grad", "center grad")):
        assert_close_relative(got, want, 1e-6, what)
    if sampled:
        assert (results[0][2][[0, 3, 5, 6]] == 0).all()
