"""The sync and async clients. Each operation is written once as a request (``Request``: what to send) and a
parser (what the answer means); the two clients only differ in how they send."""

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union
from urllib.parse import quote

import httpx

from client.types import BatchResult, EnrolledItem, GalleryPage, QueryResult, ReIDError, Verification, from_json

DEFAULT_URL = "http://127.0.0.1:8000"
ImageInput = Union[str, Path, bytes, Tuple[str, bytes]]  # a file, its bytes, or (file name, bytes)
PerImage = Union[None, str, Sequence[str]]  # once for all images, or one per image
Time = Union[None, str, float, datetime]  # ISO 8601 with a time zone, epoch seconds, or an aware datetime
PerImageTime = Union[Time, Sequence[Time]]


@dataclass
class Request:
    method: str
    path: str
    parse: Callable[[httpx.Response], Any]
    params: Dict[str, Any] = field(default_factory=dict)
    data: Dict[str, Any] = field(default_factory=dict)
    files: List[Tuple[str, Tuple[str, bytes]]] = field(default_factory=list)


def image_part(image: ImageInput, index: int) -> Tuple[str, bytes]:
    if isinstance(image, (str, Path)):
        return Path(image).name, Path(image).read_bytes()
    if isinstance(image, bytes):
        return f"image{index}", image
    return image


