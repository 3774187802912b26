"""Unlabeled crops to adapt on, with their cameras, from the places a user has them:

- a folder of images (searched recursively): the camera is the ``cN`` of a Market-style name
  (``0001_c2s1_...``), else the image's sub-folder (``cam_entrance/x.jpg``), else unknown;
- the service's SQLite store (a ``.db`` / ``.sqlite`` file, or ``sqlite:///path``), opened read-only, so it
  can be read while the service runs: every item's stored image and ``camera_id``;
- the cluster's PostgreSQL (``postgresql://...``), read-only.

A store's items are listed without their images (id, camera, and what identifies the image: its size and
enrolment time); each batch's images are read when it is decoded, so a run over a million-item gallery holds
one batch of them, and an item erased meanwhile is skipped, not read.

Person ids are never read: adaptation is unsupervised. Both stores are read with plain SQL on the columns the
service's schema documents (``items.image``, ``items.camera_id``), since ``training`` never imports
``service``."""

import hashlib
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple
from urllib.parse import unquote, urlparse

import numpy as np

from model_zoo.preprocess import InvalidImage, load_for_model

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MARKET_CAMERA = re.compile(r"^-?\d+_c(\d+)")
LIST_QUERY = "SELECT id, camera_id, length(image), created_at FROM items ORDER BY id"
UNKNOWN_CAMERA = ""


@dataclass
class CropBatch:
    pixels: np.ndarray  # uint8 [b, H, W, 3], the model's input
    cameras: List[str]  # one per decoded crop, UNKNOWN_CAMERA where none is known
    skipped: int  # crops of the batch that could not be decoded


@dataclass(frozen=True)
class StoredCrop:
    item_id: int
    key: bytes  # id, image size, enrolment time: a stored image never changes, and an id is never reused


ReadImages = Callable[[List[int]], Dict[int, bytes]]  # item ids -> their encoded images (an erased one: absent)
Source = Tuple[List[Tuple[object, str]], str, Optional[ReadImages]]  # entries, description, a store's reader


@dataclass
class Crops:
    """The crops of a source, listed but not decoded: ``batches`` reads and decodes them a batch at a time, so a
    run holds one batch of pixels, not every crop's (about 100 kB each at 256x128)."""

    entries: List[Tuple[object, str]]  # (an image path or a StoredCrop, its camera)
    description: str  # what they came from, for the card (no machine paths: a folder's or store's name)
    read_images: Optional[ReadImages] = None  # a store's: its images, by item id

    def __len__(self) -> int:
        return len(self.entries)

    def fingerprint(self) -> str:
        """sha256 over every crop and its camera, what a resumed run checks its cache against: a file by its path,
        size and modification time (as make and rsync judge a file unchanged), a store's crop by its item's id,
        image size and enrolment time, so that a fresh run reads each image once, to decode it."""
        digest = hashlib.sha256()
        for data, camera in self.entries:
            digest.update(crop_key(data) + camera.encode() + b"\0")
        return digest.hexdigest()

    def batches(self, height: int, width: int, batch_size: int = 32) -> Iterator[CropBatch]:
        """The crops decoded for a model of this input size, in order, ``batch_size`` at a time."""
        for start in range(0, len(self.entries), batch_size):
            entries = self.entries[start : start + batch_size]
            stored = [entry.item_id for entry, _ in entries if isinstance(entry, StoredCrop)]
            images = self.read_images(stored) if stored else {}
            pixels, cameras, skipped = [], [], 0
            for entry, camera in entries:
                data = images.get(entry.item_id) if isinstance(entry, StoredCrop) else entry
                try:
                    if data is None:  # erased since it was listed
                        raise InvalidImage("no longer stored")
                    pixels.append(load_for_model(data, height, width))
                except (InvalidImage, OSError):
                    skipped += 1
                    continue
                cameras.append(camera)
            empty = np.zeros((0, height, width, 3), np.uint8)
            yield CropBatch(np.stack(pixels) if pixels else empty, cameras, skipped)

    def pixels(self, height: int, width: int, count: int) -> np.ndarray:
        """The first ``count`` decodable crops (a sample: the parity check's, a test's)."""
        decoded = []
        for batch in self.batches(height, width):
            decoded.extend(batch.pixels)
            if len(decoded) >= count:
                break
        return np.stack(decoded[:count])


def crop_key(entry) -> bytes:
    if isinstance(entry, StoredCrop):
        return entry.key
    stat = entry.stat()
    return f"{entry.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()


def _camera_of(path: Path, root: Path) -> str:
    match = MARKET_CAMERA.match(path.name)
    if match:
        return f"c{match.group(1)}"
    return path.parent.relative_to(root).as_posix() if path.parent != root else UNKNOWN_CAMERA


def _folder(root: Path) -> Source:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [(path, _camera_of(path, root)) for path in files], f"folder {root.name}", None


def _listed(rows) -> List[Tuple[object, str]]:
    return [
        (StoredCrop(item_id, f"{item_id}\0{size}\0{created_at!r}".encode()), camera or UNKNOWN_CAMERA)
        for item_id, camera, size, created_at in rows
    ]


def _images_query(ids: List[int], placeholder: str) -> str:
    return f"SELECT id, image FROM items WHERE id IN ({', '.join([placeholder] * len(ids))})"


def _store(connect, placeholder: str, description: str) -> Source:
    """A store's items listed without their images, and the reader of a batch's images (``connect``: a new
    read-only connection as a context manager)."""

    def read_images(ids: List[int]) -> Dict[int, bytes]:
        with connect() as connection:
            rows = connection.execute(_images_query(ids, placeholder), ids)
            return {item_id: bytes(image) for item_id, image in rows}

    with connect() as connection:
        entries = _listed(connection.execute(LIST_QUERY))
    return entries, description, read_images


def _sqlite(path: Path) -> Source:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such store")
    return _store(lambda: closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)), "?", f"SQLite store {path.name}")


def _postgres(dsn: str) -> Source:
    import psycopg

    def connect():
        connection = psycopg.connect(dsn)
        connection.read_only = True
        return connection

    parsed = urlparse(dsn)
    return _store(connect, "%s", f"PostgreSQL database {parsed.path.lstrip('/') or parsed.hostname}")


def _entries(source: str) -> Source:
    if source.startswith(("postgresql://", "postgres://")):
        return _postgres(source)
    if source.startswith("sqlite://"):
        return _sqlite(Path(unquote(urlparse(source).path)))
    path = Path(source)
    if path.is_dir():
        return _folder(path)
    if path.suffix.lower() in (".db", ".sqlite", ".sqlite3"):
        return _sqlite(path)
    raise ValueError(f"{source}: not a folder, a SQLite store (.db, .sqlite, sqlite:///...) or postgresql://...")


def read_crops(source: str, limit: Optional[int] = None) -> Crops:
    """The crops of ``source`` (at most ``limit``, evenly spaced), listed in order, not yet decoded."""
    entries, description, read_images = _entries(str(source))
    if limit is not None and len(entries) > limit:
        entries = [entries[i] for i in np.linspace(0, len(entries) - 1, limit).round().astype(int)]
    if not entries:
        raise ValueError(f"{description}: no image to adapt on")
    return Crops(entries, description, read_images)
