"""The FastAPI app: the routes and the lifespan (load the model, open the gallery, start the batcher). Who may
call and how big a body may be: ``access``; form fields into 422s: ``form_fields``; queries of several images:
``tracks``; CASN's pairwise stage: ``pair_ranking``."""
import asyncio
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Dict, List, Literal, Optional, Tuple

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Path as PathParam, Query, Request, Response, Security, UploadFile
from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import BeforeValidator
from starlette.middleware.cors import CORSMiddleware

from model_zoo.contract import split_branches
from model_zoo.preprocess import DecodeBudgetExceeded, DecodedImage, ImageTooLarge, InvalidImage, decode_for_model
from model_zoo.ram import ranking_activation_maps
from model_zoo.rerank import rerank_shortlist
from service.access import AccessGate, BodyLimit
from service.batching import MicroBatcher
from service.errors import ERROR_SCHEMA, APIError, install_error_handlers
from service.gallery import Gallery, GalleryBase
from service.heatmaps import overlay, png_base64
from service.http_contract import HeadAsGet, image_headers
from service.inference import ImageMaps, InferenceModel
from service.metrics import RequestTimer, ServiceMetrics
from service.pair_ranking import load_pair_head, rank_shortlist
from service.schemas import (BatchQueryResponse, EnrollResponse, ErasureResponse, GalleryItem, GalleryPage, Heatmap, Match, PairAttention,
                             QueryResponse, ReadyResponse, VerifyResponse)
from service.settings import Settings
from service.store import GalleryStore, NewItem
from service.tracing import install_tracing
from service.verification import SamePersonRule
from service.tracks import Aggregate, Hit, merge_best, mean_embedding
from service.form_fields import SECONDS_PER_DAY, check_captured_at, check_id, parse_metadata, per_image, time_range
from service.validation import MAX_ID_LENGTH, MAX_ITEM_ID, check_item_id

