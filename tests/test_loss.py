"""NT-Xent against independent references: a per-anchor loop of eq. 1 and the
official code's two-block formulation."""
import pytest
import torch
import torch.nn.functional as F

from loss import contrast_accuracy, contrastive_logits, nt_xent


def per_anchor_loop(z1, z2, t):
    """Eq. 1 and Algorithm 1 of the paper, one anchor at a time, float64."""
    z = torch.cat([z1, z2]).double()
    z = z / z.norm(dim=1, keepdim=True)
    two_n = z.shape[0]
    total = 0.0
    for i in range(two_n):
        j = (i + two_n // 2) % two_n
        others = torch.stack([z[i] @ z[k] / t for k in range(two_n) if k != i])
        total = total - (z[i] @ z[j] / t - torch.logsumexp(others, dim=0))
    return total / two_n


def official_two_block(z1, z2, t):
    """google-research/simclr objective.py: logits_ab, logits_aa (diagonal masked
    with a large number); returns CE_a + CE_b, twice the mean over anchors."""
    a, b = F.normalize(z1.double(), dim=1), F.normalize(z2.double(), dim=1)
    n = a.shape[0]
    large = 1e9 * torch.eye(n, dtype=torch.float64)
    labels = torch.arange(n)
    logits_aa, logits_bb = a @ a.T / t - large, b @ b.T / t - large
    logits_ab, logits_ba = a @ b.T / t, b @ a.T / t
    loss_a = F.cross_entropy(torch.cat([logits_ab, logits_aa], 1), labels)
    loss_b = F.cross_entropy(torch.cat([logits_ba, logits_bb], 1), labels)
    return loss_a + loss_b


@pytest.mark.parametrize("t", [0.05, 0.1, 0.5, 1.0])
def test_matches_per_anchor_loop_values_and_gradients(t):
    g = torch.Generator().manual_seed(int(t * 100))
    z1 = torch.randn(6, 5, generator=g, requires_grad=True)
    z2 = torch.randn(6, 5, generator=g, requires_grad=True)
    ours = nt_xent(z1, z2, t)
    g1, g2 = torch.autograd.grad(ours, (z1, z2))
    ref = per_anchor_loop(z1, z2, t)
    r1, r2 = torch.autograd.grad(ref, (z1, z2))
    assert ours.dtype == torch.float32
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(g1, r1, rtol=1e-4, atol=1e-6)  # the float64 loop's gradients, cast back to z's dtype
    torch.testing.assert_close(g2, r2, rtol=1e-4, atol=1e-6)


def test_official_code_returns_twice_our_mean():
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(16, 8, generator=g), torch.randn(16, 8, generator=g)
    assert 2 * nt_xent(z1, z2, 0.1).item() == pytest.approx(official_two_block(z1, z2, 0.1).item(), rel=1e-5)


def test_scale_invariant_and_known_value():
    g = torch.Generator().manual_seed(4)
    z1, z2 = torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g)
    assert nt_xent(z1 * 7.0, z2 * 0.01, 0.2).item() == pytest.approx(nt_xent(z1, z2, 0.2).item(), rel=1e-5)
    # Orthonormal embeddings with identical views: positive sim 1, negatives 0, so
    # l = -log(e^(1/t) / (e^(1/t) + 2N - 2)) for every anchor.
    e = torch.eye(4)
    t = 0.5
    expected = -torch.log(torch.exp(torch.tensor(1 / t)) / (torch.exp(torch.tensor(1 / t)) + 6))
    assert nt_xent(e, e, t).item() == pytest.approx(expected.item(), rel=1e-6)


def test_stable_at_temperature_0_01():
    g = torch.Generator().manual_seed(5)
    z1 = (torch.randn(32, 16, generator=g) * 1e4).requires_grad_()
    z2 = (z1.detach() + torch.randn(32, 16, generator=g)).requires_grad_()
    loss = nt_xent(z1, z2, 0.01)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all() and torch.isfinite(z2.grad).all()
    ref = per_anchor_loop(z1.detach(), z2.detach(), 0.01)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-4, abs=1e-4)


def test_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(6)
    z1, z2 = torch.randn(16, 32, generator=g).bfloat16(), torch.randn(16, 32, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, _ = contrastive_logits(z1, z2, 0.1)
        loss = nt_xent(z1, z2, 0.1)
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    # Same as float32 arithmetic on the same (bf16-rounded) embeddings, not bf16 arithmetic.
    assert loss.item() == pytest.approx(per_anchor_loop(z1.float(), z2.float(), 0.1).item(), rel=1e-5)


def test_logits_layout_and_accuracy():
    g = torch.Generator().manual_seed(7)
    z1 = torch.randn(5, 8, generator=g)
    z2 = z1 + 0.01 * torch.randn(5, 8, generator=g)  # positives nearly identical: every anchor right
    logits, targets = contrastive_logits(z1, z2, 0.1)
    assert logits.shape == (10, 10)
    assert torch.isinf(logits.diagonal()).all() and (logits.diagonal() < 0).all()
    assert targets.tolist() == [5, 6, 7, 8, 9, 0, 1, 2, 3, 4]
    assert contrast_accuracy(logits, targets).item() == 1.0
    # Against a loop: share of anchors whose positive has the highest similarity.
    z2 = torch.randn(5, 8, generator=g)
    logits, targets = contrastive_logits(z1, z2, 0.1)
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    hits = 0
    for i in range(10):
        sims = [(z[i] @ z[k]).item() if k != i else -2.0 for k in range(10)]
        hits += max(range(10), key=lambda k: sims[k]) == (i + 5) % 10
    assert contrast_accuracy(logits, targets).item() == pytest.approx(hits / 10)


def test_rejects_mismatched_views():
    with pytest.raises(ValueError, match="both be"):
        nt_xent(torch.randn(4, 8), torch.randn(5, 8))
