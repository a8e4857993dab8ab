"""The outermost ASGI layer of `cliprec serve`: metrics for every request, body cap, admission."""

import time
from collections.abc import Sequence

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cliprec.serve.metrics import Metrics, route_label
from cliprec.serve.settings import ServeSettings

WORK_PREFIXES = ("/api/search", "/api/products")


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


class _BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once the body passes the cap; FastAPI lets HTTPExceptions through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body larger than {limit} B")


class GuardMiddleware:
    """Outermost layer: metrics for every request, body cap (413), admission to the work routes (503)."""

    def __init__(self, app: ASGIApp, settings: ServeSettings, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        self.max_inflight = settings.max_inflight
        self.retry_after = str(settings.retry_after_s).encode()
        # the upload plus the other form fields and multipart framing
        self.max_body = settings.max_upload_bytes + 64 * 1024
        self.in_flight = 0  # event-loop state: only touched from coroutines, no lock needed

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

        admitted = False
        try:
            length = dict(scope["headers"]).get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_body):
                self.metrics.rejected.labels("too_large").inc()
                await _send_json(send_status, 413, {"error": f"request body larger than {self.max_body} B"})
                return
            if scope["path"].startswith(WORK_PREFIXES):
                if self.in_flight >= self.max_inflight:
                    self.metrics.rejected.labels("saturated").inc()
                    await _send_json(
                        send_status,
                        503,
                        {"error": f"busy: {self.in_flight} requests in flight; retry shortly"},
                        [(b"retry-after", self.retry_after)],
                    )
                    return
                admitted = True
                self.in_flight += 1
                self.metrics.in_flight.inc()
            await self.app(scope, self._capped(receive), send_status)
        except _BodyTooLarge as e:
            self.metrics.rejected.labels("too_large").inc()
            if status["code"] == 500:  # nothing sent yet
                await _send_json(send_status, 413, {"error": e.detail})
        finally:
            if admitted:
                self.in_flight -= 1
                self.metrics.in_flight.dec()
            route = route_label(scope)
            method = scope.get("method", "")
            self.metrics.requests.labels(method, route, str(status["code"])).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - t0)

    def _capped(self, receive: Receive) -> Receive:
        seen = 0
        limit = self.max_body

        async def capped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge(limit)
            return message

        return capped
