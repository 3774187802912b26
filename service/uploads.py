"""Uploaded images into model input: each file read within its byte limit and decoded against the request's
one pixel budget, every refusal a 4xx in the service's error shape."""
import asyncio
from typing import List, Tuple

import numpy as np
from fastapi import UploadFile

from model_zoo.preprocess import DecodeBudgetExceeded, DecodedImage, ImageTooLarge, InvalidImage, decode_for_model
from service.errors import APIError
from service.settings import Settings


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


async def read_upload(upload: UploadFile, position: int, settings: Settings, size: Tuple[int, int], budget: PixelBudget,
                      preview: bool = False) -> Upload:
    label = f"upload {position} ({upload.filename or 'unnamed'})"
    data = await upload.read(settings.max_image_bytes + 1)
    if len(data) > settings.max_image_bytes:
        raise APIError(413, "image_too_large", f"{label}: more than {settings.max_image_bytes} bytes")
    try:
        decoded = await asyncio.to_thread(decode_for_model, data, *size, settings.max_image_pixels, budget.left, preview)
    except DecodeBudgetExceeded as exc:
        raise APIError(413, "too_many_pixels", f"{label}: {exc} of the request's REID_MAX_REQUEST_PIXELS={budget.limit}") from None
    except ImageTooLarge as exc:
        raise APIError(413, "image_too_large", f"{label}: {exc}") from None
    except InvalidImage as exc:
        raise APIError(400, "invalid_image", f"{label}: {exc}") from None
    budget.spend(decoded)
    return Upload(data, decoded)


def check_image_count(files: List[UploadFile], settings: Settings) -> None:
    if len(files) > settings.max_images_per_request:
        raise APIError(413, "too_many_images", f"{len(files)} images, at most {settings.max_images_per_request} per request")


async def read_uploads(files: List[UploadFile], settings: Settings, size: Tuple[int, int], preview: bool = False) -> List[Upload]:
    """Every image of a request, decoded one after the other against the request's one pixel budget."""
    budget = PixelBudget(settings.max_request_pixels)
    return [await read_upload(upload, i, settings, size, budget, preview) for i, upload in enumerate(files)]


def pixels_of(uploads: List[Upload]) -> np.ndarray:
    return np.stack([u.decoded.pixels for u in uploads])
