"""What every router shares: the app state once ready (503 before), the API key's declaration in the OpenAPI
schema, and the documented error responses."""

from typing import Optional

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from service.errors import ERROR_SCHEMA, APIError
from service.serving import Serving

ERRORS = {code: ERROR_SCHEMA for code in (400, 401, 404, 409, 413, 422, 503)}
TIME_FORMAT = "ISO 8601 with a time zone (2024-06-01T12:00:00Z) or epoch seconds"

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="needed when REID_API_KEY is set")


async def declare_key(key: Optional[str] = Security(api_key_header)) -> None:
    """Declares the header in the OpenAPI schema; AccessGate checks it, before the body is read."""


PROTECTED = [Depends(declare_key)]


def state(request: Request) -> Serving:
    """The ready service (``service.serving.Serving``); 503 ``not_ready`` while the model or gallery loads."""
    serving = request.app.state.serving
    if serving is None:
        raise APIError(503, "not_ready", "the model or the gallery is still loading")
    return serving
