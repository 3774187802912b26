"""FAISS over inner product with stable ids, for every index type and device.

GPU indexes, HNSW and IVF-on-GPU cannot remove ids, so deletion is one mechanism for all of them: a deleted id
becomes a tombstone that searches skip, and once tombstones pass a fifth of the index the gallery rebuilds it
from the store. Searches widen their candidate list until ``k`` accepted hits are found or the index is
exhausted, which serves the camera, person, time and score filters the same way, and ``k`` groups when the
hits are grouped (at most one per person: the best). Erased ids (a person's,
or expired ones) leave memory at once: removed in place where FAISS can, zeroed in place in HNSW, else (on a
GPU) hidden until the rebuild that follows the erasure.

Large galleries: ``reduce_dim`` keeps the indexed vectors in a smaller space, an uncentred PCA of the
gallery (the top eigenvectors of its second-moment matrix, which keep inner products where a centred PCA
would shift them by each item's component along the mean). A reduced index returns a shortlist of
``rescore_candidates`` that the caller's ``exact`` scorer (the stored full embeddings) re-scores, so every
returned score is the exact one that RAM decomposes; only which items reach the shortlist is approximate.
The full vectors are not kept in memory: a million 3840-d embeddings are 15 GB, reduced to 256-d 1 GB.

Kind ``auto`` (the default) searches exactly while a scan reads fewer than ``AUTO_LARGE_FLOATS`` (items x
dimensions: about 30 ms on one core), and becomes approximate at the rebuild that follows, so a small gallery
is exact and a large one stays fast without a setting: HNSW on the CPU, IVF where FAISS has a GPU (HNSW has no
GPU index). On the CPU HNSW is the one that meets recall@10 0.95 for real query crops in time: at a million
256-d items (bench/results/gallery_1m_real.json) IVF needed 256 of 1,024 lists for it, 35 ms a search at
p99, where HNSW (efSearch 512) took 6 ms. HNSW learns nothing from the gallery, so it is never rebuilt for
growth; it is rebuilt when tombstones (deletes, and erasures, whose vectors are zeroed in place) pass a
fifth of it.
"""

import logging
from typing import Callable, Dict, Hashable, Iterable, List, Optional, Sequence, Set, Tuple

import faiss
import numpy as np

