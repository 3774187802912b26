import math

import pytest
import torch

from training.losses import BatchHardTripletLoss, IdentificationLoss, OverlappedActivationPenalty


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


def test_ordered_oap_matches_a_hand_computed_example_and_never_pushes_branch_one():
    # Three branches on a 1x2 grid, k = 1.
    maps = torch.tensor([[[[2.0, 0.0]], [[1.0, 1.0]], [[0.0, 3.0]]]], requires_grad=True)
    a = [[sigmoid(2 - 2), sigmoid(0 - 2)], [sigmoid(0), sigmoid(0)], [sigmoid(-3), sigmoid(0)]]
    union12 = [1 - (1 - a[0][c]) * (1 - a[1][c]) for c in range(2)]
    expected = (sum(a[1][c] * a[0][c] for c in range(2)) + sum(a[2][c] * union12[c] for c in range(2))) / 3
    loss = OverlappedActivationPenalty(k=1, mode="ordered")(maps)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert maps.grad[0, 0].abs().sum() == 0 and maps.grad[0, 1:].abs().sum() > 0


def test_unknown_oap_mode_is_refused():
    with pytest.raises(ValueError, match="unknown OAP mode"):
        OverlappedActivationPenalty(k=1, mode="pairwise")


def test_batch_hard_triplet_matches_a_hand_computed_example():
    # One branch, 2-D unit features: ids 0, 0, 1, 1.
    angles = torch.tensor([0.0, 0.5, 0.3, 2.0])
    features = torch.stack([angles.cos(), angles.sin()], dim=1).unsqueeze(1)
    targets = torch.tensor([0, 0, 1, 1])

    def dist(i, j):
        return (2 - 2 * math.cos(angles[i] - angles[j])) ** 0.5

    expected = (
        sum(
            max(0.0, dist(i, p) - min(dist(i, n) for n in range(4) if targets[n] != targets[i]) + 0.3)
            for i, p in ((0, 1), (1, 0), (2, 3), (3, 2))
        )
        / 4
    )
    assert BatchHardTripletLoss(0.3)(features, targets).item() == pytest.approx(expected, rel=1e-5)
    soft = (
        sum(
            math.log1p(math.exp(dist(i, p) - min(dist(i, n) for n in range(4) if targets[n] != targets[i])))
            for i, p in ((0, 1), (1, 0), (2, 3), (3, 2))
        )
        / 4
    )
    assert BatchHardTripletLoss(None)(features, targets).item() == pytest.approx(soft, rel=1e-5)


def test_triplet_loss_sums_branches_and_survives_duplicates_and_missing_positives():
    features = torch.nn.functional.normalize(torch.randn(4, 2, 8), dim=2)
    targets = torch.tensor([0, 0, 1, 1])
    both = BatchHardTripletLoss()(features, targets)
    per_branch = [BatchHardTripletLoss()(features[:, i : i + 1], targets) for i in range(2)]
    assert both.item() == pytest.approx(sum(p.item() for p in per_branch), rel=1e-6)
    duplicated = features[[0, 0, 2, 3]].clone().requires_grad_()
    BatchHardTripletLoss()(duplicated, targets).backward()
    assert torch.isfinite(duplicated.grad).all()
    assert BatchHardTripletLoss()(features, torch.tensor([0, 1, 2, 3])).item() == 0.0


def test_label_smoothing_spreads_the_target():
    logits = torch.randn(4, 2, 5)
    targets = torch.tensor([0, 1, 2, 3])
    smoothed = IdentificationLoss(label_smoothing=0.1)(logits, targets)
    log_probs = logits.log_softmax(dim=2)
    target = torch.full((4, 5), 0.1 / 5)
    target[torch.arange(4), targets] += 0.9
    expected = -(target.unsqueeze(1) * log_probs).sum(dim=2).mean(dim=0).sum()
    assert smoothed.item() == pytest.approx(expected.item(), rel=1e-6)
