"""Prometheus metrics, one registry per app so tests can run several apps in one process."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.latency = Histogram("reid_request_seconds", "Request latency by route", ["route", "method", "status"], registry=self.registry, buckets=LATENCY_BUCKETS)
        self.batch_size = Histogram("reid_batch_size", "Images per model call", registry=self.registry, buckets=BATCH_BUCKETS)
        self.queue_wait = Histogram("reid_queue_wait_seconds", "Time a request's images waited for a model call", registry=self.registry, buckets=LATENCY_BUCKETS)
        self.gallery_size = Gauge("reid_gallery_items", "Items in the gallery", registry=self.registry)
        self.errors = Counter("reid_errors_total", "Error responses by code", ["code"], registry=self.registry)

    def observe_batch(self, size: int, waits) -> None:
        self.batch_size.observe(size)
        for wait in waits:
            self.queue_wait.observe(wait)

    def render(self) -> bytes:
        return generate_latest(self.registry)
