"""Opt-in OpenTelemetry tracing over HTTP: a request carrying a W3C traceparent is traced in that trace."""

import re

from harness.server import ServiceProcess

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def test_a_traced_request_continues_the_callers_trace(tiny_model, tmp_path):
    _, onnx_path = tiny_model
    server = ServiceProcess(onnx_path, tmp_path / "gallery.sqlite3", tracing="console")
    with server, server.client() as client:
        assert client.get("/model", headers={"traceparent": TRACEPARENT}).status_code == 200
    spans = server.output()
    assert f'"trace_id": "0x{TRACE_ID}"' in spans and '"service.name": "reid-service"' in spans
    assert re.search(r'"name": "GET /model', spans)


def test_tracing_is_off_by_default(tiny_model, tmp_path):
    _, onnx_path = tiny_model
    server = ServiceProcess(onnx_path, tmp_path / "gallery.sqlite3")
    with server, server.client() as client:
        client.get("/model", headers={"traceparent": TRACEPARENT})
    assert TRACE_ID not in server.output()
