"""Prometheus metrics, one registry per app so tests can run several apps in one process, and the ASGI
middleware that times every request by route."""

import time
from importlib import metadata

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "reid_request_seconds",
            "Request latency by route",
            ["route", "method", "status"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "reid_batch_size", "Images per model call", registry=self.registry, buckets=BATCH_BUCKETS
        )
        self.model_seconds = Histogram(
            "reid_model_seconds",
            "Time of each model call (its sum over wall time: how busy the model is)",
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.queue_wait = Histogram(
            "reid_queue_wait_seconds",
            "Time a request's images waited for a model call",
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self.gallery_size = Gauge("reid_gallery_items", "Items in the gallery", registry=self.registry)
        self.errors = Counter("reid_errors_total", "Error responses by code", ["code"], registry=self.registry)
        self.erased = Counter(
            "reid_erased_items_total",
            "Gallery items removed: by DELETE /gallery/{id} (item), "
            "DELETE /persons/{id} (person), "
            "or REID_RETENTION_DAYS (retention)",
            ["reason"],
            registry=self.registry,
        )
        self.build_info = Gauge(
            "reid_build_info",
            "Always 1; what is running: package version, model, ONNX Runtime provider",
            ["version", "model_fingerprint", "architecture", "provider"],
            registry=self.registry,
        )
        self.map_cache = Counter(
            "reid_heatmap_map_cache_total",
            "Matches whose feature maps a heatmap took from the cache (hit), from the store (stored, "
            "service.stored_maps) or from a model call (miss)",
            ["result"],
            registry=self.registry,
        )
        self.map_cache_bytes = Gauge(
            "reid_heatmap_map_cache_bytes",
            "Memory the cached feature maps take (REID_HEATMAP_CACHE_MB bounds it)",
            registry=self.registry,
        )
        self.queued_images = Gauge(
            "reid_queued_images",
            "Images waiting for a model call now (REID_MAX_QUEUED_IMAGES bounds it)",
            registry=self.registry,
        )

    def describe_build(self, model) -> None:
        """reid_build_info{...} 1 for the loaded model, the one time series that says what answers."""
        self.build_info.labels(
            package_version(), model.fingerprint, model.contract.architecture, model.providers.active
        ).set(1)

    def observe_batch(self, size: int, waits, model_seconds: float) -> None:
        self.batch_size.observe(size)
        self.model_seconds.observe(model_seconds)
        for wait in waits:
            self.queue_wait.observe(wait)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def package_version() -> str:
    try:
        return metadata.version("reid-retrieval")
    except metadata.PackageNotFoundError:  # run from a source tree without installing it
        return "unknown"


class RequestTimer:
    """Plain ASGI middleware (Starlette's ``BaseHTTPMiddleware`` costs a task group and streams per request):
    observes each HTTP request's latency under its route template, method and status."""

    def __init__(self, app, latency: Histogram):
        self.app, self.latency = app, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500  # what the client gets when the app raises before answering

        async def timed_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            route = scope.get("route")  # set on this scope by the router once it has matched
            path = route.path if route is not None else "unmatched"
            self.latency.labels(path, scope["method"], str(status)).observe(time.perf_counter() - started)
