"""Data: the Market-1501 layout reader (one or several folders), batch augmentation, identity samplers and
the loader that makes augmented batches ahead of the model."""

from training.data.loader import batch_loader
from training.data.market import ImageRecord, MarketDataset, read_split
from training.data.samplers import SAMPLER_REGISTRY, PairSampler, PKSampler, RandomBatchSampler
from training.data.transforms import TrainAugmentation

__all__ = [
    "ImageRecord",
    "MarketDataset",
    "read_split",
    "PairSampler",
    "SAMPLER_REGISTRY",
    "PKSampler",
    "RandomBatchSampler",
    "TrainAugmentation",
    "batch_loader",
]
