"""Uploaded images into model input: each file read within its byte limit and decoded against the request's
one pixel budget and the process's one decode memory budget, every refusal a 4xx in the service's error shape."""

import asyncio
import ctypes
import ctypes.util
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator, List, Tuple

import numpy as np
from fastapi import UploadFile

from model_zoo.preprocess import DecodeBudgetExceeded, DecodedImage, ImageTooLarge, InvalidImage, decode_for_model
from service.errors import APIError
from service.settings import Settings

# Peak memory of one decode per decoded pixel, the costliest format measured: a 6000x6000 lossless WebP (a
# 1.4 kB file) peaks at 16.1 bytes a pixel (the decoder's RGBA buffer, its copy, PIL's image, the RGB
# conversion); RGBA PNG and CMYK TIFF 8.3, RGB PNG/TIFF/BMP 4.3, palette PNG/GIF 5.3, grey PNG 1.1.
DECODE_BYTES_PER_PIXEL = 17
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
log = logging.getLogger(__name__)


class Upload:
    """A validated upload: the original bytes and what decoding them kept (the model's input pixels, the size,
    a preview when asked for); the full-size image is gone once resized."""

    def __init__(self, data: bytes, decoded: DecodedImage):
        self.data, self.decoded = data, decoded


class PixelBudget:
    """The pixels one request may still decode (REID_MAX_REQUEST_PIXELS): many small files that each decode
    to an image just under REID_MAX_IMAGE_PIXELS would otherwise cost seconds of CPU per request."""

    def __init__(self, limit: int):
        self.limit = self.left = limit

    def spend(self, decoded: DecodedImage) -> None:
        self.left -= decoded.decoded_pixels


class ImageDecoder:
    """Decodes uploads on its own threads within one memory budget for the whole process
    (REID_MAX_DECODE_MB): a decode waits until its estimated peak (``DECODE_BYTES_PER_PIXEL`` a decoded
    pixel) fits beside the others, so concurrent large images queue instead of adding up; one larger than
    the whole budget waits to run alone. Waiting happens on the decode threads, never on the event loop."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.capacity = settings.max_decode_mb * 2**20
        self._used = 0
        self._room = threading.Condition()
        self._executor = ThreadPoolExecutor(settings.decode_threads or os.cpu_count() or 1, thread_name_prefix="decode")

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        cost = min(pixels * DECODE_BYTES_PER_PIXEL, self.capacity)
        with self._room:
            self._room.wait_for(lambda: self._used + cost <= self.capacity)
            self._used += cost
        try:
            yield
        finally:
            with self._room:
                self._used -= cost
                self._room.notify_all()

    async def read_all(self, files: List[UploadFile], size: Tuple[int, int], preview: bool = False) -> List[Upload]:
        """Every image of a request, decoded one after the other against the request's one pixel budget."""
        budget = PixelBudget(self.settings.max_request_pixels)
        return [await self.read(upload, i, size, budget, preview) for i, upload in enumerate(files)]

    async def read(
        self, upload: UploadFile, position: int, size: Tuple[int, int], budget: PixelBudget, preview: bool
    ) -> Upload:
        settings, label = self.settings, f"upload {position} ({upload.filename or 'unnamed'})"
        data = await upload.read(settings.max_image_bytes + 1)
        if len(data) > settings.max_image_bytes:
            raise APIError(413, "image_too_large", f"{label}: more than {settings.max_image_bytes} bytes")
        try:
            decoded = await asyncio.get_running_loop().run_in_executor(
                self._executor,
                lambda: decode_for_model(data, *size, settings.max_image_pixels, budget.left, preview, self.reserve),
            )
        except DecodeBudgetExceeded as exc:
            raise APIError(
                413, "too_many_pixels", f"{label}: {exc} of the request's REID_MAX_REQUEST_PIXELS={budget.limit}"
            ) from None
        except ImageTooLarge as exc:
            raise APIError(413, "image_too_large", f"{label}: {exc}") from None
        except InvalidImage as exc:
            raise APIError(400, "invalid_image", f"{label}: {exc}") from None
        budget.spend(decoded)
        return Upload(data, decoded)


def return_large_buffers_to_the_os() -> None:
    """glibc raises its mmap threshold after each large free, up to 32 MiB, so a decode's buffers (PIL's 16 MiB
    blocks among them) then come from a thread's heap arena, which keeps them: resident memory ratchets up to
    the largest concurrent decodes and stays. A fixed threshold keeps large buffers mmapped, freed at once."""
    libc_name = ctypes.util.find_library("c")
    try:
        ok = libc_name and ctypes.CDLL(libc_name).mallopt(M_MMAP_THRESHOLD, 1 << 20)
    except (OSError, AttributeError):  # not glibc
        ok = False
    if not ok:
        log.info("could not fix the allocator's mmap threshold: freed decode buffers may stay resident")


def check_image_count(files: List[UploadFile], settings: Settings) -> None:
    if len(files) > settings.max_images_per_request:
        raise APIError(
            413, "too_many_images", f"{len(files)} images, at most {settings.max_images_per_request} per request"
        )


def pixels_of(uploads: List[Upload]) -> np.ndarray:
    return np.stack([u.decoded.pixels for u in uploads])
