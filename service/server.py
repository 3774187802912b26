"""The HTTP server: uvicorn with the limits it lacks on slow and greedy clients.

uvicorn times out idle keep-alive connections only: a client that connects and sends nothing, or half its
headers, or half its body, holds its connection (and whatever the server buffered) for ever, and header
bytes are buffered without limit. Its httptools protocol is extended here with

- a header deadline: a request's headers must be complete within ``REID_HEADER_TIMEOUT_S`` of the
  connection opening or of the previous response;
- a body idle timeout: a body must keep arriving; no byte for ``REID_BODY_TIMEOUT_S`` (while the server is
  ready to read) closes the connection;
- a header size limit (``REID_MAX_HEADER_BYTES``, answered 431);
- a connection limit (``REID_MAX_CONNECTIONS``): a connection opened past it has its request answered 503;
- uvicorn's own plain-text 400 for unparsable HTTP answered in the API's error shape.

A late client's connection is closed without an answer (it is not reading one).
"""
from dataclasses import dataclass
from http import HTTPStatus
from typing import Optional, Tuple

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.errors import error_bytes, send_error
from service.settings import Settings


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_header_bytes: int
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> "ConnectionLimits":
        return cls(settings.header_timeout_s, settings.body_timeout_s, settings.max_header_bytes, settings.max_connections)


def refusal(status: int, code: str, message: str, *headers: Tuple[bytes, bytes]):
    """An ASGI app that answers every request with this error and closes the connection."""
    async def refuse(scope, receive, send) -> None:
        await send_error(send, status, code, message, [(b"connection", b"close"), *headers])
    return refuse


def raw_error(status: int, code: str, message: str) -> bytes:
    """A whole HTTP response in the API's error shape, for the protocol to write before any app runs."""
    body = error_bytes(code, message)
    head = (f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    return head.encode() + body


class LimitedHttpProtocol(HttpToolsProtocol):
    limits: ConnectionLimits  # set on the subclass that protocol_class makes

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watchdog = None
        self._reading_headers, self._header_bytes = False, 0
        self._waiting_since = self._last_data = self.loop.time()
        if len(self.connections) > self.limits.max_connections:  # this connection's request gets 503, then it is closed
            message = f"more than REID_MAX_CONNECTIONS={self.limits.max_connections} connections are open"
            self.app = refusal(503, "overloaded", message, (b"retry-after", b"1"))
        self._watch(self.limits.header_timeout_s)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_data = self.loop.time()
        super().data_received(data)
        if self._reading_headers and not self.transport.is_closing():  # the parser keeps incomplete headers in memory: bound them
            self._header_bytes += len(data)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(431, "headers_too_large", self._headers_too_large)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers, self._header_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        app = self.app
        if len(self.url) + sum(len(name) + len(value) for name, value in self.headers) > self.limits.max_header_bytes:
            self.app = refusal(431, "headers_too_large", self._headers_too_large)  # for this request only
        try:
            super().on_headers_complete()
        finally:
            self.app = app
        self._watch(self.limits.body_timeout_s)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._waiting_since = self.loop.time()
            self._watch(self.limits.header_timeout_s)

    def send_400_response(self, msg: str) -> None:
        self._refuse(400, "invalid_http", msg)

    def _refuse(self, status: int, code: str, message: str) -> None:
        if self.cycle is None or self.cycle.response_complete:  # never inside another response's bytes
            self.transport.write(raw_error(status, code, message))
        self.transport.close()

    @property
    def _headers_too_large(self) -> str:
        return f"request headers over REID_MAX_HEADER_BYTES={self.limits.max_header_bytes} bytes"

    def _watch(self, delay: float) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = self.loop.call_later(delay, self._check_deadlines)

    def _check_deadlines(self) -> None:
        """Close the connection if its client is late; else look again when it next could be."""
        self._watchdog = None
        now, cycle = self.loop.time(), self.cycle
        if cycle is None or cycle.response_complete:  # between requests: the next one's headers are due
            left = self._waiting_since + self.limits.header_timeout_s - now
        elif cycle.more_body:  # reading a body
            if self.flow.read_paused:  # the app has not taken what came: the server is behind, not the client
                self._last_data = now
            left = self._last_data + self.limits.body_timeout_s - now
        else:  # the app has the whole request; on_response_complete watches again
            return
        if left <= 0:
            self.transport.close()
        else:
            self._watch(left)


def protocol_class(settings: Settings) -> type:
    """uvicorn's ``http`` argument: LimitedHttpProtocol with these settings' limits."""
    return type("LimitedHttpProtocol", (LimitedHttpProtocol,), {"limits": ConnectionLimits.from_settings(settings)})
