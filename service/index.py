"""FAISS over inner product with stable ids, for every index type and device.

GPU indexes, HNSW and IVF-on-GPU cannot remove ids, so deletion is one mechanism for all of them: a deleted id
becomes a tombstone that searches skip, and once tombstones pass a fifth of the index the gallery rebuilds it
from the store. Searches widen their candidate list until ``k`` accepted hits are found or the index is
exhausted, which serves the camera, person, time and score filters the same way, and ``k`` groups when the
hits are grouped (at most one per person: the best). Erased ids (a person's,
or expired ones) leave memory at once: removed in place where FAISS can, else hidden until the rebuild that
follows the erasure.
"""
import logging
from typing import Callable, Hashable, Iterable, List, Optional, Sequence, Set, Tuple

import faiss
import numpy as np

log = logging.getLogger(__name__)
COMPACT_FRACTION = 0.2
MIN_IVF_TRAINING = 39  # FAISS wants about 39 training points per list


def gpu_count() -> int:
    return faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0


class VectorIndex:
    def __init__(self, dim: int, kind: str = "flat", device: str = "auto", ivf_nlist: int = 1024, ivf_nprobe: int = 32, hnsw_m: int = 32, hnsw_ef_search: int = 128):
        self.dim, self.kind = dim, kind
        self.ivf_nlist, self.ivf_nprobe, self.hnsw_m, self.hnsw_ef_search = ivf_nlist, ivf_nprobe, hnsw_m, hnsw_ef_search
        self.use_gpu = kind != "hnsw" and (device == "gpu" or (device == "auto" and gpu_count() > 0))
        if device == "gpu" and gpu_count() == 0:
            raise RuntimeError("REID_INDEX_DEVICE=gpu but FAISS sees no GPU (faiss-cpu installed, or no CUDA device)")
        self.tombstones: Set[int] = set()
        self.holds_erased = False  # erased vectors hidden but still in memory: rebuild without them
        self.trained_on = 0  # vectors the current index was built over (IVF retrains when the gallery outgrows it)
        self.built_kind = "flat"
        self.index = self._make(np.zeros((0, dim), np.float32))

    @property
    def device(self) -> str:
        return "gpu" if self.use_gpu else "cpu"

    def _make(self, training: np.ndarray):
        if self.kind == "hnsw":
            inner = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efSearch = self.hnsw_ef_search
            self.built_kind = "hnsw"
        elif self.kind == "ivf" and len(training) >= MIN_IVF_TRAINING:
            nlist = max(1, min(self.ivf_nlist, len(training) // MIN_IVF_TRAINING))
            quantizer = faiss.IndexFlatIP(self.dim)
            inner = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            inner.train(training)
            inner.nprobe = min(self.ivf_nprobe, nlist)
            self._quantizer = quantizer  # the IVF index points at it; Python must keep it alive
            self.built_kind = "ivf"
        else:
            inner = faiss.IndexFlatIP(self.dim)
            self.built_kind = "flat"
        index = faiss.IndexIDMap2(inner) if self.built_kind == "flat" else faiss.IndexIDMap(inner)
        self._inner = inner
        if self.use_gpu:
            self._resources = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._resources, 0, index)
        return index

    def rebuild(self, chunks: Iterable[Tuple[np.ndarray, np.ndarray]]) -> None:
        """Replace the index with one over exactly these (ids, vectors) chunks."""
        ids_list, vec_list = [], []
        for ids, vectors in chunks:
            ids_list.append(ids)
            vec_list.append(vectors)
        ids = np.concatenate(ids_list) if ids_list else np.zeros(0, np.int64)
        vectors = np.concatenate(vec_list) if vec_list else np.zeros((0, self.dim), np.float32)
        self.index = self._make(vectors)
        self.tombstones = set()
        self.holds_erased = False
        self.trained_on = len(ids)
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), ids.astype(np.int64))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        self.index.add_with_ids(np.ascontiguousarray(vectors, np.float32), np.asarray(ids, np.int64))

    def remove(self, item_id: int) -> None:
        self.tombstones.add(int(item_id))

    def erase(self, ids: Sequence[int]) -> None:
        """Remove the vectors from memory, not only from results: in place on the CPU's flat and IVF indexes;
        HNSW and GPU indexes cannot remove ids, so there they are hidden and ``needs_rebuild`` asks for an index
        built without them."""
        ids = np.asarray(ids, np.int64)
        try:
            self.index.remove_ids(ids)
        except RuntimeError:
            self.tombstones.update(ids.tolist())
            self.holds_erased = True

    @property
    def size(self) -> int:
        return self.index.ntotal - len(self.tombstones)

    @property
    def needs_rebuild(self) -> bool:
        stale = self.index.ntotal > 0 and len(self.tombstones) > COMPACT_FRACTION * self.index.ntotal
        untrained = self.kind == "ivf" and self.built_kind == "flat" and self.size >= max(1000, MIN_IVF_TRAINING)
        grown = self.kind == "ivf" and self.built_kind == "ivf" and self.size > 4 * max(1, self.trained_on)
        return stale or untrained or grown or self.holds_erased

    def search(self, query: np.ndarray, k: int, accept: Optional[Callable[[int, float], bool]] = None,
               group: Optional[Callable[[int], Hashable]] = None) -> List[Tuple[int, float]]:
        """The ``k`` best live ids (inner product, descending) that ``accept(id, score)`` lets through; with
        ``group``, only the best id of each ``group(id)``."""
        total = self.index.ntotal
        if total == 0 or k <= 0:
            return []
        query = np.ascontiguousarray(query.reshape(1, -1), np.float32)
        want = min(total, max(2 * k, k + len(self.tombstones) + 16))
        while True:
            scores, ids = self.index.search(query, want)
            hits = [
                (int(i), float(s)) for s, i in zip(scores[0], ids[0])
                if i >= 0 and int(i) not in self.tombstones and (accept is None or accept(int(i), float(s)))
            ]
            if group is not None:
                hits = first_per_group(hits, group)
            if len(hits) >= k or want >= total:
                return hits[:k]
            want = min(total, want * 4)


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
