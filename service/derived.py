"""Decoded copies of costly images, stored beside their originals so that a query never decodes them again.

A heatmap needs each drawn match's model pixels (for its feature maps, when the map cache misses) and a
preview (to draw on). Both come from the stored original, and a PNG, WebP or TIFF has no reduced decode: ten
enrolled 38 kB 6300x6300 PNGs made every query that matched them take 4 s. An image whose decode took at
least ``COSTLY_PIXELS`` therefore keeps its model pixels and preview, exactly as enrolment decoded them (so
RAM stays exact), compressed in one ``.npz`` beside the original, which stays untouched.
"""

import io
from typing import Optional, Tuple

import numpy as np
from PIL import Image

from model_zoo.preprocess import DecodedImage

# a 2 MP PNG took 45 ms to decode and resize on this 2-core AMD EPYC, a lossless WebP 76 ms; a 12 MP JPEG decodes
# at 1/4 or 1/8 scale and stays under it
COSTLY_PIXELS = 2_000_000


def derived_copy(decoded: DecodedImage) -> Optional[bytes]:
    """The stored copy of an image whose decode was costly (it must have its preview); None for the others."""
    if decoded.decoded_pixels < COSTLY_PIXELS:
        return None
    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        pixels=decoded.pixels,
        preview=np.asarray(decoded.preview, np.uint8),
        size=np.array([decoded.width, decoded.height, decoded.decoded_pixels]),
        format=np.array(decoded.format),
    )
    return buffer.getvalue()


def decoded_from_copy(blob: bytes, input_size: Tuple[int, int]) -> Optional[DecodedImage]:
    """The decode a stored copy holds; None when it was made for another input size (another model)."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as copy:
        pixels = copy["pixels"]
        if pixels.shape[:2] != tuple(input_size):
            return None
        width, height, decoded_pixels = (int(v) for v in copy["size"])
        return DecodedImage(
            str(copy["format"]), width, height, decoded_pixels, pixels, Image.fromarray(copy["preview"])
        )
