"""The outermost ASGI layer of `cliprec serve` (metrics, body cap, body deadline) and admission.

Admission is a FastAPI dependency of the work routes, not part of the middleware: FastAPI resolves it
after it has read the request's form, so a request counts against `max_inflight` only once its body
has arrived. Counted before the body (as it once was), 64 connections trickling a body byte every 5 s
held every slot and every search got 503.
"""

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cliprec.serve.metrics import Metrics, route_label
from cliprec.serve.settings import ServeSettings

CLOSE = {"Connection": "close"}  # the rest of the body is not read: the connection cannot be reused


async def _send_json(
    send: Send, status: int, payload: dict, headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    body = JSONResponse(payload).body
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _BodyRefused(StarletteHTTPException):
    """Raised from `receive` (body too large or too slow); FastAPI lets HTTPExceptions through."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(status, detail, headers=CLOSE)


class Admission:
    """At most `max_inflight` requests to the work routes at once; the next one gets 503 + Retry-After."""

    def __init__(self, settings: ServeSettings, metrics: Metrics) -> None:
        self.max_inflight = settings.max_inflight
        self.retry_after = str(settings.retry_after_s)
        self.metrics = metrics
        self.in_flight = 0  # event-loop state: only touched from coroutines, no lock needed

    async def slot(self) -> AsyncIterator[None]:
        """FastAPI dependency: hold one slot while the route works (after its body was read)."""
        if self.in_flight >= self.max_inflight:
            self.metrics.rejected.labels("saturated").inc()
            raise StarletteHTTPException(
                503,
                f"busy: {self.in_flight} requests in flight; retry shortly",
                headers={"Retry-After": self.retry_after},
            )
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            yield
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()


class GuardMiddleware:
    """Outermost layer: metrics for every request, body cap (413) and deadline (408)."""

    def __init__(self, app: ASGIApp, settings: ServeSettings, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # the upload plus the other form fields and multipart framing
        self.max_body = settings.max_upload_bytes + 64 * 1024
        self.body_timeout_s = settings.body_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = {"code": 500}

        async def send_status(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                self.metrics.rejected.labels("too_large").inc()
                await _send_json(
                    send_status,
                    413,
                    {"error": f"request body larger than {self.max_body} B"},
                    [(b"connection", b"close")],
                )
                return
            await self.app(scope, self._guarded(receive), send_status)
        except _BodyRefused as e:  # raised outside a route (FastAPI's handlers answer it inside one)
            if status["code"] == 500:  # nothing sent yet
                await _send_json(send_status, e.status_code, {"error": e.detail}, [(b"connection", b"close")])
        finally:
            route = route_label(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status["code"])).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - t0)

    def _guarded(self, receive: Receive) -> Receive:
        """`receive` that counts the body against the cap and ends it at the deadline."""
        seen = 0
        body_done = False
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def guarded() -> Message:
            nonlocal seen, body_done
            if body_done:  # after the body, receive only waits for a disconnect: no deadline
                return await receive()
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                self.metrics.rejected.labels("body_timeout").inc()
                late = f"request body not complete within {self.body_timeout_s:g} s"
                raise _BodyRefused(408, late) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if seen > self.max_body:
                    self.metrics.rejected.labels("too_large").inc()
                    raise _BodyRefused(413, f"request body larger than {self.max_body} B")
            return message

        return guarded
