"""One JSON error shape for every failure: ``{"error": {"code": str, "message": str}}``."""
import logging
import sqlite3

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.batching import Overloaded

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def error_body(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}


ERROR_SCHEMA = {
    "description": "Error",
    "content": {"application/json": {"example": error_body("invalid_image", "upload 0 (a.jpg): not a recognised image format")}},
}

HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def install_error_handlers(app: FastAPI, on_error=lambda code: None) -> None:
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
    async def http_error(_: Request, exc: StarletteHTTPException):
        return respond(exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(Overloaded)
    async def overloaded(_: Request, exc: Overloaded):
        return respond(503, "overloaded", str(exc), headers={"Retry-After": "1"})

    @app.exception_handler(sqlite3.OperationalError)
    async def storage_error(_: Request, exc: sqlite3.OperationalError):
        # disk full, I/O error, read-only file: the server's trouble, not the request's; nothing was written
        log.error("gallery store: %s", exc)
        return respond(503, "storage_unavailable", f"the gallery store refused the write: {exc}")

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception):
        log.exception("unhandled error")
        return respond(500, "internal", "internal error")
