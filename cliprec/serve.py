"""`cliprec serve`: the JSON API, Prometheus metrics, offline OpenAPI docs and the web page (FastAPI).

How work is bounded:
- The Service (models, verified indexes, photo locations) loads once, in a thread started at startup,
  so the port answers at once: `/healthz` and the API say 503 (with Retry-After) until it is ready.
- Searches run on ONE worker thread (SearchWorker): torch spreads one query over `threads` cores
  (default: torch's own, every core), a Recommender's tokenizer is not safe to call from two threads at
  once, and Pillow's decompression-bomb limit is process-global, so uploads are decoded one at a time.
  What queued while the worker was busy is answered in one `Service.search_many` call, where the text
  queries share one batch through the text encoder: one query alone costs a small model mostly Python
  overhead, and the event loop competes with the worker for the GIL. bench/serve_load.py measures it.
- At most `max_inflight` requests to the work routes (/api/search, /api/products) are admitted at once,
  counted before their bodies are read; the next one gets 503 + Retry-After instead of a growing queue.
- Request bodies are capped (Content-Length, and counted while streaming): 413 past the cap.
- Every error answer is one line of JSON, `{"error": "..."}`; tracebacks go to the log, never to a client.
- uvicorn turns SIGINT/SIGTERM into a graceful shutdown: stop accepting, finish in-flight requests (at
  most `graceful_s`), then stop the worker.

The docs page (`/docs`) uses the Swagger UI files vendored in cliprec/static/vendor (no CDN).
"""

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cliprec.index import IndexIntegrityError
from cliprec.recommend import RecommendError
from cliprec.service import SearchRequest, Service, ServiceError, one_line

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
VENDOR = "/static/vendor"
USER_ERRORS = (RecommendError, IndexIntegrityError, ServiceError)  # logged without a traceback
WORK_PREFIXES = ("/api/search", "/api/products")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# the page loads only its own files; vega compiles expressions with Function() and injects its styles
PAGE_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


@dataclass(frozen=True)
class ServeSettings:
    """Limits of the server (the `cliprec serve` options)."""

    max_upload_bytes: int = 10 * 2**20
    max_k: int = 100
    max_inflight: int = 64
    retry_after_s: int = 1
    max_text_chars: int = 1000
    thumb_side: int = 128
    graceful_s: int = 10
    threads: int | None = None  # torch/FAISS threads per query; None keeps their defaults
    max_batch: int = 32  # searches answered by one Service.search_many call


# --- response models (for the OpenAPI docs; tests validate the answers against them) -------------------


class SearchHit(BaseModel):
    """One result of one variant."""

    rank: int
    id: str
    score: float
    title: str
    image: str
    photo: str


class SearchQuery(BaseModel):
    """What was asked."""

    kind: str
    text: str | None
    image: str | None
    product: str | None
    weight: float | None


class SearchResponse(BaseModel):
    """Ranked results per variant; `shared` lists the ids every returned variant found, in rank order."""

    category: str
    query: SearchQuery
    k: int
    results: dict[str, list[SearchHit]]
    shared: list[str]
    took_ms: float


class ErrorResponse(BaseModel):
    """Every error answer."""

    error: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (404, 413, 415, 422, 500, 503)
}


# --- metrics ------------------------------------------------------------------------------------------


class Metrics:
    """Prometheus collectors on a registry of their own (one per app: tests build many apps)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, cpu seconds, fds
        self.requests = Counter(
            "cliprec_http_requests",
            "HTTP requests answered, by route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cliprec_http_request_duration_seconds",
            "Time from request to the end of the response, by route template",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "cliprec_http_work_in_flight", "Admitted requests to the work routes", registry=self.registry
        )
        self.rejected = Counter(
            "cliprec_http_rejected", "Requests refused before any work, by reason", ["reason"],
            registry=self.registry,
        )  # fmt: skip
        self.batch = Histogram(
            "cliprec_search_batch_size",
            "Searches answered together by the worker",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.search = Histogram(
            "cliprec_search_duration_seconds",
            "Time from queueing a search to its answer, per query kind (all requested variants)",
            ["kind"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )


def _route_label(scope: Scope) -> str:
    """The matched route's path template (bounded label values), or 'unmatched'."""
    router = getattr(scope.get("app"), "router", None)  # Starlette puts itself in the scope
    for route in getattr(router, "routes", []):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "unmatched")
    return "unmatched"


# --- the search worker --------------------------------------------------------------------------------


def _settle(future: asyncio.Future, answer: Any) -> None:
    if future.cancelled():  # the client went away
        return
    if isinstance(answer, BaseException):
        future.set_exception(answer)
    else:
        future.set_result(answer)


