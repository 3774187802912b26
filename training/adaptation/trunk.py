"""Adapting a training checkpoint's whole network, not a head on a frozen trunk: what ``python -m training adapt``
does when ``--model`` is a checkpoint (``model.pt``) rather than a contract file.

The crops are decoded once and held (98 kB each at 256x128; ``--limit`` bounds them). Each epoch embeds every
crop and its mirror image with the network in eval mode (what is clustered), then trains it in train mode on
PxK batches of the clusters, each crop flipped, padded and cropped and randomly erased as in training
(``training.data.TrainAugmentation``), against the epoch's memory. The embedding is the exported one (each
branch's grid-mean map, normalised), so the adapted checkpoint exports to a contract file as any run's does, RAM
exact. With ``oap_weight``, CAMA's OAP keeps a multi-branch network's branches on different regions: pseudo-labels
train no identity classifier, so each crop's activation maps are taken with its cluster's centroid (branch by
branch, the centroid's slice in place of the classifier row: the map whose mean is the crop's score against its
cluster), with the checkpoint's own k and OAP form.
On a CPU this is the slow path (a backward pass per crop per step): small networks, or a GPU."""

from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from model_zoo.architectures.common import class_activation_maps
from training.data.transforms import TrainAugmentation
from training.losses import OverlappedActivationPenalty

BATCH = 64
ANCHOR_REFUSED = "anchor_weight pulls a head back to the identity: a whole network has no anchor term"


def pooled_maps(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Each branch's grid-mean feature map [B, N, D]: the embedding before its per-branch normalisation."""
    return model(images).feature_maps.float().mean(dim=(3, 4))


class TrunkAdaptee:
    def __init__(
        self,
        model: nn.Module,
        pixels: np.ndarray,
        augmentation: TrainAugmentation,
        seed: int = 0,
        oap: Optional[OverlappedActivationPenalty] = None,
    ):
        """``pixels``: every decodable crop [n, H, W, 3] uint8, the model's input; ``oap``: the penalty
        ``overlap`` applies (the checkpoint's k and form)."""
        self.module, self.pixels, self.augmentation, self.oap = model, pixels, augmentation, oap
        self.signature = list(pixels.shape)
        self.generator = torch.Generator().manual_seed(seed)
        self.batch_maps: Optional[torch.Tensor] = None

    def features(self) -> np.ndarray:
        self.module.eval()
        chunks = []
        with torch.no_grad():
            for start in range(0, len(self.pixels), BATCH):
                images = torch.from_numpy(self.pixels[start : start + BATCH])
                pooled = (pooled_maps(self.module, images) + pooled_maps(self.module, images.flip(2))) / 2
                chunks.append(F.normalize(pooled, dim=2).flatten(1).numpy())
        return np.concatenate(chunks)

    def batch_features(self, batch: np.ndarray, rng: np.random.Generator) -> torch.Tensor:
        self.module.train()
        images = self.augmentation(torch.from_numpy(self.pixels[batch]), self.generator)
        self.batch_maps = self.module(images).feature_maps.float()
        return F.normalize(self.batch_maps.mean(dim=(3, 4)), dim=2).flatten(1)

    def penalty(self) -> torch.Tensor:
        raise ValueError(ANCHOR_REFUSED)

    def overlap(self, centroids: torch.Tensor) -> torch.Tensor:
        branches = self.batch_maps.shape[1]
        return self.oap(class_activation_maps(self.batch_maps, centroids.view(len(centroids), branches, -1)))


def decoded_crops(crops, height: int, width: int, progress: bool = True):
    """(pixels [n, H, W, 3], cameras [n], skipped): every decodable crop, held for the whole adaptation."""
    pixels, cameras, skipped = [], [], 0
    with tqdm(total=len(crops), desc="decode crops", disable=not progress, leave=False) as bar:
        for batch in crops.batches(height, width):
            pixels.append(batch.pixels)
            cameras += batch.cameras
            skipped += batch.skipped
            bar.update(len(batch.pixels) + batch.skipped)
    if not cameras:
        raise ValueError(f"{crops.description}: no image to adapt on ({skipped} could not be decoded)")
    return np.concatenate(pixels), cameras, skipped
