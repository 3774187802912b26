"""Batch samplers: plain random batches, and P identities x K images (with replacement for small identities)."""
from collections import defaultdict
from typing import Iterator, List, Sequence

import torch


class RandomBatchSampler:
    """Shuffled batches of ``batch_size`` indices; the last incomplete batch is dropped."""

    def __init__(self, num_items: int, batch_size: int, generator: torch.Generator):
        self.num_items, self.batch_size, self.generator = num_items, batch_size, generator

    def __len__(self) -> int:
        return self.num_items // self.batch_size

    def __iter__(self) -> Iterator[List[int]]:
        order = torch.randperm(self.num_items, generator=self.generator).tolist()
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            yield order[start : start + self.batch_size]


class PKSampler:
    """Batches of P identities x K images; an identity with fewer than K images is sampled with replacement."""

    def __init__(self, labels: Sequence[int], batch_size: int, num_instances: int, generator: torch.Generator):
        if batch_size % num_instances:
            raise ValueError(f"batch_size {batch_size} is not a multiple of num_instances {num_instances}")
        self.per_label = defaultdict(list)
        for index, label in enumerate(labels):
            self.per_label[int(label)].append(index)
        self.identities_per_batch = batch_size // num_instances
        if self.identities_per_batch > len(self.per_label):
            raise ValueError(f"a batch needs {self.identities_per_batch} identities, the data has {len(self.per_label)}")
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
        labels = list(self.per_label)
        for _ in range(len(self)):
            chosen = torch.randperm(len(labels), generator=self.generator)[: self.identities_per_batch]
            yield [i for c in chosen.tolist() for i in self._draw(self.per_label[labels[c]])]