class SearchWorker:
    """One thread answering searches; whatever queued while it worked is answered in one batch."""

    def __init__(self, max_batch: int = 32, on_batch: Callable[[int], None] | None = None) -> None:
        self.max_batch = max_batch
        self.on_batch = on_batch
        # unbounded on purpose: GuardMiddleware admits at most max_inflight requests, which bounds it
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="cliprec-search", daemon=True)
        self._thread.start()

    def submit(self, service: Service, req: SearchRequest) -> asyncio.Future:
        """Queue a search; the future (of the running loop) gets its answer or its ServiceError."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((service, req, loop, future))
        return future

    @property
    def pending(self) -> int:
        """Searches queued and not yet taken by the worker."""
        return self._queue.qsize()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                answers: list[Any] = batch[0][0].search_many([b[1] for b in batch])
            except Exception as e:  # a bug: log it once, every request of the batch gets a 500
                log.error("serve: search batch failed", exc_info=e)
                answers = [e] * len(batch)
            for (_, _, loop, future), answer in zip(batch, answers):
                loop.call_soon_threadsafe(_settle, future, answer)

    def stop(self, timeout: float | None = None) -> None:
        """Answer what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)


# --- ASGI middleware ----------------------------------------------------------------------------------


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
            route = _route_label(scope)
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


# --- the app ------------------------------------------------------------------------------------------


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form"))
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    msg = first.get("msg", "invalid")
    return f"{where}: {msg}{more}" if where else f"{msg}{more}"


