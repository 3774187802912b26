"""The durable gallery: SQLite in WAL mode holding each item's original image bytes, embedding, ids and
metadata, and the fingerprint of the model that made the embeddings.

Writes go through their own connection with ``synchronous=FULL``, so what a request acknowledged survives
``kill -9`` (and power loss); reads use another, so they never wait for a write's fsync (WAL lets both run).
``commit_group`` lets concurrent writes share one transaction, and so one fsync, each in its own savepoint:
every write is still all or nothing on its own. Ids come from AUTOINCREMENT, so they are never reused.

Erasure (a person, or what retention expires) must leave nothing readable in the files: ``secure_delete``
zeroes what a delete frees, and ``wipe_wal`` then copies the zeroed pages into the database and truncates
the WAL, whose older frames still hold the erased rows.

The schema has a version (``PRAGMA user_version``): a file is brought up to date by ``MIGRATIONS`` when it is
opened, each step in its own transaction, so a gallery written by an older version opens and keeps working.
"""

import fcntl
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from service.validation import check_writable, dump_metadata, read_metadata

SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    person_id TEXT,
    camera_id TEXT,
    metadata TEXT NOT NULL,
    image BLOB NOT NULL,
    image_format TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    embedding BLOB NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS items_person ON items(person_id);
CREATE INDEX IF NOT EXISTS items_camera ON items(camera_id);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
# AGE: what retention goes by, the capture time when known, else the enrolment time
AGE = "COALESCE(captured_at, created_at)"
# MIGRATIONS[n] brings a version n file to version n + 1; SCHEMA above is version 0, the first release's
MIGRATIONS = [
    [
        "ALTER TABLE items ADD COLUMN captured_at REAL",  # epoch seconds, NULL: unknown
        f"CREATE INDEX items_age ON items({AGE})",
    ],
    ["ALTER TABLE items ADD COLUMN derived BLOB"],  # service.derived: decoded copies of costly images, NULL: none
    ["ALTER TABLE items ADD COLUMN maps BLOB"],  # service.stored_maps: the item's feature maps, NULL: not stored
]
SCHEMA_VERSION = len(MIGRATIONS)
ITEM_COLUMNS = "id, person_id, camera_id, metadata, image_format, width, height, created_at, captured_at"
RESERVE_BYTES = 16 * 1024 * 1024
RESERVE_HEADROOM = RESERVE_BYTES // 2  # free space the reserve never takes: the disk's last bytes are not ours
SQL_VARIABLES = 900  # ids per "IN (...)" read, under SQLite's oldest default limit of 999 host parameters
FINGERPRINT_KEY = "model_fingerprint"  # meta: the sha256 of the model that made the stored embeddings
log = logging.getLogger(__name__)


def is_disk_full(exc: BaseException) -> bool:
    return getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL


class ReserveMissing(sqlite3.OperationalError):
    """An enrolment refused because the disk reserve is not laid: it would take the space deletes need."""

    def __init__(self, reserve: "DiskReserve"):
        super().__init__(
            f"the disk is full: enrolments resume once {reserve.lay_threshold // 2**20} MiB are free "
            f"again (delete items, or free disk space); deletes still work"
        )


@dataclass
class NewItem:
    image: bytes
    image_format: str
    width: int
    height: int
    embedding: np.ndarray
    person_id: Optional[str] = None
    camera_id: Optional[str] = None
    metadata: Optional[dict] = None
    captured_at: Optional[float] = None
    derived: Optional[bytes] = None  # service.derived's copy, for an image costly to decode
    maps: Optional[bytes] = None  # service.stored_maps' form of its feature maps, where the model's are stored


@dataclass
class Item:
    id: int
    person_id: Optional[str]
    camera_id: Optional[str]
    metadata: dict
    image_format: str
    width: int
    height: int
    created_at: float
    captured_at: Optional[float] = None

    @classmethod
    def from_row(cls, row: tuple) -> "Item":
        return cls(row[0], row[1], row[2], read_metadata(row[3]), *row[4:])


class StoreInUse(RuntimeError):
    """Another process (a server, a restore) holds the store's lock."""


