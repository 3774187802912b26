"""Data: the Market-1501 layout reader, batch augmentation and identity samplers."""
from training.data.market import ImageRecord, MarketDataset, read_split
from training.data.samplers import PKSampler, RandomBatchSampler
from training.data.transforms import TrainAugmentation

__all__ = ["ImageRecord", "MarketDataset", "read_split", "PKSampler", "RandomBatchSampler", "TrainAugmentation"]
