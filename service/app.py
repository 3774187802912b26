"""The FastAPI app: settings and metrics, the lifespan (load the model, open the gallery, start the batcher
and the retention loop), the middleware, and the routes of ``service.routes``. Who may call and how big a body
may be: ``access``; uploads into model input: ``uploads``; a query's answer: ``answering``."""

import asyncio
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Dict, Optional, Tuple

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware
from swagger_ui_bundle import swagger_ui_path

from service.access import AccessGate, BodyLimit, NoFraming
from service.answering import QueryAnswerer
from service.match_maps import MatchMaps
from service.batching import MicroBatcher
from service.errors import install_error_handlers
from service.gallery import Gallery, GalleryBase
from service.http_contract import HeadAsGet
from service.inference import InferenceModel
from service.metrics import RequestTimer, ServiceMetrics
from service.multipart import install_strict_form_parsing
from service.pair_ranking import load_pair_head
from service.retention import purge_expired, retention_loop
from service.routes import gallery as gallery_routes, health, query
from service.serving import Serving
from service.settings import Settings
from service.store import GalleryStore
from service.tracing import install_tracing
from service.uploads import ImageDecoder, return_large_buffers_to_the_os
from service.verification import SamePersonRule

STATIC_DIR = Path(__file__).parent / "static"


def cluster_backend():
    """``service.cluster_gallery``, imported only when REID_GALLERY_BACKEND=cluster asks for it: its clients
    (psycopg, pymilvus) are the [cluster] extra's."""
    try:
        from service import cluster_gallery
    except ImportError as exc:
        raise RuntimeError(
            f"REID_GALLERY_BACKEND=cluster needs the [cluster] extra ({exc.name} is missing): "
            "pip install -e '.[cpu,cluster]' (or [gpu,cluster])"
        ) from exc
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
    return {
        **{error: (503, "storage_unavailable") for error in backend.UNAVAILABLE_ERRORS},
        backend.ModelChanged: (409, "model_changed"),
    }


def install_middleware(app: FastAPI, settings: Settings, metrics: ServiceMetrics) -> None:
    """The error handlers (one JSON shape, each error counted) and the middleware, outermost last."""

    def count_error(code: str) -> None:
        metrics.errors.labels(code).inc()

    install_error_handlers(app, on_error=count_error, backend_errors=backend_errors(settings))
    body_limit = settings.max_images_per_request * settings.max_image_bytes + 1024 * 1024
    app.add_middleware(BodyLimit, limit=body_limit, on_error=count_error)
    # outside BodyLimit: a request refused by its headers is refused before its size is even looked at
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(AccessGate, api_key=api_key, allowed_origins=settings.origins, on_error=count_error)
    if settings.origins:  # outside the gate: a CORS preflight carries no API key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["X-API-Key"],
            expose_headers=["Retry-After"],
            max_age=600,
        )

    app.add_middleware(RequestTimer, latency=metrics.latency)
    app.add_middleware(HeadAsGet)
    app.add_middleware(NoFraming)  # outermost: refusals by the gate or the body limit carry the headers too
    install_tracing(app, settings.tracing)


def create_app(settings: Optional[Settings] = None) -> FastAPI:
    settings = settings or Settings()
    metrics = ServiceMetrics()
    install_strict_form_parsing()
    return_large_buffers_to_the_os()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        model = InferenceModel(
            settings.model_path,
            settings.execution_provider,
            settings.intra_op_threads,
            settings.model_instances,
            settings.model_precision,
            settings.tensorrt_cache_dir or settings.store_path.parent / "tensorrt-cache",
            settings.max_batch_size,
        ).load()
        pair_head = load_pair_head(settings, model)
        same_person = SamePersonRule.choose(model.contract, settings.verify_threshold)
        gallery = await asyncio.to_thread(new_gallery, settings, model)
        await asyncio.to_thread(gallery.open)
        await gallery.start()
        retention = None
        if settings.retention_days:  # purged before ready: nothing expired is ever served
            await purge_expired(gallery, settings.retention_days, metrics)
            retention = asyncio.create_task(retention_loop(gallery, settings, metrics))
        batcher = MicroBatcher(
            model,
            settings.max_batch_size,
            settings.max_batch_wait_ms / 1000,
            model.instances,
            settings.max_queued_images,
            metrics.observe_batch,
        )
        await batcher.start()
        maps = MatchMaps(settings, metrics, model, gallery, batcher)
        answerer = QueryAnswerer(settings, metrics, model, gallery, maps, pair_head, same_person)
        serving = Serving(
            settings, metrics, model, gallery, batcher, ImageDecoder(settings), answerer, pair_head, same_person
        )
        metrics.gallery_size.set(gallery.size)
        metrics.describe_build(model)
        metrics.queued_images.set_function(batcher.queued_images)
        metrics.map_cache_bytes.set_function(lambda: maps.cache.bytes)
        app.state.serving = serving
        try:
            yield
        finally:
            app.state.serving = None
            if retention:
                retention.cancel()
                await asyncio.gather(retention, return_exceptions=True)
            await batcher.stop()
            await gallery.stop()
            gallery.close()
            serving.decoder.close()

    app = FastAPI(
        title="Person re-ID retrieval",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # a redirect would be built from the request's Host header: /gallery/ is a 404
        description="Enrol pedestrian crops, query with one, get ranked matches with Ranking Activation Map heatmaps. "
        'Every error is {"error": {"code", "message"}}.',
    )
    # settings and metrics from the start (the error handlers and /metrics need them); the rest once ready
    app.state.settings, app.state.metrics, app.state.serving = settings, metrics, None

    install_middleware(app, settings, metrics)
    # The API reference (Swagger UI) served from the installed swagger-ui-bundle, not a CDN: it works offline.
    # Mounted before /static, which would otherwise take its paths.
    app.mount("/static/swagger-ui", StaticFiles(directory=swagger_ui_path), name="swagger-ui")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/docs", include_in_schema=False)
    async def api_reference():
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title=f"{app.title}: API reference",
            swagger_favicon_url="static/favicon.svg",
            swagger_js_url="static/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="static/swagger-ui/swagger-ui.css",
        )

    @app.get("/", include_in_schema=False)
    async def page():
        """The search page (plain static files; it asks for the API key itself when one is needed)."""
        return FileResponse(STATIC_DIR / "index.html")

    for routes in (health, gallery_routes, query):
        routes.add_routes(app)
    return app
