"""Image bytes from a URL (http(s)://, file:// or a local path): retries, a body deadline, byte limits.

One code path handles every URL form the catalog may hold (plain paths are relative to the working
directory, i.e. the repo root under `dvc repro`). Each image comes with its candidate URLs in preference
order (hi_res -> large -> thumb, see cliprec.catalog.choose_images); `Fetcher.fetch_first` tries them in
that order until one gives a usable picture (cliprec.codec.process_image), so a dead hi_res URL does not
cost the product its MAIN photo.

Statuses of a fetch (the codec adds not_image, too_large and decode_error for the bytes):
    http_<code>       final non-2xx HTTP answer; 5xx and 429 are retried first, other codes are not
    timeout           connect/read timeout, or the body took longer than BODY_DEADLINE_FACTOR x timeout_s
                      after the answer's headers (retried)
    connection_error  refused/reset/DNS/TLS/incomplete body/too many redirects (retried except redirects)
    not_found         local file (plain path or file://) does not exist
    read_error        local file exists but cannot be read (permissions, ...)
    bad_url           empty URL, unsupported scheme, file:// on another host, malformed URL
    too_large         more than max_bytes (Content-Length, or the bytes read: gzip-decoded ones count)
    error             anything unexpected (a bug): logged with its traceback, error text kept

Retries (per URL, `retries` times) are urllib3's `Retry` on the requests session: backoff from `backoff_s`
doubling per retry with a random extra of up to `backoff_s` (urllib3 retries the first time at once), so
threads that failed together do not come back together; on 429 and 503 a `Retry-After` (seconds or an
HTTP date) is waited out instead. A Retry-After over MAX_RETRY_AFTER_S is not waited for: the URL fails
with its status at once (coming back sooner than asked would not honour it). A failure while reading the
body (after urllib3 is done) is retried here, on the same Retry budget.
"""

from __future__ import annotations

import datetime
import email.utils
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.exceptions import MaxRetryError, ResponseError
from urllib3.util.retry import Retry

from cliprec.codec import ImageFailure, pillow_limits, process_image
from cliprec.params import Images

log = logging.getLogger(__name__)

PROJECT_URL = "https://github.com/cliprec/cliprec"
BODY_DEADLINE_FACTOR = 3.0  # whole body within 3 x timeout_s: a trickling server cannot hold a worker
MAX_RETRY_AFTER_S = 30.0  # longest Retry-After waited for; a longer one ends the URL's tries
RETRY_AFTER_CODES = (429, 503)  # the answers whose Retry-After means "come back then" (RFC 9110)
# Every code from 500 up (http.client reads any three digits) and 429 is retried; other codes are final.
RETRY_STATUSES = frozenset((429, *range(500, 1000)))
_DELAY_SECONDS = re.compile(r"\d+(?:\.\d+)?")


class _RoutineRetries(logging.Filter):
    """Drops urllib3's warning per retry: retries are routine here and each URL's tries are in its status."""

    def filter(self, record: logging.LogRecord) -> bool:
        """False for connectionpool's "Retrying (...)" record."""
        return not (isinstance(record.msg, str) and record.msg.startswith("Retrying ("))


logging.getLogger("urllib3.connectionpool").addFilter(_RoutineRetries())


def user_agent() -> str:
    """The User-Agent sent with every HTTP request."""
    try:
        from importlib.metadata import version

        ver = version("cliprec")
    except Exception:  # not installed (e.g. run from a bare checkout)
        ver = "0"
    return f"cliprec/{ver} (+{PROJECT_URL})"


@dataclass
class ImageResult:
    """Outcome of one image: `jpeg` is set iff status == "ok"; `url` is the URL used (else the last tried).

    For an image with several candidate URLs, `candidate` is the index of `url` among them, `attempts`
    counts the requests over all of them and `tried` holds (url, status, error, attempts) per candidate.
    """

    url: str
    status: str
    error: str = ""
    jpeg: bytes | None = None
    attempts: int = 0
    seconds: float = field(default=0.0, repr=False)
    candidate: int = 0
    tried: list[tuple[str, str, str, int]] = field(default_factory=list, repr=False)


