"""Unlabeled crops to adapt on, with their cameras, from the places a user has them:

- a folder of images (searched recursively): the camera is the ``cN`` of a Market-style name
  (``0001_c2s1_...``), else the image's sub-folder (``cam_entrance/x.jpg``), else unknown;
- the service's SQLite store (a ``.db`` / ``.sqlite`` file, or ``sqlite:///path``), opened read-only, so it
  can be read while the service runs: every item's stored image and ``camera_id``;
- the cluster's PostgreSQL (``postgresql://...``), read in one read-only transaction.

Person ids are never read: adaptation is unsupervised. Both stores are read with plain SQL on the columns the
service's schema documents (``items.image``, ``items.camera_id``), since ``training`` never imports
``service``."""

import re
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple
from urllib.parse import unquote, urlparse

import numpy as np
from tqdm import tqdm

from model_zoo.preprocess import InvalidImage, load_for_model

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
MARKET_CAMERA = re.compile(r"^-?\d+_c(\d+)")
STORE_QUERY = "SELECT image, camera_id FROM items ORDER BY id"
UNKNOWN_CAMERA = ""


@dataclass
class Crops:
    pixels: np.ndarray  # uint8 [n, H, W, 3], the model's input
    cameras: List[str]  # one per crop, UNKNOWN_CAMERA where none is known
    description: str  # what they came from, for the card (no machine paths: a folder's or store's name)
    skipped: int  # images that could not be decoded

    @property
    def camera_indices(self) -> np.ndarray:
        """Cameras as 0..C-1 (unknown is a camera of its own)."""
        return np.unique(np.array(self.cameras), return_inverse=True)[1].astype(np.int64)


def _camera_of(path: Path, root: Path) -> str:
    match = MARKET_CAMERA.match(path.name)
    if match:
        return f"c{match.group(1)}"
    return path.parent.relative_to(root).as_posix() if path.parent != root else UNKNOWN_CAMERA


def _folder(root: Path) -> Tuple[List[Tuple[object, str]], str]:
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return [(path, _camera_of(path, root)) for path in files], f"folder {root.name}"


def _sqlite(path: Path) -> Tuple[List[Tuple[object, str]], str]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such store")
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = [(bytes(image), camera or UNKNOWN_CAMERA) for image, camera in connection.execute(STORE_QUERY)]
    finally:
        connection.close()
    return rows, f"SQLite store {path.name}"


def _postgres(dsn: str) -> Tuple[List[Tuple[object, str]], str]:
    import psycopg

    with psycopg.connect(dsn) as connection:
        connection.read_only = True
        rows = [(bytes(image), camera or UNKNOWN_CAMERA) for image, camera in connection.execute(STORE_QUERY)]
    parsed = urlparse(dsn)
    return rows, f"PostgreSQL database {parsed.path.lstrip('/') or parsed.hostname}"


def _entries(source: str) -> Tuple[List[Tuple[object, str]], str]:
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


def _decoded(entries: Iterable[Tuple[object, str]], height: int, width: int, progress: bool):
    pixels, cameras, skipped = [], [], 0
    for data, camera in tqdm(list(entries), desc="decode crops", disable=not progress, leave=False):
        try:
            pixels.append(load_for_model(data, height, width))
        except (InvalidImage, OSError):
            skipped += 1
            continue
        cameras.append(camera)
    return pixels, cameras, skipped


def read_crops(source: str, height: int, width: int, progress: bool = True, limit: Optional[int] = None) -> Crops:
    """Every crop of ``source`` decoded for a model of this input size (at most ``limit``, evenly spaced)."""
    entries, description = _entries(str(source))
    if limit is not None and len(entries) > limit:
        entries = [entries[i] for i in np.linspace(0, len(entries) - 1, limit).round().astype(int)]
    pixels, cameras, skipped = _decoded(entries, height, width, progress)
    if not pixels:
        raise ValueError(f"{description}: no image to adapt on ({skipped} could not be decoded)")
    return Crops(np.stack(pixels), cameras, description, skipped)
