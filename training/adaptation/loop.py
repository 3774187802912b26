"""The adaptation loop: each epoch re-clusters every crop with the current model, builds a fresh memory from
the clusters, and trains against it; outliers (crops in no cluster) sit the epoch out, as in Cluster Contrast,
and are clustered again the next epoch.

What trains is an ``Adaptee``: the per-branch head on a contract file's pooled maps (``HeadAdaptee``, here), or
a training checkpoint's whole network on the decoded crops (``training.adaptation.trunk.TrunkAdaptee``)."""

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, List, Optional, Protocol

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from training.adaptation.clustering import OUTLIER, cluster_features
from training.adaptation.head import BranchLinearHead
from training.adaptation.memory import CameraProxyMemory, ClusterMemory

MEMORIES = ("cluster", "camera")
OAP_NEEDS_MAPS = "oap_weight needs a network's feature maps: adapt a checkpoint or an IR, not a head"
CLUSTERERS = ("dbscan", "mutual")


@dataclass
class AdaptationSettings:
    """Every setting of one adaptation. The defaults are the variant bench/adaptation.py chose on CUHK03-val
    (docs/training.md); the clustering and memory constants are Cluster Contrast's and CAP's published ones."""

    epochs: int = 10
    clusterer: str = "mutual"  # "mutual": cross-camera mutual nearest neighbours; "dbscan": Cluster Contrast's
    memory: str = "cluster"  # "cluster": Cluster Contrast's centroids; "camera": CAP's camera-aware proxies
    eps: float = 0.6  # DBSCAN's radius on the Jaccard distance (Cluster Contrast, Market)
    min_samples: int = 4  # DBSCAN's core size, the crop itself included
    k1: int = 30
    k2: int = 6
    temperature: float = 0.05
    momentum: float = 0.2
    hard_negatives: int = 50  # CAP's inter-camera term: the hardest proxies of other clusters
    inter_weight: float = 0.5  # CAP's weight of the inter-camera term
    batch_size: int = 64
    instances: int = 4  # crops of one cluster in a batch
    steps_per_epoch: int = 100
    lr: float = 3e-4  # Adam
    weight_decay: float = 5e-4
    anchor_weight: float = 0.0  # lambda of ||W - I||^2 + ||b||^2, a pull back toward the source model
    oap_weight: float = 0.0  # CAMA's OAP on activation maps of each crop's cluster centroid (a network's branches)
    seed: int = 0

    def __post_init__(self):
        if self.clusterer not in CLUSTERERS:
            raise ValueError(f"clusterer {self.clusterer!r}: one of {', '.join(CLUSTERERS)}")
        if self.memory not in MEMORIES:
            raise ValueError(f"memory {self.memory!r}: one of {', '.join(MEMORIES)}")
        if self.batch_size % self.instances:
            raise ValueError(f"batch_size {self.batch_size} is not a multiple of instances {self.instances}")


# Crops of one camera: the clusterer and memory that need no camera ids (the camera-aware ones need two cameras or
# more), whatever was asked; and where a setting is left at its default, the value bench/adaptation.py chose for
# such crops (``chosen_one_camera``: the best of the camera-free variants, by the same rule as the default).
CAMERA_FREE = dict(clusterer="dbscan", memory="cluster")
ONE_CAMERA_DEFAULTS = dict(lr=1e-4, steps_per_epoch=20)


@dataclass
class EpochRecord:
    epoch: int
    clusters: int
    outliers: int
    loss: float  # the epoch's mean
    loss_start: float  # the mean over its first fifth of steps, against a memory built from the epoch's clusters
    loss_end: float  # ... and over its last fifth: the loss falls within an epoch; each epoch starts afresh
    seconds: float


def embed(head: BranchLinearHead, pooled: np.ndarray) -> np.ndarray:
    """Adapted embeddings [n, N*D] of pooled maps [n, N, D]."""
    with torch.no_grad():
        return head(torch.from_numpy(pooled)).numpy()


