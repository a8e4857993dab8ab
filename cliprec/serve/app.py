"""`cliprec serve`: the JSON API, Prometheus metrics, offline OpenAPI docs and the web page (FastAPI).

How work is bounded:
- The Service (models, verified indexes, photo locations) loads once, in a thread started at startup,
  so the port answers at once: `/healthz` and the API say 503 (with Retry-After) until it is ready.
- Searches run on ONE worker thread (SearchWorker): torch spreads one query over `threads` cores
  (`cliprec serve`'s default: 1) and a Recommender's tokenizer is not safe to call from two threads
  at once. What queued while the worker was busy is answered in one `Service.search_many` call, where
  the text queries share one batch through the text encoder: one query alone costs a small model mostly
  Python overhead, and the event loop competes with the worker for the GIL. bench/serve_load.py
  measures it. Each request of a batch gets its own answer or error.
- Uploads are decoded before they reach the worker, in `decode_workers` decoder processes
  (cliprec.decode_pool) with the images stage's checks (pixels, JPEG scans, ...) and a time limit
  (`decode_timeout_s`, 413 past it): a costly upload never holds up a search.
- /healthz says 503 when work has waited `stall_s` without the worker making progress (a heartbeat).
- At most `max_inflight` requests to the work routes (/api/search, /api/products) are admitted at once,
  counted once their bodies have arrived (middleware.Admission); the next one gets 503 + Retry-After.
- Request bodies are capped (Content-Length, and counted while streaming): 413 past the cap; a body not
  complete within `body_timeout_s` gets 408. Connection limits: cliprec/serve/connections.py.
- Every error answer is one line of JSON, `{"error": "..."}`; tracebacks go to the log, never to a client.
- uvicorn turns SIGINT/SIGTERM into a graceful shutdown: stop accepting, finish in-flight requests (at
  most `graceful_s`), then stop the worker.

The docs page (`/docs`) uses the Swagger UI files vendored in cliprec/static/vendor (no CDN).
"""

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Literal

from fastapi import Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from cliprec.decode_pool import DecodePool
from cliprec.errors import CliprecError
from cliprec.serve.cancel import CancelledInOneLine
from cliprec.serve.metrics import Metrics
from cliprec.serve.middleware import Admission, GuardMiddleware
from cliprec.serve.schemas import ERRORS, SEARCH_ERRORS, ErrorResponse, SearchResponse, forms_not_nullable
from cliprec.serve.settings import ServeSettings
from cliprec.serve.worker import SearchWorker
from cliprec.service import SearchRequest, Service, ServiceError, one_line

log = logging.getLogger("cliprec.serve")

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"
VENDOR = "/static/vendor"
WORKER_STOP_S = 1.0  # at shutdown, after uvicorn's graceful_s: keeps the exit within ~graceful_s
USER_ERRORS = (CliprecError, ServiceError)  # logged without a traceback (e.g. a corrupt artefact)
# the page loads only its own files; vega compiles expressions with Function() and injects its styles
PAGE_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


# the form's own fields are short (text: max_text_chars characters); a longer part is refused early
FORM_LIMITS = {"max_part_size": 64 * 1024, "max_fields": 32, "max_files": 1}
NOT_BLANK = ("variant", "k", "weight", "category")  # a blank choice or number is no value, not "default"


async def _no_blank_choices(request: Request) -> None:
    """Search dependency: 422 for `variant=""` and the like (FastAPI takes a blank field as omitted)."""
    form = await request.form()  # the form FastAPI already read (cached)
    blank = [name for name in NOT_BLANK if form.get(name) == ""]
    if blank:
        raise StarletteHTTPException(422, f"{blank[0]}: must not be empty")


