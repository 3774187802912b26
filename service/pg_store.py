"""The cluster gallery's source of truth: PostgreSQL holding each item's original image bytes, embedding, ids
and metadata, and the fingerprint of the model that made the embeddings (the cluster twin of
``service.store``, with the same reads).

Why PostgreSQL rather than an S3-compatible object store for the images: an enrolment must be all or nothing
across its images, their rows and the index, and one PostgreSQL transaction gives that; the crops are small
(10-30 kB), which PostgreSQL keeps out of line without trying to compress them (``STORAGE EXTERNAL``); and
it is one system fewer to run. The embeddings are stored too, so that Milvus is a derived index that any
replica can rebuild from here (``service.cluster_gallery``).

Every write runs in ``write()``: a transaction that first takes the gallery's advisory lock in shared mode
(writes run side by side; the exclusive holder, a replica bringing the index in step or re-embedding, waits
for them and holds them off) and checks that the gallery is still embedded by this replica's model. What a
write removes is announced on ``REMOVED_CHANNEL`` (``NOTIFY``, delivered at commit) so that every replica
drops those items' cached feature maps.
"""

import logging
import time
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import psycopg
from psycopg_pool import ConnectionPool

from service.store import (
    FINGERPRINT_KEY,
    ITEM_COLUMNS,
    InsertedRow,
    Item,
    NewItem,
    insert_statement,
    listing_filter,
    set_maps_statement,
)

log = logging.getLogger(__name__)
SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    person_id TEXT,
    camera_id TEXT,
    metadata TEXT NOT NULL,
    image BYTEA NOT NULL,
    image_format TEXT NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    embedding BYTEA NOT NULL,
    created_at DOUBLE PRECISION NOT NULL,
    captured_at DOUBLE PRECISION
);
ALTER TABLE items ALTER COLUMN image SET STORAGE EXTERNAL;
ALTER TABLE items ADD COLUMN IF NOT EXISTS derived BYTEA;
ALTER TABLE items ADD COLUMN IF NOT EXISTS maps BYTEA;
ALTER TABLE items ALTER COLUMN maps SET STORAGE EXTERNAL;
CREATE INDEX IF NOT EXISTS items_person ON items(person_id);
CREATE INDEX IF NOT EXISTS items_camera ON items(camera_id);
CREATE INDEX IF NOT EXISTS items_age ON items((COALESCE(captured_at, created_at)));
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
AGE = "COALESCE(captured_at, created_at)"  # what retention goes by, as in service.store
GALLERY_LOCK = 0x5E1D_6A11  # the advisory lock's key: writes hold it shared, index repair and re-embedding exclusive
REMOVED_CHANNEL = "reid_gallery_removed"
POOL_WAIT_S = 5.0
NOTIFY_PAYLOAD_IDS = 300  # ids per notification, well under PostgreSQL's 8000-byte payload limit


class ModelChanged(RuntimeError):
    """The gallery was re-embedded by another model since this replica started: its writes would mix models."""