def create_app(
    root: str | Path = ".",
    categories: Sequence[str] | None = None,
    settings: ServeSettings | None = None,
    loader: Callable[[], Service] | None = None,
    on_load_error: Callable[[str], None] | None = None,
) -> FastAPI:
    """The FastAPI app; the Service is built by `loader` (default: load root's categories + warm up)."""
    settings = settings or ServeSettings()
    metrics = Metrics()

    def default_loader() -> Service:
        if settings.threads:
            import faiss
            import torch

            torch.set_num_threads(settings.threads)
            faiss.omp_set_num_threads(settings.threads)
        service = Service(
            root, categories, thumb_side=settings.thumb_side, max_upload_bytes=settings.max_upload_bytes
        )
        service.warm_up()
        return service

    load = loader or default_loader

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202 (FastAPI's lifespan protocol)
        state = app.state
        state.service, state.load_error = None, None
        state.worker = SearchWorker(settings.max_batch, on_batch=metrics.batch.observe)

        def run_loader() -> None:
            t0 = time.perf_counter()
            try:
                service = load()
            except Exception as e:  # RecommendError, IndexIntegrityError, OSError, ...: say it, don't die
                state.load_error = one_line(str(e)) or type(e).__name__
                log.error("serve: cannot load: %s", state.load_error, exc_info=not isinstance(e, USER_ERRORS))
                if on_load_error is not None:
                    on_load_error(state.load_error)
                return
            state.service = service
            log.info(
                "serve: ready in %.1f s: %s (%s)",
                time.perf_counter() - t0,
                ", ".join(service.categories),
                service.model_name,
            )

        threading.Thread(target=run_loader, name="cliprec-load", daemon=True).start()
        try:
            yield
        finally:
            # in-flight searches finish (uvicorn waited for their requests); nothing new is accepted
            state.worker.stop(timeout=settings.graceful_s)
            log.info("serve: stopped")

    app = FastAPI(
        title="cliprec",
        summary="Product recommendations with CLIP (zero-shot) and CLIP + LoRA",
        version="0.1.0",
        lifespan=lifespan,
        docs_url=None,  # served below from the vendored Swagger UI files
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.service = None
    app.state.load_error = None
    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, _validation_message(exc))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error("serve: %s %s failed", request.method, request.url.path, exc_info=exc)
        return _error(500, "internal error (see the server log)")

    def service(request: Request) -> Service:
        svc = request.app.state.service
        if svc is None:
            error = request.app.state.load_error
            message = f"not ready: {error}" if error else "loading models and indexes; retry shortly"
            raise StarletteHTTPException(503, message, headers={"Retry-After": str(settings.retry_after_s)})
        return svc

    # --- pages -----------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/docs", include_in_schema=False)
    def docs() -> Response:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="cliprec API",
            swagger_js_url=f"{VENDOR}/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url=f"{VENDOR}/swagger-ui/swagger-ui.css",
            swagger_favicon_url=f"{VENDOR}/swagger-ui/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # its default badge calls an outside validator
        )

    # --- health, info, metrics -------------------------------------------------------------------------

    @app.get("/healthz", responses={503: {"model": ErrorResponse}})
    def healthz(request: Request) -> JSONResponse:
        """200 once the models and verified indexes are loaded, 503 before (or when loading failed)."""
        svc = request.app.state.service
        if svc is None:
            error = request.app.state.load_error
            payload = {"status": "failed", "error": error} if error else {"status": "loading"}
            return JSONResponse(payload, 503, headers={"Retry-After": str(settings.retry_after_s)})
        return JSONResponse({"status": "ok", "categories": svc.categories})

    @app.get("/api/info", responses=ERRORS)
    def info(request: Request) -> JSONResponse:
        """Model, variants, index type, ntotal, commit, each variant's metrics (CIs where present)."""
        svc = service(request)
        payload = svc.info()
        payload["limits"] = {
            "max_upload_bytes": svc.max_upload_bytes,
            "max_k": settings.max_k,
            "max_inflight": settings.max_inflight,
            "max_text_chars": settings.max_text_chars,
        }
        return JSONResponse(payload)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- search ----------------------------------------------------------------------------------------

    @app.post("/api/search", response_model=SearchResponse, responses=ERRORS)
    async def search(
        request: Request,
        text: Annotated[
            str | None, Form(max_length=settings.max_text_chars, description="query text")
        ] = None,
        image: Annotated[UploadFile | None, File(description="query photo (JPEG, PNG, WebP, ...)")] = None,
        product: Annotated[
            str | None, Form(max_length=200, description="product id: more like this product")
        ] = None,
        weight: Annotated[
            float | None, Form(ge=0.0, le=1.0, description="text weight when text and image are both given")
        ] = None,
        category: Annotated[str | None, Form(description="default: the first served category")] = None,
        variant: Annotated[Literal["zeroshot", "lora", "both"], Form()] = "both",
        k: Annotated[int, Form(ge=1, le=settings.max_k)] = 10,
    ) -> JSONResponse:
        """Top-k products per variant for a text, an image, text + image, or a product (more like this)."""
        svc = service(request)
        data: bytes | None = None
        name = None
        if image is not None:
            data = await image.read()
            name = (image.filename or "upload")[:200]
            if not data and not image.filename:  # an empty file input of an HTML form
                data, name = None, None
        req = SearchRequest(
            category=category,
            variant=variant,
            text=text,
            image=data,
            image_name=name,
            product=product or None,
            weight=weight,
            k=k,
        )
        t0 = time.perf_counter()
        payload = await request.app.state.worker.submit(svc, req)
        metrics.search.labels(req.kind).observe(time.perf_counter() - t0)
        return JSONResponse(payload)

    # --- products --------------------------------------------------------------------------------------

    @app.get("/api/products/{category}/{product_id}", responses=ERRORS)
    def product_detail(request: Request, category: str, product_id: str) -> JSONResponse:
        """Catalog fields of a product, its photos and whether each variant has it indexed."""
        return JSONResponse(service(request).product(category, product_id))

    def _jpeg(data: bytes) -> Response:
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    View = Annotated[Literal["main", "alt"], Query(description="main photo or the other view")]

    @app.get(
        "/api/products/{category}/{product_id}/photo",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
    )
    def product_photo(request: Request, category: str, product_id: str, view: View = "main") -> Response:
        """A stored product photo (the images stage's JPEG)."""
        return _jpeg(service(request).photo(category, product_id, view))

    @app.get(
        "/api/products/{category}/{product_id}/thumb",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
    )
    def product_thumb(request: Request, category: str, product_id: str, view: View = "main") -> Response:
        """A thumbnail of a stored product photo."""
        return _jpeg(service(request).photo(category, product_id, view, thumb=True))

    @app.get("/api/plots", responses=ERRORS)
    def plots(request: Request) -> JSONResponse:
        """Vega-Lite specs of the project's DVC plots (training curves, Recall@K), data inlined."""
        from cliprec.plots import plot_specs

        svc = service(request)
        return JSONResponse(plot_specs(svc.root))

    return app


def run(
    root: str | Path = ".",
    host: str = "127.0.0.1",
    port: int = 8000,
    categories: Sequence[str] | None = None,
    settings: ServeSettings | None = None,
    access_log: bool = False,
) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a graceful stop, 2 when the models or indexes cannot load."""
    import uvicorn

    settings = settings or ServeSettings()
    outcome = {"code": 0}
    server: uvicorn.Server | None = None

    def failed(message: str) -> None:
        outcome["code"] = 2
        if server is not None:
            server.should_exit = True  # the port answered 503 meanwhile; now stop

    app = create_app(root, categories, settings, on_load_error=failed)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=access_log,
        timeout_graceful_shutdown=settings.graceful_s,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    server.run()
    return outcome["code"]