def _form_error(exc: StarletteHTTPException) -> tuple[int, str] | None:
    """Starlette's 400 for a form part over FORM_LIMITS' size is a too-long field: 422, as pydantic's."""
    cause = exc.__context__
    if exc.status_code == 400 and isinstance(cause, MultiPartException) and "maximum size" in cause.message:
        return 422, f"a form field is longer than {FORM_LIMITS['max_part_size']} B"
    return None


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
        state.service, state.load_error, state.decoders = None, None, None
        state.worker = SearchWorker(settings.max_batch, on_batch=metrics.batch.observe)

        def run_loader() -> None:
            t0 = time.perf_counter()
            try:
                service = load()
                # the decoders check uploads with the images stage's settings of the served project
                state.decoders = DecodePool(
                    service.image_config, settings.decode_workers, settings.decode_timeout_s
                )
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
            # uvicorn has waited up to graceful_s for the requests: what the worker still does is for no one
            state.worker.stop(timeout=WORKER_STOP_S)
            if state.decoders is not None:
                state.decoders.close()
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
    app.add_middleware(CancelledInOneLine)  # added last: the outermost layer
    forms_not_nullable(app)
    work = [Depends(Admission(settings, metrics).slot)]  # the work routes share one budget
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> JSONResponse:
        busy = {"Retry-After": str(settings.retry_after_s)} if exc.status == 503 else None
        return _error(exc.status, str(exc), busy)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status, message = _form_error(exc) or (exc.status_code, str(exc.detail))
        return _error(status, message, getattr(exc, "headers", None))

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
    @app.head("/", include_in_schema=False)
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
    @app.head("/healthz", include_in_schema=False)  # load balancers probe with HEAD
    def healthz(request: Request) -> JSONResponse:
        """200 once the models and verified indexes are loaded; 503 before, when loading failed, or when
        the search worker has made no progress for `stall_s` with work waiting (restart the server)."""
        svc = request.app.state.service
        if svc is None:
            error = request.app.state.load_error
            payload = {"status": "failed", "error": error} if error else {"status": "loading"}
            return JSONResponse(payload, 503, headers={"Retry-After": str(settings.retry_after_s)})
        stalled = request.app.state.worker.stalled(settings.stall_s)
        if stalled:
            return JSONResponse({"status": "stalled", "error": stalled}, 503)
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
            "max_jpeg_scans": svc.image_config.max_jpeg_scans,
            "decode_timeout_s": settings.decode_timeout_s,
        }
        return JSONResponse(payload)

    @app.get("/metrics", include_in_schema=False)
    def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # --- search ----------------------------------------------------------------------------------------

    @app.post(
        "/api/search",
        response_model=SearchResponse,
        responses=SEARCH_ERRORS,
        dependencies=[*work, Depends(_no_blank_choices)],
        form_limits=FORM_LIMITS,
    )
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
        svc.validate(req)  # a request that will be refused costs no decode
        if data is not None:
            svc.check_upload(data)
            req.prepared = await request.app.state.decoders.decode(data)
        payload = await request.app.state.worker.submit(svc, req)
        metrics.search.labels(req.kind).observe(time.perf_counter() - t0)
        return JSONResponse(payload)

    # --- products --------------------------------------------------------------------------------------

    @app.get("/api/products/{category}/{product_id}", responses=ERRORS, dependencies=work)
    def product_detail(request: Request, category: str, product_id: str) -> JSONResponse:
        """Catalog fields of a product, its photos, its `thumb` URL (null when it has no stored photo) and
        whether each variant has it indexed."""
        return JSONResponse(service(request).product(category, product_id))

    def _jpeg(data: bytes) -> Response:
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})

    View = Annotated[Literal["main", "alt"], Query(description="main photo or the other view")]

    @app.get(
        "/api/products/{category}/{product_id}/photo",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
        dependencies=work,
    )
    def product_photo(request: Request, category: str, product_id: str, view: View = "main") -> Response:
        """A stored product photo (the images stage's JPEG)."""
        return _jpeg(service(request).photo(category, product_id, view))

    @app.get(
        "/api/products/{category}/{product_id}/thumb",
        response_class=Response,
        responses={200: {"content": {"image/jpeg": {}}}, **ERRORS},
        dependencies=work,
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
