"""Rendering RAM grids (model_zoo.ram) as PNG overlays on the gallery image. numpy and PIL only."""

import base64
import io

import numpy as np
from PIL import Image

from model_zoo.preprocess import PREVIEW_SIDE

MAX_OVERLAY_SIDE = PREVIEW_SIDE  # the service draws on decode_for_model's previews, already this small
# A perceptually ordered blue -> cyan -> yellow -> red ramp (anchor colours, linearly interpolated).
_ANCHORS = np.array(
    [[48, 18, 59], [40, 120, 230], [30, 200, 200], [250, 220, 60], [230, 60, 20], [122, 4, 3]], np.float32
)


def colormap(values: np.ndarray) -> np.ndarray:
    """values in [0, 1] -> uint8 RGB."""
    position = np.clip(values, 0, 1) * (len(_ANCHORS) - 1)
    low = np.floor(position).astype(int).clip(0, len(_ANCHORS) - 2)
    frac = (position - low)[..., None]
    return (_ANCHORS[low] * (1 - frac) + _ANCHORS[low + 1] * frac).astype(np.uint8)


def normalise(grid: np.ndarray) -> np.ndarray:
    """Min-max to [0, 1] per map: the overlay shows where a match's evidence lies, not how strong it is."""
    low, high = float(grid.min()), float(grid.max())
    return np.zeros_like(grid, np.float32) if high - low < 1e-12 else ((grid - low) / (high - low)).astype(np.float32)


def overlay(image: Image.Image, grid: np.ndarray, opacity: float = 0.5, unit_scale: bool = False) -> Image.Image:
    """The grid upsampled bilinearly to the image (scaled to at most 256 px a side) and blended on it; min-max
    scaled, or with ``unit_scale`` drawn as it is on [0, 1] (maps whose level means something, like attention)."""
    scale = min(1.0, MAX_OVERLAY_SIDE / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    base = image.convert("RGB").resize(size, Image.BILINEAR)
    values = np.clip(grid, 0, 1).astype(np.float32) if unit_scale else normalise(grid)
    heat = Image.fromarray(values, mode="F").resize(size, Image.BILINEAR)
    colours = Image.fromarray(colormap(np.asarray(heat)))
    return Image.blend(base, colours, opacity)


def png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    # zlib level 1: a query with heatmaps encodes dozens of these; level 1 took 0.7 ms per overlay where the
    # default (6) took 2.6 ms, for files 18% larger
    image.save(buffer, format="PNG", compress_level=1)
    return base64.b64encode(buffer.getvalue()).decode("ascii")