def _local_path(url: str) -> Path | None:
    """The local file a URL names, or None for http(s); raises ImageFailure(bad_url)."""
    if not isinstance(url, str) or not url.strip():
        raise ImageFailure("bad_url", f"empty url {url!r}")
    try:
        parsed = urlparse(url)
    except ValueError as e:
        raise ImageFailure("bad_url", f"malformed url: {e}") from e
    scheme = parsed.scheme.lower()
    if scheme in ("http", "https"):
        return None
    if scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ImageFailure("bad_url", f"file:// url on another host {parsed.netloc!r}")
        return Path(url2pathname(parsed.path))
    if scheme == "" or Path(url).exists():  # a plain path (one with a colon in it included)
        return Path(url)
    raise ImageFailure("bad_url", f"unsupported url scheme {scheme!r}")


def _read_local(path: Path, max_bytes: int) -> bytes:
    """A local file's bytes, at most max_bytes of them; raises ImageFailure."""
    try:
        with open(path, "rb") as f:
            n = os.fstat(f.fileno()).st_size
            if n > max_bytes:
                raise ImageFailure("too_large", f"{n:,} B > max_bytes {max_bytes:,}")
            data = f.read(max_bytes + 1)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as e:
        raise ImageFailure("not_found", f"{type(e).__name__}: {path}") from e
    except OSError as e:
        raise ImageFailure("read_error", f"{type(e).__name__}: {e}") from e
    if len(data) > max_bytes:  # the file grew after fstat
        raise ImageFailure("too_large", f"more than max_bytes {max_bytes:,} B")
    return data


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value (delay-seconds or HTTP-date); None if absent or invalid."""
    value = (value or "").strip()
    if not value:
        return None
    if _DELAY_SECONDS.fullmatch(value):  # RFC 9110 says digits; a decimal is read the obvious way
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; an obsolete form may parse without a zone
        when = when.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


class ImageRetry(Retry):
    """urllib3's Retry with this fetcher's Retry-After rules, sleeping through `pause` (tests replace it).

    Retry-After counts on RETRY_AFTER_CODES only (urllib3 also reads it on 413 and on any answer), is read
    leniently (a decimal is read the obvious way; a bad value means plain backoff, not urllib3's
    InvalidHeader), and one over `retry_after_max` ends the tries at once: urllib3 would shorten it to the
    cap and come back sooner than asked.
    """

    RETRY_AFTER_STATUS_CODES = frozenset(RETRY_AFTER_CODES)
    pause: Callable[[float], None] = staticmethod(time.sleep)

    def new(self, **kw: object) -> ImageRetry:
        """The next Retry state, with the same `pause`."""
        retry = super().new(**kw)
        retry.pause = self.pause
        return retry

    def get_retry_after(self, response: urllib3.BaseHTTPResponse) -> float | None:
        """Seconds a 429/503 answer asks to wait; None for other answers and absent or invalid values."""
        if response.status not in self.RETRY_AFTER_STATUS_CODES:
            return None
        return parse_retry_after(response.headers.get("Retry-After"))

    def increment(
        self,
        method: str | None = None,
        url: str | None = None,
        response: urllib3.BaseHTTPResponse | None = None,
        error: Exception | None = None,
        _pool: object = None,
        _stacktrace: object = None,
    ) -> ImageRetry:
        """urllib3's increment, except that a Retry-After over the cap spends the budget at once."""
        wait = None if response is None else self.get_retry_after(response)
        if wait is not None and wait > self.retry_after_max:
            # urlopen (raise_on_status=False) answers with this response, as when the tries are spent
            raise MaxRetryError(_pool, url, ResponseError(f"Retry-After {wait:g} s over the cap"))
        return super().increment(method, url, response, error, _pool, _stacktrace)

    def sleep(self, response: urllib3.BaseHTTPResponse | None = None) -> None:
        """Wait out the answer's Retry-After if it has one, else urllib3's backoff."""
        wait = None if response is None else self.get_retry_after(response)
        self.pause(wait if wait is not None else self.get_backoff_time())


