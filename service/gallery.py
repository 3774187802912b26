"""The embedded gallery: the SQLite store (source of truth) and the FAISS index kept consistent, in this process
(the default; several replicas share ``service.cluster_gallery`` instead).

Every write (enrol, delete) goes through one writer task, in arrival order: it commits the store in a worker
thread (writes that arrive together share one transaction and one fsync: group commit), then updates the
in-memory index on the event loop, then answers the requests. A write is acknowledged only once it is durable
and searchable, and no other write can come between its store commit and its index update. Searches and
store reads run in worker threads (``ReadThreads``, each thread on its own read connection), never on the
loop; the index changes only while no search runs (``service.search_gate``). Reads run while a commit is under
way, so a query may find an id in the index whose delete the store has already committed: readers skip ids
the store no longer has. At start the index is rebuilt from the store; a store embedded by
another model is re-embedded from its stored images or refused.

Later rebuilds (the gallery outgrew what a trained index learnt from, or many deletes left tombstones) run in
a worker thread on a read connection of their own, while the old index keeps answering and writes go on:
each write applied meanwhile is replayed onto the new index when it is swapped in. Applying a write to the
index is idempotent (an id the index already holds is not added again, one it lacks is not removed), so a
write the rebuild's read already saw replays harmlessly. The exception is an erasure on an index that cannot
drop vectors (HNSW, GPU): it is rebuilt at once (in a worker thread, searches waiting), so the erased vectors
leave memory before the next write is answered.

Erasure (a person's items, or those retention expires) is one such write: one transaction, then the WAL
wiped (service.store), then the vectors removed from memory, then the answer.
"""

import asyncio
import logging
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from model_zoo.preprocess import load_for_model
from service.index import VectorIndex
from service.inference import ImageMaps, InferenceModel
from service.search_gate import SearchGate
from service.settings import Settings
from service.stored_maps import MapStorage
from service.store import (
    FINGERPRINT_KEY,
    GalleryStore,
    Item,
    NewItem,
    ReserveMissing,
    StoreReader,
    StoreReads,
    is_disk_full,
)

log = logging.getLogger(__name__)
READ_THREADS = 4  # searches and store reads at once: FAISS and SQLite release the GIL
EMBEDDING_DIM_KEY = "embedding_dim"
TRAINING_SAMPLE = 50_000  # gallery vectors a trained index learns from (IVF's lists, the reduction's axes)


class ModelMismatch(RuntimeError):
    """The store was embedded by another model and re-embedding is switched off."""


class Label(NamedTuple):
    """What the search filters look at, per id, kept in memory (the store is not read per candidate)."""

    person_id: Optional[str]
    camera_id: Optional[str]
    captured_at: Optional[float]


UNLABELLED = Label(None, None, None)


@dataclass
class _Write:
    in_store: Callable[[], Any]  # runs inside the group's transaction, in the writer thread
    in_index: Callable[[Any], None]  # gets in_store's result, runs on the event loop after the commit
    future: asyncio.Future
    frees_space: bool = False  # a delete: on a full disk it is committed again with the store's disk reserve
    erases: bool = False  # an erasure: the WAL is wiped after its commit


