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
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from cliprec.decode_pool import DecodePool
from cliprec.errors import CliprecError, one_line
from cliprec.query import Query as SearchQuery
from cliprec.query import QueryError
from cliprec.serve.cancel import CancelledInOneLine
from cliprec.serve.metrics import Metrics
from cliprec.serve.middleware import Admission, GuardMiddleware
from cliprec.serve.schemas import ERRORS, SEARCH_ERRORS, ErrorResponse, SearchResponse, forms_not_nullable
from cliprec.serve.settings import ServeSettings
from cliprec.serve.worker import SearchWorker
from cliprec.service import SearchRequest, Service, ServiceError

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
# the form's own fields are short (text: max_text_chars characters); a longer part is refused early
FORM_LIMITS = {"max_part_size": 64 * 1024, "max_fields": 32, "max_files": 1}
NOT_BLANK = ("variant", "k", "weight", "category")  # a blank choice or number is no value, not "default"


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": one_line(message)}, status_code=status, headers=headers)


def _retry_after(request: Request) -> dict[str, str]:
    return {"Retry-After": str(request.app.state.settings.retry_after_s)}


# --- error handlers: every error answer is one line of JSON ------------------------------------------------


async def _service_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return _error(exc.status, str(exc), _retry_after(request) if exc.status == 503 else None)


def _form_error(exc: StarletteHTTPException) -> tuple[int, str] | None:
    """Starlette's 400 for a form part over FORM_LIMITS' size is a too-long field: 422, as pydantic's."""
    cause = exc.__context__
    if exc.status_code == 400 and isinstance(cause, MultiPartException) and "maximum size" in cause.message:
        return 422, f"a form field is longer than {FORM_LIMITS['max_part_size']} B"
    return None


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status, message = _form_error(exc) or (exc.status_code, str(exc.detail))
    return _error(status, message, getattr(exc, "headers", None))