class PostgresStore:
    def __init__(self, dsn: str, fingerprint: str, pool_size: int = 8):
        self.dsn, self.fingerprint = dsn, fingerprint
        # every read and write borrows a connection, checked first: one broken by a PostgreSQL restart is
        # replaced, not kept failing; with PostgreSQL down a request waits POOL_WAIT_S for one, then gets its 503
        self.pool = ConnectionPool(
            dsn,
            min_size=1,
            max_size=pool_size,
            open=True,
            kwargs={"autocommit": True},
            check=ConnectionPool.check_connection,
            timeout=POOL_WAIT_S,
        )
        with self.exclusive() as conn:  # two replicas starting together must not both create the schema
            conn.execute(SCHEMA)

    @property
    def path(self) -> str:
        """Where the gallery lives, for messages (no password)."""
        info = psycopg.conninfo.conninfo_to_dict(self.dsn)
        return f"postgresql://{info.get('host', '')}:{info.get('port', 5432)}/{info.get('dbname', '')}"

    def close(self) -> None:
        self.pool.close()

    def _read(self, query: str, args=()) -> List[tuple]:
        with self.pool.connection() as conn:
            return conn.execute(query, args).fetchall()

    @contextmanager
    def exclusive(self) -> Iterator[psycopg.Connection]:
        """A connection holding the gallery's lock exclusively (writes wait) until the block ends."""
        with self.pool.connection() as conn:
            conn.execute("SELECT pg_advisory_lock(%s)", (GALLERY_LOCK,))
            try:
                yield conn
            finally:
                conn.execute("SELECT pg_advisory_unlock(%s)", (GALLERY_LOCK,))

    @contextmanager
    def write(self) -> Iterator["Transaction"]:
        """One write transaction (shared lock, model check); committed when the block ends without error."""
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock_shared(%s)", (GALLERY_LOCK,))
            stored = conn.execute("SELECT value FROM meta WHERE key = %s", (FINGERPRINT_KEY,)).fetchone()
            if stored is not None and stored[0] != self.fingerprint:
                raise ModelChanged(
                    f"the gallery is now embedded by model {stored[0][:12]}, this replica serves "
                    f"{self.fingerprint[:12]}: "
                    "restart it with that model"
                )
            yield Transaction(conn)

    def get(self, item_id: int) -> Optional[Item]:
        rows = self._read(f"SELECT {ITEM_COLUMNS} FROM items WHERE id = %s", (item_id,))
        return Item.from_row(rows[0]) if rows else None

    def get_many_with_embeddings(self, ids: Sequence[int], dim: int) -> Dict[int, Tuple[Item, np.ndarray]]:
        """Items and their embeddings by id, in one read; ids no longer stored are absent."""
        rows = self._read(f"SELECT {ITEM_COLUMNS}, embedding FROM items WHERE id = ANY(%s)", (list(ids),))
        return {row[0]: (Item.from_row(row[:-1]), np.frombuffer(row[-1], np.float32, count=dim)) for row in rows}

    def embeddings(self, ids: Sequence[int], dim: int) -> Dict[int, np.ndarray]:
        rows = self._read("SELECT id, embedding FROM items WHERE id = ANY(%s)", (list(ids),))
        return {i: np.frombuffer(blob, np.float32, count=dim) for i, blob in rows}

    def images(self, ids: Sequence[int]) -> Dict[int, bytes]:
        return {
            i: bytes(image) for i, image in self._read("SELECT id, image FROM items WHERE id = ANY(%s)", (list(ids),))
        }

    def derived(self, ids: Sequence[int]) -> Dict[int, bytes]:
        return self._present("derived", ids)

    def stored_maps(self, ids: Sequence[int]) -> Dict[int, bytes]:
        return self._present("maps", ids)

    def _present(self, column: str, ids: Sequence[int]) -> Dict[int, bytes]:
        rows = self._read(f"SELECT id, {column} FROM items WHERE id = ANY(%s) AND {column} IS NOT NULL", (list(ids),))
        return {i: bytes(blob) for i, blob in rows}

    def list(
        self,
        limit: int,
        offset: int,
        person_id: Optional[str] = None,
        camera_id: Optional[str] = None,
        captured_after: Optional[float] = None,
        captured_before: Optional[float] = None,
    ) -> Tuple[int, List[Item]]:
        """A page of items in id order, filtered as ``service.store``'s list."""
        clause, args = listing_filter("%s", person_id, camera_id, captured_after, captured_before)
        total = self._read(f"SELECT COUNT(*) FROM items{clause}", args)[0][0]
        rows = self._read(
            f"SELECT {ITEM_COLUMNS} FROM items{clause} ORDER BY id LIMIT %s OFFSET %s", [*args, limit, offset]
        )
        return total, [Item.from_row(r) for r in rows]

    def count(self) -> int:
        return self._read("SELECT COUNT(*) FROM items")[0][0]

    def get_meta(self, key: str) -> Optional[str]:
        rows = self._read("SELECT value FROM meta WHERE key = %s", (key,))
        return rows[0][0] if rows else None


class Transaction:
    """The writes of ``PostgresStore.write``, on its connection, inside its transaction."""

    def __init__(self, conn: psycopg.Connection):
        self.conn = conn

    def insert(self, items: Sequence[NewItem]) -> List[Item]:
        now, stored = time.time(), []
        for item in items:
            row = InsertedRow(item, now)
            item_id = self.conn.execute(insert_statement("%s") + " RETURNING id", row.values).fetchone()[0]
            stored.append(row.stored(item_id))
        return stored

    def set_maps(self, maps: Dict[int, bytes]) -> None:
        self.conn.cursor().executemany(set_maps_statement("%s"), [(blob, item_id) for item_id, blob in maps.items()])

    def remove(self, item_id: int) -> List[int]:
        return self._delete("id = %s", (item_id,))

    def erase_person(self, person_id: str) -> List[int]:
        return self._delete("person_id = %s", (person_id,))

    def erase_older_than(self, cutoff: float) -> List[int]:
        return self._delete(f"{AGE} < %s", (cutoff,))

    def _delete(self, where: str, args: tuple) -> List[int]:
        ids = [row[0] for row in self.conn.execute(f"DELETE FROM items WHERE {where} RETURNING id", args).fetchall()]
        for start in range(0, len(ids), NOTIFY_PAYLOAD_IDS):
            self.conn.execute(
                "SELECT pg_notify(%s, %s)",
                (REMOVED_CHANNEL, ",".join(map(str, ids[start : start + NOTIFY_PAYLOAD_IDS]))),
            )
        return ids


def write_meta(conn: psycopg.Connection, values: Dict[str, str]) -> None:
    """Inside the caller's transaction."""
    for key, value in values.items():
        conn.execute(
            "INSERT INTO meta(key, value) VALUES (%s, %s) ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
            (key, value),
        )


def iter_rows(conn: psycopg.Connection, columns: str, chunk: int) -> Iterator[List[tuple]]:
    """Every item's ``columns`` (``id`` first) in id order, ``chunk`` rows at a time (keyset pages: no long
    transaction, no OFFSET scan)."""
    last = 0
    while True:
        rows = conn.execute(f"SELECT {columns} FROM items WHERE id > %s ORDER BY id LIMIT %s", (last, chunk)).fetchall()
        if not rows:
            return
        last = rows[-1][0]
        yield rows


def listen_for_removals(dsn: str, on_removed, stop) -> None:
    """Call ``on_removed(ids)`` for every removal any replica commits, until ``stop`` (a threading.Event) is
    set; runs in a thread of its own, reconnecting after a lost connection."""
    while not stop.is_set():
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(f"LISTEN {REMOVED_CHANNEL}")
                while not stop.is_set():
                    for note in conn.notifies(timeout=1.0):
                        on_removed([int(i) for i in note.payload.split(",") if i])
        except psycopg.Error as exc:
            log.warning("listening for gallery removals: %s; reconnecting", exc)
            stop.wait(1.0)
