"""Image decoding and resizing, shared by training and the service so both feed the model the same pixels.

The ONNX model takes uint8 RGB [B, H, W, 3] at the size its metadata names and normalises inside the graph;
the only preprocessing outside it is: decode (format judged by content), convert to RGB, resize with PIL's
bilinear filter to width x height. Torch-free.
"""
import io
from pathlib import Path
from typing import Tuple, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 40_000_000


class InvalidImage(ValueError):
    """The bytes are not a decodable image."""


class ImageTooLarge(InvalidImage):
    """The image has more pixels than allowed (a decompression bomb, or just too big)."""


def decode_with_format(data: Union[bytes, Path, str], max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[Image.Image, str]:
    """Decode image bytes (or a file) into an RGB PIL image, with the format PIL found (``JPEG``, ``PNG``,
    ...); the format is judged by content, not name."""
    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    if isinstance(data, (bytes, bytearray)) and not data:
        raise InvalidImage("empty file")
    try:
        with Image.open(source) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageTooLarge(f"image has {width}x{height} pixels, more than the limit of {max_pixels}")
            img.load()
            return img.convert("RGB"), img.format or "UNKNOWN"
    except InvalidImage:
        raise
    except UnidentifiedImageError:
        raise InvalidImage("not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(str(exc)) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InvalidImage(f"cannot decode image: {exc}") from None


def resize_to_input(img: Image.Image, height: int, width: int) -> np.ndarray:
    """Resize to the model's input size; returns uint8 [height, width, 3]."""
    if img.size != (width, height):
        img = img.resize((width, height), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def decode_for_model(data: Union[bytes, Path, str], height: int, width: int,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> Tuple[Image.Image, str, np.ndarray]:
    """Decode and resize in one step: (RGB image, its format, uint8 [height, width, 3] for the model)."""
    image, image_format = decode_with_format(data, max_pixels)
    return image, image_format, resize_to_input(image, height, width)


def load_for_model(data: Union[bytes, Path, str], height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The model's input pixels only: what the trainer's evaluation, the exporter and the service feed it."""
    return decode_for_model(data, height, width, max_pixels)[2]
