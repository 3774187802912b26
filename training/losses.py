"""CAMA's objective (eq. 5-8): the identification loss summed over branches plus alpha times the
overlapped activation penalty."""
import torch
import torch.nn.functional as F
from torch import nn


class IdentificationLoss(nn.Module):
    """L_id = sum over branches of the cross-entropy of each branch's class scores (eq. 7)."""

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        batch, branches, classes = logits.shape
        per_image_branch = F.cross_entropy(logits.float().reshape(-1, classes), targets.repeat_interleave(branches), reduction="none")
        return per_image_branch.view(batch, branches).mean(dim=0).sum()


class OverlappedActivationPenalty(nn.Module):
    """L_oap = (1/N) sum_xy prod_i a^i with a^i = sigmoid(M^i_t - sigma^i), sigma^i the k-th largest of M^i_t.

    Takes the target-class activation maps [B, N, h, w]; returns the batch mean. Defined for N >= 2 only:
    with one branch there is nothing to overlap, and the product would just suppress the branch's own map.
    """

    def __init__(self, k: int):
        super().__init__()
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k

    def forward(self, target_maps: torch.Tensor) -> torch.Tensor:
        batch, branches = target_maps.shape[:2]
        if branches < 2:
            raise ValueError("the overlapped activation penalty needs at least two branches")
        flat = target_maps.float().reshape(batch, branches, -1)
        if self.k > flat.shape[2]:
            raise ValueError(f"k={self.k} exceeds the {flat.shape[2]} cells of the activation map")
        sigma = flat.topk(self.k, dim=2).values[:, :, -1:]
        masks = torch.sigmoid(flat - sigma)
        return (masks.prod(dim=1).sum(dim=1) / branches).mean()
