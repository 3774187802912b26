"""The gallery of a service that runs as several replicas (REID_GALLERY_BACKEND=cluster): PostgreSQL
(``service.pg_store``) is the source of truth, a Milvus collection (``service.milvus_index``) the index every
replica searches. Any replica answers any request; a replica that dies loses nothing it acknowledged.

A write is one PostgreSQL transaction with the Milvus write inside it: the rows are written, then Milvus,
then the commit, and only then the answer. If Milvus fails, the transaction rolls back and nothing happened;
if the commit fails after Milvus took the write, the Milvus write is undone (best effort). Whatever is left
in Milvus without a row (a replica killed between the two) is never answered, since every hit is read back
from PostgreSQL, and the next replica to start removes it: at start a replica takes the gallery's lock
exclusively (writes wait), re-embeds a gallery embedded by another model, then brings the collection in step
with the rows (recreated if it is missing or of another dimension, orphans removed, missing rows added).

What differs from the embedded gallery (``service.gallery``), by design: writes are not group-committed
(PostgreSQL commits concurrent transactions side by side); ``size`` is read from PostgreSQL at most once a
second; a delete on one replica reaches the other replicas' feature-map caches through a PostgreSQL
notification, so for a moment after it they may still hold those maps (never answered: the item is gone).
Erasure removes the rows and the vectors at once, but PostgreSQL keeps a deleted row's bytes until VACUUM
reuses the space and Milvus keeps deleted vectors until compaction (docs/deployment.md, "Cluster").
"""

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import psycopg
from pymilvus.exceptions import MilvusException
from tqdm import tqdm

from model_zoo.preprocess import load_for_model
from service.gallery import EMBEDDING_DIM_KEY, GalleryBase, ModelMismatch
from service.inference import InferenceModel
from service.index import first_per_group
from service.milvus_index import MAX_LIMIT, MilvusIndex, search_filter
from service.pg_store import ModelChanged, PostgresStore, Transaction, iter_rows, listen_for_removals, write_meta
from service.settings import Settings
from service.store import FINGERPRINT_KEY, ITEM_COLUMNS, Item, NewItem

log = logging.getLogger(__name__)
UNAVAILABLE_ERRORS = (psycopg.OperationalError, MilvusException)  # the database or the index is out of reach: 503
__all__ = ["ClusterGallery", "ModelChanged", "UNAVAILABLE_ERRORS"]
SIZE_TTL_S = 1.0
REMEMBERED_PEOPLE = 100_000  # search hits whose person a later grouping (a best-of track) may ask for
REMEMBERED_REMOVALS = 10_000


