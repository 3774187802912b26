"""The gallery: enrol images (all or nothing), list and read items, delete one, erase a person."""

import asyncio
from dataclasses import asdict
from functools import partial
from typing import Annotated, List, Optional

from fastapi import FastAPI, File, Form, Path as PathParam, Query, Request, Response, UploadFile
from pydantic import BeforeValidator

from service.errors import APIError
from service.derived import derived_copy
from service.form_fields import check_captured_at, check_id, check_stored_id, parse_metadata, per_image, time_range
from service.http_contract import image_headers
from service.routes.common import ERRORS, PROTECTED, TIME_FORMAT, state
from service.schemas import EnrollResponse, ErasureResponse, GalleryItem, GalleryPage
from service.store import NewItem
from service.uploads import check_image_count, pixels_of
from service.validation import MAX_ID_LENGTH, MAX_ITEM_ID, check_item_id

# Gallery ids in paths: decimal digits only ("+1" and "1_0" are no ids), within SQLite's INTEGER
ItemId = Annotated[
    int, PathParam(ge=1, le=MAX_ITEM_ID, description="a gallery item's id"), BeforeValidator(check_item_id)
]
IMAGE_RESPONSE = {
    200: {
        "description": "the original image bytes",
        "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
    }
}


def item_body(item) -> GalleryItem:
    return GalleryItem(**asdict(item))


async def enroll(
    request: Request,
    images: List[UploadFile] = File(..., description="one or more image files"),
    person_id: Optional[List[str]] = Form(None, description="once for all images, or once per image"),
    camera_id: Optional[List[str]] = Form(None, description="once for all images, or once per image"),
    metadata: Optional[List[str]] = Form(None, description="a JSON object, once for all images or once per image"),
    captured_at: Optional[List[str]] = Form(
        None,
        description=f"when each image was taken, {TIME_FORMAT}; once for all "
        f"images or "
        "once per image; at most a day ahead, not past REID_RETENTION_DAYS; unset: "
        "unknown",
    ),
):
    s = state(request)
    settings = s.settings
    check_image_count(images, settings)
    count = len(images)
    persons = [check_id(p, "person_id") for p in per_image(person_id, count, "person_id")]
    cameras = [check_id(c, "camera_id") for c in per_image(camera_id, count, "camera_id")]
    metas = [parse_metadata(m) for m in per_image(metadata, count, "metadata")]
    times = [check_captured_at(t, settings) for t in per_image(captured_at, count, "captured_at")]
    uploads = await s.decoder.read_all(
        images, s.model.input_size, preview=True
    )  # previews: for service.derived's copies
    storage = s.gallery.map_storage
    embedding, maps = await s.batcher.embed(pixels_of(uploads), with_maps=storage.enabled)
    packed = await asyncio.to_thread(storage.packed, maps, count)
    new = [
        NewItem(u.data, u.decoded.format, u.decoded.width, u.decoded.height, e, p, c, m, t, derived_copy(u.decoded), f)
        for u, e, p, c, m, t, f in zip(uploads, embedding, persons, cameras, metas, times, packed)
    ]
    stored = await s.gallery.add(new)
    s.metrics.gallery_size.set(s.gallery.size)
    return EnrollResponse(ids=[i.id for i in stored], items=[item_body(i) for i in stored])


async def list_gallery(
    request: Request,
    limit: int = Query(50, ge=1, le=500),
    offset: int = Query(0, ge=0, le=2**62),
    person_id: Optional[str] = Query(None, max_length=MAX_ID_LENGTH),
    camera_id: Optional[str] = Query(None, max_length=MAX_ID_LENGTH),
    captured_after: Optional[str] = Query(None, description=f"only items taken at or after this time, {TIME_FORMAT}"),
    captured_before: Optional[str] = Query(None, description=f"only items taken before this time, {TIME_FORMAT}"),
):
    gallery = state(request).gallery
    person_id, camera_id = check_id(person_id, "person_id"), check_id(camera_id, "camera_id")
    total, items = await gallery.list(limit, offset, person_id, camera_id, *time_range(captured_after, captured_before))
    return GalleryPage(total=total, limit=limit, offset=offset, items=[item_body(i) for i in items])


async def find(request: Request, item_id: int):
    gallery = state(request).gallery
    item = await gallery.get(item_id)
    if item is None:
        raise APIError(404, "not_found", f"no gallery item {item_id}")
    return item


async def get_item(request: Request, item_id: ItemId):
    return item_body(await find(request, item_id))


async def get_image(request: Request, item_id: ItemId):
    item = await find(request, item_id)
    gallery = state(request).gallery
    data = (await gallery.images([item_id])).get(item_id)
    if data is None:
        raise APIError(404, "not_found", f"no gallery item {item_id}")
    return Response(data, headers=image_headers(item.image_format))


async def delete_item(request: Request, item_id: ItemId):
    s = state(request)
    if not await s.gallery.delete(item_id):
        raise APIError(404, "not_found", f"no gallery item {item_id}")
    s.metrics.erased.labels("item").inc()
    s.metrics.gallery_size.set(s.gallery.size)
    return Response(status_code=204)


async def erase_person(request: Request, person_id: str):
    """Erase every item of the person, image, embedding, ids, metadata and index entry, in one transaction;
    the store's freed bytes are zeroed and its WAL truncated before the answer."""
    s = state(request)
    erased = await s.gallery.erase_person(check_stored_id(person_id, "person_id"))
    if not erased:
        raise APIError(404, "not_found", "no gallery item of this person")
    s.metrics.erased.labels("person").inc(len(erased))
    s.metrics.gallery_size.set(s.gallery.size)
    return ErasureResponse(person_id=person_id, removed=len(erased), ids=erased)


def add_routes(app: FastAPI) -> None:
    """The gallery's routes, all behind the API key."""
    route = partial(app.add_api_route, tags=["gallery"], dependencies=PROTECTED, responses=ERRORS)
    route("/gallery", enroll, methods=["POST"], status_code=201, response_model=EnrollResponse)
    route("/gallery", list_gallery, methods=["GET"], response_model=GalleryPage)
    route("/gallery/{item_id}", get_item, methods=["GET"], response_model=GalleryItem)
    route(
        "/gallery/{item_id}/image",
        get_image,
        methods=["GET"],
        response_class=Response,
        responses={**ERRORS, **IMAGE_RESPONSE},
    )
    route("/gallery/{item_id}", delete_item, methods=["DELETE"], status_code=204)
    # :path, so that a person id with a "/" (sent as %2F) can be erased too
    route("/persons/{person_id:path}", erase_person, methods=["DELETE"], response_model=ErasureResponse)