log = logging.getLogger(__name__)
COMPACT_FRACTION = 0.2
MIN_IVF_TRAINING = 39  # FAISS wants about 39 training points per list
MIN_TRAINED_SIZE = 1000  # below this a gallery is searched exactly: approximation buys nothing there
# kind "auto": approximate once a flat scan would read this many floats (a 100k x 3840-d scan, 384M, took 118 ms:
# 3.3G a second, so about 30 ms here); 390k items of 256-d, 26k of 3840-d
AUTO_LARGE_FLOATS = 100_000_000
ExactScorer = Callable[[np.ndarray], np.ndarray]  # ids -> their exact inner products with the query


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class VectorIndex:
    def __init__(
        self,
        dim: int,
        kind: str = "flat",
        device: str = "auto",
        ivf_nlist: int = 1024,
        ivf_nprobe: int = 32,
        hnsw_m: int = 32,
        hnsw_ef_search: int = 512,
        reduce_dim: int = 0,
        rescore_candidates: int = 100,
    ):
        self.dim, self.kind = dim, kind
        self.ivf_nlist, self.ivf_nprobe, self.hnsw_m, self.hnsw_ef_search = (
            ivf_nlist,
            ivf_nprobe,
            hnsw_m,
            hnsw_ef_search,
        )
        self.reduce_dim = reduce_dim if 0 < reduce_dim < dim else 0
        self.rescore_candidates = rescore_candidates
        self.projection: Optional[np.ndarray] = None  # [dim, reduce_dim] once trained
        self.use_gpu = kind != "hnsw" and (device == "gpu" or (device == "auto" and gpu_count() > 0))
        if device == "gpu" and gpu_count() == 0:
            raise RuntimeError("REID_INDEX_DEVICE=gpu but FAISS sees no GPU (faiss-cpu installed, or no CUDA device)")
        self.tombstones: Set[int] = set()
        self.holds_erased = False  # erased vectors hidden but still in memory: rebuild without them
        self.trained_on = 0  # vectors the current index was built over (IVF retrains when the gallery outgrows it)
        self.planned_size = 0  # items a rebuild is about to add: what kind "auto" decides by before they are in
        self.built_kind = "flat"
        self.index = self._make(np.zeros((0, dim), np.float32))

    @property
    def device(self) -> str:
        return "gpu" if self.use_gpu else "cpu"

    @property
    def trains(self) -> bool:
        """Whether this index kind learns from the gallery (IVF's lists, the reduction's axes)."""
        return self._planned_kind == "ivf" or self.reduce_dim > 0

    @property
    def _planned_kind(self) -> str:
        """The kind the next build makes: kind "auto" decides by the size the rebuild planned."""
        if self.kind != "auto":
            return self.kind
        if self.planned_size * self.dim < AUTO_LARGE_FLOATS:
            return "flat"
        return "ivf" if self.use_gpu else "hnsw"

    @property
    def rescores(self) -> bool:
        """Searches return approximate scores that the caller's exact scorer must replace."""
        return self.projection is not None

    def _make(self, training: np.ndarray):
        trained = self.trains and len(training) >= MIN_TRAINED_SIZE  # IVF's own minimum (MIN_IVF_TRAINING) is far lower
        self.projection = uncentred_pca(training, self.reduce_dim) if trained and self.reduce_dim else None
        training = self._project(training)
        dim = training.shape[1]
        if self._planned_kind == "hnsw":
            inner = faiss.IndexHNSWFlat(dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = self.hnsw_ef_search
            self.built_kind = "hnsw"
        elif self._planned_kind == "ivf" and trained:
            nlist = max(1, min(self.ivf_nlist, len(training) // MIN_IVF_TRAINING))
            quantizer = faiss.IndexFlatIP(dim)
            inner = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
            inner.train(training)
            inner.nprobe = min(self.ivf_nprobe, nlist)
            self._quantizer = quantizer  # the IVF index points at it; Python must keep it alive
            self.built_kind = "ivf"
        else:
            inner = faiss.IndexFlatIP(dim)
            self.built_kind = "flat"
        index = faiss.IndexIDMap2(inner) if self.built_kind == "flat" else faiss.IndexIDMap(inner)
        self._inner = inner
        if self.use_gpu:
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, 0, index)
        return index

    def rebuild(self, chunks: Iterable[Tuple[np.ndarray, np.ndarray]], training: Optional[np.ndarray] = None) -> None:
        """Replace the index with one over exactly these (ids, vectors) chunks, added as they come. ``training``:
        what the trained parts learn from, a sample of the gallery (without it the chunks are gathered and
        used whole, which needs them all in memory at once: fine for small galleries)."""
        if training is None:
            chunks = list(chunks)
            training = np.concatenate([v for _, v in chunks]) if chunks else np.zeros((0, self.dim), np.float32)
        self.index = self._make(np.ascontiguousarray(training, np.float32))
        self.tombstones = set()
        self.holds_erased = False
        for ids, vectors in chunks:
            self.add(ids, vectors)
        self.trained_on = self.index.ntotal

    def set_search_breadth(self, breadth: int) -> None:
        """How widely each search looks, now and in later builds: the IVF lists it visits (nprobe, capped by the
        lists the index has) and the candidates HNSW keeps (efSearch)."""
        self.ivf_nprobe = self.hnsw_ef_search = breadth
        if self.built_kind == "ivf":
            self._inner.nprobe = min(breadth, self._inner.nlist)
        elif self.built_kind == "hnsw":
            self._inner.hnsw.efSearch = breadth

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(self._project(vectors), np.asarray(ids, np.int64))

    def _project(self, vectors: np.ndarray) -> np.ndarray:
        vectors = np.ascontiguousarray(vectors, np.float32).reshape(-1, self.dim)
        return vectors if self.projection is None else np.ascontiguousarray(vectors @ self.projection)

    def remove(self, item_id: int) -> None:
        self.tombstones.add(int(item_id))

    def erase(self, ids: Sequence[int]) -> None:
        """Remove the vectors from memory, not only from results: in place on the CPU's flat and IVF indexes;
        HNSW cannot remove ids, so there the vectors are overwritten with zeros where they lie and the ids
        hidden (the graph keeps its links, which hold no embedding); GPU indexes can do neither, so there they
        are hidden and ``needs_rebuild`` asks for an index built without them."""
        ids = np.asarray(ids, np.int64)
        if self.built_kind == "hnsw" and not self.use_gpu:
            self._held_vectors()[np.isin(faiss.vector_to_array(self.index.id_map), ids)] = 0
            self.tombstones.update(ids.tolist())
            return
        try:
            self.index.remove_ids(ids)
        except RuntimeError:
            self.tombstones.update(ids.tolist())
            self.holds_erased = True

    def _held_vectors(self) -> np.ndarray:
        """HNSW's stored vectors [ntotal, d], a view of FAISS' own memory (writes change the index)."""
        storage = faiss.downcast_index(self._inner.storage)
        return faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * storage.d).reshape(storage.ntotal, storage.d)

    @property
    def size(self) -> int:
        return self.index.ntotal - len(self.tombstones)

    @property
    def lists(self) -> Optional[int]:
        """IVF's lists as built (REID_IVF_NLIST capped by the training sample), None for other kinds."""
        return self._inner.nlist if self.built_kind == "ivf" else None

    @property
    def needs_rebuild(self) -> bool:
        stale = self.index.ntotal > 0 and len(self.tombstones) > COMPACT_FRACTION * self.index.ntotal
        is_trained = self.built_kind == "ivf" or self.rescores
        untrained = self.trains and not is_trained and self.size >= MIN_TRAINED_SIZE
        grown = self.trains and is_trained and self.size > 4 * max(1, self.trained_on)
        outgrew_scan = self.kind == "auto" and self.built_kind == "flat" and self.size * self.dim >= AUTO_LARGE_FLOATS
        return stale or untrained or grown or outgrew_scan or self.holds_erased

    def search(
        self,
        query: np.ndarray,
        k: int,
        accept: Optional[Callable[[int, float], bool]] = None,
        group: Optional[Callable[[int], Hashable]] = None,
        exact: Optional[ExactScorer] = None,
    ) -> List[Tuple[int, float]]:
        """The ``k`` best live ids (inner product, descending) that ``accept(id, score)`` lets through; with
        ``group``, only the best id of each ``group(id)``. A reduced index needs ``exact``: the shortlist's
        scores come from it (ids it returns NaN for are gone from the gallery and skipped)."""
        total = self.index.ntotal
        if total == 0 or k <= 0:
            return []
        if self.rescores and exact is None:
            raise ValueError("a reduced index needs the exact scorer to re-score its shortlist")
        projected = self._project(query)
        want = min(total, max(2 * k, k + len(self.tombstones) + 16, self.rescore_candidates if self.rescores else 0))
        exact_scores: Dict[int, float] = {}
        while True:
            scores, ids = self.index.search(projected, want)
            found = [(int(i), float(s)) for s, i in zip(scores[0], ids[0]) if i >= 0 and int(i) not in self.tombstones]
            if self.rescores:
                found = rescored(found, exact, exact_scores)
            hits = [(i, s) for i, s in found if accept is None or accept(i, s)]
            if group is not None:
                hits = first_per_group(hits, group)
            if len(hits) >= k or want >= total:
                return hits[:k]
            want = min(total, want * 4)


def rescored(hits: List[Tuple[int, float]], exact: ExactScorer, known: Dict[int, float]) -> List[Tuple[int, float]]:
    """The hits with their exact scores, best first; ``known`` caches the scores already read, so a search
    that widens re-scores only the new candidates."""
    missing = np.array([i for i, _ in hits if i not in known], np.int64)
    if len(missing):
        known.update(zip(missing.tolist(), exact(missing).tolist()))
    return sorted(((i, known[i]) for i, _ in hits if not np.isnan(known[i])), key=lambda hit: -hit[1])


def uncentred_pca(vectors: np.ndarray, dim: int) -> np.ndarray:
    """[D, dim]: the top ``dim`` eigenvectors of the vectors' second-moment matrix, so that projected inner
    products approximate the original ones (a centred PCA would subtract the mean and shift them)."""
    moment = (vectors.T @ vectors).astype(np.float64) / max(1, len(vectors))
    _, axes = np.linalg.eigh(moment)  # ascending eigenvalues
    return np.ascontiguousarray(axes[:, ::-1][:, :dim], np.float32)


def first_per_group(hits: List[Tuple], group: Callable[[int], Hashable]) -> List[Tuple]:
    """The first hit (id first) of each group, in the order given: the best one, when the hits are ranked."""
    seen: Set[Hashable] = set()
    kept = []
    for hit in hits:
        key = group(hit[0])
        if key not in seen:
            seen.add(key)
            kept.append(hit)
    return kept
