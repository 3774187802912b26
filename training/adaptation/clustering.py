"""Pseudo-labels for unlabeled crops: DBSCAN over the k-reciprocal Jaccard distance (Zhong et al. 2017), as
Cluster Contrast (Dai et al. 2021) clusters. Numpy only: no scikit-learn on the install path."""

from dataclasses import dataclass

import numpy as np

from model_zoo.rerank import jaccard_distances

OUTLIER = -1


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray  # [n] cluster 0..K-1, or OUTLIER
    num_clusters: int

    @property
    def outliers(self) -> int:
        return int((self.labels == OUTLIER).sum())


def dbscan(distance: np.ndarray, eps: float, min_samples: int) -> np.ndarray:
    """DBSCAN on a precomputed [n, n] distance: labels 0..K-1 numbered by first member, OUTLIER for noise.

    A core point has at least ``min_samples`` points (itself included) within ``eps``; clusters are the
    connected core points, and a border point joins the cluster of its nearest core neighbour."""
    near = distance <= eps
    core_ids = np.flatnonzero(near.sum(axis=1) >= min_samples)
    rows, cols = np.nonzero(near[np.ix_(core_ids, core_ids)])  # every core point with itself, so none is left out
    labels = _union(np.stack([core_ids[rows], core_ids[cols]], axis=1), len(distance))
    for i in np.setdiff1d(np.arange(len(distance)), core_ids):
        neighbours = core_ids[near[i, core_ids]]
        if len(neighbours):
            labels[i] = labels[neighbours[np.argmin(distance[i, neighbours])]]
    return _renumbered(labels)


def _renumbered(labels: np.ndarray) -> np.ndarray:
    """Clusters numbered in order of their first member, so equal inputs give equal labels."""
    out = np.full(len(labels), OUTLIER)
    clustered = labels != OUTLIER
    _, first, inverse = np.unique(labels[clustered], return_index=True, return_inverse=True)
    out[clustered] = np.argsort(np.argsort(first))[inverse]
    return out


def _union(pairs: np.ndarray, n: int) -> np.ndarray:
    """Connected components of ``pairs`` [m, 2] over n points; points in no pair are OUTLIER."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for a, b in pairs:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    labels = np.full(n, OUTLIER)
    paired = np.unique(pairs)
    labels[paired] = [root(i) for i in paired]
    return _renumbered(labels)


def cross_camera_mutual_neighbours(features: np.ndarray, cameras: np.ndarray) -> np.ndarray:
    """Labels joining i and j when, for each pair of cameras, j is i's most similar crop in j's camera and i is
    j's in i's: single-shot data (one crop per person and camera, as PRID and GRID) has no dense clusters for
    DBSCAN, but its true pairs are often each other's best match across cameras."""
    similarity = features @ features.T
    pairs = []
    for a in np.unique(cameras):
        for b in np.unique(cameras):
            rows, cols = np.flatnonzero(cameras == a), np.flatnonzero(cameras == b)
            if a >= b or not len(rows) or not len(cols):
                continue
            block = similarity[np.ix_(rows, cols)]
            best_col, best_row = block.argmax(axis=1), block.argmax(axis=0)
            mutual = best_row[best_col] == np.arange(len(rows))
            pairs.extend(zip(rows[mutual], cols[best_col[mutual]]))
    return _union(np.array(pairs, np.int64).reshape(-1, 2), len(features))


def cluster_features(
    features: np.ndarray, cameras: np.ndarray, method: str, eps: float, min_samples: int, k1: int, k2: int
) -> Clustering:
    """Pseudo-labels of L2-normalised features [n, F] by ``method`` ("dbscan" or "mutual")."""
    if method == "mutual":
        labels = cross_camera_mutual_neighbours(features, cameras)
    else:
        labels = dbscan(jaccard_distances(features, k1, k2), eps, min_samples)
    return Clustering(labels, int(labels.max()) + 1 if len(labels) else 0)