log = logging.getLogger(__name__)
STATIC_DIR = Path(__file__).parent / "static"
ERRORS = {code: ERROR_SCHEMA for code in (400, 401, 404, 409, 413, 422, 503)}
# Gallery ids in paths: decimal digits only ("+1" and "1_0" are no ids), within SQLite's INTEGER
ItemId = Annotated[int, PathParam(ge=1, le=MAX_ITEM_ID, description="a gallery item's id"), BeforeValidator(check_item_id)]
IMAGE_RESPONSE = {200: {"description": "the original image bytes", "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}}}
METRICS_RESPONSE = {200: {"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}}
TIME_FORMAT = "ISO 8601 with a time zone (2024-06-01T12:00:00Z) or epoch seconds"
GROUP_BY_REORDERED = ("group_by keeps each person's best match in the index's order; rerank and pair_attention put a fixed shortlist "
                      "in their own order: choose one")


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


async def require_gallery(gallery: GalleryBase) -> None:
    if await gallery.current_size() == 0:
        raise APIError(409, "gallery_empty", "the gallery is empty: enrol images with POST /gallery first")


class Stopwatch:
    """An answer's timing_ms: the milliseconds of each step, then the total."""

    def __init__(self):
        self.started, self.timing = time.perf_counter(), {}

    def lap(self, name: str) -> None:
        self.timing[name] = (time.perf_counter() - self.started) * 1000 - sum(self.timing.values())

    def total(self) -> Dict[str, float]:
        self.timing["total"] = (time.perf_counter() - self.started) * 1000
        return self.timing


@dataclass(frozen=True)
class QueryOptions:
    """What the queries of one request share."""
    top_k: int
    filters: Dict[str, object]  # Gallery.search's filter arguments
    rerank: bool
    group_by_person: bool
    heatmaps: bool = False
    pair_attention: bool = False
    branch_overlays: bool = True

    @property
    def reorders(self) -> bool:
        """A re-ranking step puts a shortlist in its own order."""
        return self.rerank or self.pair_attention


async def search_index(gallery: GalleryBase, vectors: np.ndarray, k: int, options: QueryOptions) -> Tuple[List[Hit], Dict[int, int]]:
    """A query's index hits: its one vector's, or a best-of track's, each image searched and the hits merged at
    their best score; and, for the latter, which track image gave each hit its score ({} otherwise)."""
    searches = [await gallery.search_from_loop(vector, k, group_by_person=options.group_by_person, **options.filters) for vector in vectors]
    if len(searches) == 1:
        return searches[0], {}
    return merge_best(searches, k, gallery.person_group if options.group_by_person else None)


async def purge_expired(gallery: GalleryBase, days: float, metrics: ServiceMetrics) -> int:
    """Erase what REID_RETENTION_DAYS has expired, the way a person is erased (one transaction, WAL wiped)."""
    erased = await gallery.erase_older_than(time.time() - days * SECONDS_PER_DAY)
    metrics.erased.labels("retention").inc(len(erased))
    if erased:
        log.info("retention: erased %d item(s) older than %g days", len(erased), days)
    return len(erased)


async def retention_loop(gallery: GalleryBase, settings: Settings, metrics: ServiceMetrics) -> None:
    while True:
        await asyncio.sleep(settings.retention_interval_s)
        try:
            await purge_expired(gallery, settings.retention_days, metrics)
        except Exception:  # a full disk, say: the next round tries again
            log.exception("retention purge failed; next try in %g s", settings.retention_interval_s)
        metrics.gallery_size.set(gallery.size)


def item_body(item) -> GalleryItem:
    return GalleryItem(**asdict(item))


def branch_scores(vector: np.ndarray, query_features: np.ndarray) -> List[float]:
    """Each branch's cosine between an embedding [N*D] and query features [N, D]."""
    return (split_branches(vector, len(query_features)) * query_features).sum(axis=1).tolist()


def match_body(rank: int, score: float, item, vector: np.ndarray, query_features: np.ndarray, **ranking) -> Match:
    """``ranking``: the fields a re-ranking step adds (rerank_distance, or pair_distance and pair_attention)."""
    return Match(id=item.id, rank=rank, score=score, branch_scores=branch_scores(vector, query_features), **ranking,
                 person_id=item.person_id, camera_id=item.camera_id, captured_at=item.captured_at, metadata=item.metadata)


def rerank_hits(embedding: np.ndarray, hits: List[Tuple[int, float]], found: dict, top_k: int, settings: Settings) -> Tuple[List[Tuple[int, float]], List[dict]]:
    """The shortlist ``hits`` re-ranked with the query alone (model_zoo.rerank): the first ``top_k`` in the
    new order, and their Match fields (rerank_distance). ``found`` holds each hit's stored embedding."""
    vectors = np.stack([found[i][1] for i, _ in hits]) if hits else np.zeros((0, len(embedding)), np.float32)
    distances, order = rerank_shortlist(embedding, vectors, settings.rerank_k1, settings.rerank_k2, settings.rerank_lambda)
    order = order[:top_k]
    return [hits[j] for j in order], [{"rerank_distance": float(distances[j])} for j in order]


def make_heatmap(query_features: np.ndarray, maps: ImageMaps, image, branch_overlays: bool = True) -> Heatmap:
    """RAM of one image (``maps`` indexed to it), and the model's own attention maps when it exports them.
    Without ``branch_overlays`` the per-branch PNGs are not drawn (the grids still are): they are most of a
    heatmap query's CPU (bench/results/heatmap_cost.json)."""
    ram = ranking_activation_maps(query_features, maps.features)
    heatmap = Heatmap(
        grid=ram.aggregate.tolist(), branch_grids=ram.per_branch.tolist(),
        overlay_png=png_base64(overlay(image, ram.aggregate)),
        branch_overlays_png=[png_base64(overlay(image, grid)) for grid in ram.per_branch] if branch_overlays else [],
    )
    if maps.attention is not None:
        heatmap.attention_grids = maps.attention.tolist()
        heatmap.attention_overlays_png = [png_base64(overlay(image, grid, unit_scale=True)) for grid in maps.attention]
    return heatmap


def draw_pair_attention(pair: PairAttention, query_image, match_image) -> None:
    pair.query_overlay_png = png_base64(overlay(query_image, np.array(pair.query_grid)))
    pair.gallery_overlay_png = png_base64(overlay(match_image, np.array(pair.gallery_grid)))


def cluster_backend():
    """``service.cluster_gallery``, imported only when REID_GALLERY_BACKEND=cluster asks for it: its clients
    (psycopg, pymilvus) are the [cluster] extra's."""
    try:
        from service import cluster_gallery
    except ImportError as exc:
        raise RuntimeError(f"REID_GALLERY_BACKEND=cluster needs the [cluster] extra ({exc.name} is missing): "
                           "pip install -e '.[cpu,cluster]' (or [gpu,cluster])") from exc
    return cluster_gallery


def new_gallery(settings: Settings, model: InferenceModel) -> GalleryBase:
    """The gallery of REID_GALLERY_BACKEND, not yet opened."""
    if settings.gallery_backend == "cluster":
        return cluster_backend().ClusterGallery(model, settings)
    return Gallery(GalleryStore(settings.store_path), model, settings)


def backend_errors(settings: Settings) -> Dict[type, Tuple[int, str]]:
    """The cluster backend's exceptions as answers: its database or index out of reach (503), or a replica
    left behind by a model change (409)."""
    if settings.gallery_backend != "cluster":
        return {}
    backend = cluster_backend()
    return {**{error: (503, "storage_unavailable") for error in backend.UNAVAILABLE_ERRORS}, backend.ModelChanged: (409, "model_changed")}


def match_heatmap(query_features: np.ndarray, maps: ImageMaps, image, match: Match, query_image, branch_overlays: bool) -> Heatmap:
    """One match's drawings, in one worker thread: its RAM and, after a pair_attention query, its pair's maps."""
    if match.pair_attention is not None:
        draw_pair_attention(match.pair_attention, query_image, image)
    return make_heatmap(query_features, maps, image, branch_overlays)


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    settings = settings or Settings()
    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        model = InferenceModel(settings.model_path, settings.execution_provider, settings.intra_op_threads, settings.model_instances, settings.model_precision,
                               settings.tensorrt_cache_dir or settings.store_path.parent / "tensorrt-cache", settings.max_batch_size).load()
        app.state.pair_head = load_pair_head(settings, model)
        app.state.same_person = SamePersonRule.choose(model.contract, settings.verify_threshold)
        gallery = await asyncio.to_thread(new_gallery, settings, model)
        await asyncio.to_thread(gallery.open)
        await gallery.start()
        retention = None
        if settings.retention_days:
            await purge_expired(gallery, settings.retention_days, metrics)  # before ready: nothing expired is ever served
            retention = asyncio.create_task(retention_loop(gallery, settings, metrics))
        batcher = MicroBatcher(model, settings.max_batch_size, settings.max_batch_wait_ms / 1000, model.instances,
                               settings.max_queued_images, metrics.observe_batch)
        await batcher.start()
        app.state.model, app.state.gallery, app.state.batcher = model, gallery, batcher
        metrics.gallery_size.set(gallery.size)
        metrics.describe_build(model)
        metrics.queued_images.set_function(batcher.queued_images)
        metrics.map_cache_bytes.set_function(lambda: gallery.map_cache.bytes)
        app.state.ready = True
        try:
            yield
        finally:
            app.state.ready = False
            if retention:
                retention.cancel()
                await asyncio.gather(retention, return_exceptions=True)
            await batcher.stop()
            await gallery.stop()
            gallery.close()

    app = FastAPI(
        title="Person re-ID retrieval", version="0.1.0", lifespan=lifespan,
        redirect_slashes=False,  # a redirect would be built from the request's Host header: /gallery/ is a 404
        description="Enrol pedestrian crops, query with one, get ranked matches with Ranking Activation Map heatmaps. "
        'Every error is {"error": {"code", "message"}}.',
    )
    app.state.ready = False

    def count_error(code: str) -> None:
        metrics.errors.labels(code).inc()

    install_error_handlers(app, on_error=count_error, backend_errors=backend_errors(settings))
    body_limit = settings.max_images_per_request * settings.max_image_bytes + 1024 * 1024
    app.add_middleware(BodyLimit, limit=body_limit, on_error=count_error)
    # outside BodyLimit: a request refused by its headers is refused before its size is even looked at
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(AccessGate, api_key=api_key, allowed_origins=settings.origins, on_error=count_error)
    if settings.origins:  # outside the gate: a CORS preflight carries no API key
        app.add_middleware(CORSMiddleware, allow_origins=settings.origins, allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["X-API-Key"], expose_headers=["Retry-After"], max_age=600)

    app.add_middleware(RequestTimer, latency=metrics.latency)
    app.add_middleware(HeadAsGet)
    install_tracing(app, settings.tracing)

    api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="needed when REID_API_KEY is set")

    async def declare_key(key: Optional[str] = Security(api_key_header)) -> None:
        """Declares the header in the OpenAPI schema; AccessGate checks it, before the body is read."""

    def state(request: Request):
        if not request.app.state.ready:
            raise APIError(503, "not_ready", "the model or the gallery is still loading")
        return request.app.state

    protected = [Depends(declare_key)]

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    async def page():
        """The search page (plain static files; it asks for the API key itself when one is needed)."""
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/healthz", tags=["health"])
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"], response_model=ReadyResponse, responses={503: ERROR_SCHEMA})
    async def readyz(request: Request):
        s = state(request)
        problem = await s.gallery.readiness_problem()
        if problem:
            raise APIError(503, "model_changed", f"{problem}: restart this replica with that model")
        size = await s.gallery.current_size()
        return ReadyResponse(
            ready=True, provider={**asdict(s.model.providers), "fell_back": s.model.providers.fell_back},
            index=s.gallery.describe_index(), gallery_size=size, model_fingerprint=s.model.fingerprint,
        )

    @app.get("/model", tags=["health"], dependencies=protected, responses=ERRORS)
    async def model_info(request: Request):
        s = state(request)
        return {**asdict(s.model.contract), "embedding_dim": s.model.contract.embedding_dim,
                "fingerprint": s.model.fingerprint, "file": s.model.path.name, "precision": s.model.precision,
                # what the optional query steps can use: CASN's pair head (pair_attention=true), CLPD-style attention maps
                "pair_head": s.pair_head is not None, "attention_maps": s.model.has_attention_maps}

    @app.get("/metrics", tags=["health"], dependencies=protected, response_class=PlainTextResponse, responses={**ERRORS, **METRICS_RESPONSE})
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/gallery", status_code=201, tags=["gallery"], response_model=EnrollResponse, dependencies=protected, responses=ERRORS)
    async def enroll(
        request: Request,
        images: List[UploadFile] = File(..., description="one or more image files"),
        person_id: Optional[List[str]] = Form(None, description="once for all images, or once per image"),
        camera_id: Optional[List[str]] = Form(None, description="once for all images, or once per image"),
        metadata: Optional[List[str]] = Form(None, description="a JSON object, once for all images or once per image"),
        captured_at: Optional[List[str]] = Form(None, description=f"when each image was taken, {TIME_FORMAT}; once for all images or "
                                                "once per image; at most a day ahead, not past REID_RETENTION_DAYS; unset: unknown"),
    ):
        s = state(request)
        check_image_count(images, settings)
        count = len(images)
        persons = [check_id(p, "person_id") for p in per_image(person_id, count, "person_id")]
        cameras = [check_id(c, "camera_id") for c in per_image(camera_id, count, "camera_id")]
        metas = [parse_metadata(m) for m in per_image(metadata, count, "metadata")]
        times = [check_captured_at(t, settings) for t in per_image(captured_at, count, "captured_at")]
        uploads = await read_uploads(images, settings, s.model.input_size)
        embedding, _ = await s.batcher.embed(pixels_of(uploads))
        new = [NewItem(u.data, u.decoded.format, u.decoded.width, u.decoded.height, e, p, c, m, t)
               for u, e, p, c, m, t in zip(uploads, embedding, persons, cameras, metas, times)]
        stored = await s.gallery.add(new)
        metrics.gallery_size.set(s.gallery.size)
        return EnrollResponse(ids=[i.id for i in stored], items=[item_body(i) for i in stored])

    @app.get("/gallery", tags=["gallery"], response_model=GalleryPage, dependencies=protected, responses=ERRORS)
    async def list_gallery(
        request: Request,
        limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=2**62),
        person_id: Optional[str] = Query(None, max_length=MAX_ID_LENGTH), camera_id: Optional[str] = Query(None, max_length=MAX_ID_LENGTH),
        captured_after: Optional[str] = Query(None, description=f"only items taken at or after this time, {TIME_FORMAT}"),
        captured_before: Optional[str] = Query(None, description=f"only items taken before this time, {TIME_FORMAT}"),
    ):
        gallery = state(request).gallery
        total, items = await gallery.read(gallery.store.list, limit, offset, person_id, camera_id, *time_range(captured_after, captured_before))
        return GalleryPage(total=total, limit=limit, offset=offset, items=[item_body(i) for i in items])

    async def find(request: Request, item_id: int):
        gallery = state(request).gallery
        item = await gallery.read(gallery.store.get, item_id)
        if item is None:
            raise APIError(404, "not_found", f"no gallery item {item_id}")
        return item

    @app.get("/gallery/{item_id}", tags=["gallery"], response_model=GalleryItem, dependencies=protected, responses=ERRORS)
    async def get_item(request: Request, item_id: ItemId):
        return item_body(await find(request, item_id))

    @app.get("/gallery/{item_id}/image", tags=["gallery"], dependencies=protected, response_class=Response, responses={**ERRORS, **IMAGE_RESPONSE})
    async def get_image(request: Request, item_id: ItemId):
        item = await find(request, item_id)
        gallery = state(request).gallery
        data = (await gallery.read(gallery.store.images, [item_id])).get(item_id)
        if data is None:
            raise APIError(404, "not_found", f"no gallery item {item_id}")
        return Response(data, headers=image_headers(item.image_format))

    @app.delete("/gallery/{item_id}", status_code=204, tags=["gallery"], dependencies=protected, responses=ERRORS)
    async def delete_item(request: Request, item_id: ItemId):
        s = state(request)
        if not await s.gallery.delete(item_id):
            raise APIError(404, "not_found", f"no gallery item {item_id}")
        metrics.erased.labels("item").inc()
        metrics.gallery_size.set(s.gallery.size)
        return Response(status_code=204)

    # :path, so that a person id with a "/" (sent as %2F) can be erased too
    @app.delete("/persons/{person_id:path}", tags=["gallery"], response_model=ErasureResponse, dependencies=protected, responses=ERRORS)
    async def erase_person(request: Request, person_id: str):
        """Erase every item of the person, image, embedding, ids, metadata and index entry, in one transaction;
        the store's freed bytes are zeroed and its WAL truncated before the answer."""
        s = state(request)
        erased = await s.gallery.erase_person(check_id(person_id, "person_id"))
        if not erased:
            raise APIError(404, "not_found", "no gallery item of this person")
        metrics.erased.labels("person").inc(len(erased))
        metrics.gallery_size.set(s.gallery.size)
        return ErasureResponse(person_id=person_id, removed=len(erased), ids=erased)

    async def query_options(
        top_k: int = Form(10, description="number of matches, 1 to REID_MAX_TOP_K"),
        camera_id: Optional[str] = Form(None, description="only matches from this camera"),
        exclude_camera_id: Optional[str] = Form(None, description="no matches from this camera (the re-ID protocol's same-camera rule)"),
        person_id: Optional[str] = Form(None, description="only matches of this person"),
        min_score: Optional[float] = Form(None, ge=-1.0, le=1.0, description="only matches scoring at least this"),
        captured_after: Optional[str] = Form(None, description=f"only matches taken at or after this time, {TIME_FORMAT}"),
        captured_before: Optional[str] = Form(None, description=f"only matches taken before this time, {TIME_FORMAT}"),
        rerank: bool = Form(False, description="k-reciprocal re-ranking (Zhong et al. 2017) of a shortlist of REID_RERANK_SHORTLIST "
                            "index hits (the same filters), the query alone with them: the matches then follow rerank_distance, not score"),
        group_by: Optional[Literal["person"]] = Form(None, description="person: at most one match per person_id, its best-scoring item (items "
                                                     "without person_id each count alone); the index search widens until top_k persons "
                                                     "are found. Not with rerank or pair_attention (422)"),
        branch_overlays: bool = Form(True, description="with heatmaps: also draw each branch's overlay PNG (branch_overlays_png); false "
                                     "leaves that list empty (the branch grids are still there), about half a heatmap query's CPU"),
    ) -> QueryOptions:
        """The options every query route shares, checked before any image is read."""
        if not 1 <= top_k <= settings.max_top_k:
            raise APIError(422, "invalid_request", f"top_k: must be between 1 and {settings.max_top_k}")
        for value, name in ((camera_id, "camera_id"), (exclude_camera_id, "exclude_camera_id"), (person_id, "person_id")):
            check_id(value, name)
        after, before = time_range(captured_after, captured_before)
        if group_by and rerank:
            raise APIError(422, "invalid_request", GROUP_BY_REORDERED)
        filters = dict(camera_id=camera_id, exclude_camera_id=exclude_camera_id, person_id=person_id, min_score=min_score,
                       captured_after=after, captured_before=before)
        return QueryOptions(top_k, filters, rerank, group_by == "person", branch_overlays=branch_overlays)

    @app.post("/query", tags=["query"], response_model=QueryResponse, dependencies=protected, responses=ERRORS)
    async def query(
        request: Request,
        image: List[UploadFile] = File(..., description="the query image; repeated, a track: several images of one person (a tracker's "
                                       "crops), answered as one query by `aggregate` (at most REID_MAX_IMAGES_PER_REQUEST images)"),
        options: QueryOptions = Depends(query_options),
        heatmaps: bool = Form(True, description="compute RAM heatmaps for the query and each match"),
        pair_attention: bool = Form(False, description="CASN's pairwise re-ranking of a shortlist of REID_RERANK_SHORTLIST index hits "
                                    "(the same filters; their stored images re-embedded), by feature + Siamese attention distance: the matches "
                                    "then follow pair_distance and carry pair_attention. Needs a pair head (GET /model: pair_head; else 409 "
                                    "no_pair_head); not with rerank=true, group_by or a track (422)"),
        aggregate: Aggregate = Form("mean", description="a track's aggregation: mean (the per-branch mean of its embeddings, "
                                    "re-normalised, searched as one query) or best (each gallery item at the best score of any track "
                                    "image, which each match names in track_image; not with rerank). No effect on one image"),
    ):
        s = state(request)
        options = replace(options, heatmaps=heatmaps, pair_attention=pair_attention)
        check_image_count(image, settings)
        check_steps(s, options, len(image), aggregate)
        uploads = await read_uploads(image, settings, s.model.input_size, preview=heatmaps)
        await require_gallery(s.gallery)
        watch = Stopwatch()
        embedding, maps = await s.batcher.embed(pixels_of(uploads), with_maps=heatmaps or pair_attention)
        watch.lap("embed")
        vectors = embedding if aggregate == "best" else mean_embedding(embedding, s.model.contract.num_branches)[None]
        response = await answer(s, options, vectors, maps, [u.decoded.preview for u in uploads], watch)
        if len(uploads) > 1:
            response.track_size, response.aggregate = len(uploads), aggregate
        return response

    @app.post("/query/batch", tags=["query"], response_model=BatchQueryResponse, dependencies=protected, responses=ERRORS)
    async def query_batch(
        request: Request,
        images: List[UploadFile] = File(..., description="the query images, each its own query (at most REID_MAX_IMAGES_PER_REQUEST)"),
        options: QueryOptions = Depends(query_options),
        heatmaps: bool = Form(False, description="RAM heatmaps for each query and its first REID_MAX_HEATMAP_MATCHES matches; off by default here"),
    ):
        """Independent queries with the same options, embedded together in one model batch; the answers in upload
        order, each what POST /query answers for that image alone. No pair_attention (it re-embeds a shortlist
        per query)."""
        s = state(request)
        options = replace(options, heatmaps=heatmaps)
        check_image_count(images, settings)
        uploads = await read_uploads(images, settings, s.model.input_size, preview=heatmaps)
        await require_gallery(s.gallery)
        watch = Stopwatch()
        embedding, maps = await s.batcher.embed(pixels_of(uploads), with_maps=heatmaps)
        watch.lap("embed")
        # one query after the other: each one's heatmap matches are re-embedded as one batch, so the model queue
        # holds at most one query's REID_MAX_HEATMAP_MATCHES images from this request at a time
        results = [await answer(s, options, embedding[row : row + 1], None if maps is None else maps[row : row + 1],
                                [upload.decoded.preview], Stopwatch())
                   for row, upload in enumerate(uploads)]
        return BatchQueryResponse(results=results, gallery_size=s.gallery.size, timing_ms=watch.total())

    @app.post("/verify", tags=["query"], response_model=VerifyResponse, dependencies=protected, responses=ERRORS)
    async def verify(
        request: Request,
        image_a: UploadFile = File(..., description="one image"),
        image_b: UploadFile = File(..., description="the other image"),
    ):
        """Are the two images the same person? Their score, and the decision at the same-person threshold (the
        model's calibrated one, or REID_VERIFY_THRESHOLD). The gallery is not involved."""
        s = state(request)
        uploads = await read_uploads([image_a, image_b], settings, s.model.input_size)
        watch = Stopwatch()
        embedding, _ = await s.batcher.embed(pixels_of(uploads), with_maps=False)
        watch.lap("embed")
        score = s.gallery.score(float(embedding[0] @ embedding[1]))  # as a query's: the mean cosine, clipped to [-1, 1]
        rule = s.same_person
        return VerifyResponse(score=score, branch_scores=branch_scores(embedding[1], split_branches(embedding[0], s.model.contract.num_branches)),
                              same_person=rule.decide(score), threshold=rule.threshold,
                              threshold_source=rule.source, calibration=rule.calibration, timing_ms=watch.total())

    def check_steps(s, options: QueryOptions, images: int, aggregate: str) -> None:
        """Optional steps that do not go together (422), then those this model lacks (409)."""
        if options.pair_attention and options.group_by_person:
            raise APIError(422, "invalid_request", GROUP_BY_REORDERED)
        if options.pair_attention and images > 1:
            raise APIError(422, "invalid_request", "pair_attention compares one query image's maps with each match's: not for a track")
        if options.rerank and images > 1 and aggregate == "best":
            raise APIError(422, "invalid_request", "rerank re-ranks around one query embedding: for a track, use aggregate=mean")
        if options.pair_attention:
            check_pair_attention(s, options.rerank)

    async def answer(s, options: QueryOptions, vectors: np.ndarray, maps: Optional[ImageMaps], previews: list, watch: Stopwatch) -> QueryResponse:
        """One query's answer from its embedded images. ``vectors`` [V, N*D] are what is searched: one image's
        embedding or a track's mean (V = 1), or each image of a best-of track; ``maps`` and ``previews`` are each
        query image's."""
        shortlist = max(options.top_k, settings.rerank_shortlist) if options.reorders else options.top_k
        hits, sources = await search_index(s.gallery, vectors, shortlist, options)
        found = await s.gallery.read(s.gallery.store.get_many_with_embeddings, [i for i, _ in hits], s.gallery.dim)
        features = split_branches(vectors, s.model.contract.num_branches)  # [V, N, D]
        watch.lap("search")
        live = [(i, score) for i, score in hits if i in found]  # absent: a delete committed, not yet indexed
        ranking, known_maps = [{}] * len(live), {}
        if options.rerank:
            live, ranking = await asyncio.to_thread(rerank_hits, vectors[0], live, found, options.top_k, settings)
            watch.lap("rerank")
        if options.pair_attention:
            live, ranking, known_maps = await pair_rerank(s, vectors[0], maps[0], live, found, options.top_k)
            watch.lap("pair_attention")
        # a best-of track's match is scored, and explained, with the features of the image that gave its score
        features_by_id = {i: features[sources.get(i, 0)] for i, _ in live}
        matches = [match_body(rank, score, *found[i], features_by_id[i], same_person=s.same_person.decide(score), **fields,
                              **({"track_image": sources[i]} if sources else {}))
                   for rank, ((i, score), fields) in enumerate(zip(live, ranking), 1)]
        query_heatmaps = None
        if options.heatmaps:
            query_heatmaps, _ = await asyncio.gather(
                draw_query_heatmaps(features, maps, previews, options.branch_overlays),
                add_heatmaps(s, matches, features_by_id, previews[0], known_maps, options.branch_overlays))
            watch.lap("heatmaps")
        track = len(previews) > 1
        return QueryResponse(matches=matches, query_heatmap=None if track or not query_heatmaps else query_heatmaps[0],
                             track_heatmaps=query_heatmaps if track else None, gallery_size=s.gallery.size, timing_ms=watch.total(),
                             reranked=options.reorders, heatmap_matches=sum(m.heatmap is not None for m in matches))

    async def draw_query_heatmaps(features: np.ndarray, maps: ImageMaps, previews: list, branch_overlays: bool) -> List[Heatmap]:
        """Each query image's map for the features its matches were scored with: the one vector's (an image, a
        track's mean), or with one vector per image (a best-of track) the image's own."""
        per_image = features if len(features) > 1 else [features[0]] * len(previews)
        return list(await asyncio.gather(*(asyncio.to_thread(make_heatmap, per_image[j], maps[j], preview, branch_overlays)
                                           for j, preview in enumerate(previews))))

    def check_pair_attention(s, rerank: bool) -> None:
        if rerank:
            raise APIError(422, "invalid_request", "rerank and pair_attention are two re-rankings of the shortlist: choose one")
        if s.pair_head is None:
            raise APIError(409, "no_pair_head", f"pair_attention needs a pair head: this model ({s.model.path.name}) has none beside it "
                           "and REID_PAIR_HEAD_PATH is unset (a CASN IDE model's export writes <model>.pair_head.npz)")

    async def pair_rerank(s, embedding: np.ndarray, query_maps: ImageMaps, hits: List[Tuple[int, float]], found: dict, top_k: int):
        """CASN's pairwise stage (service.pair_ranking) over the shortlist ``hits``, with their maps (cached, or
        their stored images decoded and re-embedded in one batch): (first ``top_k`` hits, their Match fields,
        {id: maps}, kept so that the heatmaps of those matches need no second model call)."""
        maps = await maps_of(s, [i for i, _ in hits], {})
        hits = [(i, score) for i, score in hits if i in maps]
        ranked, fields = await asyncio.to_thread(rank_shortlist, s.pair_head, embedding, query_maps, hits, found, maps, top_k)
        return ranked, fields, maps

    async def decode_stored(s, ids: List[int], preview: bool) -> Dict[int, DecodedImage]:
        """The stored images of ``ids``, decoded for the model; an id deleted since the search is left out."""
        stored = await s.gallery.read(s.gallery.store.images, ids)
        present = [i for i in ids if i in stored]
        return await asyncio.to_thread(lambda: {i: decode_for_model(stored[i], *s.model.input_size, settings.max_image_pixels, preview=preview)
                                                for i in present})

    async def maps_of(s, ids: List[int], known: Dict[int, ImageMaps], decoded: Optional[Dict[int, DecodedImage]] = None) -> Dict[int, ImageMaps]:
        """Each id's maps: from ``known``, else from the gallery's map cache, the others from one batch of their
        images (``decoded``, or decoded here only for those; then cached). An id deleted since the search is
        left out."""
        cached = s.gallery.map_cache.get([i for i in ids if i not in known])
        metrics.map_cache.labels("hit").inc(len(cached))
        known = {**cached, **known}
        missing = [i for i in ids if i not in known]
        fresh = {}
        if missing:
            decoded = decoded if decoded is not None else await decode_stored(s, missing, preview=False)
            missing = [i for i in missing if i in decoded]
        if missing:
            metrics.map_cache.labels("miss").inc(len(missing))
            _, maps = await s.batcher.embed(np.stack([decoded[i].pixels for i in missing]), with_maps=True)
            fresh = {i: maps[row] for row, i in enumerate(missing)}
            s.gallery.remember_maps(fresh)
        return {i: fresh[i] if i in fresh else known[i] for i in ids if i in fresh or i in known}

    async def add_heatmaps(s, matches: List[Match], features_by_id: Dict[int, np.ndarray], query_image, known_maps: Dict[int, ImageMaps],
                           branch_overlays: bool) -> None:
        """Re-embed the first REID_MAX_HEATMAP_MATCHES matches' stored images in one batch for their feature
        maps (unless ``known_maps`` has them), then draw their RAMs on previews (a top_k=100 query drew 100
        took 3.7 s and answered 17.7 MB), each for the query features it was scored with (``features_by_id``)."""
        chosen = matches[:settings.max_heatmap_matches]
        decoded = await decode_stored(s, [m.id for m in chosen], preview=True)
        gone = {m.id for m in chosen if m.id not in decoded}  # deleted since the search
        matches[:] = [m for m in matches if m.id not in gone]
        chosen = [m for m in chosen if m.id in decoded]
        if not chosen:
            return
        maps = await maps_of(s, [m.id for m in chosen], known_maps, decoded)
        # one worker thread per match: PIL and zlib release the GIL, so the overlays are drawn on every core
        heatmaps = await asyncio.gather(*(asyncio.to_thread(match_heatmap, features_by_id[m.id], maps[m.id], decoded[m.id].preview, m, query_image,
                                                            branch_overlays) for m in chosen))
        for match, heatmap in zip(chosen, heatmaps):
            match.heatmap = heatmap

    return app
