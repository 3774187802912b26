"""Who may call the API, decided from the request's headers before any of its body is read.

- The API key (``REID_API_KEY``): every route but the public ones needs header ``X-API-Key``. A request
  without it is answered 401 at once: its body is never received, parsed or spooled to disk.
- Writes from other web sites (CSRF): a browser attaches ``Origin`` (and ``Sec-Fetch-Site``) to every
  cross-origin POST, and a form on any page can post to a service with no key on the user's machine or
  network. A write whose Origin is neither this server's host nor in ``REID_ALLOWED_ORIGINS`` is refused with
  403; clients that are not browsers send no Origin and pass.
- The body's size (``BodyLimit``): over the limit it is refused with 413 by its Content-Length, or as its
  chunks arrive, before it is spooled to disk.
"""

import hmac
from typing import Callable, Iterable, Optional, Tuple
from urllib.parse import urlsplit

from starlette.datastructures import Headers

from service.errors import send_error

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# Routes anyone may read: health checks, the web page (it asks for the key itself) and the API's docs.
PUBLIC_PATHS = frozenset({"/", "/healthz", "/readyz", "/openapi.json", "/docs"})
PUBLIC_PREFIXES = ("/static/",)
Refusal = Tuple[int, str, str]


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def same_host(origin: str, host: Optional[str]) -> bool:
    """Origin ``scheme://host[:port]`` names the Host the request was sent to. The scheme is left out: behind
    a TLS proxy the page is https while this server sees http."""
    return bool(host) and urlsplit(origin).netloc.lower() == host.lower()


class AccessGate:
    """Plain ASGI middleware: refuses by headers alone, before the app (and its body parser) runs."""

    def __init__(self, app, api_key: Optional[str], allowed_origins: Iterable[str], on_error: Callable[[str], None]):
        self.app, self.on_error = app, on_error
        self.api_key = api_key.encode() if api_key else None
        self.allowed_origins = frozenset(allowed_origins)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        refusal = self.cross_site(scope["method"], headers) or self.unauthorized(scope["path"], headers)
        if refusal is None:
            return await self.app(scope, receive, send)
        status, code, message = refusal
        self.on_error(code)
        await send_error(send, status, code, message)

    def cross_site(self, method: str, headers: Headers) -> Optional[Refusal]:
        if method not in WRITE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is None:  # no browser sends a cross-origin write without it; Sec-Fetch-Site is the back-up
            foreign = headers.get("sec-fetch-site") in ("cross-site", "same-site")
        else:
            foreign = origin not in self.allowed_origins and not same_host(origin, headers.get("host"))
        if not foreign:
            return None
        return (
            403,
            "cross_site_request",
            (
                f"a {method} from another web site ({origin or 'Sec-Fetch-Site'}) is "
                f"refused; "
                "allow its origin with REID_ALLOWED_ORIGINS"
            ),
        )

    def unauthorized(self, path: str, headers: Headers) -> Optional[Refusal]:
        if self.api_key is None or is_public(path):
            return None
        given = headers.get("x-api-key", "").encode()
        if given and hmac.compare_digest(given, self.api_key):
            return None
        return 401, "unauthorized", "missing or wrong X-API-Key header"


class NoFraming:
    """Every answer forbids other sites to frame it (X-Frame-Options, and CSP frame-ancestors for browsers that
    follow only that): a page inside another site's invisible frame could have its delete buttons clicked."""

    HEADERS = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'")]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def guarded(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        await self.app(scope, receive, guarded)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413 before they are spooled to disk: by Content-Length
    when the client sends one, else by counting the chunks as they arrive."""

    def __init__(self, app, limit: int, on_error):
        self.app, self.limit, self.on_error = app, limit, on_error

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(send)
        received = 0
        too_large = False

        async def counting_receive():
            nonlocal received, too_large
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                too_large = True
                raise _BodyTooLarge()
            return message

        async def guarded_send(message):
            # The body parser turns our exception into its own error response: answer 413 in its place.
            if not too_large:
                await send(message)
            elif message["type"] == "http.response.start":
                await self._refuse(send)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except _BodyTooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        self.on_error("payload_too_large")
        await send_error(send, 413, "payload_too_large", f"request body over {self.limit} bytes")


class _BodyTooLarge(Exception):
    pass