class GalleryBase:
    """What the routes use of a gallery, whichever the backend: this embedded one (SQLite + FAISS in this
    process) or ``service.cluster_gallery`` (PostgreSQL + Milvus, shared by replicas). Both have ``open``,
    ``start``/``stop``/``close``, ``add``, ``delete``, ``erase_person``, ``erase_older_than``, ``search``,
    ``size``, ``describe_index``, ``readiness_problem`` and the reads below (``get``, ``list``, ``images``, ...), which
    run each backend's ``store`` reads off the event loop."""

    def __init__(self, model: InferenceModel, settings: Settings):
        self.model, self.settings = model, settings
        self.dim = model.contract.embedding_dim
        self.num_branches = model.contract.num_branches
        self.map_storage = MapStorage(model, settings.stored_maps_max_kb)
        self._removal_listeners: List[Callable[[List[int]], None]] = []

    def holds(self, item_id: int) -> bool:
        raise NotImplementedError

    def person_of(self, item_id: int) -> Optional[str]:
        raise NotImplementedError

    async def readiness_problem(self) -> Optional[str]:
        """Why this replica must not serve (None: it may)."""
        return None

    async def current_size(self) -> int:
        """``size``, read afresh where it may lag (the empty-gallery check, /readyz); here it never does."""
        return self.size

    async def search_from_loop(self, *args, **kwargs) -> List[Tuple[int, float]]:
        """``search``, called from the event loop, run off it (an exact scan, or a network round trip)."""
        raise NotImplementedError

    async def read(self, read: Callable[..., Any], *args) -> Any:
        """``read(*args)``, one of ``store``'s reads, called from the event loop, run off it."""
        raise NotImplementedError

    # The reads the routes and the query answerer make, each run off the event loop by ``read``: they ask the
    # gallery, never its store.
    async def get(self, item_id: int) -> Optional[Item]:
        return await self.read(self.store.get, item_id)

    async def list(self, limit: int, offset: int, *filters) -> Tuple[int, List[Item]]:
        """A page of items in id order; ``filters``: person, camera, captured after, captured before."""
        return await self.read(self.store.list, limit, offset, *filters)

    async def items_with_embeddings(self, ids: Sequence[int]) -> Dict[int, Tuple[Item, np.ndarray]]:
        return await self.read(self.store.get_many_with_embeddings, ids, self.dim)

    async def images(self, ids: Sequence[int]) -> Dict[int, bytes]:
        """The stored original image bytes by id; ids no longer stored are absent."""
        return await self.read(self.store.images, ids)

    async def decoded_copies(self, ids: Sequence[int]) -> Dict[int, bytes]:
        """``service.derived``'s copies of those of ``ids`` that have one."""
        return await self.read(self.store.derived, ids)

    async def stored_maps(self, ids: Sequence[int]) -> Dict[int, ImageMaps]:
        """``service.stored_maps``' maps of those of ``ids`` that have them."""
        return await asyncio.to_thread(MapStorage.unpacked, await self.read(self.store.stored_maps, ids))

    async def store_maps(self, maps: Dict[int, bytes]) -> None:
        """Write stored maps (``service.stored_maps``' blobs) for items stored without them."""
        raise NotImplementedError

    def on_removed(self, listener: Callable[[List[int]], None]) -> None:
        """Call ``listener(ids)`` in the same write that removes items (a delete, an erasure, another replica's
        delete seen by the cluster backend): what keeps derived state, such as the heatmap maps' cache, exact."""
        self._removal_listeners.append(listener)

    def announce_removed(self, ids: List[int]) -> None:
        for listener in self._removal_listeners:
            listener(ids)

    def person_group(self, item_id: int) -> Tuple[str, object]:
        """What group_by=person groups by: the person, or, for an item without person_id, the item alone
        (unknown people are not merged into one)."""
        person = self.person_of(item_id)
        return ("person", person) if person is not None else ("item", item_id)

    def score(self, raw: float) -> float:
        """The index's inner product as the documented score, the mean of the branches' cosines in [-1, 1]
        (float32 sums put an identical image a hair above 1, 1.0000001)."""
        return min(1.0, max(-1.0, raw / self.num_branches))


