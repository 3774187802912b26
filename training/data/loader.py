"""Augmented training batches made ahead of the model, in worker processes when asked for.

The identity sampler runs in the main process and hands each batch's indices to the loader together with a
seed drawn from the training generator, so a batch's augmentation is the same whether it is made inline or in
any worker: a run is reproducible from its seed whatever ``data.workers`` is.
"""

from typing import Iterable, Iterator, List, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from training.data.market import MarketDataset
from training.data.transforms import TrainAugmentation

BatchKey = Tuple[List[int], int]


class AugmentedBatches(Dataset):
    """``(indices, seed) -> (uint8 images [B, H, W, 3], labels [B])``."""

    def __init__(self, dataset: MarketDataset, augment: TrainAugmentation):
        self.dataset, self.augment = dataset, augment

    def __getitem__(self, key: BatchKey) -> Tuple[torch.Tensor, torch.Tensor]:
        indices, seed = key
        images = torch.from_numpy(np.stack([self.dataset.image(i) for i in indices]))
        generator = torch.Generator().manual_seed(seed)
        return self.augment(images, generator), torch.from_numpy(self.dataset.labels[indices])


class SeededBatches:
    """The sampler's batches, at most ``limit`` of them, each with a seed from ``generator``; the first ``skip``
    are drawn (so the generator moves exactly as in an uninterrupted epoch) but not handed out."""

    def __init__(self, sampler: Iterable[List[int]], generator: torch.Generator, limit: int, skip: int = 0):
        self.sampler, self.generator, self.limit, self.skip = sampler, generator, limit, skip

    def __len__(self) -> int:
        return self.limit - self.skip

    def __iter__(self) -> Iterator[BatchKey]:
        for number, indices in zip(range(self.limit), self.sampler):
            seed = int(torch.randint(2**62, (), generator=self.generator))
            if number >= self.skip:
                yield indices, seed


def batch_loader(
    dataset: MarketDataset,
    augment: TrainAugmentation,
    sampler,
    generator: torch.Generator,
    limit: int,
    workers: int = 0,
    pin_memory: bool = False,
    skip: int = 0,
) -> DataLoader:
    """One epoch of augmented batches, from batch ``skip`` on (an epoch resumed part way); with ``workers`` > 0
    they are made in that many processes, up to four batches per worker ahead of the model."""
    return DataLoader(
        AugmentedBatches(dataset, augment),
        sampler=SeededBatches(sampler, generator, limit, skip),
        batch_size=None,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers > 0 else None,
    )
