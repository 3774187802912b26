"""The heatmap stage's gallery maps: each match's feature maps, from this stage's own cache (``service.map_cache``),
else as stored at enrolment (``service.stored_maps``), else their stored images decoded (from ``service.derived``'s
copy where one exists) and re-embedded in one batch, then cached (and stored, where this model's maps are stored,
for items stored without them). The gallery announces the items that leave it (``GalleryBase.on_removed``) and the
cache drops them in the same write, so a deleted or erased item's maps never outlive it."""

import asyncio
import logging
from typing import Dict, List, Optional, Set

import numpy as np

from model_zoo.preprocess import DecodedImage, decode_for_model
from service.batching import MicroBatcher
from service.derived import decoded_from_copy
from service.gallery import GalleryBase
from service.inference import ImageMaps, InferenceModel
from service.map_cache import FeatureMapCache
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger(__name__)


class MatchMaps:
    def __init__(
        self,
        settings: Settings,
        metrics: ServiceMetrics,
        model: InferenceModel,
        gallery: GalleryBase,
        batcher: MicroBatcher,
    ):
        self.settings, self.metrics, self.model, self.gallery, self.batcher = settings, metrics, model, gallery, batcher
        self.cache = FeatureMapCache(settings.heatmap_cache_mb * 2**20)
        self._storing: Set[asyncio.Task] = set()
        gallery.on_removed(self.cache.discard)

    async def decode_stored(self, ids: List[int], preview: bool) -> Dict[int, DecodedImage]:
        """The stored images of ``ids``, decoded for the model (from ``service.derived``'s copy where an image has
        one); an id deleted since the search is left out."""
        size, max_pixels = self.model.input_size, self.settings.max_image_pixels
        copies = await self.gallery.decoded_copies(ids)
        decoded = await asyncio.to_thread(lambda: {i: decoded_from_copy(blob, size) for i, blob in copies.items()})
        decoded = {i: d for i, d in decoded.items() if d is not None}
        stored = await self.gallery.images([i for i in ids if i not in decoded])
        decoded.update(
            await asyncio.to_thread(
                lambda: {i: decode_for_model(blob, *size, max_pixels, preview=preview) for i, blob in stored.items()}
            )
        )
        return {i: decoded[i] for i in ids if i in decoded}

    async def of(
        self,
        ids: List[int],
        known: Dict[int, ImageMaps],
        decoded: Optional[Dict[int, DecodedImage]] = None,
        stored: bool = True,
    ) -> Dict[int, ImageMaps]:
        """Each id's maps: from ``known``, else from the cache, else as stored (unless not ``stored``: CASN's pair
        distance moved by 1e-3 on int8 maps), the others from one batch of their images (``decoded``, or decoded
        here only for those; then cached). An id deleted since the search is left out."""
        cached = self.cache.get([i for i in ids if i not in known])
        self.metrics.map_cache.labels("hit").inc(len(cached))
        known = {**cached, **known}
        if stored:
            from_store = await self.gallery.stored_maps([i for i in ids if i not in known])
            self.metrics.map_cache.labels("stored").inc(len(from_store))
            known.update(from_store)
        missing = [i for i in ids if i not in known]
        fresh = {}
        if missing:
            decoded = decoded if decoded is not None else await self.decode_stored(missing, preview=False)
            missing = [i for i in missing if i in decoded]
        if missing:
            self.metrics.map_cache.labels("miss").inc(len(missing))
            _, maps = await self.batcher.embed(np.stack([decoded[i].pixels for i in missing]), with_maps=True)
            fresh = {i: maps[row] for row, i in enumerate(missing)}
            self.remember(fresh)
            if stored and self.gallery.map_storage.enabled:
                self.store_in_background(missing, maps)
        return {i: fresh[i] if i in fresh else known[i] for i in ids if i in fresh or i in known}

    def store_in_background(self, ids: List[int], maps: ImageMaps) -> None:
        """Store the batch's maps just computed (row by row ``ids``) for items stored without them (enrolled
        before maps were stored, or by a server that stored none), so that their next heatmap reads them; the
        answer does not wait for it."""
        task = asyncio.create_task(self._store(ids, maps))
        self._storing.add(task)  # the loop keeps only a weak reference to a task
        task.add_done_callback(self._storing.discard)

    async def _store(self, ids: List[int], maps: ImageMaps) -> None:
        try:
            blobs = await asyncio.to_thread(self.gallery.map_storage.packed, maps, len(ids))
            await self.gallery.store_maps(dict(zip(ids, blobs)))
        except Exception as exc:  # a full disk, a replica now on another model: the next miss tries again
            log.warning("maps of %d items not stored: %s", len(ids), exc)

    def remember(self, maps: Dict[int, ImageMaps]) -> None:
        """Cache freshly computed maps of items still in the gallery (one deleted while its maps were being
        computed is left out: its delete has already cleared the cache)."""
        self.cache.put({item_id: item_maps for item_id, item_maps in maps.items() if self.gallery.holds(item_id)})
