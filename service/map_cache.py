"""Gallery items' feature maps kept in memory for heatmaps, so that a match drawn again needs no model call.

Where the gallery holds no stored maps for a match (``service.stored_maps``: a model whose maps are too big to
store, an item enrolled before maps were stored), a heatmap query re-embeds its stored image for its maps: on
this CPU about 13 ms per match with the previous default, over half of a heatmap query's CPU once per-branch
overlays were off (bench/heatmap_cost.py). The maps of a 3-branch MobileNetV2 item are 480 kB in float32, too
big to keep for every item, so this is a least-recently-used cache under a byte budget
(``REID_HEATMAP_CACHE_MB``) holding them in float16, 240 kB an item: the grid's mean then differs from the
match's score by under 1e-5 (2.5e-6 at most over 39 real pairs, against 1.7e-7 in float32); CASN's pair distance
from cached maps moves by a few thousandths (2.6e-3 in tests/test_casn.py). Items that leave the gallery leave
the cache in the same write (service.gallery), an erasure included. Used on the event loop only.
"""

from collections import OrderedDict
from dataclasses import replace
from typing import Dict, Iterable

import numpy as np

from service.inference import ImageMaps


class FeatureMapCache:
    def __init__(self, budget_bytes: int):
        self.budget = budget_bytes
        self.bytes = 0
        self._maps: "OrderedDict[int, ImageMaps]" = OrderedDict()

    def __len__(self) -> int:
        return len(self._maps)

    def get(self, ids: Iterable[int]) -> Dict[int, ImageMaps]:
        """The cached maps among ``ids``, in float32 as the model gives them; each one found becomes the most
        recently used."""
        found = {}
        for item_id in ids:
            maps = self._maps.get(item_id)
            if maps is None:
                continue
            self._maps.move_to_end(item_id)
            found[item_id] = with_map_dtype(maps, np.float32)
        return found

    def put(self, maps: Dict[int, ImageMaps]) -> None:
        """Keep these items' maps, dropping the least recently used past the budget."""
        for item_id, item_maps in maps.items():
            compact = with_map_dtype(item_maps, np.float16)
            if compact.nbytes > self.budget:
                continue
            self.discard([item_id])
            self._maps[item_id] = compact
            self.bytes += compact.nbytes
        while self.bytes > self.budget:
            _, dropped = self._maps.popitem(last=False)
            self.bytes -= dropped.nbytes

    def discard(self, ids: Iterable[int]) -> None:
        for item_id in ids:
            dropped = self._maps.pop(item_id, None)
            if dropped is not None:
                self.bytes -= dropped.nbytes


def with_map_dtype(maps: ImageMaps, dtype) -> ImageMaps:
    """The feature maps and the pair maps in ``dtype`` (the attention maps, small and shown as they are, kept)."""
    return replace(
        maps, features=maps.features.astype(dtype), pair=None if maps.pair is None else maps.pair.astype(dtype)
    )
