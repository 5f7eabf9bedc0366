"""DINOv2's options: Sinkhorn-Knopp centring (as a per-batch centre for the fused loss) and KoLeo."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dinocxr_fast.dino import DINOLoss
from dinocxr_fast.dino.centering import sinkhorn_center, sinkhorn_knopp_reference
from dinocxr_fast.dino.koleo import koleo_loss


def dinov2_sinkhorn_knopp(teacher_output, teacher_temp, n_iterations=3):
    """facebookresearch/dinov2's sinkhorn_knopp_teacher, restated (single process, no max shift)."""
    q = torch.exp(teacher_output.double() / teacher_temp).t()
    b, k = q.shape[1], q.shape[0]
    q /= torch.sum(q)
    for _ in range(n_iterations):
        q /= torch.sum(q, dim=1, keepdim=True)
        q /= k
        q /= torch.sum(q, dim=0, keepdim=True)
        q /= b
    q *= b
    return q.t()


@pytest.mark.parametrize("shape,temp,iters", [((8, 16), 0.1, 3), ((13, 37), 0.04, 3), ((6, 5), 0.07, 1), ((32, 256), 0.02, 5)])
def test_sinkhorn_center_reproduces_dinov2_targets(shape, temp, iters):
    torch.manual_seed(0)
    t = torch.randn(shape) * 0.3
    expected = dinov2_sinkhorn_knopp(t, temp, iters)
    torch.testing.assert_close(sinkhorn_knopp_reference(t, temp, iters), expected, rtol=1e-9, atol=1e-12)
    center = sinkhorn_center(t, temp, iters)
    assert center.shape == (1, shape[1])
    got = F.softmax((t - center) / temp, dim=-1).double()
    torch.testing.assert_close(got, expected, rtol=2e-4, atol=1e-6)


def test_sinkhorn_targets_balance_the_prototypes():
    torch.manual_seed(1)
    t = torch.randn(64, 32) * 0.2 + torch.linspace(0, 1, 32)  # some prototypes far more likely
    center = sinkhorn_center(t, 0.05, 10)
    q = F.softmax((t - center) / 0.05, dim=-1)
    torch.testing.assert_close(q.sum(1), torch.ones(64))
    # columns are near-uniform (each prototype gets ~B/K of the mass), unlike the plain softmax
    assert q.sum(0).std() < 0.1 * F.softmax(t / 0.05, dim=-1).sum(0).std()


def test_sinkhorn_center_is_safe_at_low_temperature():
    t = torch.randn(16, 64) * 3.0
    center = sinkhorn_center(t, 0.01, 3)
    assert torch.isfinite(center).all()
    assert torch.isfinite(F.softmax((t - center) / 0.01, dim=-1)).all()


def test_sinkhorn_center_rejects_zero_iterations():
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_center(torch.randn(4, 8), 0.1, 0)


def test_dino_loss_sinkhorn_mode_is_cross_entropy_with_sinkhorn_targets():
    torch.manual_seed(2)
    b, k, crops = 6, 48, 4
    student = torch.randn(crops * b, k, requires_grad=True)
    teacher = torch.randn(2 * b, k)
    loss_fn = DINOLoss(k, crops, teacher_temp=0.04, warmup_teacher_temp=0.04, centering="sinkhorn", backend="torch")
    loss = loss_fn(student, teacher, epoch=0)
    q = dinov2_sinkhorn_knopp(teacher, 0.04).float().chunk(2)
    s = (student / 0.1).chunk(crops)
    total, n = 0.0, 0
    for iq, target in enumerate(q):
        for v in range(crops):
            if v != iq:
                total = total + torch.sum(-target * F.log_softmax(s[v], dim=-1), dim=-1).mean()
                n += 1
    torch.testing.assert_close(loss, total / n, rtol=1e-4, atol=1e-5)
    loss.backward()
    assert torch.isfinite(student.grad).all()
    # the centre buffer holds this batch's Sinkhorn centre (no EMA), for the monitor and checkpoints
    torch.testing.assert_close(loss_fn.center, sinkhorn_center(teacher, 0.04, 3))


def test_dino_loss_rejects_unknown_centering():
    with pytest.raises(ValueError, match="centering"):
        DINOLoss(8, 2, centering="mean")


def test_koleo_matches_its_definition_and_spreads_features():
    torch.manual_seed(3)
    x = torch.randn(10, 7, requires_grad=True)
    got = koleo_loss(x)
    xn = F.normalize(x.detach(), dim=-1)
    dist = torch.cdist(xn, xn) + torch.eye(10) * 10
    expected = -torch.log(dist.min(dim=1).values + 1e-8).mean()
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-6)
    got.backward()
    with torch.no_grad():  # a small step against the gradient raises the nearest-neighbour distances
        assert koleo_loss(x - 0.05 * x.grad) < got


def test_koleo_rejects_a_single_row():
    with pytest.raises(ValueError, match="B >= 2"):
        koleo_loss(torch.randn(1, 4))
