"""The training objective's terms: CAMA's identification loss (eq. 7) with optional label smoothing, its
overlapped activation penalty (eq. 5-6) in the paper's symmetric form or an ordered form, and a batch-hard
triplet loss on each branch's feature. The trainer sums them with their weights (eq. 8 plus the triplet term).
"""

import torch
import torch.nn.functional as F
from torch import nn

OAP_MODES = ("symmetric", "ordered")


class IdentificationLoss(nn.Module):
    """L_id = sum over branches of the cross-entropy of each branch's class scores (eq. 7); with
    ``label_smoothing`` eps the target is (1 - eps) on the true class and eps spread over all classes."""

    def __init__(self, label_smoothing: float = 0.0):
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        batch, branches, classes = logits.shape
        per_image_branch = F.cross_entropy(
            logits.float().reshape(-1, classes),
            targets.repeat_interleave(branches),
            reduction="none",
            label_smoothing=self.label_smoothing,
        )
        return per_image_branch.view(batch, branches).mean(dim=0).sum()


class OverlappedActivationPenalty(nn.Module):
    """CAMA's penalty on the target-class activation maps [B, N, h, w]; returns the batch mean.

    a^i = sigmoid(M^i_t - sigma^i), sigma^i the k-th largest value of M^i_t (eq. 5).

    ``symmetric`` (eq. 6, the paper's formula): L = (1/N) sum_xy prod_i a^i; every branch is pushed away from
    every other.
    ``ordered``: branch i is penalised only where branches 1..i-1 are already active, and those are held fixed:
    L = (1/N) sum_{i>=2} sum_xy a^i * (1 - prod_{j<i} (1 - sg(a^j))), sg = stop-gradient. The second factor is
    the soft union of the earlier masks, so branch 1 is never pushed and each later branch looks for regions
    the earlier ones left, as the paper's text describes the ordered branches.

    Defined for N >= 2 only: with one branch there is nothing to overlap.
    """

    def __init__(self, k: int, mode: str = "symmetric"):
        super().__init__()
        if k < 1:
            raise ValueError("k must be at least 1")
        if mode not in OAP_MODES:
            raise ValueError(f"unknown OAP mode {mode!r}: one of {', '.join(OAP_MODES)}")
        self.k, self.mode = k, mode

    def masks(self, target_maps: torch.Tensor) -> torch.Tensor:
        """a^i, [B, N, h*w]."""
        batch, branches = target_maps.shape[:2]
        if branches < 2:
            raise ValueError("the overlapped activation penalty needs at least two branches")
        flat = target_maps.float().reshape(batch, branches, -1)
        if self.k > flat.shape[2]:
            raise ValueError(f"k={self.k} exceeds the {flat.shape[2]} cells of the activation map")
        sigma = flat.topk(self.k, dim=2).values[:, :, -1:]
        return torch.sigmoid(flat - sigma)

    def forward(self, target_maps: torch.Tensor) -> torch.Tensor:
        masks = self.masks(target_maps)
        branches = masks.shape[1]
        if self.mode == "symmetric":
            overlap = masks.prod(dim=1).sum(dim=1)
        else:
            covered = 1 - torch.cumprod(1 - masks.detach(), dim=1)
            overlap = (masks[:, 1:] * covered[:, :-1]).sum(dim=(1, 2))
        return (overlap / branches).mean()


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances [B, B]; clamped before the square root so that duplicates (a PxK batch may draw an
    image twice) give a zero gradient, not NaN."""
    squared = x.pow(2).sum(dim=1)
    return (squared.view(-1, 1) + squared.view(1, -1) - 2 * x @ x.T).clamp_min(1e-12).sqrt()


class BatchHardTripletLoss(nn.Module):
    """Batch-hard triplet loss (Hermans et al. 2017) summed over branches, on the per-branch L2-normalised
    features [B, N, D], the very vectors the embedding concatenates (so training and retrieval use one
    metric). For each anchor: the farthest positive and the nearest negative in the batch, in Euclidean
    distance; hinge with ``margin``, or the soft-plus form when ``margin`` is None. Anchors without a positive
    or a negative in the batch are left out."""

    def __init__(self, margin=0.3):
        super().__init__()
        self.margin = margin

    def forward(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        features = features.float()
        same = targets.view(-1, 1) == targets.view(1, -1)
        others = ~torch.eye(len(targets), dtype=torch.bool, device=targets.device)
        positives, negatives = same & others, ~same
        usable = positives.any(dim=1) & negatives.any(dim=1)
        if not usable.any():
            return features.sum() * 0.0
        total = features.new_zeros(())
        for branch in range(features.shape[1]):
            dist = pairwise_distances(features[:, branch])
            hardest_positive = dist.masked_fill(~positives, float("-inf")).amax(dim=1)
            hardest_negative = dist.masked_fill(~negatives, float("inf")).amin(dim=1)
            gap = (hardest_positive - hardest_negative)[usable]
            total = total + (F.softplus(gap) if self.margin is None else F.relu(gap + self.margin)).mean()
        return total


class ProbabilityMarginRankLoss(nn.Module):
    """FMN's rank loss (eq. 5): mean over the batch of max(0, p^G_t - p^L_t + margin), p_t the softmax
    probability of the true class from the frozen global network (G, a constant) and the locally attentive
    one (L): the LAN must be more sure of the right person than the GRN, by the margin."""

    def __init__(self, margin: float = 0.1):
        super().__init__()
        self.margin = margin

    def forward(self, global_logits: torch.Tensor, local_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        p_global = global_logits.detach().float().softmax(dim=-1).gather(-1, targets.view(-1, 1))
        p_local = local_logits.float().softmax(dim=-1).gather(-1, targets.view(-1, 1))
        return F.relu(p_global - p_local + self.margin).mean()