class StoreLock:
    """An exclusive advisory lock (``flock``) on ``<store>.lock``, held while a process owns the store: a server
    for its whole life, a restore while it replaces the file. The kernel lets it go when the process dies, even
    by ``kill -9``, so a crash never leaves it stale. The lock file is never deleted: deleting it would let two
    processes lock two different files of the same name."""

    def __init__(self, store_path: Path):
        self.store_path = Path(store_path)
        self.path = self.store_path.with_name(self.store_path.name + ".lock")
        self.file = None

    def acquire(self) -> "StoreLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.release()
            raise StoreInUse(
                f"{self.store_path} is in use by another process (a running server or a restore): {self.path} is locked"
            ) from None
        return self

    def release(self) -> None:
        if self.file:
            self.file.close()  # closing the last descriptor drops the flock
            self.file = None

    def __enter__(self) -> "StoreLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def tolerant_text(db: sqlite3.Connection) -> sqlite3.Connection:
    """A TEXT value that is not UTF-8 (written by another tool) is read with U+FFFD in place of the bad bytes
    rather than failing every read that touches its row."""
    db.text_factory = lambda data: data.decode("utf-8", "replace")
    return db


INSERTED_COLUMNS = (
    "person_id",
    "camera_id",
    "metadata",
    "image",
    "image_format",
    "width",
    "height",
    "embedding",
    "created_at",
    "captured_at",
    "derived",
    "maps",
)


def insert_statement(placeholder: str) -> str:
    """One item's INSERT with the driver's ``placeholder`` (SQLite ``?``, psycopg ``%s``): both stores write it."""
    return (
        f"INSERT INTO items({', '.join(INSERTED_COLUMNS)}) VALUES ({', '.join([placeholder] * len(INSERTED_COLUMNS))})"
    )


def set_maps_statement(placeholder: str) -> str:
    """Stored maps (service.stored_maps) written back for an item stored without them; both stores run it."""
    return f"UPDATE items SET maps = {placeholder} WHERE id = {placeholder} AND maps IS NULL"


class InsertedRow:
    """A new item as both stores write it (INSERTED_COLUMNS' values) and answer it once written."""

    def __init__(self, item: NewItem, now: float):
        self.item, self.now, self.metadata = item, now, item.metadata or {}
        check_writable(self.metadata)  # the last guard: what is committed must serialise back (service.validation)

    @property
    def values(self) -> tuple:
        item = self.item
        embedding = np.ascontiguousarray(item.embedding, np.float32).tobytes()
        return (
            item.person_id,
            item.camera_id,
            dump_metadata(self.metadata),
            item.image,
            item.image_format,
            item.width,
            item.height,
            embedding,
            self.now,
            item.captured_at,
            item.derived,
            item.maps,
        )

    def stored(self, item_id: int) -> Item:
        item = self.item
        return Item(
            item_id,
            item.person_id,
            item.camera_id,
            self.metadata,
            item.image_format,
            item.width,
            item.height,
            self.now,
            item.captured_at,
        )


def listing_filter(
    placeholder: str,
    person_id: Optional[str],
    camera_id: Optional[str],
    captured_after: Optional[float],
    captured_before: Optional[float],
) -> Tuple[str, list]:
    """A listing's WHERE clause (empty when nothing filters) and its arguments, with the driver's parameter
    placeholder (SQLite's ``?``, PostgreSQL's ``%s``)."""
    where, args = [], []
    for condition, value in (
        ("person_id = {}", person_id),
        ("camera_id = {}", camera_id),
        ("captured_at >= {}", captured_after),
        ("captured_at < {}", captured_before),
    ):
        if value is not None:
            where.append(condition.format(placeholder))
            args.append(value)
    return (f" WHERE {' AND '.join(where)}" if where else ""), args


