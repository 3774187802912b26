"""Opt-in OpenTelemetry tracing (``REID_TRACING``): a span per HTTP request from the FastAPI instrumentation,
continuing the caller's trace when the request carries a W3C ``traceparent`` header, so a query shows up
inside the trace of the camera pipeline that sent it. ``console`` prints finished spans on stdout (for a
look, and the tests); ``otlp`` sends them over OTLP/HTTP to the collector that the standard
``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) names, batched. Off by default: nothing is
imported then."""

from fastapi import FastAPI

SERVICE_NAME = "reid-service"


def install_tracing(app: FastAPI, mode: str) -> None:
    if mode == "off":
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": SERVICE_NAME}))
    if mode == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