def _validation_message(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form"))
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    msg = first.get("msg", "invalid")
    return f"{where}: {msg}{more}" if where else f"{msg}{more}"


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _error(422, _validation_message(exc))


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    log.error("serve: %s %s failed", request.method, request.url.path, exc_info=exc)
    return _error(500, "internal error (see the server log)")


HANDLERS: tuple[tuple[type[Exception], Callable[..., Any]], ...] = (
    (ServiceError, _service_error),
    (StarletteHTTPException, _http_error),
    (RequestValidationError, _validation_error),
    (Exception, _internal_error),
)

# --- loading the service, and the app's lifetime ---------------------------------------------------------


def _default_loader(root: str | Path, categories: Sequence[str] | None, settings: ServeSettings) -> Service:
    """Load root's categories with `settings`' threads and thumbnails, then warm the models up."""
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


def _load(state: Any) -> None:
    """Build the Service and the decoders (thread `cliprec-load`); a failure is state.load_error."""
    settings: ServeSettings = state.settings
    t0 = time.perf_counter()
    try:
        service = state.loader()
        # the decoders check uploads with the images stage's settings of the served project
        state.decoders = DecodePool(service.image_config, settings.decode_workers, settings.decode_timeout_s)
    except Exception as e:  # RecommendError, IndexIntegrityError, OSError, ...: say it, don't die
        state.load_error = one_line(e)
        log.error("serve: cannot load: %s", state.load_error, exc_info=not isinstance(e, USER_ERRORS))
        if state.on_load_error is not None:
            state.on_load_error(state.load_error)
        return
    state.service = service
    log.info(
        "serve: ready in %.1f s: %s (%s)",
        time.perf_counter() - t0,
        ", ".join(service.categories),
        service.model_name,
    )


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Start the loader thread and the search worker; at shutdown stop the worker and the decoders."""
    state = app.state
    state.service, state.load_error, state.decoders = None, None, None
    state.worker = SearchWorker(state.settings.max_batch, on_batch=state.metrics.batch.observe)
    threading.Thread(target=_load, args=(state,), name="cliprec-load", daemon=True).start()
    try:
        yield
    finally:
        # uvicorn has waited up to graceful_s for the requests: what the worker still does is for no one
        state.worker.stop(timeout=WORKER_STOP_S)
        if state.decoders is not None:
            state.decoders.close()
        log.info("serve: stopped")


def service(request: Request) -> Service:
    """The loaded Service, or 503 + Retry-After while it loads (or when loading failed)."""
    svc = request.app.state.service
    if svc is None:
        error = request.app.state.load_error
        message = f"not ready: {error}" if error else "loading models and indexes; retry shortly"
        raise StarletteHTTPException(503, message, headers=_retry_after(request))
    return svc


async def _work_slot(request: Request) -> AsyncIterator[None]:
    """Work routes' dependency: hold one of the `max_inflight` slots (middleware.Admission)."""
    async with asynccontextmanager(request.app.state.admission.slot)():
        yield


WORK = [Depends(_work_slot)]  # the work routes share one budget
router = APIRouter()

# --- pages -----------------------------------------------------------------------------------------------


@router.get("/", include_in_schema=False)
@router.head("/", include_in_schema=False)
def page() -> FileResponse:
    """The web page."""
    return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": PAGE_CSP})


@router.get("/docs", include_in_schema=False)
def docs(request: Request) -> Response:
    """The OpenAPI docs from the vendored Swagger UI files."""
    return get_swagger_ui_html(
        openapi_url=request.app.openapi_url or "/openapi.json",
        title="cliprec API",
        swagger_js_url=f"{VENDOR}/swagger-ui/swagger-ui-bundle.js",
        swagger_css_url=f"{VENDOR}/swagger-ui/swagger-ui.css",
        swagger_favicon_url=f"{VENDOR}/swagger-ui/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None},  # its default badge calls an outside validator
    )


# --- health, info, metrics -------------------------------------------------------------------------------


@router.get("/healthz", responses={503: {"model": ErrorResponse}})
@router.head("/healthz", include_in_schema=False)  # load balancers probe with HEAD
def healthz(request: Request) -> JSONResponse:
    """200 once the models and verified indexes are loaded; 503 before, when loading failed, or when
    the search worker has made no progress for `stall_s` with work waiting (restart the server)."""
    state = request.app.state
    if state.service is None:
        payload = (
            {"status": "failed", "error": state.load_error} if state.load_error else {"status": "loading"}
        )
        return JSONResponse(payload, 503, headers=_retry_after(request))
    stalled = state.worker.stalled(state.settings.stall_s)
    if stalled:
        return JSONResponse({"status": "stalled", "error": stalled}, 503)
    return JSONResponse({"status": "ok", "categories": state.service.categories})


@router.get("/api/info", responses=ERRORS)
def info(request: Request) -> JSONResponse:
    """Model, variants, index type, ntotal, commit, each variant's metrics (CIs where present)."""
    svc = service(request)
    settings: ServeSettings = request.app.state.settings
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


@router.get("/metrics", include_in_schema=False)
def prometheus(request: Request) -> Response:
    """The Prometheus metrics."""
    return Response(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# --- search ----------------------------------------------------------------------------------------------


async def _no_blank_choices(request: Request) -> None:
    """Search dependency: 422 for `variant=""` and the like (FastAPI takes a blank field as omitted)."""
    form = await request.form()  # the form FastAPI already read (cached)
    blank = [name for name in NOT_BLANK if form.get(name) == ""]
    if blank:
        raise StarletteHTTPException(422, f"{blank[0]}: must not be empty")


async def _upload(image: UploadFile | None) -> tuple[bytes | None, str | None]:
    """(bytes, name) of the uploaded image; (None, None) for none or an HTML form's empty file input."""
    if image is None:
        return None, None
    data = await image.read()
    if not data and not image.filename:  # an empty file input of an HTML form
        return None, None
    return data, (image.filename or "upload")[:200]


async def _answer(request: Request, svc: Service, req: SearchRequest) -> JSONResponse:
    """Validate, decode the upload in the decoder processes, then queue the search for the worker."""
    state = request.app.state
    t0 = time.perf_counter()
    svc.validate(req)  # a request that will be refused costs no decode
    if req.upload is not None:
        svc.check_upload(req.upload)
        req.prepared = await state.decoders.decode(req.upload)
    payload = await state.worker.submit(svc, req)
    state.metrics.search.labels(req.kind).observe(time.perf_counter() - t0)
    return JSONResponse(payload)


def _search_route(settings: ServeSettings) -> Callable[..., Any]:
    """The search endpoint; its form's limits (text length, k) are `settings`', so its schema says them.

    The fields are parameters, not a form model (`Annotated[Model, Form()]`): FastAPI does not see the
    UploadFile inside a model, and would describe the body as url-encoded and required.
    """

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
        data, name = await _upload(image)
        text = text if text and text.strip() else None  # an HTML form's blank text box: no text
        try:
            query = SearchQuery(text=text, image=name, product=product or None, k=k, weight=weight)
        except QueryError as e:
            raise ServiceError(422, str(e)) from None
        return await _answer(request, svc, SearchRequest(category, query, variant, upload=data))

    return search


# --- products --------------------------------------------------------------------------------------------

View = Annotated[Literal["main", "alt"], Query(description="main photo or the other view")]
JPEG = {200: {"content": {"image/jpeg": {}}}, **ERRORS}


def _jpeg(data: bytes) -> Response:
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "public, max-age=3600"})