def retry_policy(cfg: Images, pause: Callable[[float], None] = time.sleep) -> ImageRetry:
    """The Retry every HTTP request of a Fetcher starts from: `retries` tries in all, whatever fails."""
    retry = ImageRetry(
        total=cfg.retries,
        allowed_methods=frozenset({"GET"}),
        status_forcelist=RETRY_STATUSES,
        backoff_factor=cfg.backoff_s,
        backoff_jitter=cfg.backoff_s,
        respect_retry_after_header=True,
        retry_after_max=MAX_RETRY_AFTER_S,
        raise_on_status=False,  # the last answer is returned: its code is the URL's status
        raise_on_redirect=False,
    )
    retry.pause = pause
    return retry


def _request_failure(e: requests.RequestException) -> ImageFailure:
    """The final status of a request that got no answer (urllib3 has retried what it could)."""
    cause = e.args[0] if e.args else None
    if isinstance(cause, MaxRetryError):  # the last try's error says more than "Max retries exceeded"
        cause = cause.reason
        text = f"{type(cause).__name__}: {cause}"
    else:
        text = f"{type(e).__name__}: {e}"
    if isinstance(e, requests.exceptions.Timeout) or isinstance(cause, urllib3.exceptions.ReadTimeoutError):
        return ImageFailure("timeout", text)
    if isinstance(e, (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema)):
        return ImageFailure("bad_url", text)
    return ImageFailure("connection_error", text)  # refused, DNS, TLS, too many redirects, ...


def _check_answer(resp: requests.Response, retry: ImageRetry, max_bytes: int) -> None:
    """Raise the final status of a non-2xx answer, or too_large for a Content-Length over max_bytes."""
    code = resp.status_code
    if not 200 <= code < 300:
        message = f"HTTP {code} {resp.reason}"
        wait = retry.get_retry_after(resp.raw)
        if wait is not None and wait > MAX_RETRY_AFTER_S and retry.total:
            message += f"; Retry-After {wait:g} s is over the {MAX_RETRY_AFTER_S:g} s cap: not retried"
        raise ImageFailure(f"http_{code}", message)
    length = resp.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > max_bytes:
        raise ImageFailure("too_large", f"Content-Length {int(length):,} B > max_bytes {max_bytes:,}")


def _read_body(resp: requests.Response, cfg: Images) -> bytes:
    """The answer's body within max_bytes and the body deadline; raises ImageFailure (retryable or not)."""
    deadline = time.monotonic() + BODY_DEADLINE_FACTOR * cfg.timeout_s
    buf = bytearray()
    try:
        # read1 returns whatever arrived (iter_content would block until a whole chunk is in, so a
        # trickling server would beat the deadline); decode_content counts gzip-decoded bytes.
        while chunk := resp.raw.read1(65536, decode_content=True):
            buf += chunk
            if len(buf) > cfg.max_bytes:
                raise ImageFailure("too_large", f"body over max_bytes {cfg.max_bytes:,} B")
            if time.monotonic() > deadline:
                raise ImageFailure(
                    "timeout", f"body not done within {BODY_DEADLINE_FACTOR * cfg.timeout_s:g} s", True
                )
    # raw reads of the body raise urllib3's own exceptions, unwrapped by requests
    except urllib3.exceptions.ReadTimeoutError as e:
        raise ImageFailure("timeout", f"read timeout: {e}", True) from e
    except (urllib3.exceptions.HTTPError, OSError) as e:  # IncompleteRead, reset, DecodeError, ...
        raise ImageFailure("connection_error", f"{type(e).__name__}: {e}", True) from e
    return bytes(buf)


def _next_try(retry: ImageRetry, url: str, failure: ImageFailure) -> ImageRetry:
    """The Retry state after a failed body read; raises `failure` when the budget is spent."""
    try:
        retry = retry.increment("GET", url, error=failure)
    except MaxRetryError:
        raise failure  # noqa: B904 (the budget's end is no cause of the failure)
    log.debug("retry %d: %s (%s)", len(retry.history), url, failure)
    return retry


