"""Batch samplers: random batches, and P identities x K images (with replacement for small identities).

Both take optional weights so that several training sources can be mixed in chosen proportions: the PxK
sampler draws identities with probability proportional to their weight (uniform over identities by default,
so a source with many frames of few people, like TownCentre, does not dominate), the random sampler draws
images in proportion to theirs (with replacement when weighted).
"""
from collections import defaultdict
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch


class RandomBatchSampler:
    """Shuffled batches of ``batch_size`` indices, the last incomplete batch dropped; with ``weights``, images
    are drawn with replacement in proportion to their weight."""

    def __init__(self, num_items: int, batch_size: int, generator: torch.Generator, weights: Optional[Sequence[float]] = None):
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

    def __init__(self, labels: Sequence[int], batch_size: int, num_instances: int, generator: torch.Generator,
                 identity_weights: Optional[Sequence[float]] = None):
        if batch_size % num_instances:
            raise ValueError(f"batch_size {batch_size} is not a multiple of num_instances {num_instances}")
        self.per_label = defaultdict(list)
        for index, label in enumerate(labels):
            self.per_label[int(label)].append(index)
        self.labels = sorted(self.per_label)
        self.identities_per_batch = batch_size // num_instances
        weights = np.ones(len(self.labels)) if identity_weights is None else np.asarray(identity_weights, dtype=np.float64)[self.labels]
        if (weights > 0).sum() < self.identities_per_batch:
            raise ValueError(f"a batch needs {self.identities_per_batch} identities, the data has {(weights > 0).sum()} with weight > 0")
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
            chosen = torch.multinomial(self.weights, self.identities_per_batch, replacement=False, generator=self.generator)
            yield [i for c in chosen.tolist() for i in self._draw(self.per_label[self.labels[c]])]