def per_image(value: PerImage) -> List[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def time_text(value: Time) -> Optional[str]:
    """A time as the service reads it; a naive datetime is sent as it is, and refused (422): its zone is unknown."""
    if value is None or isinstance(value, str):
        return value
    return value.isoformat() if isinstance(value, datetime) else f"{float(value):.6f}"  # plain decimals, never 1e-05


def per_image_time(value: PerImageTime) -> List[str]:
    if value is None:
        return []
    return [time_text(value)] if isinstance(value, (str, float, int, datetime)) else [time_text(v) for v in value]


def form(**values: Any) -> Dict[str, Any]:
    """Form fields without the unset ones; booleans as the service reads them."""
    return {k: (str(v).lower() if isinstance(v, bool) else v) for k, v in values.items() if v is not None}


def checked(response: httpx.Response) -> httpx.Response:
    """The response, or ``ReIDError`` with the documented code (``http_<status>`` if the body is not the shape)."""
    if response.is_success:
        return response
    try:
        error = response.json()["error"]
        raise ReIDError(response.status_code, error["code"], error["message"])
    except (ValueError, KeyError, TypeError):
        raise ReIDError(response.status_code, f"http_{response.status_code}", response.text[:200]) from None


def enroll_request(
    images: Sequence[ImageInput],
    person_id: PerImage = None,
    camera_id: PerImage = None,
    metadata: Union[None, Dict, Sequence[Dict]] = None,
    captured_at: PerImageTime = None,
) -> Request:
    metadata_list = [] if metadata is None else [metadata] if isinstance(metadata, dict) else list(metadata)
    data = {
        "person_id": per_image(person_id),
        "camera_id": per_image(camera_id),
        "metadata": [json.dumps(m) for m in metadata_list],
        "captured_at": per_image_time(captured_at),
    }
    files = [("images", image_part(image, i)) for i, image in enumerate(images)]
    return Request(
        "POST",
        "/gallery",
        lambda r: [from_json(EnrolledItem, i) for i in r.json()["items"]],
        data={k: v for k, v in data.items() if v},
        files=files,
    )


def query_fields(
    top_k: int,
    heatmaps: bool,
    camera_id: Optional[str] = None,
    exclude_camera_id: Optional[str] = None,
    person_id: Optional[str] = None,
    min_score: Optional[float] = None,
    rerank: bool = False,
    group_by: Optional[str] = None,
    captured_after: Time = None,
    captured_before: Time = None,
    **route_fields: Any,
) -> Dict[str, Any]:
    """The form fields every query route shares, and ``route_fields`` (a route's own, unset when None)."""
    return form(
        top_k=top_k,
        camera_id=camera_id,
        exclude_camera_id=exclude_camera_id,
        person_id=person_id,
        min_score=min_score,
        heatmaps=heatmaps,
        rerank=rerank or None,
        group_by=group_by,
        captured_after=time_text(captured_after),
        captured_before=time_text(captured_before),
        **route_fields,
    )


def parse_query(response: httpx.Response) -> QueryResult:
    return QueryResult.from_json(response.json())


def query_request(
    image: ImageInput, top_k: int = 10, heatmaps: bool = True, pair_attention: bool = False, **options
) -> Request:
    data = query_fields(top_k, heatmaps, pair_attention=pair_attention or None, **options)
    return Request("POST", "/query", parse_query, data=data, files=[("image", image_part(image, 0))])


def track_request(
    images: Sequence[ImageInput], top_k: int = 10, aggregate: str = "mean", heatmaps: bool = True, **options
) -> Request:
    """Several images of one person as one query: the ``image`` field repeated."""
    files = [("image", image_part(image, i)) for i, image in enumerate(images)]
    return Request(
        "POST", "/query", parse_query, data=query_fields(top_k, heatmaps, aggregate=aggregate, **options), files=files
    )


def batch_request(images: Sequence[ImageInput], top_k: int = 10, heatmaps: bool = False, **options) -> Request:
    files = [("images", image_part(image, i)) for i, image in enumerate(images)]
    return Request(
        "POST",
        "/query/batch",
        lambda r: BatchResult.from_json(r.json()),
        data=query_fields(top_k, heatmaps, **options),
        files=files,
    )


def verify_request(image_a: ImageInput, image_b: ImageInput) -> Request:
    return Request(
        "POST",
        "/verify",
        lambda r: from_json(Verification, r.json()),
        files=[("image_a", image_part(image_a, 0)), ("image_b", image_part(image_b, 1))],
    )


def gallery_request(
    limit: int = 50,
    offset: int = 0,
    person_id: Optional[str] = None,
    camera_id: Optional[str] = None,
    captured_after: Time = None,
    captured_before: Time = None,
) -> Request:
    return Request(
        "GET",
        "/gallery",
        lambda r: GalleryPage.from_json(r.json()),
        params=form(
            limit=limit,
            offset=offset,
            person_id=person_id,
            camera_id=camera_id,
            captured_after=time_text(captured_after),
            captured_before=time_text(captured_before),
        ),
    )


def erase_person_request(person_id: str) -> Request:
    # quoted whole ("/" too): the id is one path segment to the server, however it is spelt
    return Request("DELETE", f"/persons/{quote(person_id, safe='')}", lambda r: r.json()["removed"])


REQUESTS = {
    "item": lambda item_id: Request("GET", f"/gallery/{int(item_id)}", lambda r: from_json(EnrolledItem, r.json())),
    "image": lambda item_id: Request("GET", f"/gallery/{int(item_id)}/image", lambda r: r.content),
    "delete": lambda item_id: Request("DELETE", f"/gallery/{int(item_id)}", lambda r: None),
    "model": lambda: Request("GET", "/model", lambda r: r.json()),
    "ready": lambda: Request("GET", "/readyz", lambda r: r.json()),
}


def client_options(base_url: str, api_key: Optional[str], timeout: float, transport) -> Dict[str, Any]:
    headers = {"X-API-Key": api_key} if api_key else {}
    return dict(base_url=base_url, headers=headers, timeout=timeout, **({"transport": transport} if transport else {}))


def send_kwargs(request: Request) -> Dict[str, Any]:
    kwargs: Dict[str, Any] = {"params": request.params or None}
    if request.files or request.data:
        kwargs.update(data=request.data or None, files=request.files or None)
    return kwargs


class ReIDClient:
    """Sync client: ``with ReIDClient(url, api_key=...) as reid: reid.enroll([...]); reid.query(...)``."""

    def __init__(
        self, base_url: str = DEFAULT_URL, api_key: Optional[str] = None, timeout: float = 60.0, transport=None
    ):
        self._http = httpx.Client(**client_options(base_url, api_key, timeout, transport))

    def _send(self, request: Request) -> Any:
        return request.parse(checked(self._http.request(request.method, request.path, **send_kwargs(request))))

    def enroll(
        self,
        images: Sequence[ImageInput],
        person_id: PerImage = None,
        camera_id: PerImage = None,
        metadata=None,
        captured_at: PerImageTime = None,
    ) -> List[EnrolledItem]:
        """Enrol images, all or nothing; person/camera ids, metadata and capture times once for all or once per
        image."""
        return self._send(enroll_request(images, person_id, camera_id, metadata, captured_at))

    def query(self, image: ImageInput, top_k: int = 10, **options) -> QueryResult:
        """Matches for one image; ``options``: camera_id, exclude_camera_id, person_id, min_score, captured_after,
        captured_before, heatmaps, overlays (False: grids only, no PNG), branch_overlays (True: a PNG per branch too),
        rerank,
        pair_attention, group_by ("person": one match per person)."""
        return self._send(query_request(image, top_k, **options))

    def query_track(
        self, images: Sequence[ImageInput], top_k: int = 10, aggregate: str = "mean", **options
    ) -> QueryResult:
        """Matches for several images of one person (a track), aggregated by ``mean`` or ``best``; the options
        of ``query`` but pair_attention."""
        return self._send(track_request(images, top_k, aggregate, **options))

    def query_batch(self, images: Sequence[ImageInput], top_k: int = 10, **options) -> BatchResult:
        """Each image its own query, the same options for all (those of ``query`` but pair_attention; heatmaps
        off unless asked for), embedded in one batch: ``results`` in the order of ``images``."""
        return self._send(batch_request(images, top_k, **options))

    def verify(self, image_a: ImageInput, image_b: ImageInput) -> Verification:
        """Are the two images the same person: their score, and the decision at the server's threshold."""
        return self._send(verify_request(image_a, image_b))

    def gallery(
        self,
        limit: int = 50,
        offset: int = 0,
        person_id: Optional[str] = None,
        camera_id: Optional[str] = None,
        captured_after: Time = None,
        captured_before: Time = None,
    ) -> GalleryPage:
        return self._send(gallery_request(limit, offset, person_id, camera_id, captured_after, captured_before))

    def iter_gallery(self, page_size: int = 100, **filters) -> Iterator[EnrolledItem]:
        """Every enrolled item (optionally filtered), page by page."""
        offset = 0
        while True:
            page = self.gallery(page_size, offset, **filters)
            yield from page.items
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return

    def item(self, item_id: int) -> EnrolledItem:
        return self._send(REQUESTS["item"](item_id))

    def image(self, item_id: int) -> bytes:
        return self._send(REQUESTS["image"](item_id))

    def delete(self, item_id: int) -> None:
        self._send(REQUESTS["delete"](item_id))

    def erase_person(self, person_id: str) -> int:
        """Erase every item of the person (images, embeddings, index entries); how many. ReIDError 404 if none."""
        return self._send(erase_person_request(person_id))

    def model(self) -> Dict[str, Any]:
        return self._send(REQUESTS["model"]())

    def ready(self) -> Dict[str, Any]:
        return self._send(REQUESTS["ready"]())

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "ReIDClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncReIDClient:
    """Async client, the same operations: ``async with AsyncReIDClient(url) as reid: await reid.query(...)``."""

    def __init__(
        self, base_url: str = DEFAULT_URL, api_key: Optional[str] = None, timeout: float = 60.0, transport=None
    ):
        self._http = httpx.AsyncClient(**client_options(base_url, api_key, timeout, transport))

    async def _send(self, request: Request) -> Any:
        return request.parse(checked(await self._http.request(request.method, request.path, **send_kwargs(request))))

    async def enroll(
        self,
        images: Sequence[ImageInput],
        person_id: PerImage = None,
        camera_id: PerImage = None,
        metadata=None,
        captured_at: PerImageTime = None,
    ) -> List[EnrolledItem]:
        return await self._send(enroll_request(images, person_id, camera_id, metadata, captured_at))

    async def query(self, image: ImageInput, top_k: int = 10, **options) -> QueryResult:
        return await self._send(query_request(image, top_k, **options))

    async def query_track(
        self, images: Sequence[ImageInput], top_k: int = 10, aggregate: str = "mean", **options
    ) -> QueryResult:
        return await self._send(track_request(images, top_k, aggregate, **options))

    async def query_batch(self, images: Sequence[ImageInput], top_k: int = 10, **options) -> BatchResult:
        return await self._send(batch_request(images, top_k, **options))

    async def verify(self, image_a: ImageInput, image_b: ImageInput) -> Verification:
        return await self._send(verify_request(image_a, image_b))

    async def gallery(
        self,
        limit: int = 50,
        offset: int = 0,
        person_id: Optional[str] = None,
        camera_id: Optional[str] = None,
        captured_after: Time = None,
        captured_before: Time = None,
    ) -> GalleryPage:
        return await self._send(gallery_request(limit, offset, person_id, camera_id, captured_after, captured_before))

    async def iter_gallery(self, page_size: int = 100, **filters) -> AsyncIterator[EnrolledItem]:
        offset = 0
        while True:
            page = await self.gallery(page_size, offset, **filters)
            for item in page.items:
                yield item
            offset += len(page.items)
            if not page.items or offset >= page.total:
                return

    async def item(self, item_id: int) -> EnrolledItem:
        return await self._send(REQUESTS["item"](item_id))

    async def image(self, item_id: int) -> bytes:
        return await self._send(REQUESTS["image"](item_id))

    async def delete(self, item_id: int) -> None:
        await self._send(REQUESTS["delete"](item_id))

    async def erase_person(self, person_id: str) -> int:
        return await self._send(erase_person_request(person_id))

    async def model(self) -> Dict[str, Any]:
        return await self._send(REQUESTS["model"]())

    async def ready(self) -> Dict[str, Any]:
        return await self._send(REQUESTS["ready"]())

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> "AsyncReIDClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
