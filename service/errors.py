"""One JSON error shape for every failure: ``{"error": {"code": str, "message": str}}``."""

import json
import logging
import sqlite3
from typing import Dict, Iterable, Tuple, Type

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from service.batching import Overloaded
from service.validation import InvalidValue

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


def error_bytes(code: str, message: str) -> bytes:
    return json.dumps(error_body(code, message)).encode()


async def send_error(send, status: int, code: str, message: str, headers: Iterable[Tuple[bytes, bytes]] = ()) -> None:
    """Answer in the one error shape from plain ASGI code: middleware that runs before FastAPI's handlers."""
    body = error_bytes(code, message)
    start_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *headers]
    await send({"type": "http.response.start", "status": status, "headers": start_headers})
    await send({"type": "http.response.body", "body": body})


ERROR_SCHEMA = {
    "description": "Error",
    "content": {
        "application/json": {"example": error_body("invalid_image", "upload 0 (a.jpg): not a recognised image format")}
    },
}

# 400 from the framework: a body that cannot be parsed (multipart without a boundary, broken multipart)
HTTP_CODES = {
    400: "invalid_body",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def allowed_methods(request: Request) -> str:
    """The Allow header of a 405: the methods of every route on the request's path (each method has its own
    route, so the one that raised knows only its own), HEAD wherever GET is."""
    methods = set()
    for route in request.app.router.routes:
        if route.matches(request.scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    if "GET" in methods:
        methods.add("HEAD")
    return ", ".join(sorted(methods))


def install_error_handlers(
    app: FastAPI, on_error=lambda code: None, backend_errors: Dict[Type[Exception], Tuple[int, str]] = {}
) -> None:
    """``backend_errors``: the gallery backend's own exceptions, each answered with (status, code) and its message."""

    def respond(status: int, code: str, message: str, headers=None) -> JSONResponse:
        on_error(code)
        return JSONResponse(error_body(code, message), status_code=status, headers=headers)

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError):
        return respond(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return respond(422, "invalid_request", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = allowed_methods(request)
        return respond(exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail), headers)

    @app.exception_handler(InvalidValue)
    async def invalid_value(_: Request, exc: InvalidValue):  # the store's own last check (service.validation)
        return respond(422, "invalid_request", str(exc))

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded):
        return respond(503, "overloaded", str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(sqlite3.OperationalError)
    async def storage_error(_: Request, exc: sqlite3.OperationalError):
        # disk full, I/O error, read-only file: the server's trouble, not the request's; nothing was written
        log.error("gallery store: %s", exc)
        return respond(503, "storage_unavailable", f"the gallery store refused the write: {exc}")

    for error_type, (status, code) in backend_errors.items():

        async def backend_error(_: Request, exc: Exception, status=status, code=code):
            log.error("gallery backend: %s", exc)
            return respond(status, code, f"the gallery backend: {exc}")

        app.add_exception_handler(error_type, backend_error)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        # Starlette re-raises after this answer and uvicorn then drops the connection: say so, or the
        # client's next request on it would meet a reset instead of an answer.
        return respond(500, "internal", "internal error", headers={"Connection": "close"})
