"""Market-1501 layout: ``bounding_box_train``, ``query``, ``bounding_box_test`` with names ``PPPP_cC...``.

Market protocol: pid -1 marks junk images (never trained on, ignored in evaluation); in the gallery pid 0
marks distractors (negatives for every query). The training split keeps pid 0 as an identity: Market's own
training split has none, and several Market-layout sets (CUHK03 here) number identities from 0000. Any image
format PIL reads is accepted, judged by content; files that don't decode are reported by name and left out,
so a bad file never stops an epoch.

Training may read several folders at once: person ids and cameras are unique within a folder only, so both
are offset per folder. Each image also has a *source* for per-source sampling weights: the folder's name, or
``folder/subset`` where the folder has a ``mapping.csv`` with a ``source_subset`` column (a folder that merges
several data sets, such as the PETA re-ID sets).
"""

import csv
import logging
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from tqdm import tqdm

from model_zoo.preprocess import InvalidImage, load_for_model

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^(-1|\d+)_c(\d+)")
SPLITS = ("bounding_box_train", "query", "bounding_box_test")
SOURCE_MAPPING = "mapping.csv"


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    pid: int
    camid: int
    source: str = ""


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


def read_source_subsets(root: Path, split: str) -> Dict[str, str]:
    """file name -> source subset, from the folder's ``mapping.csv`` (empty where there is none)."""
    mapping = Path(root) / SOURCE_MAPPING
    if not mapping.is_file():
        return {}
    with mapping.open(newline="") as handle:
        return {
            row["file"]: row["source_subset"]
            for row in csv.DictReader(handle)
            if row.get("split") == split and row.get("source_subset")
        }


def _decode_one(job: Tuple[Path, int, int]) -> Union[np.ndarray, str]:
    path, height, width = job
    try:
        return load_for_model(path, height, width)
    except InvalidImage as exc:
        return str(exc)


def decode_records(
    records: List[ImageRecord], height: int, width: int, progress: bool = True, desc: str = "decode", workers: int = 0
) -> Tuple[np.ndarray, List[ImageRecord], List[str]]:
    """Decode and resize every record, in ``workers`` processes if > 0: (uint8 [N, H, W, 3], the records that
    decoded, 'name: reason' for the rest)."""
    jobs = [(r.path, height, width) for r in records]
    if workers > 0:
        with ProcessPoolExecutor(workers) as pool:
            results = list(
                tqdm(
                    pool.map(_decode_one, jobs, chunksize=64),
                    total=len(jobs),
                    desc=desc,
                    disable=not progress,
                    leave=False,
                )
            )
    else:
        results = [_decode_one(job) for job in tqdm(jobs, desc=desc, disable=not progress, leave=False)]
    images, kept, bad = [], [], []
    for record, result in zip(records, results):
        if isinstance(result, str):
            bad.append(f"{record.path.name}: {result}")
        else:
            images.append(result)
            kept.append(record)
    if bad:
        log.warning("%d files could not be decoded and were left out: %s", len(bad), bad[:10])
    array = np.stack(images) if images else np.zeros((0, height, width, 3), np.uint8)
    return array, kept, bad


def read_training_records(roots: Sequence[Path]) -> Tuple[List[ImageRecord], List[str], int]:
    """The training records of every root with pids and cameras offset per folder and sources named; also the
    unnamed files and the number of junk images left out."""
    records, unnamed, junk = [], [], 0
    pid_offset = cam_offset = 0
    for root in map(Path, roots):
        split, names = read_split(root / "bounding_box_train")
        unnamed += [f"{root.name}/{name}" for name in names]
        junk += sum(r.pid < 0 for r in split)
        split = [r for r in split if r.pid >= 0]
        subsets = read_source_subsets(root, "bounding_box_train")
        records += [
            ImageRecord(
                r.path,
                r.pid + pid_offset,
                r.camid + cam_offset,
                f"{root.name}/{subsets[r.path.name]}" if r.path.name in subsets else root.name,
            )
            for r in split
        ]
        pid_offset += max((r.pid for r in split), default=-1) + 1
        cam_offset += max((r.camid for r in split), default=0)
    return records, unnamed, junk


class MarketDataset:
    """The training split of one or more folders: records with pids relabelled 0..C-1 and sources numbered
    0..S-1, images decoded in memory or on demand."""

    def __init__(
        self,
        roots: Union[Path, str, Sequence[Path]],
        height: int,
        width: int,
        cache_images: bool = True,
        progress: bool = True,
        workers: int = 0,
    ):
        roots = [roots] if isinstance(roots, (str, Path)) else list(roots)
        records, self.unnamed, self.junk = read_training_records(roots)
        self.height, self.width = height, width
        self.bad_files: List[str] = []
        self.images: Optional[np.ndarray] = None
        if cache_images:
            self.images, records, self.bad_files = decode_records(
                records, height, width, progress, "decode train", workers
            )
        if not records:
            raise ValueError(f"{', '.join(map(str, roots))}: no usable training images")
        self.records = records
        self.pid_to_label: Dict[int, int] = {pid: i for i, pid in enumerate(sorted({r.pid for r in records}))}
        self.labels = np.array([self.pid_to_label[r.pid] for r in records], dtype=np.int64)
        self.source_names: List[str] = sorted({r.source for r in records})
        index = {name: i for i, name in enumerate(self.source_names)}
        self.sources = np.array([index[r.source] for r in records], dtype=np.int64)

    @property
    def num_classes(self) -> int:
        return len(self.pid_to_label)

    def __len__(self) -> int:
        return len(self.records)

    def image(self, index: int) -> np.ndarray:
        if self.images is not None:
            return self.images[index]
        return load_for_model(self.records[index].path, self.height, self.width)

    def describe_sources(self) -> Dict[str, Dict[str, int]]:
        """Images and identities per source."""
        return {
            name: {
                "images": int((self.sources == i).sum()),
                "identities": len(set(self.labels[self.sources == i].tolist())),
            }
            for i, name in enumerate(self.source_names)
        }

    def source_weights(self, weights: Dict[str, float]) -> np.ndarray:
        """Per-source multipliers [S] from {name: weight}; a name is a source or its subset part
        (``TownCentre`` for ``peta-train/TownCentre``); unnamed sources weigh 1. A name that is no source here
        is skipped with a warning: a recipe's weights (pool.yaml's TownCentre) must not stop a run on other data."""
        result = np.ones(len(self.source_names))
        for key, weight in weights.items():
            hits = [i for i, name in enumerate(self.source_names) if key in (name, name.split("/")[-1])]
            if not hits:
                log.warning(
                    "source weight for %r skipped: no such source in this data (sources: %s)",
                    key,
                    ", ".join(self.source_names),
                )
                continue
            if weight < 0:
                raise ValueError(f"source weight for {key!r} is negative")
            result[hits] = weight
        return result
