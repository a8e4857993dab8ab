"""Connection-level limits of `cliprec serve`: a small subclass of uvicorn's httptools protocol.

Why a subclass, and why httptools: uvicorn's options cover only part of what a hostile client needs.
Its httptools parser has no header-size limit (one connection streaming never-ending headers grew the
server by 600 MiB), its keep-alive timer starts only after a first response (a connection that never
sends a byte stays open for ever), there is no deadline for a request head or body, and
`limit_concurrency` answers 503 per request but still accepts every connection until the process runs
out of file descriptors. uvicorn's h11 parser caps the head size (`h11_max_incomplete_event_size`),
but it has none of the deadlines either, and measured here it answered fewer text searches than
httptools (interleaved A/B runs: docs/serving.md, Connection limits). So this class keeps httptools
(its own cost measured there too) and adds, per connection:

- a cap on open connections, set below the file-descriptor limit: past it a connection gets 503 and is
  closed at once, counted and logged (at most one line per 10 s);
- the idle timeout (uvicorn's `timeout_keep_alive`) also before the first request;
- a deadline for the request head, from its first byte; a cap on its size (431 past it): what a
  connection holds of an unfinished head is at most the cap plus one read;
- a deadline for the request body (a backstop: GuardMiddleware answers 408 at the same deadline while
  the app reads the body; this closes connections whose body nobody reads, e.g. one that trickles on
  after its response was sent);
- one-line JSON for parser errors (400) and for every answer above;
- at a graceful stop, requests still arriving are dropped at once instead of being waited for.

It relies on uvicorn internals (the parser callbacks and attributes of `HttpToolsProtocol`);
tests/test_serve_hostile_conn.py drives a real `cliprec serve` through each of them.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
import time
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from cliprec.serve.metrics import Metrics
from cliprec.serve.settings import ServeSettings

log = logging.getLogger("cliprec.serve")

BODY_BACKSTOP_S = 1.0  # past GuardMiddleware's body deadline, so that its 408 goes first
REFUSAL_LOG_EVERY_S = 10.0


class RefusalLog:
    """Logs refused connections: the first at once, then at most one line per period with the count."""

    def __init__(self, every_s: float = REFUSAL_LOG_EVERY_S) -> None:
        self.every_s = every_s
        self.last = float("-inf")
        self.unlogged = 0
        self.flush_at: Any = None  # a timer that reports what was refused since the last line

    def refused(self, loop: asyncio.AbstractEventLoop, open_now: int, cap: int) -> None:
        """Count one refusal; log now when the period has passed, else once it has."""
        self.unlogged += 1
        wait = self.last + self.every_s - time.monotonic()
        if wait <= 0:
            self.flush(open_now, cap)
        elif self.flush_at is None:
            self.flush_at = loop.call_later(wait, self.flush, open_now, cap)

    def flush(self, open_now: int, cap: int) -> None:
        """Log the refusals not yet reported."""
        if self.flush_at is not None:
            self.flush_at.cancel()
            self.flush_at = None
        if self.unlogged:
            log.warning(
                "serve: connection cap reached (%d open, --max-connections %d): refused %d connection(s)"
                " since the last report",
                open_now,
                cap,
                self.unlogged,
            )
        self.last, self.unlogged = time.monotonic(), 0


def json_response(status: int, message: str, extra: list[tuple[bytes, bytes]]) -> bytes:
    """A complete HTTP/1.1 response with a one-line JSON error body that closes the connection."""
    body = json.dumps({"error": message}, separators=(",", ":")).encode()  # as the app's JSONResponse
    head = [f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}".encode()]
    head += [name + b": " + value for name, value in extra]
    head += [b"content-type: application/json", b"content-length: " + str(len(body)).encode()]
    head += [b"connection: close"]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a connection cap, head/body deadlines and a head size cap."""

    settings: ClassVar[ServeSettings]
    metrics: ClassVar[Metrics]
    max_connections: ClassVar[int]
    refusals: ClassVar[RefusalLog]

    @classmethod
    def configured(
        cls, settings: ServeSettings, metrics: Metrics, max_connections: int
    ) -> type[GuardedProtocol]:
        """A subclass bound to these limits (uvicorn instantiates the class it is given)."""
        attrs = {
            "settings": settings,
            "metrics": metrics,
            "max_connections": max_connections,
            "refusals": RefusalLog(),
        }
        return type(cls.__name__, (cls,), attrs)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._head_timer: Any = None
        self._body_timer: Any = None
        self._in_head = False  # a request head has begun and is not complete
        self._in_body = False  # a head is complete, its body is not
        self._head_bytes = 0

    # --- connections ---------------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        """Accept, or refuse past the cap; start the idle timer (uvicorn starts it after a response)."""
        super().connection_made(transport)
        self.metrics.connections.set(len(self.connections))
        if len(self.connections) > self.max_connections:
            self.metrics.rejected.labels("connections").inc()
            self.refusals.refused(self.loop, len(self.connections) - 1, self.max_connections)
            self._refuse(503, "too many connections; retry shortly", [(b"retry-after", b"1")])
            return
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        """Also stop this connection's deadlines."""
        self._cancel_timers()
        super().connection_lost(exc)
        self.metrics.connections.set(len(self.connections))

    def data_received(self, data: bytes) -> None:
        """Feed the parser; start the head deadline at a head's first byte, cap the head's size."""
        if not self._in_head and not self._in_body:
            self._start_head()  # also bytes the parser skips (blank lines) start a head's deadline
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            self._head_bytes += len(data)  # may count a pipelined body's tail too: only ever more
            if self._head_bytes > self.settings.max_header_bytes:
                self.metrics.rejected.labels("header_too_large").inc()
                limit = self.settings.max_header_bytes
                self._refuse(431, f"request head larger than {limit} B")

    def shutdown(self) -> None:
        """Graceful stop: a request still arriving is dropped at once (slow clients would hold the stop
        for `graceful_s`); a request being answered finishes."""
        arriving = self._in_head or (self._in_body and not (self.cycle and self.cycle.response_started))
        if arriving and not self.transport.is_closing():
            self._cancel_timers()
            self.transport.close()
            return
        super().shutdown()

    def send_400_response(self, msg: str) -> None:
        """A parser error: one line of JSON instead of uvicorn's plain text."""
        self.metrics.rejected.labels("bad_request").inc()
        self._refuse(400, "invalid HTTP request")

    # --- parser callbacks ----------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        """A request begins (maybe pipelined behind the previous one in the same read)."""
        super().on_message_begin()
        if not self._in_head:
            self._start_head()

    def on_headers_complete(self) -> None:
        """The head is in: its deadline ends, the body's begins."""
        self._in_head, self._in_body = False, True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        self._body_timer = self.loop.call_later(
            self.settings.body_timeout_s + BODY_BACKSTOP_S, self._body_timed_out
        )
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        """The body is in."""
        self._in_body = False
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    # --- deadlines -----------------------------------------------------------------------------------

    def _start_head(self) -> None:
        self._in_head, self._head_bytes = True, 0
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.settings.header_timeout_s, self._head_timed_out)

    def _head_timed_out(self) -> None:
        self._head_timer = None
        self.metrics.rejected.labels("header_timeout").inc()
        self._refuse(408, f"request head not complete within {self.settings.header_timeout_s:g} s")

    def _body_timed_out(self) -> None:
        self._body_timer = None
        self.metrics.rejected.labels("body_timeout").inc()
        self._refuse(408, f"request body not complete within {self.settings.body_timeout_s:g} s")

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    def _refuse(self, status: int, message: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
        """Answer with one line of JSON and close the connection; only close it during a body (the app
        answers that request, or has already)."""
        in_body = self._in_body
        self._cancel_timers()
        if self.transport.is_closing():
            return
        if not in_body and (self.cycle is None or self.cycle.response_complete):
            headers = list(self.server_state.default_headers) + (extra or [])
            self.transport.write(json_response(status, message, headers))
        self.transport.close()
