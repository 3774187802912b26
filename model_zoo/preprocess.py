"""Image decoding and resizing, shared by training and the service so both feed the model the same pixels.

The ONNX model takes uint8 RGB [B, H, W, 3] at the size its metadata names and normalises inside the graph;
the only preprocessing outside it is ``decode_for_model``: decode (format judged by content, a JPEG at the
smallest DCT scale that still covers the model's input and a preview), turn it upright by its EXIF
orientation, resize with PIL's bilinear filter to width x height, RGB. Torch-free.
"""

import io
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager, Optional, Tuple, Union

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000
# The longest side of a preview (the service's heatmap overlays). A JPEG is decoded at least this large on its
# longer side, whether a preview is asked for or not, so the model's pixels never depend on that choice.
PREVIEW_SIDE = 256
# A JPEG is decoded at least this many times the model's input size, and the bilinear resize does the rest:
# on a smooth 1500x3000 photo-like JPEG resized to 128x256 the pixels then differ from a full-size decode by
# 0.3 grey levels on average, at most 2 (at 1x: 5.9 on average, up to 42, since DCT scaling filters less).
DRAFT_MARGIN = 4
_QUARTER_TURNS = {5, 6, 7, 8}  # EXIF orientations stored on their side


class InvalidImage(ValueError):
    """The bytes are not a decodable image."""


class ImageTooLarge(InvalidImage):
    """The image has more pixels than allowed (a decompression bomb, or just too big)."""


class DecodeBudgetExceeded(ImageTooLarge):
    """Decoding the image would take more pixels than the caller has left (``max_decoded_pixels``)."""


@dataclass
class DecodedImage:
    format: str  # as PIL found it: JPEG, PNG, ...
    width: int  # the full image, upright (as a viewer shows it)
    height: int
    decoded_pixels: int  # width x height as decoded: fewer than the full image when a JPEG decoded scaled down
    pixels: np.ndarray  # the model's input, uint8 [height, width, 3]
    preview: Optional[Image.Image]  # RGB, upright, at most PREVIEW_SIDE a side; only when asked for


def decode_for_model(
    data: Union[bytes, Path, str],
    height: int,
    width: int,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_pixels: Optional[int] = None,
    preview: bool = False,
    reserve: Optional[Callable[[int], ContextManager]] = None,
) -> DecodedImage:
    """Decode image bytes (or a file) and resize to the model's input; the full-size decode is released here.

    ``max_pixels`` bounds the full image (decompression bombs), ``max_decoded_pixels`` what is really decoded.
    ``reserve(pixels)``, when given, is held around the decode itself (a caller's memory budget)."""
    if isinstance(data, (bytes, bytearray)) and not data:
        raise InvalidImage("empty file")
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        with Image.open(source) as img:
            full_size = _check_size(img, max_pixels)
            _draft(img, height, width)
            if max_decoded_pixels is not None and img.width * img.height > max_decoded_pixels:
                raise DecodeBudgetExceeded(
                    f"decoding it takes {img.width}x{img.height} pixels, {max_decoded_pixels} are left"
                )
            with reserve(img.width * img.height) if reserve else nullcontext():
                return _decode(img, full_size, height, width, preview)
    except InvalidImage:
        raise
    except UnidentifiedImageError:
        raise InvalidImage("not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"cannot decode image: {exc}") from None


def load_for_model(
    data: Union[bytes, Path, str], height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """The model's input pixels only: what the trainer's evaluation, the exporter and the service feed it."""
    return decode_for_model(data, height, width, max_pixels).pixels


def _check_size(img: Image.Image, max_pixels: int) -> Tuple[int, int]:
    width, height = img.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"image has {width}x{height} pixels, more than the limit of {max_pixels}")
    return width, height


def _orientation(img: Image.Image) -> int:
    return img.getexif().get(ExifTags.Base.Orientation, 1)


def _draft(img: Image.Image, height: int, width: int) -> None:
    """Let the decoder scale down by 1/2, 1/4 or 1/8 (JPEG's DCT scaling; other formats ignore it) while the
    result still covers DRAFT_MARGIN x the model's input and a preview: a 12 MP photo never exists at full size."""
    wanted_w, wanted_h = DRAFT_MARGIN * width, DRAFT_MARGIN * height
    if _orientation(img) in _QUARTER_TURNS:  # stored on its side: the model's width lies along the stored height
        wanted_w, wanted_h = wanted_h, wanted_w
    if img.width >= img.height:
        wanted_w = max(wanted_w, PREVIEW_SIDE)
    else:
        wanted_h = max(wanted_h, PREVIEW_SIDE)
    img.draft(None, (wanted_w, wanted_h))


def _decode(img: Image.Image, full_size: Tuple[int, int], height: int, width: int, preview: bool) -> DecodedImage:
    img.load()
    decoded_pixels = img.width * img.height
    if _orientation(img) in _QUARTER_TURNS:
        full_size = full_size[::-1]
    ImageOps.exif_transpose(img, in_place=True)
    decoded = _grey_or_rgb(img)
    pixels = decoded if decoded.size == (width, height) else decoded.resize((width, height), Image.BILINEAR)
    small = _preview(decoded) if preview else None
    return DecodedImage(
        img.format or "UNKNOWN", *full_size, decoded_pixels, np.asarray(pixels.convert("RGB"), dtype=np.uint8), small
    )


def _grey_or_rgb(img: Image.Image) -> Image.Image:
    """Bilevel and grey images stay in one band until resized: the same pixels as converting to RGB first
    (each band is resized alone) from a quarter of the memory (PIL keeps RGB in 4 bytes a pixel)."""
    if img.mode == "1":
        return img.convert("L")
    return img if img.mode in ("L", "RGB") else img.convert("RGB")


def _preview(img: Image.Image) -> Image.Image:
    scale = min(1.0, PREVIEW_SIDE / max(img.size))
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    return (img if img.size == size else img.resize(size, Image.BILINEAR)).convert("RGB")