@router.get("/api/products/{category}/{product_id}", responses=ERRORS, dependencies=WORK)
def product_detail(request: Request, category: str, product_id: str) -> JSONResponse:
    """Catalog fields of a product, its photos, its `thumb` URL (null when it has no stored photo) and
    whether each variant has it indexed."""
    return JSONResponse(service(request).product(category, product_id))


@router.get(
    "/api/products/{category}/{product_id}/photo", response_class=Response, responses=JPEG, dependencies=WORK
)
def product_photo(request: Request, category: str, product_id: str, view: View = "main") -> Response:
    """A stored product photo (the images stage's JPEG)."""
    return _jpeg(service(request).photo(category, product_id, view))


@router.get(
    "/api/products/{category}/{product_id}/thumb", response_class=Response, responses=JPEG, dependencies=WORK
)
def product_thumb(request: Request, category: str, product_id: str, view: View = "main") -> Response:
    """A thumbnail of a stored product photo."""
    return _jpeg(service(request).photo(category, product_id, view, thumb=True))


@router.get("/api/plots", responses=ERRORS)
def plots(request: Request) -> JSONResponse:
    """Vega-Lite specs of the project's DVC plots (training curves, Recall@K), data inlined."""
    from cliprec.plots import plot_specs

    return JSONResponse(plot_specs(service(request).root))


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
    app = FastAPI(
        title="cliprec",
        summary="Product recommendations with CLIP (zero-shot) and CLIP + LoRA",
        version="0.1.0",
        lifespan=_lifespan,
        docs_url=None,  # served by `docs` from the vendored Swagger UI files
        redoc_url=None,
    )
    state = app.state
    state.settings, state.metrics, state.on_load_error = settings, metrics, on_load_error
    state.loader = loader or partial(_default_loader, root, categories, settings)
    state.service, state.load_error = None, None
    state.admission = Admission(settings, metrics)
    app.add_middleware(GuardMiddleware, settings=settings, metrics=metrics)
    app.add_middleware(CancelledInOneLine)  # added last: the outermost layer
    for exc_class, handler in HANDLERS:
        app.add_exception_handler(exc_class, handler)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # the routes themselves, not include_router: FastAPI wraps an included router in one lazy route, whose
    # templates serve.metrics.route_label (the `route` label) cannot see
    app.router.routes.extend(router.routes)
    app.add_api_route(
        "/api/search",
        _search_route(settings),
        methods=["POST"],
        response_model=SearchResponse,
        responses=SEARCH_ERRORS,
        dependencies=[*WORK, Depends(_no_blank_choices)],
        form_limits=FORM_LIMITS,
    )
    forms_not_nullable(app)
    return app