class Gallery(GalleryBase):
    def __init__(self, store: GalleryStore, model: InferenceModel, settings: Settings):
        super().__init__(model, settings)
        self.store = store
        self.labels: Dict[int, Label] = {}
        self.index = self._new_index()
        self._rebuilding: Optional[asyncio.Task] = None
        self._replay: List[Tuple[_Write, Any]] = []  # writes applied to the old index while the new one is built
        self._cancel_rebuild = threading.Event()

    def _new_index(self) -> VectorIndex:
        s = self.settings
        return VectorIndex(
            self.dim,
            s.index_type,
            s.index_device,
            s.ivf_nlist,
            s.ivf_nprobe,
            s.hnsw_m,
            s.hnsw_ef_search,
            s.index_reduce_dim,
            s.index_rescore_candidates,
        )

    def open(self, progress: bool = True) -> None:
        stored = self.store.get_meta(FINGERPRINT_KEY)
        if stored is not None and stored != self.model.fingerprint and self.store.count():
            if self.settings.on_model_change == "refuse":
                raise ModelMismatch(
                    f"the gallery in {self.store.path} was embedded by model {stored[:12]}, this is "
                    f"{self.model.fingerprint[:12]}; "
                    "set REID_ON_MODEL_CHANGE=reembed to re-embed its stored images, or point REID_STORE_PATH "
                    "elsewhere"
                )
            self.reembed(progress)  # writes the new fingerprint with the new embeddings
        else:
            self.store.set_meta(self._meta)
        self.rebuild_index()

    @property
    def _meta(self) -> Dict[str, str]:
        return {FINGERPRINT_KEY: self.model.fingerprint, EMBEDDING_DIM_KEY: str(self.dim)}

    def reembed(self, progress: bool = True) -> None:
        """Embed every stored image with the current model; written in one transaction at the end."""
        height, width = self.model.input_size
        updates = []
        with tqdm(total=self.store.count(), desc="re-embedding gallery", disable=not progress) as bar:
            for rows in self.store.iter_images(self.settings.max_batch_size):
                batch = np.stack(
                    [load_for_model(image, height, width, self.settings.max_image_pixels) for _, image in rows]
                )
                embedding, maps = self.map_storage.predict(self.model, batch)
                updates += [(item_id, vector, m) for (item_id, _), vector, m in zip(rows, embedding, maps)]
                bar.update(len(rows))
        self.store.replace_embeddings(updates, self._meta)
        log.warning("re-embedded %d gallery items with model %s", len(updates), self.model.fingerprint[:12])

    def rebuild_index(self) -> None:
        """Rebuild the index from the store here and now (at start, or to recover from a failed update)."""
        self.index, self.labels = built_index(self._new_index(), self.store, self.dim)
        if self.index.size != self.store.count():
            raise RuntimeError(f"index holds {self.index.size} items, store {self.store.count()}")

    @property
    def size(self) -> int:
        return len(self.labels)

    def holds(self, item_id: int) -> bool:
        return item_id in self.labels

    def person_of(self, item_id: int) -> Optional[str]:
        return self.labels.get(item_id, UNLABELLED).person_id

    def describe_index(self) -> Dict[str, object]:
        index = self.index
        return {
            "type": index.built_kind,
            "requested_type": index.kind,
            "device": index.device,
            "size": index.size,
            "tombstones": len(index.tombstones),
            "reduced_dim": index.index.d if index.rescores else None,
            "rebuilding": self.rebuilding,
        }

    @property
    def rebuilding(self) -> bool:
        """A new index is being built in the background; the current one answers meanwhile."""
        return self._rebuilding is not None

    async def start(self) -> None:
        self._writes: asyncio.Queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._reads = ReadThreads(self.store, READ_THREADS)
        self._gate = SearchGate()
        self._writer = asyncio.create_task(self._write_loop())

    async def read(self, read: Callable[..., Any], *args) -> Any:
        """``read(*args)``, one of ``store``'s reads, in a worker thread on that thread's own connection."""
        return await self._reads.run(lambda reader: getattr(reader, read.__name__)(*args))

    async def search_from_loop(self, *args, **kwargs) -> List[Tuple[int, float]]:
        """``search`` in a worker thread, never while the index changes (``service.search_gate``)."""

        def search(reader: StoreReader) -> List[Tuple[int, float]]:
            with self._gate.searching():
                return self.search(*args, store=reader, **kwargs)

        return await self._reads.run(search)

    def close(self) -> None:
        self.store.close()

    async def stop(self) -> None:
        self._writer.cancel()
        self._cancel_rebuild.set()
        await asyncio.gather(self._writer, *([self._rebuilding] if self._rebuilding else []), return_exceptions=True)
        self._executor.shutdown(wait=True)
        self._reads.close()

    async def add(self, items: Sequence[NewItem]) -> List[Item]:
        """Store and index the items, all or nothing; returns them as stored once they are durable and searchable."""

        def in_index(stored: List[Item]) -> None:
            fresh = [(i, new.embedding) for i, new in zip(stored, items) if i.id not in self.labels]
            if fresh:
                self.index.add(np.array([i.id for i, _ in fresh], np.int64), np.stack([vector for _, vector in fresh]))
                self.labels.update({i.id: Label(i.person_id, i.camera_id, i.captured_at) for i, _ in fresh})

        return await self._write(partial(self.store.insert, items), in_index)

    async def store_maps(self, maps: Dict[int, bytes]) -> None:
        await self._write(partial(self.store.set_maps, maps), lambda _: None)

    async def delete(self, item_id: int) -> bool:
        """Remove the item from store and index; False when there is no such item."""

        def in_index(removed: bool) -> None:
            self.announce_removed([item_id])
            if removed and item_id in self.labels:
                self.index.remove(item_id)
                del self.labels[item_id]

        return await self._write(partial(self.store.remove, item_id), in_index, frees_space=True)

    async def erase_person(self, person_id: str) -> List[int]:
        """Erase every item of the person (store, WAL, index) in one write; the ids erased, none if there were none."""
        return await self._erase(partial(self.store.erase_person, person_id))

    async def erase_older_than(self, cutoff: float) -> List[int]:
        """Erase every item older than ``cutoff`` (epoch seconds; by capture time when known, else enrolment time)."""
        return await self._erase(partial(self.store.erase_older_than, cutoff))

    async def _erase(self, in_store: Callable[[], List[int]]) -> List[int]:
        def in_index(erased: List[int]) -> None:
            self.announce_removed(erased)
            held = [item_id for item_id in erased if item_id in self.labels]
            if held:
                self.index.erase(held)
                for item_id in held:
                    del self.labels[item_id]

        return await self._write(in_store, in_index, frees_space=True, erases=True)

    async def _write(
        self,
        in_store: Callable[[], Any],
        in_index: Callable[[Any], None],
        frees_space: bool = False,
        erases: bool = False,
    ) -> Any:
        write = _Write(in_store, in_index, asyncio.get_running_loop().create_future(), frees_space, erases)
        await self._writes.put(write)
        return await write.future

    async def _write_loop(self) -> None:
        while True:
            group = [await self._writes.get()]
            while not self._writes.empty():
                group.append(self._writes.get_nowait())
            try:
                results = await self._commit(group)
            except Exception as exc:  # the commit failed, so none of the group happened
                log.error("gallery write failed: %s", exc)
                for write in group:
                    _settle(write.future, error=exc)
                continue
            await self._wipe_after_erasure(group, results)
            async with self._gate.changing():
                for write, result in zip(group, results):
                    if isinstance(result, Exception):
                        _settle(write.future, error=result)
                    else:
                        await self._apply_to_index(write, result)
                        _settle(write.future, result=result)
                await self._maybe_rebuild()

    async def _commit(self, group: List[_Write]) -> List[Any]:
        """The group's results, each a value or its own error. The disk reserve comes before enrolments: where
        it is not laid (the disk was full), only the group's deletes run, giving their space back. On a full
        disk the group's deletes are committed again on their own, with the reserve, so space can be freed."""
        loop = asyncio.get_running_loop()
        deletes = [i for i, w in enumerate(group) if w.frees_space]
        if not await loop.run_in_executor(self._executor, self.store.reserve.lay):
            return await self._commit_deletes_only(group, deletes, ReserveMissing(self.store.reserve))
        try:
            return await loop.run_in_executor(self._executor, self.store.commit_group, [w.in_store for w in group])
        except sqlite3.OperationalError as exc:
            if not (is_disk_full(exc) and deletes):
                raise
            return await self._commit_deletes_only(group, deletes, exc)

    async def _commit_deletes_only(self, group: List[_Write], deletes: List[int], refusal: Exception) -> List[Any]:
        results: List[Any] = [refusal] * len(group)
        if deletes:
            freed = await asyncio.get_running_loop().run_in_executor(
                self._executor, self.store.commit_freeing_space, [group[i].in_store for i in deletes]
            )
            for i, result in zip(deletes, freed):
                results[i] = result
        return results

    async def _wipe_after_erasure(self, group: List[_Write], results: List[Any]) -> None:
        """Before an erasure is answered, the WAL frames that still hold what it erased are gone."""
        if any(w.erases and r and not isinstance(r, Exception) for w, r in zip(group, results)):
            try:
                await asyncio.get_running_loop().run_in_executor(self._executor, self.store.wipe_wal)
            except sqlite3.Error as exc:  # the erasure has committed all the same; the next one wipes again
                log.error("wiping the WAL after an erasure failed: %s", exc)

    async def _apply_to_index(self, write: _Write, result: Any) -> None:
        """With the search gate held (as every change of the index or its labels)."""
        try:
            write.in_index(result)
        except Exception:  # the write is durable: make the index match the store again rather than fail it
            log.exception("index update failed; rebuilding the index from the store")
            await self._rebuild_now()
        if self._rebuilding is not None:
            self._replay.append((write, result))

    async def _rebuild_now(self) -> None:
        """Rebuild the index from the store in a worker thread; the gate held, searches wait for it."""
        reader = self.store.reader()
        try:
            self.index, self.labels = await asyncio.to_thread(built_index, self._new_index(), reader, self.dim)
        finally:
            reader.close()

    async def _maybe_rebuild(self) -> None:
        if self.index.holds_erased:  # erased vectors must leave memory now, not when a background build ends
            await self._rebuild_now()
        elif self.index.needs_rebuild and self._rebuilding is None:
            self._replay = []
            self._rebuilding = asyncio.create_task(self._rebuild_in_background())

    async def _rebuild_in_background(self) -> None:
        """Build a new index from the store in a worker thread, then swap it in and replay onto it the writes
        applied since the build began (on the loop, the gate held, between two writes: no search sees a half state)."""
        started = time.perf_counter()
        reader = self.store.reader()
        try:
            index, labels = await asyncio.to_thread(
                built_index, self._new_index(), reader, self.dim, self._cancel_rebuild
            )
        except Exception as exc:  # the old index stays; the next write that finds it stale tries again
            if not self._cancel_rebuild.is_set():
                log.error("rebuilding the index in the background failed: %s", exc)
            return
        finally:
            reader.close()
            self._rebuilding = None
        async with self._gate.changing():
            self.index, self.labels = index, labels
            replay, self._replay = self._replay, []
            for write, result in replay:
                await self._apply_to_index(write, result)
            log.info(
                "index rebuilt in the background: %d items, %d writes replayed, %.1f s",
                index.size,
                len(replay),
                time.perf_counter() - started,
            )
            await self._maybe_rebuild()  # a replayed erasure on HNSW, or growth during the build, asks for another

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
        store: Optional[StoreReads] = None,
    ) -> List[Tuple[int, float]]:
        """Top-k (id, score) with score = mean over branches of the cosine similarity, in [-1, 1]. The time range
        is captured_after <= captured_at < captured_before; an item of unknown capture time is in no range.
        ``group_by_person``: the best item of each person only (see ``person_group``). ``store``: what a reduced
        index's shortlist is re-scored from (the calling thread's connection; default: the store's own)."""

        def accept(item_id: int, raw: float) -> bool:
            person, camera, captured = self.labels.get(item_id, UNLABELLED)
            return (
                (camera_id is None or camera == camera_id)
                and (exclude_camera_id is None or camera != exclude_camera_id)
                and (person_id is None or person == person_id)
                and (min_score is None or self.score(raw) >= min_score)
                and in_time_range(captured, captured_after, captured_before)
            )

        filtered = any(
            v is not None for v in (camera_id, exclude_camera_id, person_id, min_score, captured_after, captured_before)
        )
        hits = self.index.search(
            embedding,
            k,
            accept if filtered else None,
            self.person_group if group_by_person else None,
            partial(exact_scores, store or self.store, embedding),
        )
        return [(item_id, self.score(raw)) for item_id, raw in hits]


