"""Backup and restore of a gallery as one file: ``python -m service backup FILE`` / ``restore FILE``.

The backup file is itself a gallery store: a consistent snapshot of REID_STORE_PATH taken with SQLite's backup
API (a read transaction, so a running server keeps writing meanwhile: WAL), converted to a rollback journal so
that it is one self-contained file. It holds the images, ids, metadata, capture times, embeddings and the
fingerprint of the model that made them. A restore checks the file, then installs a copy as the store while
holding the store's lock (no server may run on it); a server started on it with another model re-embeds it
from its images (``Gallery.open``, REID_ON_MODEL_CHANGE=reembed).

Files are written beside their destination and renamed into place, so a crash leaves the old file or the new
one, never half of one.
"""

import os
import sqlite3
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from service.store import FINGERPRINT_KEY, SCHEMA_VERSION, StoreLock

# the columns of the first schema (version 0): an older backup has them all, and is migrated when opened
REQUIRED_COLUMNS = {
    "id",
    "person_id",
    "camera_id",
    "metadata",
    "image",
    "image_format",
    "width",
    "height",
    "embedding",
    "created_at",
}


class NotAGallery(ValueError):
    """The file is not a gallery store this code can read."""


class Refused(RuntimeError):
    """The operation would overwrite something it was not told to."""


@dataclass
class Summary:
    items: int
    model_fingerprint: str
    schema_version: int

    def __str__(self) -> str:
        return f"{self.items} items, model {self.model_fingerprint[:12]}, schema version {self.schema_version}"


def backup(store_path: Path, target: Path, force: bool = False) -> Summary:
    """Snapshot the store into ``target``; refuses an existing target unless ``force``."""
    store_path, target = Path(store_path), Path(target)
    if not store_path.is_file():
        raise NotAGallery(f"there is no gallery store at {store_path}")
    if target.exists() and not force:
        raise Refused(f"{target} exists; pass --force to overwrite it")
    with _connect(store_path, read_only=False) as source:  # read-write: a reader of a WAL file needs its -shm
        return _install_snapshot(source, target, overwrite=force)


def restore(source: Path, store_path: Path, replace: bool = False) -> Summary:
    """Make the backup ``source`` the store at ``store_path``; refuses while a process holds the store, and over
    a store with items (or one that cannot be read) unless ``replace``."""
    summary = check_gallery(source)
    with StoreLock(store_path):  # held until the new file is in place: no server starts on half of a restore
        present = _items_in(Path(store_path))
        if present != 0 and not replace:
            what = "cannot be read" if present is None else f"holds {present} items"
            raise Refused(f"the store {store_path} {what}; pass --replace to overwrite it")
        with _connect(Path(source), read_only=True) as db:
            _install_snapshot(db, Path(store_path), overwrite=True)
    return summary


def check_gallery(path: Path) -> Summary:
    """What the gallery file holds, once it has passed SQLite's integrity check and has the tables, schema
    version and model fingerprint of a gallery store; else NotAGallery."""
    if not Path(path).is_file():
        raise NotAGallery(f"{path} is not a file")
    try:
        with _connect(Path(path), read_only=True) as db:
            return _check(db, path)
    except sqlite3.DatabaseError as exc:  # not SQLite at all, or pages too damaged to read
        raise NotAGallery(f"{path} is not a readable gallery store: {exc}") from None


def _check(db: sqlite3.Connection, path: Path) -> Summary:
    problems = [row[0] for row in db.execute("PRAGMA integrity_check").fetchall()]
    if problems != ["ok"]:
        raise NotAGallery(f"{path} fails SQLite's integrity check: {'; '.join(problems[:3])}")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > SCHEMA_VERSION:
        raise NotAGallery(
            f"{path} has schema version {version}, written by a newer service (this one knows {SCHEMA_VERSION})"
        )
    columns = {row[1] for row in db.execute("PRAGMA table_info(items)")}
    has_meta = db.execute("SELECT 1 FROM sqlite_schema WHERE type = 'table' AND name = 'meta'").fetchone()
    if not REQUIRED_COLUMNS <= columns or not has_meta:
        raise NotAGallery(f"{path} is an SQLite file but not a gallery store (no items and meta tables)")
    fingerprint = db.execute("SELECT value FROM meta WHERE key = ?", (FINGERPRINT_KEY,)).fetchone()
    if fingerprint is None:
        raise NotAGallery(f"{path} has no model fingerprint: a store no server has opened yet")
    return Summary(db.execute("SELECT COUNT(*) FROM items").fetchone()[0], fingerprint[0], version)


def _items_in(store_path: Path) -> Optional[int]:
    """Items in the store, 0 when there is no store yet, None when it cannot be read."""
    if not store_path.exists():
        return 0
    try:
        with _connect(store_path, read_only=False) as db:  # read-write: a WAL left by a crash is replayed first
            if not db.execute("SELECT 1 FROM sqlite_schema WHERE name = 'items'").fetchone():
                return 0
            return db.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    except sqlite3.DatabaseError:
        return None


def _install_snapshot(source: sqlite3.Connection, target: Path, overwrite: bool) -> Summary:
    """Copy ``source`` into a temporary file beside ``target``, check it, then move it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        _snapshot(source, temporary)
        summary = check_gallery(temporary)  # never install a copy that restore would refuse
        _remove_sidecars(target)
        if overwrite:
            os.replace(temporary, target)
        else:
            os.link(temporary, target)  # fails if the target appeared meanwhile: never overwritten unasked
        _fsync_folder(target.parent)
        return summary
    except FileExistsError:
        raise Refused(f"{target} exists; pass --force to overwrite it") from None
    finally:
        temporary.unlink(missing_ok=True)


def _snapshot(source: sqlite3.Connection, path: Path) -> None:
    """The source's last committed state as one file, flushed to disk."""
    path.unlink(missing_ok=True)
    copy = sqlite3.connect(path, isolation_level=None)
    try:
        source.backup(copy)  # all pages in one step: one read transaction, so one consistent state
        # the copied header says WAL; a rollback journal keeps the file whole on its own, with no -wal beside it
        copy.execute("PRAGMA journal_mode=DELETE")
    finally:
        copy.close()
    with open(path, "rb+") as file:
        os.fsync(file.fileno())


def _remove_sidecars(target: Path) -> None:
    # A -wal left beside the old file would be replayed into the new one when it is opened, corrupting it.
    for suffix in ("-wal", "-shm"):
        target.with_name(target.name + suffix).unlink(missing_ok=True)


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)  # the rename itself survives power loss
    finally:
        os.close(descriptor)


class _connect:
    """A connection closed on exit (sqlite3's own context manager only commits); ``read_only`` never writes the file."""

    def __init__(self, path: Path, read_only: bool):
        uri = path.resolve().as_uri() + ("?mode=ro" if read_only else "?mode=rw")  # rw: never create a missing file
        self.db = sqlite3.connect(uri, uri=True, isolation_level=None)

    def __enter__(self) -> sqlite3.Connection:
        return self.db

    def __exit__(self, *exc) -> None:
        self.db.close()
