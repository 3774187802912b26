import math

import pytest
import torch

from training.losses import IdentificationLoss, OverlappedActivationPenalty


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_oap_matches_a_hand_computed_example():
    # Two branches on a 1x3 grid, k = 1: sigma is each map's maximum.
    maps = torch.tensor([[[[3.0, 1.0, 0.0]], [[0.0, 2.0, 2.0]]]])
    a1 = [sigmoid(3 - 3), sigmoid(1 - 3), sigmoid(0 - 3)]
    a2 = [sigmoid(0 - 2), sigmoid(2 - 2), sigmoid(2 - 2)]
    expected = sum(x * y for x, y in zip(a1, a2)) / 2
    assert OverlappedActivationPenalty(k=1)(maps).item() == pytest.approx(expected, rel=1e-6)


def test_oap_is_near_zero_for_disjoint_and_large_for_identical_activations():
    # Eight cells activated in steps above the threshold (the k-th largest), the rest far below it.
    top = torch.full((32,), -30.0)
    top[:8] = torch.arange(10.0, 2.0, -1.0)
    bottom = top.flip(0)
    penalty = OverlappedActivationPenalty(k=8)
    disjoint = penalty(torch.stack([top, bottom]).view(1, 2, 8, 4))
    identical = penalty(torch.stack([top, top]).view(1, 2, 8, 4))
    assert disjoint.item() < 1e-3
    expected = sum(sigmoid(v) ** 2 for v in range(8)) / 2
    assert identical.item() == pytest.approx(expected, abs=1e-3)
    assert identical.item() > 2.5


def test_oap_gradient_reaches_every_branch():
    maps = torch.randn(2, 3, 4, 2, requires_grad=True)
    OverlappedActivationPenalty(k=3)(maps).backward()
    per_branch = maps.grad.abs().sum(dim=(0, 2, 3))
    assert (per_branch > 0).all()


def test_oap_refuses_a_single_branch_and_a_k_beyond_the_grid():
    with pytest.raises(ValueError):
        OverlappedActivationPenalty(k=2)(torch.randn(1, 1, 4, 2))
    with pytest.raises(ValueError):
        OverlappedActivationPenalty(k=9)(torch.randn(1, 2, 4, 2))


def test_identification_loss_sums_branch_cross_entropies():
    logits = torch.randn(4, 3, 5)
    targets = torch.tensor([0, 1, 2, 3])
    expected = sum(torch.nn.functional.cross_entropy(logits[:, i], targets) for i in range(3))
    assert IdentificationLoss()(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)