class ReadThreads:
    """Store reads in worker threads, each thread on its own read-only connection (SQLite's WAL lets them read
    beside the writer): a read that misses the page cache no longer holds up the event loop."""

    def __init__(self, store: GalleryStore, threads: int):
        self._store, self._local, self._opened = store, threading.local(), []
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="gallery-read")

    def _reader(self) -> StoreReader:
        reader = getattr(self._local, "reader", None)
        if reader is None:
            reader = self._local.reader = self._store.reader()
            self._opened.append(reader)
        return reader

    async def run(self, read: Callable[[StoreReader], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, lambda: read(self._reader()))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        for reader in self._opened:
            reader.close()


class RebuildCancelled(Exception):
    """The server is stopping: a background rebuild gives up."""


def built_index(
    index: VectorIndex, store: StoreReads, dim: int, cancelled: Optional[threading.Event] = None
) -> Tuple[VectorIndex, Dict[int, Label]]:
    """``index`` (new and empty) filled from the store, streamed in chunks (trained parts learn from a sample
    of TRAINING_SAMPLE vectors), with the labels of what it holds."""
    labels: Dict[int, Label] = {}

    def chunks():
        for ids, vectors, rows in store.iter_embeddings(dim):
            if cancelled is not None and cancelled.is_set():
                raise RebuildCancelled()
            labels.update(zip(ids.tolist(), (Label(*row) for row in rows)))
            yield ids, vectors

    index.planned_size = store.count()
    training = store.sample_embeddings(TRAINING_SAMPLE, dim) if index.trains else np.zeros((0, dim), np.float32)
    index.rebuild(chunks(), training)
    return index, labels


def exact_scores(store: StoreReads, embedding: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Inner products of the stored full embeddings of ``ids`` with ``embedding`` (NaN for ids no longer stored):
    what a reduced index's shortlist is re-scored with."""
    found = store.embeddings(ids.tolist(), len(embedding))
    return np.array([float(found[i] @ embedding) if i in found else np.nan for i in ids.tolist()], np.float32)


def in_time_range(captured: Optional[float], after: Optional[float], before: Optional[float]) -> bool:
    if after is None and before is None:
        return True
    return captured is not None and (after is None or captured >= after) and (before is None or captured < before)


def _settle(future: asyncio.Future, result: Any = None, error: Optional[BaseException] = None) -> None:
    if future.done():  # the request was cancelled (client gone): the write stands all the same
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