class StoreReads:
    """The store's reads, on ``self.db``: the store's own read connection, or a ``StoreReader``'s."""

    db: sqlite3.Connection

    def get(self, item_id: int) -> Optional[Item]:
        row = self.db.execute(f"SELECT {ITEM_COLUMNS} FROM items WHERE id = ?", (item_id,)).fetchone()
        return Item.from_row(row) if row else None

    def _rows_by_id(self, columns: str, ids: Sequence[int]) -> List[tuple]:
        """The rows of ``ids``, in reads of at most SQL_VARIABLES ids (SQLite's limit on host parameters)."""
        ids = list(ids)
        rows = []
        for start in range(0, len(ids), SQL_VARIABLES):
            chunk = ids[start : start + SQL_VARIABLES]
            rows += self.db.execute(
                f"SELECT {columns} FROM items WHERE id IN ({','.join('?' * len(chunk))})", chunk
            ).fetchall()
        return rows

    def get_many_with_embeddings(self, ids: Sequence[int], dim: int) -> Dict[int, Tuple[Item, np.ndarray]]:
        """Items and their embeddings by id, in one read; ids no longer stored are absent."""
        return {
            row[0]: (Item.from_row(row[:-1]), np.frombuffer(row[-1], np.float32, count=dim))
            for row in self._rows_by_id(f"{ITEM_COLUMNS}, embedding", ids)
        }

    def embeddings(self, ids: Sequence[int], dim: int) -> Dict[int, np.ndarray]:
        """Embeddings by id; ids no longer stored are absent."""
        return {i: np.frombuffer(blob, np.float32, count=dim) for i, blob in self._rows_by_id("id, embedding", ids)}

    def sample_embeddings(self, count: int, dim: int, seed: int = 0) -> np.ndarray:
        """[min(count, stored), dim] embeddings drawn uniformly without replacement (all of them when fewer)."""
        ids = np.array([row[0] for row in self.db.execute("SELECT id FROM items")], np.int64)
        if len(ids) > count:
            ids = np.random.default_rng(seed).choice(ids, count, replace=False)
        vectors = list(self.embeddings(np.sort(ids).tolist(), dim).values())
        return np.stack(vectors) if vectors else np.zeros((0, dim), np.float32)

    def images(self, ids: Sequence[int]) -> Dict[int, bytes]:
        return dict(self._rows_by_id("id, image", ids))

    def derived(self, ids: Sequence[int]) -> Dict[int, bytes]:
        """``service.derived``'s copies of those of ``ids`` that have one."""
        return self._present("derived", ids)

    def stored_maps(self, ids: Sequence[int]) -> Dict[int, bytes]:
        """``service.stored_maps``' blobs of those of ``ids`` that have one."""
        return self._present("maps", ids)

    def _present(self, column: str, ids: Sequence[int]) -> Dict[int, bytes]:
        return {i: blob for i, blob in self._rows_by_id(f"id, {column}", ids) if blob is not None}

    def list(
        self,
        limit: int,
        offset: int,
        person_id: Optional[str] = None,
        camera_id: Optional[str] = None,
        captured_after: Optional[float] = None,
        captured_before: Optional[float] = None,
    ) -> Tuple[int, List[Item]]:
        """A page of items in id order; the capture time range is captured_after <= captured_at < captured_before
        (an item of unknown time is in no range)."""
        clause, args = listing_filter("?", person_id, camera_id, captured_after, captured_before)
        total = self.db.execute(f"SELECT COUNT(*) FROM items{clause}", args).fetchone()[0]
        rows = self.db.execute(
            f"SELECT {ITEM_COLUMNS} FROM items{clause} ORDER BY id LIMIT ? OFFSET ?", [*args, limit, offset]
        ).fetchall()
        return total, [Item.from_row(r) for r in rows]

    def count(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0]

    def iter_embeddings(self, dim: int, chunk: int = 4096) -> Iterator[Tuple[np.ndarray, np.ndarray, List[Tuple]]]:
        """All (ids, embeddings [n, dim], (person_id, camera_id, captured_at) rows) in chunks, in id order."""
        last = 0
        while True:
            rows = self.db.execute(
                "SELECT id, person_id, camera_id, captured_at, embedding FROM items WHERE id > ? ORDER BY id LIMIT ?",
                (last, chunk),
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            ids = np.array([r[0] for r in rows], np.int64)
            vectors = np.stack([np.frombuffer(r[4], np.float32) for r in rows])
            if vectors.shape[1] != dim:
                raise ValueError(f"stored embeddings have {vectors.shape[1]} dimensions, the model {dim}")
            yield ids, vectors, [r[1:4] for r in rows]

    def iter_images(self, chunk: int = 64) -> Iterator[List[Tuple[int, bytes]]]:
        last = 0
        while True:
            rows = self.db.execute(
                "SELECT id, image FROM items WHERE id > ? ORDER BY id LIMIT ?", (last, chunk)
            ).fetchall()
            if not rows:
                return
            last = rows[-1][0]
            yield rows


class StoreReader(StoreReads):
    """A read-only connection of its own, for a long read in another thread (the index rebuilt in the
    background) while the store's connections serve the event loop and the writer."""

    def __init__(self, path: Path):
        self.db = tolerant_text(
            sqlite3.connect(Path(path).resolve().as_uri() + "?mode=ro", uri=True, check_same_thread=False)
        )

    def close(self) -> None:
        self.db.close()


class GalleryStore(StoreReads):
    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = StoreLock(self.path).acquire()  # one owner at a time: two servers would each index half the writes
        try:
            self._open()
        except BaseException:
            self.lock.release()
            raise

    def _open(self) -> None:
        self.writer = self._connect()
        self.reserve = DiskReserve(self.path.with_name(self.path.name + ".reserve"), RESERVE_BYTES)
        self._use_incremental_vacuum()
        self.writer.execute("PRAGMA journal_mode=WAL")
        self.writer.executescript(SCHEMA)
        self._migrate()
        self.reserve.lay()
        self.db = tolerant_text(self._connect())  # reads

    def _connect(self) -> sqlite3.Connection:
        # check_same_thread=False: the service writes from one worker thread and reads on the event loop,
        # never the same connection from two threads at once.
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA secure_delete=ON")  # freed bytes are zeroed, not left for a file reader (erasure)
        return db

    def _migrate(self) -> None:
        version = self.writer.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(
                f"{self.path} has schema version {version}, written by a newer service (this one knows "
                f"{SCHEMA_VERSION})"
            )
        for number, steps in enumerate(MIGRATIONS[version:], version):
            with self._transaction():
                for step in steps:
                    self.writer.execute(step)
                self.writer.execute(f"PRAGMA user_version = {number + 1}")
            log.info("migrated the gallery schema of %s to version %d", self.path, number + 1)

    def _use_incremental_vacuum(self) -> None:
        """``auto_vacuum=INCREMENTAL``, so that deletes on a full disk can give their pages back to the
        filesystem (``free_space``). A new file gets it before its first table; a file made without it is
        rewritten once (``VACUUM``) where the disk has room for the copy, else keeps its pages."""
        if self.writer.execute("PRAGMA auto_vacuum").fetchone()[0] == 2:
            return
        new_file = not self.writer.execute("PRAGMA page_count").fetchone()[0]
        self.writer.execute("PRAGMA auto_vacuum=INCREMENTAL")
        if new_file:
            return
        if _free_bytes(self.path.parent) < 2 * self.path.stat().st_size + self.reserve.lay_threshold:
            log.warning("%s keeps the pages deletes free (no room to rewrite it with auto_vacuum)", self.path)
            return
        log.info("rewriting %s once, so that deletes can give space back to a full disk", self.path)
        self.writer.execute("VACUUM")

    def close(self) -> None:
        self.db.close()
        self.writer.close()
        self.lock.release()

    def reader(self) -> StoreReader:
        return StoreReader(self.path)

    def _transaction(self):
        return _Transaction(self.writer)

    def commit_group(self, writes: Sequence[Callable[[], object]]) -> List[Union[object, Exception]]:
        """Run writes (store methods bound with ``functools.partial``, such as ``insert`` and ``remove``) in one
        transaction, each in a savepoint: a write that fails, whatever the error (SQLite's, or a value it
        cannot bind), is rolled back alone and its error returned in its place, so one request's bad value
        never fails the others in its group. A failed commit, or an error after which SQLite has rolled the
        whole transaction back (disk full, I/O error), raises, and then none of them happened."""
        results = []
        with self._transaction():
            for write in writes:
                self.writer.execute("SAVEPOINT write")
                try:
                    results.append(write())
                except Exception as exc:
                    if not self.writer.in_transaction:
                        raise
                    self.writer.execute("ROLLBACK TO write")
                    results.append(exc)
                self.writer.execute("RELEASE write")
        return results

    def commit_freeing_space(self, writes: Sequence[Callable[[], object]]) -> List[Union[object, Exception]]:
        """``commit_group`` for deletes on a full disk (or one whose reserve is not laid again yet): the disk
        reserve is given back first, so that space can always be freed (even a delete needs room in the WAL),
        then the pages the deletes freed go back to the filesystem, where the reserve can be laid again."""
        if self.reserve.laid():
            log.warning(
                "the disk is full: giving back the %d byte disk reserve for %d delete(s)",
                self.reserve.size,
                len(writes),
            )
            self.reserve.release()
        results = self.commit_group(writes)
        try:
            self.writer.executescript("PRAGMA incremental_vacuum")  # execute() would free one page per call
            self.writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the file shrinks, and the WAL to nothing
        except sqlite3.Error as exc:  # best effort: the deletes have committed all the same
            log.warning("giving space back after deletes on a full disk: %s", exc)
        return results

    def get_meta(self, key: str) -> Optional[str]:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, values: Dict[str, str]) -> None:
        with self._transaction():
            self._write_meta(values)

    def _write_meta(self, values: Dict[str, str]) -> None:
        self.writer.executemany("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", list(values.items()))

    def add(self, items: Sequence[NewItem]) -> List[Item]:
        """Insert all items in one transaction; returns them as stored, in order."""
        with self._transaction():
            return self.insert(items)

    def delete(self, item_id: int) -> bool:
        with self._transaction():
            return self.remove(item_id)

    def insert(self, items: Sequence[NewItem]) -> List[Item]:
        """Insert items inside the caller's transaction (``add`` or ``commit_group``); returns them as stored
        (built here, not read back: a delete may already be on its way)."""
        now, stored = time.time(), []
        for item in items:
            row = InsertedRow(item, now)
            cursor = self.writer.execute(insert_statement("?"), row.values)
            stored.append(row.stored(cursor.lastrowid))
        return stored

    def set_maps(self, maps: Dict[int, bytes]) -> None:
        """Write stored maps of items that have none, inside the caller's transaction (a deleted item's are
        dropped: its row is gone)."""
        self.writer.executemany(set_maps_statement("?"), [(blob, item_id) for item_id, blob in maps.items()])

    def remove(self, item_id: int) -> bool:
        """Delete one item inside the caller's transaction; False when there was none."""
        return self.writer.execute("DELETE FROM items WHERE id = ?", (item_id,)).rowcount == 1

    def erase_person(self, person_id: str) -> List[int]:
        """Delete every item of the person inside the caller's transaction; their ids."""
        return self._erase("person_id = ?", (person_id,))

    def erase_older_than(self, cutoff: float) -> List[int]:
        """Delete, inside the caller's transaction, every item whose age (AGE) is before ``cutoff``; their ids."""
        return self._erase(f"{AGE} < ?", (cutoff,))

    def _erase(self, where: str, args: tuple) -> List[int]:
        return [row[0] for row in self.writer.execute(f"DELETE FROM items WHERE {where} RETURNING id", args).fetchall()]

    def wipe_wal(self) -> bool:
        """After an erasure: copy the WAL (its zeroed pages) into the database and truncate it, so that no older
        frame still holds erased rows. False when a reader kept it from finishing (the next wipe does)."""
        busy, _, _ = self.writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if busy:
            log.warning("the WAL could not be truncated after an erasure: a reader held it; the next erasure retries")
        return not busy

    def replace_embeddings(
        self, updates: Sequence[Tuple[int, np.ndarray, Optional[bytes]]], meta: Dict[str, str]
    ) -> None:
        """Write new embeddings and stored maps (None: not stored) and the new model's metadata in one
        transaction."""
        with self._transaction():
            self.writer.executemany(
                "UPDATE items SET embedding = ?, maps = ? WHERE id = ?",
                [(np.ascontiguousarray(e, np.float32).tobytes(), m, i) for i, e, m in updates],
            )
            self._write_meta(meta)

    def integrity_ok(self) -> bool:
        return self.db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


