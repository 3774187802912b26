"""Contrastive memories of pseudo-label clusters, the loss the adaptation trains with.

``ClusterMemory`` (Cluster Contrast, Dai et al. 2021): one normalised centroid per cluster; InfoNCE of each
feature against all centroids; after each step a cluster's centroid moves toward the batch member least like
it (the "hard" update the paper found best).

``CameraProxyMemory`` (camera-aware proxies, CAP, Wang et al. AAAI 2021): one proxy per (cluster, camera),
so a cluster split across cameras is pulled together explicitly. The intra-camera term classifies a feature
among its own camera's proxies; the inter-camera term pulls it to every proxy of its cluster against the
hardest proxies of other clusters. Camera bias is what a new deployment adds, and this term removes it."""

import torch
import torch.nn.functional as F


def _normalised_means(features: torch.Tensor, groups: torch.Tensor, count: int) -> torch.Tensor:
    sums = torch.zeros(count, features.shape[1]).index_add_(0, groups, features)
    return F.normalize(sums, dim=1)


class ClusterMemory:
    def __init__(self, features: torch.Tensor, labels: torch.Tensor, temperature: float, momentum: float):
        """``features`` [n, E] normalised, ``labels`` [n] in 0..K-1 (no outliers)."""
        self.centroids = _normalised_means(features, labels, int(labels.max()) + 1)
        self.temperature, self.momentum = temperature, momentum

    def loss(self, features: torch.Tensor, labels: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(features @ self.centroids.T / self.temperature, labels)

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, cameras: torch.Tensor) -> None:
        similarity = (features * self.centroids[labels]).sum(dim=1)
        for label in labels.unique():
            members = torch.nonzero(labels == label).squeeze(1)
            hardest = features[members[similarity[members].argmin()]]
            moved = self.momentum * self.centroids[label] + (1 - self.momentum) * hardest
            self.centroids[label] = F.normalize(moved, dim=0)


class CameraProxyMemory:
    def __init__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor,
        cameras: torch.Tensor,
        temperature: float,
        momentum: float,
        hard_negatives: int,
        inter_weight: float,
    ):
        """``cameras`` [n] in 0..C-1; a proxy for each (cluster, camera) pair that has members."""
        keys = labels * (int(cameras.max()) + 1) + cameras
        self.proxy_keys, proxy_of = torch.unique(keys, return_inverse=True)
        self.proxies = _normalised_means(features, proxy_of, len(self.proxy_keys))
        self.proxy_cluster = self.proxy_keys // (int(cameras.max()) + 1)
        self.proxy_camera = self.proxy_keys % (int(cameras.max()) + 1)
        self.num_cameras = int(cameras.max()) + 1
        self.temperature, self.momentum = temperature, momentum
        self.hard_negatives, self.inter_weight = hard_negatives, inter_weight

    def _proxy_index(self, labels: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        return torch.searchsorted(self.proxy_keys, labels * self.num_cameras + cameras)

    def loss(self, features: torch.Tensor, labels: torch.Tensor, cameras: torch.Tensor) -> torch.Tensor:
        logits = features @ self.proxies.T / self.temperature  # [B, P]
        own = self._proxy_index(labels, cameras)
        same_camera = self.proxy_camera[None, :] == cameras[:, None]
        intra = F.cross_entropy(logits.masked_fill(~same_camera, float("-inf")), own)
        positive = self.proxy_cluster[None, :] == labels[:, None]
        negatives = logits.masked_fill(positive, float("-inf"))
        k = min(self.hard_negatives, negatives.shape[1])
        hardest = negatives.topk(k, dim=1).values
        positives = logits.masked_fill(~positive, float("-inf"))
        denominator = torch.logsumexp(torch.cat([positives, hardest], dim=1), dim=1, keepdim=True)
        log_probability = (logits - denominator).masked_fill(~positive, 0)
        inter = -(log_probability.sum(dim=1) / positive.sum(dim=1)).mean()
        return intra + self.inter_weight * inter

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor, cameras: torch.Tensor) -> None:
        for index, feature in zip(self._proxy_index(labels, cameras).tolist(), features):
            moved = self.momentum * self.proxies[index] + (1 - self.momentum) * feature
            self.proxies[index] = F.normalize(moved, dim=0)
