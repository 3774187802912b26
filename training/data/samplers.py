"""Batch samplers: random batches, and P identities x K images (with replacement for small identities), and
image pairs; each registered by its ``data.sampler`` name in ``SAMPLER_REGISTRY`` with a builder that reads the
training set and the data config, so a new sampler is a new registration, not an edit of the trainer.

Both take optional weights so that several training sources can be mixed in chosen proportions: the PxK
sampler draws identities with probability proportional to their weight (uniform over identities by default,
so a source with many frames of few people, like TownCentre, does not dominate), the random sampler draws
images in proportion to theirs (with replacement when weighted).
"""

from collections import defaultdict
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch

from model_zoo.registry import Registry

SAMPLER_REGISTRY = Registry("sampler")  # name -> build(dataset, data_cfg, generator) -> a batch sampler


class RandomBatchSampler:
    """Shuffled batches of ``batch_size`` indices, the last incomplete batch dropped; with ``weights``, images
    are drawn with replacement in proportion to their weight."""

    def __init__(
        self, num_items: int, batch_size: int, generator: torch.Generator, weights: Optional[Sequence[float]] = None
    ):
        self.num_items, self.batch_size, self.generator = num_items, batch_size, generator
        self.weights = None if weights is None else torch.as_tensor(np.asarray(weights, dtype=np.float64))

    def __len__(self) -> int:
        return self.num_items // self.batch_size

    def __iter__(self) -> Iterator[List[int]]:
        count = len(self) * self.batch_size
        if self.weights is None:
            order = torch.randperm(self.num_items, generator=self.generator)[:count]
        else:
            order = torch.multinomial(self.weights, count, replacement=True, generator=self.generator)
        order = order.tolist()
        for start in range(0, count, self.batch_size):
            yield order[start : start + self.batch_size]


class PKSampler:
    """Batches of P identities x K images; an identity with fewer than K images is sampled with replacement.

    ``identity_weights`` (one per label, default all 1) sets how often each identity is drawn; the P
    identities of one batch are distinct."""

    def __init__(
        self,
        labels: Sequence[int],
        batch_size: int,
        num_instances: int,
        generator: torch.Generator,
        identity_weights: Optional[Sequence[float]] = None,
    ):
        if batch_size % num_instances:
            raise ValueError(f"batch_size {batch_size} is not a multiple of num_instances {num_instances}")
        self.per_label = defaultdict(list)
        for index, label in enumerate(labels):
            self.per_label[int(label)].append(index)
        self.labels = sorted(self.per_label)
        self.identities_per_batch = batch_size // num_instances
        weights = (
            np.ones(len(self.labels))
            if identity_weights is None
            else np.asarray(identity_weights, dtype=np.float64)[self.labels]
        )
        if (weights > 0).sum() < self.identities_per_batch:
            raise ValueError(
                f"a batch needs {self.identities_per_batch} identities, the data has {(weights > 0).sum()} with weight "
                f"> 0"
            )
        self.weights = torch.as_tensor(weights)
        self.num_instances, self.generator = num_instances, generator
        self.num_items = len(labels)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return self.num_items // self.batch_size

    def _draw(self, indices: List[int]) -> List[int]:
        k = self.num_instances
        if len(indices) >= k:
            picks = torch.randperm(len(indices), generator=self.generator)[:k]
        else:
            picks = torch.randint(len(indices), (k,), generator=self.generator)
        return [indices[i] for i in picks.tolist()]

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(len(self)):
            chosen = torch.multinomial(
                self.weights, self.identities_per_batch, replacement=False, generator=self.generator
            )
            yield [i for c in chosen.tolist() for i in self._draw(self.per_label[self.labels[c]])]


class PairSampler:
    """Batches of image pairs for Siamese training (CASN): ``[a_1, b_1, a_2, b_2, ...]``, ``batch_size / 2``
    pairs, each a positive (two different images of one person) with probability ``positive_share``, else a
    negative (two people). A pair's "same" flag is its two labels compared, so nothing else travels with the
    batch. Positives come from identities with at least two images; pair order is random."""

    def __init__(self, labels: Sequence[int], batch_size: int, generator: torch.Generator, positive_share: float = 0.5):
        if batch_size % 2:
            raise ValueError(f"batch_size {batch_size} must be even: pairs of images")
        if not 0 <= positive_share <= 1:
            raise ValueError("positive_share must be in [0, 1]")
        per_label = defaultdict(list)
        for index, label in enumerate(labels):
            per_label[int(label)].append(index)
        self.per_label = per_label
        self.repeated = [label for label, items in per_label.items() if len(items) >= 2]
        self.all_labels = sorted(per_label)
        if (positive_share > 0 and not self.repeated) or (positive_share < 1 and len(self.all_labels) < 2):
            raise ValueError("pairs need a person with two images (positives) and two people (negatives)")
        self.batch_size, self.generator, self.positive_share = batch_size, generator, positive_share
        self.num_items = len(labels)

    def __len__(self) -> int:
        return self.num_items // self.batch_size

    def _pick(self, items: List, count: int) -> List:
        return [items[i] for i in torch.randperm(len(items), generator=self.generator)[:count].tolist()]

    def _pair(self) -> List[int]:
        if torch.rand((), generator=self.generator).item() < self.positive_share:
            (label,) = self._pick(self.repeated, 1)
            return self._pick(self.per_label[label], 2)
        first, second = self._pick(self.all_labels, 2)
        return [self._pick(self.per_label[first], 1)[0], self._pick(self.per_label[second], 1)[0]]

    def __iter__(self) -> Iterator[List[int]]:
        for _ in range(len(self)):
            yield [index for _ in range(self.batch_size // 2) for index in self._pair()]


@SAMPLER_REGISTRY.register("random")
def _random_batches(dataset, data_cfg, generator: torch.Generator) -> RandomBatchSampler:
    weights = dataset.source_weights(data_cfg.source_weights)[dataset.sources] if data_cfg.source_weights else None
    return RandomBatchSampler(len(dataset), data_cfg.batch_size, generator, weights)


@SAMPLER_REGISTRY.register("pk")
def _identities_by_instances(dataset, data_cfg, generator: torch.Generator) -> PKSampler:
    identity_weights = np.zeros(dataset.num_classes)
    identity_weights[dataset.labels] = dataset.source_weights(data_cfg.source_weights)[dataset.sources]
    return PKSampler(dataset.labels, data_cfg.batch_size, data_cfg.num_instances, generator, identity_weights)


@SAMPLER_REGISTRY.register("pairs")
def _image_pairs(dataset, data_cfg, generator: torch.Generator) -> PairSampler:
    return PairSampler(dataset.labels, data_cfg.batch_size, generator, data_cfg.pair_positive_share)
