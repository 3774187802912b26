"""Each item's feature maps stored beside it, compact, so that a heatmap query reads its matches' maps instead of
re-embedding their images: the model call was most of an uncached heatmap query (bench/results/heatmap_cost.json).

The maps are written when the item is enrolled (the model computes them anyway: the embedding is their grid mean),
again when a gallery is re-embedded by another model, so stored maps are always the current model's, and for an item
stored without them by its first heatmap (``service.match_maps``). Each is int8 per cell with one scale per (branch,
channel), beside each channel's exact mean over the grid in float32: RAM's grid mean (the match's score) then stays
exact, and a cell moves by at most one quantisation step (half for the rounding, up to half again for putting the
exact mean back). For retail-0277 (256 x 16 x 8) that is 34.8 kB an item against 131 kB in float32 (the default,
three such maps, 104.5 kB); its RAM grids from stored maps, measured on real query / match pairs, are in
bench/results/heatmap_cost.json (``stored_maps``).
Maps bigger than REID_STORED_MAPS_MAX_KB (a 3-branch MobileNetV2 CAMA model's are 490 kB) and models with attention
or pair maps (which these do not hold) are not stored: their matches are re-embedded as before.
"""

from typing import Dict, List, Optional, Sequence

import numpy as np

from service.inference import ImageMaps, InferenceModel

FORMAT_VERSION = 1
HEADER = np.dtype("<u2")  # version, then the map's shape [N, D, h, w]
QUANTISED_LEVELS = 127


def packed_bytes(shape: Sequence[int]) -> int:
    """The stored size of one item's maps of ``shape`` [N, D, h, w]: header, means and scales, int8 codes."""
    branches, channels = shape[0], shape[1]
    return HEADER.itemsize * (1 + len(shape)) + 2 * 4 * branches * channels + int(np.prod(shape))


def pack(features: np.ndarray) -> List[bytes]:
    """Each image's maps of a batch's feature maps [B, N, D, h, w], packed (see the module docstring)."""
    features = features.astype(np.float32, copy=False)
    means = features.mean(axis=(3, 4))
    residual = features - means[..., None, None]
    scales = np.abs(residual).max(axis=(3, 4)) / QUANTISED_LEVELS
    scales[scales == 0] = 1.0
    codes = np.rint(residual / scales[..., None, None]).clip(-QUANTISED_LEVELS, QUANTISED_LEVELS).astype(np.int8)
    header = np.array([FORMAT_VERSION, *features.shape[1:]], HEADER).tobytes()
    return [header + means[b].tobytes() + scales[b].tobytes() + codes[b].tobytes() for b in range(len(features))]


def unpack(blob: bytes) -> Optional[np.ndarray]:
    """One item's maps [N, D, h, w] in float32; None for a format this version does not read."""
    header = np.frombuffer(blob, HEADER, count=5)
    if header[0] != FORMAT_VERSION:
        return None
    shape = tuple(int(v) for v in header[1:])
    vectors = shape[0] * shape[1]
    offset = header.nbytes
    means = np.frombuffer(blob, np.float32, vectors, offset).reshape(shape[:2])
    scales = np.frombuffer(blob, np.float32, vectors, offset + 4 * vectors).reshape(shape[:2])
    codes = np.frombuffer(blob, np.int8, int(np.prod(shape)), offset + 8 * vectors).reshape(shape)
    residual = codes * scales[..., None, None]
    # rounding moved each channel's mean off zero: put it back, so the grid's mean is the stored exact one
    residual -= residual.mean(axis=(2, 3), keepdims=True)
    return (residual + means[..., None, None]).astype(np.float32)


class MapStorage:
    """Whether this model's maps are stored (``enabled``), and packing and reading them for the gallery."""

    def __init__(self, model: InferenceModel, max_kb: int):
        contract = model.contract
        shape = (contract.num_branches, contract.branch_dim, contract.map_height, contract.map_width)
        self.item_bytes = packed_bytes(shape)
        self.enabled = not model.optional_maps and self.item_bytes <= max_kb * 1024

    def packed(self, maps: Optional[ImageMaps], count: int) -> List[Optional[bytes]]:
        """The stored form of a batch's maps (``count`` Nones when not stored)."""
        return pack(maps.features) if self.enabled and maps is not None else [None] * count

    def predict(self, model: InferenceModel, images: np.ndarray):
        """(embedding, each image's stored maps or None): what re-embedding a gallery writes."""
        embedding, maps = model.predict(images, with_maps=self.enabled)
        return embedding, self.packed(maps, len(images))

    @staticmethod
    def unpacked(blobs: Dict[int, bytes]) -> Dict[int, ImageMaps]:
        maps = {item_id: unpack(blob) for item_id, blob in blobs.items()}
        return {item_id: ImageMaps(features) for item_id, features in maps.items() if features is not None}
