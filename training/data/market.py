"""Market-1501 layout: ``bounding_box_train``, ``query``, ``bounding_box_test`` with names ``PPPP_cC...``.

Market protocol: pid -1 marks junk images (never trained on, ignored in evaluation); in the gallery pid 0
marks distractors (negatives for every query). The training split keeps pid 0 as an identity: Market's own
training split has none, and several Market-layout sets (CUHK03 here) number identities from 0000. Any image format PIL reads is accepted, judged by
content; files that don't decode are reported by name and left out, so a bad file never stops an epoch.
"""
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
from tqdm import tqdm

from model_zoo.preprocess import InvalidImage, load_for_model

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^(-1|\d+)_c(\d+)")
SPLITS = ("bounding_box_train", "query", "bounding_box_test")


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    pid: int
    camid: int


def read_split(folder: Path) -> Tuple[List[ImageRecord], List[str]]:
    """Records of every file named like ``PPPP_cC...`` in ``folder``, and the names that don't match."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    records, unnamed = [], []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        match = NAME_PATTERN.match(path.name)
        if match:
            records.append(ImageRecord(path, int(match.group(1)), int(match.group(2))))
        else:
            unnamed.append(path.name)
    if unnamed:
        log.warning("%s: %d files not named PPPP_cC...: %s", folder, len(unnamed), unnamed[:5])
    return records, unnamed


def decode_records(records: List[ImageRecord], height: int, width: int, progress: bool = True, desc: str = "decode") -> Tuple[np.ndarray, List[ImageRecord], List[str]]:
    """Decode and resize every record: (uint8 [N, H, W, 3], the records that decoded, 'name: reason' for the rest)."""
    images, kept, bad = [], [], []
    for record in tqdm(records, desc=desc, disable=not progress, leave=False):
        try:
            images.append(load_for_model(record.path, height, width))
            kept.append(record)
        except InvalidImage as exc:
            bad.append(f"{record.path.name}: {exc}")
    if bad:
        log.warning("%d files could not be decoded and were left out: %s", len(bad), bad[:10])
    array = np.stack(images) if images else np.zeros((0, height, width, 3), np.uint8)
    return array, kept, bad


class MarketDataset:
    """The training split: records with pids relabelled 0..C-1, images decoded in memory or on demand."""

    def __init__(self, root: Path, height: int, width: int, cache_images: bool = True, progress: bool = True):
        records, self.unnamed = read_split(Path(root) / "bounding_box_train")
        self.height, self.width = height, width
        self.junk = sum(r.pid < 0 for r in records)
        records = [r for r in records if r.pid >= 0]
        self.bad_files: List[str] = []
        self.images: Optional[np.ndarray] = None
        if cache_images:
            self.images, records, self.bad_files = decode_records(records, height, width, progress, "decode train")
        self.records = records
        self.pid_to_label: Dict[int, int] = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
        self.labels = np.array([self.pid_to_label[r.pid] for r in records], dtype=np.int64)
        if not records:
            raise ValueError(f"{root}: no usable training images")

    @property
    def num_classes(self) -> int:
        return len(self.pid_to_label)

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> np.ndarray:
        if self.images is not None:
            return self.images[index]
        return load_for_model(self.records[index].path, self.height, self.width)