class DiskReserve:
    """Disk space held back for deletes: a file beside the database, given back to the filesystem when the
    disk is full, and laid again only where its size and ``RESERVE_HEADROOM`` are free (never the disk's last
    bytes). While it is not laid, enrolments are refused: they would take the space the next deletes need."""

    def __init__(self, path: Path, size: int):
        self.path, self.size = path, size
        self.lay_threshold = size + RESERVE_HEADROOM

    def laid(self) -> bool:
        return self.path.exists()

    def lay(self) -> bool:
        """Lay the reserve where there is room; whether it is laid."""
        if self.laid() or _free_bytes(self.path.parent) < self.lay_threshold:
            return self.laid()
        try:
            with open(self.path, "wb") as reserve:
                os.posix_fallocate(reserve.fileno(), 0, self.size)
        except OSError as exc:
            log.warning("could not lay the disk reserve %s: %s", self.path, exc)
            self.path.unlink(missing_ok=True)
        return self.laid()

    def release(self) -> None:
        self.path.unlink(missing_ok=True)


def _free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            try:
                self.db.execute("COMMIT")
                return False
            except sqlite3.Error:
                self._rollback()
                raise
        self._rollback()
        return False

    def _rollback(self) -> None:
        if self.db.in_transaction:  # SQLite has already rolled back after some errors
            self.db.execute("ROLLBACK")