class Adaptee(Protocol):
    """What an adaptation trains, and how it embeds the crops."""

    module: nn.Module  # its parameters train; its state is what a checkpoint keeps
    signature: list  # what a checkpoint must match to be resumed (the crops' shape)

    def features(self) -> np.ndarray:
        """Every crop's embedding [n, N*D] (each branch normalised), both views averaged: what is clustered."""

    def batch_features(self, batch: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        """The embeddings of the crops ``batch`` (indices) as training sees them, with their gradients."""

    def penalty(self) -> torch.Tensor:
        """How far it has moved from the source (the anchor term's penalty)."""

    def overlap(self, centroids: torch.Tensor) -> torch.Tensor:
        """OAP on the last batch's maps, each crop's activation maps taken with its cluster's centroid [B, N*D]
        in place of an identity classifier's row."""


class HeadAdaptee:
    """A per-branch linear head on each crop's pooled source maps [n, V, N, D] in V views (image, mirror): an
    epoch costs milliseconds, and any contract file can be adapted so."""

    def __init__(self, pooled_views: np.ndarray):
        self.pooled_views = pooled_views
        self.module = BranchLinearHead(*pooled_views.shape[2:])
        self.signature = list(pooled_views.shape)

    def features(self) -> np.ndarray:
        return embed(self.module, self.pooled_views.mean(axis=1))  # the views averaged: steadier clusters

    def batch_features(self, batch: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        views = rng.integers(0, self.pooled_views.shape[1], len(batch))
        return self.module(torch.from_numpy(self.pooled_views[batch, views]))

    def penalty(self) -> torch.Tensor:
        return self.module.distance_from_identity()

    def overlap(self, centroids: torch.Tensor) -> torch.Tensor:
        raise ValueError(OAP_NEEDS_MAPS)


def _batches(labels: np.ndarray, settings: AdaptationSettings, rng: np.random.Generator):
    """P clusters x K crops (with replacement for small clusters), ``steps_per_epoch`` batches."""
    members = {label: np.flatnonzero(labels == label) for label in np.unique(labels[labels != OUTLIER])}
    clusters = np.array(sorted(members))
    per_batch = min(settings.batch_size // settings.instances, len(clusters))
    for _ in range(settings.steps_per_epoch):
        chosen = rng.choice(clusters, per_batch, replace=False)
        yield np.concatenate(
            [rng.choice(members[c], settings.instances, replace=len(members[c]) < settings.instances) for c in chosen]
        )


def _memory(settings: AdaptationSettings, features: torch.Tensor, labels: torch.Tensor, cameras: torch.Tensor):
    if settings.memory == "camera":
        return CameraProxyMemory(
            features,
            labels,
            cameras,
            settings.temperature,
            settings.momentum,
            settings.hard_negatives,
            settings.inter_weight,
        )
    return ClusterMemory(features, labels, settings.temperature, settings.momentum)


def adapt_head(
    pooled_views: np.ndarray,
    cameras: np.ndarray,
    settings: AdaptationSettings,
    checkpoint: Optional[Path] = None,
    progress: bool = True,
    on_epoch: Optional[Callable[[EpochRecord, BranchLinearHead], None]] = None,
) -> tuple:
    """Train a head on ``pooled_views`` [n, V, N, D] (each crop's grid-mean maps in V views: the image, its
    mirror, ...) with ``cameras`` [n] (0..C-1; all 0 where unknown). Returns (head, [EpochRecord])."""
    return adapt_features(HeadAdaptee(pooled_views), cameras, settings, checkpoint, progress, on_epoch)


def adapt_features(
    adaptee: Adaptee,
    cameras: np.ndarray,
    settings: AdaptationSettings,
    checkpoint: Optional[Path] = None,
    progress: bool = True,
    on_epoch: Optional[Callable[[EpochRecord, nn.Module], None]] = None,
) -> tuple:
    """Adapt ``adaptee`` to its crops, whose ``cameras`` [n] are 0..C-1 (all 0 where unknown). Returns
    (its module, [EpochRecord]).

    With ``checkpoint``, the state is saved after each epoch and a run that finds one resumes after it."""
    module = adaptee.module
    optimizer = torch.optim.Adam(module.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    history: List[EpochRecord] = []
    if checkpoint is not None and Path(checkpoint).exists():
        state = torch.load(checkpoint, weights_only=False)
        if state["settings"] != asdict(settings) or state["shape"] != adaptee.signature:
            raise ValueError(f"{checkpoint} was written by another adaptation (settings or crops differ)")
        module.load_state_dict(state["module"])
        optimizer.load_state_dict(state["optimizer"])
        history = [EpochRecord(**record) for record in state["history"]]
    camera_tensor = torch.from_numpy(cameras.astype(np.int64))
    bar = tqdm(range(len(history), settings.epochs), desc="adapt", disable=not progress, initial=len(history))
    for epoch in bar:
        started = time.perf_counter()
        rng = np.random.default_rng([settings.seed, epoch])
        torch.manual_seed(settings.seed * 1000 + epoch)
        features = adaptee.features()
        clustering = cluster_features(
            features,
            cameras,
            settings.clusterer,
            settings.eps,
            settings.min_samples,
            settings.k1,
            settings.k2,
        )
        losses = []
        if clustering.num_clusters >= 2:
            losses = _train_epoch(adaptee, optimizer, features, clustering.labels, camera_tensor, settings, rng)
        fifth = max(1, len(losses) // 5)
        record = EpochRecord(
            epoch + 1,
            clustering.num_clusters,
            clustering.outliers,
            _mean(losses),
            _mean(losses[:fifth]),
            _mean(losses[-fifth:]),
            time.perf_counter() - started,
        )
        history.append(record)
        bar.set_postfix(clusters=record.clusters, outliers=record.outliers, loss=f"{record.loss:.3f}")
        if checkpoint is not None:
            _save(checkpoint, module, optimizer, history, settings, adaptee.signature)
        if on_epoch:
            on_epoch(record, module)
    return module, history


def _mean(values: List[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def _train_epoch(adaptee: Adaptee, optimizer, features, labels, cameras, settings, rng) -> List[float]:
    """One epoch's steps against a memory built from ``features`` [n, E], the epoch's clustering input."""
    clustered = labels != OUTLIER
    label_tensor = torch.from_numpy(labels)
    memory = _memory(settings, torch.from_numpy(features[clustered]), label_tensor[clustered], cameras[clustered])
    centroids = _centroids(features, labels) if settings.oap_weight else None
    losses = []
    for batch in _batches(labels, settings, rng):
        batch_features = adaptee.batch_features(batch, rng)
        batch_labels, batch_cameras = label_tensor[batch], cameras[batch]
        loss = memory.loss(batch_features, batch_labels, batch_cameras)
        if settings.anchor_weight:
            loss = loss + settings.anchor_weight * adaptee.penalty()
        if settings.oap_weight:
            loss = loss + settings.oap_weight * adaptee.overlap(centroids[batch_labels])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        memory.update(batch_features.detach(), batch_labels, batch_cameras)
        losses.append(loss.item())
    return losses


def _centroids(features: np.ndarray, labels: np.ndarray) -> torch.Tensor:
    """Each cluster's mean embedding [clusters, E], by label; the epoch's, as its memory starts from them."""
    clustered = labels != OUTLIER
    sums = np.zeros((labels.max() + 1, features.shape[1]), np.float32)
    np.add.at(sums, labels[clustered], features[clustered])
    return torch.from_numpy(sums / np.maximum(np.bincount(labels[clustered], minlength=len(sums)), 1)[:, None])


def _save(path: Path, module, optimizer, history, settings, shape) -> None:
    path = Path(path)
    temporary = path.with_suffix(".tmp")
    torch.save(
        {
            "module": module.state_dict(),
            "optimizer": optimizer.state_dict(),
            "history": [asdict(record) for record in history],
            "settings": asdict(settings),
            "shape": list(shape),
        },
        temporary,
    )
    temporary.replace(path)