class Fetcher:
    """Fetch + process URLs from many threads: one requests.Session per thread, bounded retries.

    `sleep` (what a retry waits with) is injectable so tests can see the delays without waiting.
    """

    def __init__(self, cfg: Images, sleep: Callable[[float], None] = time.sleep) -> None:
        self.cfg = cfg
        self._retry = retry_policy(cfg, sleep)
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._ua = user_agent()

    def _session(self) -> tuple[requests.Session, HTTPAdapter]:
        """This thread's session and the adapter mounted on it for http and https."""
        local = self._local
        if getattr(local, "session", None) is None:
            local.session = requests.Session()
            local.adapter = HTTPAdapter(pool_connections=8, pool_maxsize=8, max_retries=self._retry)
            local.session.mount("http://", local.adapter)
            local.session.mount("https://", local.adapter)
            local.session.headers.update({"User-Agent": self._ua, "Accept": "image/*,*/*;q=0.8"})
            with self._lock:
                self._sessions.append(local.session)
        return local.session, local.adapter

    def _get(self, url: str, retry: ImageRetry) -> requests.Response:
        """The answer to GET url with `retry` as what is left of its budget; raises its final failure."""
        session, adapter = self._session()
        adapter.max_retries = retry  # the adapter is this thread's: the budget is this URL's
        timeout = self.cfg.timeout_s
        try:
            return session.get(url, stream=True, timeout=(timeout, timeout))
        except requests.RequestException as e:
            failure = _request_failure(e)
            spent = e.args and isinstance(e.args[0], MaxRetryError)  # urllib3 used all that was left
            failure.attempts = len(retry.history) + 1 + (retry.total if spent else 0)
            raise failure from e

    def _read_http(self, url: str) -> tuple[bytes, int]:
        """The body of an http(s) URL and the requests it took; raises ImageFailure."""
        retry: ImageRetry = self._retry
        while True:
            with self._get(url, retry) as resp:
                retry = resp.raw.retries or retry  # the state after urllib3's own retries
                try:
                    _check_answer(resp, retry, self.cfg.max_bytes)
                    return _read_body(resp, self.cfg), len(retry.history) + 1
                except ImageFailure as f:
                    f.attempts = len(retry.history) + 1
                    if not f.retryable:
                        raise
                    retry = _next_try(retry, url, f)
            retry.sleep()

    def _read(self, url: str) -> tuple[bytes, int]:
        """The bytes a URL names and the requests it took (1 for a local file)."""
        path = _local_path(url)
        if path is not None:
            return _read_local(path, self.cfg.max_bytes), 1
        return self._read_http(url)

    def fetch(self, url: str) -> ImageResult:
        """Fetch, decode, resize and encode one URL; never raises (failures become the status)."""
        t0 = time.perf_counter()
        attempts = 1
        try:
            data, attempts = self._read(url)
            jpeg = process_image(data, self.cfg)
            result = ImageResult(url, "ok", "", jpeg, attempts)
        except ImageFailure as f:
            attempts = f.attempts
            result = ImageResult(url, f.status, str(f), None, attempts)
            log.debug("%s: %s (%s)", url, f.status, f)
        except Exception as e:
            log.warning("unexpected failure on %s", url, exc_info=True)
            result = ImageResult(url, "error", f"{type(e).__name__}: {e}", None, attempts)
        result.seconds = time.perf_counter() - t0
        result.tried = [(result.url, result.status, result.error, result.attempts)]
        return result

    def fetch_first(self, candidates: Sequence[str]) -> ImageResult:
        """Try one image's candidate URLs in order until one is ok; never raises.

        Any failure moves on to the next candidate: a smaller size of the same photo may well work where
        the larger one was missing, refused or too big.
        """
        results: list[ImageResult] = []
        for url in candidates or [""]:  # no URL at all: bad_url, as an empty one
            results.append(self.fetch(url))
            if results[-1].status == "ok":
                break
        result = results[-1]
        result.candidate = len(results) - 1
        result.attempts = sum(r.attempts for r in results)
        result.seconds = sum(r.seconds for r in results)
        result.tried = [t for r in results for t in r.tried]
        return result

    def close(self) -> None:
        """Close every thread's session."""
        with self._lock:
            for s in self._sessions:
                s.close()
            self._sessions.clear()

    def __enter__(self) -> Fetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fetch_image(url: str, cfg: Images) -> ImageResult:
    """Fetch and process one URL (same code path as the stage); never raises."""
    with pillow_limits(cfg.max_pixels), Fetcher(cfg) as fetcher:
        return fetcher.fetch(url)
