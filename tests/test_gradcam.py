"""Grad-CAM inside training (training/gradcam.py): no parameter gradients touched, the closed form of a linear
head, the two modes, and bf16 autocast."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.gradcam import grad_cam, linear_head_cam


class TinyNet(nn.Module):
    """conv -> A [B, 6, 4, 3] -> GAP -> linear: a head linear in A."""

    def __init__(self, classes: int = 5):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.classifier = nn.Linear(6, classes)

    def forward(self, x):
        activations = F.relu(self.conv(x))
        return activations, self.classifier(activations.mean(dim=(2, 3)))


def target_score(logits, targets):
    return logits.gather(1, targets[:, None]).sum()


@pytest.fixture
def batch():
    torch.manual_seed(0)
    return torch.randn(4, 3, 4, 3), torch.tensor([0, 2, 4, 1])


@pytest.mark.parametrize("mode", ["detached", "differentiable"])
def test_no_parameter_gradient_is_touched_and_the_later_backward_is_unchanged(batch, mode):
    images, targets = batch
    torch.manual_seed(1)
    net = TinyNet()
    twin = copy.deepcopy(net)
    activations, logits = net(images)
    grad_cam(target_score(logits, targets), activations, mode)
    assert all(p.grad is None for p in net.parameters())
    F.cross_entropy(logits, targets).backward()  # the graph was retained
    twin_activations, twin_logits = twin(images)
    F.cross_entropy(twin_logits, targets).backward()
    for p, q in zip(net.parameters(), twin.parameters()):
        assert torch.equal(p.grad, q.grad)
    # gradients already accumulated stay as they are
    before = [p.grad.clone() for p in net.parameters()]
    activations, logits = net(images)
    grad_cam(target_score(logits, targets), activations, mode)
    assert all(torch.equal(p.grad, b) for p, b in zip(net.parameters(), before))


def gap_linear_head(targets, seed, mode="detached"):
    """Leaf activations A [4, 6, 4, 3] (hw = 12), a GAP + Linear head, and Grad-CAM of the targets' logits."""
    torch.manual_seed(seed)
    activations = torch.randn(4, 6, 4, 3, requires_grad=True)
    head = nn.Linear(6, 5)
    logits = head(activations.mean(dim=(2, 3)))
    return activations, head, grad_cam(target_score(logits, targets), activations, mode)


def test_a_gap_linear_head_gives_the_closed_form(batch):
    targets = batch[1]
    activations, head, maps = gap_linear_head(targets, seed=2)
    weight = head.weight[targets]  # [B, C]
    by_hand = F.relu((weight[:, :, None, None] * activations).sum(1)) / 12  # w_k = W_t,k / hw
    assert maps.shape == (4, 4, 3) and maps.dtype == torch.float32 and maps.grad_fn is None
    torch.testing.assert_close(maps, by_hand.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(linear_head_cam(activations, weight).detach(), maps, atol=1e-6, rtol=0)
    without_relu = linear_head_cam(activations, weight, relu=False)
    assert (without_relu < 0).any() and torch.equal(F.relu(without_relu), linear_head_cam(activations, weight))


def test_the_differentiable_mode_passes_gradient_to_the_activations_only(batch):
    targets = batch[1]
    activations, head, maps = gap_linear_head(targets, seed=3, mode="differentiable")
    maps.sum().backward()
    assert head.weight.grad is None and head.bias.grad is None  # nothing flows through the weights
    weight = head.weight[targets].detach() / 12
    active = ((weight[:, :, None, None] * activations).sum(1) > 0).float()
    torch.testing.assert_close(activations.grad, weight[:, :, None, None] * active[:, None], atol=1e-7, rtol=0)


def test_bf16_autocast_matches_fp32_in_normalised_shape(batch):
    images, targets = batch
    torch.manual_seed(4)
    net = TinyNet()
    activations, logits = net(images)
    reference = grad_cam(target_score(logits, targets), activations)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        activations, logits = net(images)
        assert activations.dtype == torch.bfloat16
        maps = grad_cam(target_score(logits, targets), activations)
        assert linear_head_cam(activations, net.classifier.weight[targets]).dtype == torch.float32
    assert maps.dtype == torch.float32

    def shape(m):
        return m / m.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]

    torch.testing.assert_close(shape(maps), shape(reference), atol=0.05, rtol=0)


def test_bad_arguments_are_refused(batch):
    activations = torch.randn(2, 6, 4, 3, requires_grad=True)
    score = activations.sum()
    with pytest.raises(ValueError, match="mode"):
        grad_cam(score, activations, "guided")
    with pytest.raises(ValueError, match="scalar"):
        grad_cam(activations.sum(dim=(1, 2, 3)), activations)


def test_fp16_autocast_keeps_small_gradients_by_scaling_the_score():
    # A classifier initialised like CAMA's (std 1e-3) over a 16 x 8 grid: dScore/dA ~ 1e-5, below fp16's
    # smallest normal, where an unscaled backward loses most of its digits (about 2e-3 off here; 3.5e-4 scaled).
    torch.manual_seed(5)
    conv, head = nn.Conv2d(3, 64, 3, padding=1), nn.Linear(64, 10, bias=False)
    nn.init.normal_(head.weight, std=0.001)
    images, targets = torch.randn(4, 3, 16, 8), torch.tensor([0, 1, 2, 3])

    def maps():
        activations = F.relu(conv(images))
        return grad_cam(target_score(head(activations.mean(dim=(2, 3))), targets), activations)

    reference = maps()
    with torch.autocast("cpu", dtype=torch.float16):
        low = maps()
    assert low.dtype == torch.float32
    assert (low - reference).abs().max() <= 1e-3 * reference.abs().max()