class ClusterGallery(GalleryBase):
    def __init__(self, model: InferenceModel, settings: Settings):
        super().__init__(model, settings)
        self.store = PostgresStore(settings.postgres_dsn.get_secret_value(), model.fingerprint)
        self.index = MilvusIndex(
            settings.milvus_uri,
            settings.milvus_token.get_secret_value() if settings.milvus_token else None,
            settings.milvus_collection,
            self.dim,
            settings.milvus_index_type,
        )
        self._size, self._size_read = 0, 0.0
        self._people: "OrderedDict[int, Optional[str]]" = OrderedDict()
        self._people_lock = threading.Lock()
        self._removed: "OrderedDict[int, None]" = OrderedDict()
        self._stop_listening = threading.Event()

    def open(self, progress: bool = True) -> None:
        with self.store.exclusive() as conn:
            stored = conn.execute("SELECT value FROM meta WHERE key = %s", (FINGERPRINT_KEY,)).fetchone()
            count = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
            if stored is not None and stored[0] != self.model.fingerprint and count:
                if self.settings.on_model_change == "refuse":
                    raise ModelMismatch(
                        f"the gallery in {self.store.path} was embedded by model {stored[0][:12]}, "
                        f"this is "
                        f"{self.model.fingerprint[:12]}; set REID_ON_MODEL_CHANGE=reembed to re-embed "
                        f"its stored images"
                    )
                self._reembed(conn, count, progress)
                self.index.recreate()
            else:
                with conn.transaction():
                    write_meta(conn, self._meta)
            self._bring_index_in_step(conn, progress)
        self._size, self._size_read = count, time.monotonic()

    @property
    def _meta(self) -> Dict[str, str]:
        return {FINGERPRINT_KEY: self.model.fingerprint, EMBEDDING_DIM_KEY: str(self.dim)}

    def _reembed(self, conn: psycopg.Connection, count: int, progress: bool) -> None:
        """Every stored image embedded with this model, in one transaction (the other replicas' writes wait on
        the lock, then find the new fingerprint and refuse to mix models)."""
        height, width = self.model.input_size
        with conn.transaction(), tqdm(total=count, desc="re-embedding gallery", disable=not progress) as bar:
            for rows in iter_rows(conn, "id, image", self.settings.max_batch_size):
                batch = np.stack(
                    [load_for_model(bytes(image), height, width, self.settings.max_image_pixels) for _, image in rows]
                )
                embedding, maps = self.map_storage.predict(self.model, batch)
                conn.cursor().executemany(
                    "UPDATE items SET embedding = %s, maps = %s WHERE id = %s",
                    [
                        (vector.astype(np.float32).tobytes(), item_maps, item_id)
                        for (item_id, _), vector, item_maps in zip(rows, embedding, maps)
                    ],
                )
                bar.update(len(rows))
            write_meta(conn, self._meta)
        log.warning("re-embedded %d gallery items with model %s", count, self.model.fingerprint[:12])

    def _bring_index_in_step(self, conn: psycopg.Connection, progress: bool, chunk: int = 1024) -> None:
        """The collection holding exactly the stored items (the caller holds the lock exclusively)."""
        indexed = set() if self.index.ensure() else self.index.ids()
        stored = {row[0] for row in conn.execute("SELECT id FROM items")}
        orphans, missing = sorted(indexed - stored), sorted(stored - indexed)
        self.index.delete(orphans)
        with tqdm(total=len(missing), desc="indexing gallery in Milvus", disable=not progress or not missing) as bar:
            for start in range(0, len(missing), chunk):
                rows = conn.execute(
                    f"SELECT {ITEM_COLUMNS}, embedding FROM items WHERE id = ANY(%s)", (missing[start : start + chunk],)
                ).fetchall()
                self.index.upsert(
                    [Item.from_row(row[:-1]) for row in rows],
                    [np.frombuffer(row[-1], np.float32, count=self.dim) for row in rows],
                )
                bar.update(len(rows))
        if orphans or missing:
            log.warning(
                "Milvus brought in step with PostgreSQL: %d orphan vector(s) removed, %d item(s) indexed",
                len(orphans),
                len(missing),
            )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def removed_elsewhere(ids: List[int]) -> None:
            loop.call_soon_threadsafe(self._forget, ids)

        self._listener = threading.Thread(
            target=listen_for_removals,
            args=(self.store.dsn, removed_elsewhere, self._stop_listening),
            name="gallery-removals",
            daemon=True,
        )
        self._listener.start()

    async def stop(self) -> None:
        self._stop_listening.set()
        await asyncio.to_thread(self._listener.join, 5)

    def close(self) -> None:
        self.index.close()
        self.store.close()

    def _forget(self, ids: List[int]) -> None:
        self.announce_removed(ids)
        for item_id in ids:
            self._removed[item_id] = None
        while len(self._removed) > REMEMBERED_REMOVALS:
            self._removed.popitem(last=False)
        self._size_read = 0.0

    def holds(self, item_id: int) -> bool:
        return item_id not in self._removed

    @property
    def size(self) -> int:
        """The stored items as last counted, give or take this replica's writes since (no I/O: it is read on
        the event loop, in every answer and metric)."""
        return self._size

    async def current_size(self) -> int:
        """The count read from PostgreSQL, in a worker thread, at most once a second (and at once while it
        reads 0, so the first enrolment on any replica is seen at once by the others' empty-gallery check)."""
        if self._size == 0 or time.monotonic() - self._size_read > SIZE_TTL_S:
            self._size, self._size_read = await asyncio.to_thread(self.store.count), time.monotonic()
        return self._size

    def describe_index(self) -> Dict[str, object]:
        return {
            "type": "milvus",
            "requested_type": self.settings.milvus_index_type,
            "device": "remote",
            "size": self.size,
            "tombstones": 0,
            "reduced_dim": None,
            "rebuilding": False,
            **self.index.describe(),
        }

    async def readiness_problem(self) -> Optional[str]:
        """In a worker thread; also raises when PostgreSQL or Milvus is out of reach (answered 503
        storage_unavailable), after waiting at most the pool's POOL_WAIT_S, which must not hold up the loop."""
        return await asyncio.to_thread(self._model_left_behind)

    def _model_left_behind(self) -> Optional[str]:
        self.index.check()
        stored = self.store.get_meta(FINGERPRINT_KEY)
        if stored is not None and stored != self.model.fingerprint:
            return (
                f"the gallery is now embedded by model {stored[:12]}, this replica serves {self.model.fingerprint[:12]}"
            )
        return None

    async def add(self, items: List[NewItem]) -> List[Item]:
        stored = await asyncio.to_thread(self._add, items)
        self._size += len(stored)
        return stored

    def _add(self, items: List[NewItem]) -> List[Item]:
        stored: List[Item] = []
        try:
            with self.store.write() as tx:
                stored = tx.insert(items)
                self.index.upsert(stored, [item.embedding for item in items])
        except BaseException:
            if stored:
                self._undo_upsert([item.id for item in stored])
            raise
        return stored

    def _undo_upsert(self, ids: List[int]) -> None:
        try:
            self.index.delete(ids)
        except Exception as exc:  # the orphans are never answered, and the next replica to start removes them
            log.error("could not undo a Milvus write whose transaction failed (%s); the next start removes it", exc)

    async def store_maps(self, maps: Dict[int, bytes]) -> None:
        def in_transaction() -> None:
            with self.store.write() as tx:  # refused once another replica re-embedded with another model
                tx.set_maps(maps)

        await asyncio.to_thread(in_transaction)

    async def delete(self, item_id: int) -> bool:
        return bool(await self._remove(lambda tx: tx.remove(item_id)))

    async def erase_person(self, person_id: str) -> List[int]:
        return await self._remove(lambda tx: tx.erase_person(person_id))

    async def erase_older_than(self, cutoff: float) -> List[int]:
        return await self._remove(lambda tx: tx.erase_older_than(cutoff))

    async def _remove(self, remove: Callable[[Transaction], List[int]]) -> List[int]:
        def in_transaction() -> List[int]:
            with self.store.write() as tx:
                ids = remove(tx)
                self.index.delete(ids)
            return ids

        ids = await asyncio.to_thread(in_transaction)
        self._size -= len(ids)
        self._forget(ids)
        return ids

    async def read(self, read: Callable[..., Any], *args) -> Any:
        return await asyncio.to_thread(read, *args)

    async def search_from_loop(self, *args, **kwargs) -> List[Tuple[int, float]]:
        """In a worker thread: a Milvus search is a round trip that would otherwise stop every request of this
        replica while it lasts."""
        return await asyncio.to_thread(self.search, *args, **kwargs)

    def search(
        self,
        embedding: np.ndarray,
        k: int,
        camera_id: Optional[str] = None,
        exclude_camera_id: Optional[str] = None,
        person_id: Optional[str] = None,
        min_score: Optional[float] = None,
        captured_after: Optional[float] = None,
        captured_before: Optional[float] = None,
        group_by_person: bool = False,
    ) -> List[Tuple[int, float]]:
        """As ``Gallery.search``; the filters run in Milvus, the score cut and the grouping here (widening the
        search until ``k`` people are found, as the embedded index does)."""
        expression = search_filter(camera_id, exclude_camera_id, person_id, captured_after, captured_before)
        want = 4 * k if group_by_person else k
        while True:
            found = self.index.search(embedding, want, expression)
            self._remember_people(found)
            hits = [(item_id, self.score(raw)) for item_id, raw, _ in found]
            if min_score is not None:
                hits = [hit for hit in hits if hit[1] >= min_score]
            if group_by_person:
                hits = first_per_group(hits, self.person_group)
            if len(hits) >= k or len(found) < want or want >= MAX_LIMIT:
                return hits[:k]
            want = min(MAX_LIMIT, want * 4)

    def _remember_people(self, found: List[Tuple[int, float, Optional[str]]]) -> None:
        with self._people_lock:  # searches run in worker threads
            for item_id, _, person in found:
                self._people[item_id] = person
                self._people.move_to_end(item_id)
            while len(self._people) > REMEMBERED_PEOPLE:
                self._people.popitem(last=False)

    def person_of(self, item_id: int) -> Optional[str]:
        with self._people_lock:
            return self._people.get(item_id)
