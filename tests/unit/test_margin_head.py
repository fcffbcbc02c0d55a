# Margin formulas and the reference margin-softmax head against direct, independent formulas.
import math

import pytest
import torch

from toolkit.heads import ReferenceIdentityCenterHead, Margin, apply_margin_to_target, margin_softmax_ce_reference


def direct_target(c: float, m1: float, m2: float, m3: float) -> float:
    """Textbook combined margin on one scalar cosine, written without torch."""
    theta = math.acos(max(-1.0, min(1.0, c)))
    if m1 * theta + m2 <= math.pi:
        return math.cos(m1 * theta + m2) - m3
    return c - m2 * math.sin(m2) - m3


@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.0, 0.3, 0.2), (1.5, 0.1, 0.1)])
def test_margin_matches_scalar_formula(m1, m2, m3):
    cosines = torch.linspace(-0.999, 0.999, 201, dtype=torch.float64)
    got = apply_margin_to_target(cosines, Margin(scale=1.0, m1=m1, m2=m2, m3=m3))
    expected = torch.tensor([direct_target(float(c), m1, m2, m3) for c in cosines], dtype=torch.float64)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_arcface_target_is_monotone_in_theta_including_fallback():
    # theta + m2 > pi happens for cosines below cos(pi - m2); the fallback must keep decreasing in theta.
    theta = torch.linspace(0.0, math.pi, 2001, dtype=torch.float64)
    target = apply_margin_to_target(torch.cos(theta), Margin(m2=0.5, m3=0.0))
    assert torch.all(target[1:] <= target[:-1] + 1e-12)


def reference_loss_by_hand(emb, centers, labels, s, m1, m2, m3):
    """Per-row loss written out: -log(exp(s*t) / (exp(s*t) + sum_{j != y} exp(s*c_j)))."""
    emb_n = emb / emb.norm(dim=1, keepdim=True)
    cen_n = centers / centers.norm(dim=1, keepdim=True)
    losses = []
    for i in range(emb.shape[0]):
        cos_row = [float(emb_n[i] @ cen_n[j]) for j in range(centers.shape[0])]
        y = int(labels[i])
        target = s * direct_target(cos_row[y], m1, m2, m3)
        others = [s * c for j, c in enumerate(cos_row) if j != y]
        top = max([target, *others])
        denom = math.exp(target - top) + sum(math.exp(o - top) for o in others)
        losses.append(-(target - top - math.log(denom)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("m1,m2,m3", [(1.0, 0.5, 0.0), (1.0, 0.0, 0.4), (1.2, 0.2, 0.1)])
def test_reference_loss_equals_hand_computation(m1, m2, m3):
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(6, 8, generator=gen, dtype=torch.float64)
    centers = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    labels = torch.tensor([0, 4, 2, 2, 1, 3])
    got = margin_softmax_ce_reference(emb, centers, labels, Margin(scale=16.0, m1=m1, m2=m2, m3=m3))
    expected = reference_loss_by_hand(emb, centers, labels, 16.0, m1, m2, m3)
    assert got.dtype == torch.float64
    assert abs(float(got) - expected) < 1e-9 * max(1.0, abs(expected))


def test_reference_gradients_pass_gradcheck_in_float64():
    gen = torch.Generator().manual_seed(1)
    emb = torch.randn(4, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    centers = torch.randn(7, 6, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 6, 0, 1])
    margin = Margin(scale=8.0, m1=1.0, m2=0.3, m3=0.1)

    def loss_fn(e, c):
        return margin_softmax_ce_reference(e, c, labels, margin)

    assert torch.autograd.gradcheck(loss_fn, (emb, centers), eps=1e-6, atol=1e-5)


def test_head_runs_loss_in_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    head = ReferenceIdentityCenterHead(10, 16, Margin(scale=32.0, m3=0.4))
    emb = torch.randn(8, 16)
    labels = torch.randint(0, 10, (8,))
    fp32_loss = head(emb, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast_loss = head(emb.bfloat16(), labels)
    assert autocast_loss.dtype == torch.float32
    # Only the bf16 rounding of the input embedding differs.
    assert abs(float(autocast_loss.detach()) - float(fp32_loss.detach())) < 0.05


def test_head_initialisation_statistics():
    torch.manual_seed(0)
    head = ReferenceIdentityCenterHead(1000, 64, Margin())
    centers = head.centers_CD.detach()
    assert centers.dtype == torch.float32
    assert abs(float(centers.std()) - 0.01) < 5e-4
    assert abs(float(centers.mean())) < 5e-4
