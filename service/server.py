"""The HTTP server: uvicorn with the limits it lacks on slow and greedy clients.

uvicorn times out idle keep-alive connections only: a client that connects and sends nothing, or half its
headers, or half its body, holds its connection (and whatever the server buffered) for ever, and header
bytes are buffered without limit. Its httptools protocol is extended here with

- a header deadline: a request's headers must be complete within ``REID_HEADER_TIMEOUT_S`` of the
  connection opening or of the previous response;
- a body idle timeout and rate: a body must keep arriving; no byte for ``REID_BODY_TIMEOUT_S``, or fewer than
  ``REID_MIN_BODY_BYTES_PER_S`` on average over such a window (while the server is ready to read), closes the
  connection;
- a header size limit (``REID_MAX_HEADER_BYTES``, answered 431), counted per request, so that many small
  pipelined requests in one write are not taken for one large one;
- connection limits, in all (``REID_MAX_CONNECTIONS``) and per client address
  (``REID_MAX_CONNECTIONS_PER_CLIENT``): a connection opened past either has its request answered 503;
- uvicorn's own plain-text 400 for unparsable HTTP answered in the API's error shape.

A late client's connection is closed without an answer (it is not reading one).
"""

from collections import Counter
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
    max_connections_per_client: int = 0
    min_body_bytes_per_s: int = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> "ConnectionLimits":
        return cls(
            settings.header_timeout_s,
            settings.body_timeout_s,
            settings.max_header_bytes,
            settings.max_connections,
            settings.max_connections_per_client,
            settings.min_body_bytes_per_s,
        )


def refusal(status: int, code: str, message: str, *headers: Tuple[bytes, bytes]):
    """An ASGI app that answers every request with this error and closes the connection."""

    async def refuse(scope, receive, send) -> None:
        await send_error(send, status, code, message, [(b"connection", b"close"), *headers])

    return refuse


def raw_error(status: int, code: str, message: str) -> bytes:
    """A whole HTTP response in the API's error shape, for the protocol to write before any app runs."""
    body = error_bytes(code, message)
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class LimitedHttpProtocol(HttpToolsProtocol):
    limits: ConnectionLimits  # set on the subclass that protocol_class makes
    open_per_client: Counter  # client address -> open connections, shared by the server's connections

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._watchdog = None
        self._reading_headers, self._header_bytes = False, 0
        self._waiting_since = self._last_data = self.loop.time()
        self._body_window = (self._last_data, 0)  # (start, bytes since): the body's rate is checked per window
        peer = transport.get_extra_info("peername")
        self._client = peer[0] if isinstance(peer, tuple) and self.limits.max_connections_per_client else None
        if self._client is not None:
            self.open_per_client[self._client] += 1
        if len(self.connections) > self.limits.max_connections:  # this connection's request gets 503, then it is closed
            self._refuse_requests(f"more than REID_MAX_CONNECTIONS={self.limits.max_connections} connections are open")
        elif self._client is not None and self.open_per_client[self._client] > self.limits.max_connections_per_client:
            self._refuse_requests(
                f"more than REID_MAX_CONNECTIONS_PER_CLIENT={self.limits.max_connections_per_client} "
                f"connections are open from this client"
            )
        self._watch(self.limits.header_timeout_s)

    def _refuse_requests(self, message: str) -> None:
        self.app = refusal(503, "overloaded", message, (b"retry-after", b"1"))

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._client is not None:
            self.open_per_client[self._client] -= 1
            if not self.open_per_client[self._client]:
                del self.open_per_client[self._client]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """The parser keeps incomplete headers in memory: bound them. Headers that began in an earlier chunk
        and go on count this whole chunk; headers that began in this one count what the parser has handed
        over of them (URL, header lines) and the partial line it holds, so that requests pipelined before
        them in the chunk do not count."""
        self._last_data = self.loop.time()
        self._body_window = (self._body_window[0], self._body_window[1] + len(data))
        continued, before, self._message_began = self._reading_headers, self._header_bytes, False
        super().data_received(data)
        if self._reading_headers and not self.transport.is_closing():
            if continued and not self._message_began:
                self._header_bytes = before + len(data)
            else:
                self._header_bytes += len(data) - (data.rfind(b"\n") + 1)
            if self._header_bytes > self.limits.max_header_bytes:
                self._refuse(431, "headers_too_large", self._headers_too_large)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_headers, self._header_bytes, self._message_began = True, 0, True

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._header_bytes += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._header_bytes += len(name) + len(value)

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        app = self.app
        if len(self.url) + sum(len(name) + len(value) for name, value in self.headers) > self.limits.max_header_bytes:
            self.app = refusal(431, "headers_too_large", self._headers_too_large)  # for this request only
        try:
            super().on_headers_complete()
        finally:
            self.app = app
        self._body_window = (self.loop.time(), 0)
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
                self._last_data, self._body_window = now, (now, 0)
            if self._body_too_slow(now):
                self.transport.close()
                return
            left = min(self._last_data, self._body_window[0]) + self.limits.body_timeout_s - now
        else:  # the app has the whole request; on_response_complete watches again
            return
        if left <= 0:
            self.transport.close()
        else:
            self._watch(left)

    def _body_too_slow(self, now: float) -> bool:
        """Whether the body's last full window brought fewer bytes than the minimum rate; a new window then."""
        start, received = self._body_window
        if now - start < self.limits.body_timeout_s:
            return False
        self._body_window = (now, 0)
        return received < self.limits.min_body_bytes_per_s * (now - start)


def protocol_class(settings: Settings) -> type:
    """uvicorn's ``http`` argument: LimitedHttpProtocol with these settings' limits."""
    return type(
        "LimitedHttpProtocol",
        (LimitedHttpProtocol,),
        {"limits": ConnectionLimits.from_settings(settings), "open_per_client": Counter()},
    )
