"""The gallery: the SQLite store (source of truth) and the FAISS index kept consistent.

Every write touches the store first (one transaction) and then the in-memory index, with no ``await`` in
between, so on the one event loop no request ever sees one without the other. At start the index is rebuilt
from the store; a store embedded by another model is re-embedded from its stored images or refused.
"""
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from model_zoo.preprocess import load_for_model
from service.index import VectorIndex
from service.inference import InferenceModel
from service.settings import Settings
from service.store import GalleryStore, NewItem

log = logging.getLogger(__name__)
FINGERPRINT_KEY = "model_fingerprint"
EMBEDDING_DIM_KEY = "embedding_dim"


class ModelMismatch(RuntimeError):
    """The store was embedded by another model and re-embedding is switched off."""


class Gallery:
    def __init__(self, store: GalleryStore, model: InferenceModel, settings: Settings):
        self.store, self.model, self.settings = store, model, settings
        self.dim = model.contract.embedding_dim
        self.num_branches = model.contract.num_branches
        self.labels: Dict[int, Tuple[Optional[str], Optional[str]]] = {}
        self.index = VectorIndex(self.dim, settings.index_type, settings.index_device, settings.ivf_nlist,
                                 settings.ivf_nprobe, settings.hnsw_m, settings.hnsw_ef_search)

    def open(self, progress: bool = True) -> None:
        stored = self.store.get_meta(FINGERPRINT_KEY)
        if stored is not None and stored != self.model.fingerprint and self.store.count():
            if self.settings.on_model_change == "refuse":
                raise ModelMismatch(
                    f"the gallery in {self.store.path} was embedded by model {stored[:12]}, this is {self.model.fingerprint[:12]}; "
                    "set REID_ON_MODEL_CHANGE=reembed to re-embed its stored images, or point REID_STORE_PATH elsewhere")
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
                batch = np.stack([load_for_model(image, height, width, self.settings.max_image_pixels) for _, image in rows])
                embedding, _ = self.model.predict(batch, with_maps=False)
                updates += [(item_id, vector) for (item_id, _), vector in zip(rows, embedding)]
                bar.update(len(rows))
        self.store.replace_embeddings(updates, self._meta)
        log.warning("re-embedded %d gallery items with model %s", len(updates), self.model.fingerprint[:12])

    def rebuild_index(self) -> None:
        self.labels = {}

        def chunks():
            for ids, vectors, labels in self.store.iter_embeddings(self.dim):
                self.labels.update(zip(ids.tolist(), labels))
                yield ids, vectors

        self.index.rebuild(chunks())
        if self.index.size != self.store.count():
            raise RuntimeError(f"index holds {self.index.size} items, store {self.store.count()}")

    @property
    def size(self) -> int:
        return len(self.labels)

    def add(self, items: Sequence[NewItem]) -> List[int]:
        ids = self.store.add(items)
        self.index.add(np.array(ids, np.int64), np.stack([item.embedding for item in items]))
        self.labels.update({i: (item.person_id, item.camera_id) for i, item in zip(ids, items)})
        self._maybe_rebuild()
        return ids

    def delete(self, item_id: int) -> bool:
        if not self.store.delete(item_id):
            return False
        self.index.remove(item_id)
        self.labels.pop(item_id, None)
        self._maybe_rebuild()
        return True

    def _maybe_rebuild(self) -> None:
        if self.index.needs_rebuild:
            self.rebuild_index()

    def search(self, embedding: np.ndarray, k: int, camera_id: Optional[str] = None, exclude_camera_id: Optional[str] = None,
               person_id: Optional[str] = None, min_score: Optional[float] = None) -> List[Tuple[int, float]]:
        """Top-k (id, score) with score = mean over branches of the cosine similarity, in [-1, 1]."""
        def accept(item_id: int, raw: float) -> bool:
            person, camera = self.labels.get(item_id, (None, None))
            return ((camera_id is None or camera == camera_id) and (exclude_camera_id is None or camera != exclude_camera_id)
                    and (person_id is None or person == person_id) and (min_score is None or raw / self.num_branches >= min_score))

        filtered = any(v is not None for v in (camera_id, exclude_camera_id, person_id, min_score))
        hits = self.index.search(embedding, k, accept if filtered else None)
        return [(item_id, raw / self.num_branches) for item_id, raw in hits]
