"""The `images` stage: fetch product images, decode them safely, resize, re-encode, store in parquet shards.

One code path handles every URL form the catalog may hold: http(s)://, file:// and plain local paths
(relative to the working directory, i.e. the repo root under `dvc repro`). Each image comes with its
candidate URLs in preference order (hi_res -> large -> thumb, see cliprec.catalog.choose_images); they are
tried in that order for the same image until one gives a usable picture, so a dead hi_res URL does not
cost the product its MAIN photo. Every image ends in exactly one status (that of the URL used, or of the
last one tried); a bad item never stops the stage and is never replaced by a placeholder image.

Statuses (status.parquet `status`, report.json `counts`):
    ok                stored (or usable: see `view`)
    http_<code>       final non-2xx HTTP answer; 5xx and 429 are retried first, other codes are not
    timeout           connect/read timeout, or the body took longer than BODY_DEADLINE_FACTOR x timeout_s
                      (retried)
    connection_error  refused/reset/DNS/TLS/incomplete body/too many redirects (retried except redirects)
    not_found         local file (plain path or file://) does not exist
    read_error        local file exists but cannot be read (permissions, ...)
    bad_url           empty URL, unsupported scheme, file:// on another host, malformed URL
    not_image         bytes are not an image in an accepted format (HTML error page, empty body, EPS...)
    too_large         more than max_bytes, more than max_pixels pixels (decompression bomb), or a JPEG
                      of more than max_jpeg_scans scans (counted before decoding); the error quotes the
                      configured limit
    decode_error      recognised image that does not decode: truncated, corrupt, unconvertible mode
                      (whatever the decoder raised); only a file's first frame is decoded
    error             anything unexpected (a bug): logged with its traceback, error text kept

Retries (per URL, `retries` times): exponential backoff from `backoff_s` with jitter (x0.5..1.5), so
threads that failed together do not come back together; on 429 and 503 a `Retry-After` (seconds or an
HTTP date) is waited out first. A Retry-After over MAX_RETRY_AFTER_S is not waited for: the URL fails
with its status at once (coming back sooner than asked would not honour it).

Images: RGB (alpha flattened onto white), EXIF orientation applied, then `center_crop` (short side scaled
to `size`, centre square kept) or `pad` (long side scaled to `size`, letterboxed on white, the usual
product-photo background), JPEG at `jpeg_quality`. Shards hold rows in product order, then view order,
whatever order the threads finish in, so two runs over the same answers give identical bytes.
"""

from __future__ import annotations

import contextlib
import datetime
import email.utils
import functools
import hashlib
import io
import logging
import math
import os
import random
import re
import struct
import threading
import time
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import requests
import urllib3
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from requests.adapters import HTTPAdapter
from tqdm import tqdm

from cliprec.artifacts import MANIFEST_FILE, catalog_identity, verify_files, write_json, write_manifest
from cliprec.errors import CliprecError
from cliprec.params import Images

log = logging.getLogger(__name__)

PROJECT_URL = "https://github.com/cliprec/cliprec"
SHARD_GLOB = "shard-*.parquet"
STATUS_FILE = "status.parquet"
REPORT_FILE = "report.json"
VIEWS = ("main", "alt")
STATUSES = (
    "ok",
    "timeout",
    "connection_error",
    "not_found",
    "read_error",
    "bad_url",
    "not_image",
    "too_large",
    "decode_error",
    "error",
    "duplicate_photo",  # fetched, but the same MAIN photo as a product of another split: not stored
)  # plus http_<code>, one per code seen
# Formats a product photo comes in. Others (EPS runs Ghostscript, fonts, PSD, ...) are not_image: fewer
# decoders facing untrusted bytes.
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
BODY_DEADLINE_FACTOR = 3.0  # whole body within 3 x timeout_s: a trickling server cannot hold a worker
MAX_RETRY_AFTER_S = 30.0  # longest Retry-After waited for; a longer one ends the URL's tries
RETRY_AFTER_CODES = (429, 503)  # the answers whose Retry-After means "come back then" (RFC 9110)
DRAFT_FACTOR = 1  # JPEG DCT-downscale to >= the target size (DCT scaling averages, no aliasing)
REDUCING_GAP = 3.0
RESAMPLE = Image.Resampling.BICUBIC
WHITE = (255, 255, 255)
PRODUCT_BATCH_ROWS = 4096  # products.parquet rows read at once by the stage
ROW_GROUP_ROWS = 256  # ~5 MB of JPEGs: what a streaming reader holds at once

SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("view", pa.string()),
        ("variant", pa.string()),
        ("url", pa.string()),
        ("jpeg", pa.binary()),
    ]
)
TRY_TYPE = pa.struct(
    [("url", pa.string()), ("status", pa.string()), ("error", pa.string()), ("attempts", pa.int32())]
)
STATUS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("url", pa.string()),  # the URL used (status ok), else the last one tried
        ("view", pa.string()),  # view stored in the shards; null if not stored
        ("status", pa.string()),  # the image's final status: that of `url`
        ("error", pa.string()),
        ("position", pa.int32()),  # index of the image in the product's image_urls
        ("attempts", pa.int32()),  # requests over all candidates tried
        ("candidate", pa.int32()),  # index of `url` among the image's candidates (0: hi_res if any)
        ("tried", pa.list_(TRY_TYPE)),  # every candidate tried, in order; the last one is `url`
    ]
)


def user_agent() -> str:
    """The User-Agent sent with every HTTP request."""
    try:
        from importlib.metadata import version

        ver = version("cliprec")
    except Exception:  # not installed (e.g. run from a bare checkout)
        ver = "0"
    return f"cliprec/{ver} (+{PROJECT_URL})"


# --- one image ------------------------------------------------------------------------------------------


class ImageFailure(Exception):
    """A per-item failure that ends in `status`; `retryable` failures are tried again."""

    def __init__(
        self, status: str, message: str, retryable: bool = False, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.attempts = 1


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


def _to_rgb_or_rgba(im: Image.Image) -> Image.Image:
    """RGB, or RGBA where the image has transparency (flattened after resizing, which handles alpha)."""
    mode = im.mode
    if mode in ("RGB", "RGBA") and "transparency" not in im.info:
        return im
    if mode.startswith("I;16") or mode in ("I", "F"):
        # 16-bit/float greyscale: convert("RGB") clips at 255 instead of scaling.
        arr = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or arr.max(initial=0) > 255:
            arr = arr / 257.0
        grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "P":
        has_alpha = "transparency" in im.info or (im.palette is not None and im.palette.mode == "RGBA")
        return im.convert("RGBA" if has_alpha else "RGB")
    if "transparency" in im.info or mode in ("LA", "La", "PA", "RGBa"):
        return im.convert("RGBA")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, ...


def _flatten(im: Image.Image) -> Image.Image:
    if im.mode != "RGBA":
        return im
    out = Image.new("RGB", im.size, WHITE)
    out.paste(im, mask=im.getchannel("A"))
    return out


def _draft_size(w: int, h: int, size: int, resize: str) -> tuple[int, int]:
    target = DRAFT_FACTOR * size
    if resize == "center_crop":
        return target, target  # both sides >= target keeps the short side >= target
    long_side = max(w, h)
    return max(1, math.ceil(target * w / long_side)), max(1, math.ceil(target * h / long_side))


def resize_square(im: Image.Image, size: int, resize: str = "center_crop") -> Image.Image:
    """Resize an RGB/RGBA image to size x size RGB by `center_crop` or `pad` (white letterbox)."""
    w, h = im.size
    if resize == "center_crop":
        short = min(w, h)
        box = ((w - short) / 2, (h - short) / 2, (w + short) / 2, (h + short) / 2)
        out = im.resize((size, size), RESAMPLE, box=box, reducing_gap=REDUCING_GAP)
        return _flatten(out)
    if resize != "pad":
        raise ValueError(f"resize must be center_crop or pad, not {resize!r}")
    scale = size / max(w, h)
    nw, nh = max(1, min(size, round(w * scale))), max(1, min(size, round(h * scale)))
    inner = im.resize((nw, nh), RESAMPLE, reducing_gap=REDUCING_GAP)
    canvas = Image.new("RGB", (size, size), WHITE)
    canvas.paste(inner, ((size - nw) // 2, (size - nh) // 2), inner if inner.mode == "RGBA" else None)
    return canvas


@functools.cache
def _open_formats() -> tuple[str, ...]:
    Image.init()  # Image.open(formats=...) raises KeyError for a plugin not registered yet
    return tuple(f for f in ACCEPTED_FORMATS if f in Image.OPEN)


# What Pillow's decoders raise on bad bytes: OSError (truncated), SyntaxError (bad structure; also a
# plainly cut AVIF), RuntimeError (the AVIF plugin when the AV1 decoder fails), ValueError, EOFError,
# struct.error and the lookup errors of Python plugins reading garbage fields, ZeroDivisionError and
# OverflowError (zero or huge header fields), MemoryError (an allocation the header asked for). Any of
# them is the file's fault, so it is this image's decode_error and never a crash of the caller.
_DECODE_ERRORS = (
    OSError,
    ValueError,
    SyntaxError,
    RuntimeError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    MemoryError,
)
JPEG_FORMATS = ("JPEG", "MPO")  # an MPO's first frame, the one decoded, is a plain JPEG
# In entropy-coded data a 0xFF data byte is stuffed as FF 00 and FF D0..D7 are restart markers: any other
# FF xx ends the scan. Between segments libjpeg skips garbage up to the next FF xx (xx not 00 or FF).
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xff]")
_STANDALONE = frozenset((0x01, *range(0xD0, 0xD9)))  # TEM, RSTn, SOI: markers without a length


_DELAY_SECONDS = re.compile(r"\d+(?:\.\d+)?")
_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")


def _check_pixels(w: int, h: int, max_pixels: int) -> None:
    if w < 1 or h < 1:
        raise ImageFailure("decode_error", f"empty image {w}x{h}")
    if w * h > max_pixels:
        raise ImageFailure(
            "too_large", f"{w}x{h} = {w * h:,} px > max_pixels {max_pixels:,} (decompression bomb?)"
        )


def jpeg_scans(data: bytes, stop_after: int) -> int:
    """Scans (SOS segments) of a JPEG's first image, counted up to stop_after + 1 by walking its markers.

    libjpeg decodes every scan over the whole coefficient buffer and Pillow sets no scan limit, so a
    progressive JPEG repeating one tiny scan thousands of times costs minutes within any pixel limit
    (libjpeg-turbo's own tools have a -maxscans option for this). The walk jumps segment to segment (a
    regex finds each scan's end) and stops at EOI: it costs O(stop_after) steps, never a decode.
    """
    pos, scans, n = 2, 0, len(data)
    while pos + 1 < n and scans <= stop_after:
        if data[pos] != 0xFF or data[pos + 1] in (0x00, 0xFF):  # garbage or fill bytes: as libjpeg, skip
            m = _NEXT_MARKER.search(data, pos + 1)
            if m is None:
                break
            pos = m.start()
            continue
        marker = data[pos + 1]
        if marker == 0xD9:  # EOI: what follows (an MPO's other frames, trailing bytes) is not decoded
            break
        if marker in _STANDALONE:
            pos += 2
            continue
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == 0xDA:
            scans += 1
            m = _SCAN_END.search(data, pos)
            if m is None:
                break
            pos = m.start()
    return scans


def _check_scans(data: bytes, max_scans: int) -> None:
    scans = jpeg_scans(data, max_scans)
    if scans > max_scans:
        raise ImageFailure(
            "too_large", f"JPEG with more than {max_scans} scans > max_jpeg_scans {max_scans} (scan bomb?)"
        )


def _bomb_failure(e: Exception, max_pixels: int) -> ImageFailure:
    """too_large for Pillow's own bomb check, quoting our limit: Pillow's error quotes 2 x max_pixels."""
    m = _BOMB_PIXELS.search(str(e))
    size = f"{int(m.group(1)):,} px" if m else "image"
    return ImageFailure("too_large", f"{size} > max_pixels {max_pixels:,} (decompression bomb?)")


def process_image(data: bytes, cfg: Images) -> bytes:
    """Decode untrusted image bytes, make them side x side RGB, return JPEG bytes; raises ImageFailure."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone flipped the global: truncated files would decode as grey garbage instead of failing.
        raise ImageFailure("error", "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; refusing to decode")
    try:
        im = Image.open(io.BytesIO(data), formats=_open_formats())
    except UnidentifiedImageError as e:
        raise ImageFailure("not_image", f"not an image in {'/'.join(_open_formats())} ({len(data)} B)") from e
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb_failure(e, cfg.max_pixels) from e
    except _DECODE_ERRORS as e:
        raise ImageFailure("decode_error", f"{type(e).__name__}: {e}") from e
    with im:
        _check_pixels(*im.size, cfg.max_pixels)
        if im.format in JPEG_FORMATS:
            _check_scans(data, cfg.max_jpeg_scans)
        try:
            # JPEG only (no-op elsewhere): decode at 1/2..1/8 scale in the DCT, the big speed win.
            im.draft(None, _draft_size(*im.size, cfg.side, cfg.resize))
            im.load()  # LOAD_TRUNCATED_IMAGES is False: a truncated file raises here
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise _bomb_failure(e, cfg.max_pixels) from e
        except _DECODE_ERRORS as e:
            raise ImageFailure("decode_error", f"{type(e).__name__}: {e}") from e
        fmt = im.format
        try:
            rotated = ImageOps.exif_transpose(im)
        except Exception as e:  # a corrupt EXIF block is no reason to lose the picture
            log.debug("ignoring EXIF orientation (%s: %s)", type(e).__name__, e)
            rotated = im
        try:
            rgb = _to_rgb_or_rgba(rotated)
        except (ValueError, OSError) as e:
            raise ImageFailure("decode_error", f"cannot convert {fmt} mode {im.mode} to RGB: {e}") from e
        out = resize_square(rgb, cfg.side, cfg.resize)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=cfg.jpeg_quality)
    return buf.getvalue()


def decode_jpeg(data: bytes, min_side: int | None = None) -> Image.Image:
    """Decode a stored JPEG (a shard's `jpeg` cell) into an RGB PIL image.

    With `min_side`, libjpeg decodes straight at the smallest 1/2, 1/4 or 1/8 scale that keeps both sides
    >= min_side: a 224-px shard read for a 64-px model decodes at 112 px in a third of the time.
    """
    with Image.open(io.BytesIO(data), formats=("JPEG",)) as im:
        if min_side:
            im.draft("RGB", (min_side, min_side))
        im.load()
        return im.convert("RGB") if im.mode != "RGB" else im.copy()


@contextlib.contextmanager
def pillow_limits(max_pixels: int) -> Iterator[None]:
    """Make Pillow's own decompression-bomb check use max_pixels and raise instead of warning.

    Process-global (Pillow has no per-call limit); entered once around the whole thread pool.
    """
    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


# --- fetching -------------------------------------------------------------------------------------------


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


def retry_delay(
    attempt: int, backoff_s: float, rng: random.Random, retry_after: float | None = None
) -> float:
    """Seconds before retry `attempt` (1 = first): backoff_s x 2^(attempt-1) x U(0.5, 1.5), or Retry-After.

    The jitter spreads threads that failed at the same moment (a 429 burst) instead of sending them back
    in lockstep. A Retry-After is waited out in full, plus up to half the backoff for the same reason.
    """
    base = backoff_s * 2 ** (attempt - 1)
    if retry_after is not None:
        return retry_after + base * rng.uniform(0.0, 0.5)
    return base * rng.uniform(0.5, 1.5)


def _read_http(session: requests.Session, url: str, cfg: Images) -> bytes:
    deadline = time.monotonic() + BODY_DEADLINE_FACTOR * cfg.timeout_s
    try:
        with session.get(url, stream=True, timeout=(cfg.timeout_s, cfg.timeout_s)) as resp:
            code = resp.status_code
            if not 200 <= code < 300:
                retryable = code >= 500 or code == 429
                retry_after = (
                    parse_retry_after(resp.headers.get("Retry-After")) if code in RETRY_AFTER_CODES else None
                )
                raise ImageFailure(f"http_{code}", f"HTTP {code} {resp.reason}", retryable, retry_after)
            length = resp.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > cfg.max_bytes:
                raise ImageFailure(
                    "too_large", f"Content-Length {int(length):,} B > max_bytes {cfg.max_bytes:,}"
                )
            buf = bytearray()
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
            return bytes(buf)
    except ImageFailure:
        raise
    except requests.exceptions.Timeout as e:
        raise ImageFailure("timeout", f"{type(e).__name__}: {e}", True) from e
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema) as e:
        raise ImageFailure("bad_url", f"{type(e).__name__}: {e}") from e
    except requests.exceptions.TooManyRedirects as e:
        raise ImageFailure("connection_error", f"{type(e).__name__}: {e}") from e
    except requests.exceptions.ConnectionError as e:
        # A read timeout while streaming the body surfaces as ConnectionError(ReadTimeoutError).
        if e.args and isinstance(e.args[0], urllib3.exceptions.ReadTimeoutError):
            raise ImageFailure("timeout", f"read timeout: {e}", True) from e
        raise ImageFailure("connection_error", f"{type(e).__name__}: {e}", True) from e
    except requests.exceptions.RequestException as e:  # ChunkedEncodingError, ContentDecodingError, ...
        raise ImageFailure("connection_error", f"{type(e).__name__}: {e}", True) from e
    # raw reads of the body raise urllib3's own exceptions, unwrapped by requests
    except urllib3.exceptions.ReadTimeoutError as e:
        raise ImageFailure("timeout", f"read timeout: {e}", True) from e
    except (urllib3.exceptions.HTTPError, OSError) as e:  # IncompleteRead, reset, DecodeError, ...
        raise ImageFailure("connection_error", f"{type(e).__name__}: {e}", True) from e


class Fetcher:
    """Fetch + process URLs from many threads: one requests.Session per thread, bounded retries.

    `sleep` and `rng` (the backoff jitter) are injectable so tests can see the delays without waiting.
    """

    def __init__(
        self,
        cfg: Images,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self._sleep = sleep
        # random.Random's methods are safe to share between threads; jitter never reaches the outputs.
        self._rng = rng if rng is not None else random.Random()
        self._local = threading.local()
        self._sessions: list[requests.Session] = []
        self._lock = threading.Lock()
        self._ua = user_agent()

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            # Retries are ours (they also cover body errors and count attempts); the pool is per thread.
            adapter = HTTPAdapter(pool_connections=8, pool_maxsize=8, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.headers.update({"User-Agent": self._ua, "Accept": "image/*,*/*;q=0.8"})
            self._local.session = session
            with self._lock:
                self._sessions.append(session)
        return session

    def _read(self, url: str) -> tuple[bytes, int]:
        path = _local_path(url)
        if path is not None:
            return _read_local(path, self.cfg.max_bytes), 1
        attempt = 0
        while True:
            attempt += 1
            try:
                return _read_http(self._session(), url, self.cfg), attempt
            except ImageFailure as f:
                f.attempts = attempt
                if not f.retryable or attempt > self.cfg.retries:
                    raise
                if f.retry_after is not None and f.retry_after > MAX_RETRY_AFTER_S:
                    over = ImageFailure(
                        f.status,
                        f"{f}; Retry-After {f.retry_after:g} s is over the {MAX_RETRY_AFTER_S:g} s cap: "
                        "not retried",
                    )
                    over.attempts = attempt
                    raise over from f
                delay = retry_delay(attempt, self.cfg.backoff_s, self._rng, f.retry_after)
                log.debug("retry %d/%d in %.2f s: %s (%s)", attempt, self.cfg.retries, delay, url, f)
                self._sleep(delay)

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


# --- the stage ------------------------------------------------------------------------------------------


def _as_list(value: Any) -> list:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return list(value)


def image_candidates(image: Any) -> list[str]:
    """One image's candidate URLs from an `image_urls` entry: a list of URLs, or a single URL string."""
    # A plain string is the one-URL-per-image layout of older products tables (and of hand-made frames).
    if isinstance(image, str):
        return [image]
    return [str(u) if u is not None else "" for u in _as_list(image)]


class _ShardWriter:
    def __init__(self, out_dir: Path, shard_size: int) -> None:
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.rows: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
        self.n_rows = 0
        self.paths: list[Path] = []

    def add(self, pid: str, view: str, variant: str, url: str, jpeg: bytes) -> None:
        for name, value in zip(SHARD_SCHEMA.names, (pid, view, variant, url, jpeg)):
            self.rows[name].append(value)
        self.n_rows += 1
        if len(self.rows["id"]) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        if not self.rows["id"]:
            return
        table = pa.table(self.rows, schema=SHARD_SCHEMA)
        path = self.out_dir / f"shard-{len(self.paths):05d}.parquet"
        pq.write_table(
            table,
            path,
            row_group_size=ROW_GROUP_ROWS,
            compression={"id": "zstd", "view": "zstd", "variant": "zstd", "url": "zstd", "jpeg": "none"},
            write_statistics=["id", "view", "variant"],  # min/max of JPEG bytes would bloat the footer
        )
        self.paths.append(path)
        self.rows = {name: [] for name in SHARD_SCHEMA.names}


class _StatusWriter:
    """status.parquet written in row groups as products finish: memory stays flat for any catalog."""

    def __init__(self, path: Path, rows_per_group: int = 8192) -> None:
        self.path, self.rows_per_group = path, rows_per_group
        self.rows: dict[str, list] = {name: [] for name in STATUS_SCHEMA.names}
        self._writer: pq.ParquetWriter | None = None

    def add(self, row: Sequence[Any]) -> None:
        for name, value in zip(STATUS_SCHEMA.names, row, strict=True):
            self.rows[name].append(value)
        if len(self.rows["id"]) >= self.rows_per_group:
            self.flush()

    def flush(self) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, STATUS_SCHEMA, compression="zstd")
        if self.rows["id"]:
            self._writer.write_table(pa.table(self.rows, schema=STATUS_SCHEMA))
            self.rows = {name: [] for name in STATUS_SCHEMA.names}

    def close(self) -> None:
        self.flush()
        self._writer.close()


def _product_rows(products: pd.DataFrame | Iterable[pd.DataFrame]) -> Iterator[tuple[str, list, list, str]]:
    """(id, image_urls, image_variants, split) per product, frame by frame."""
    for frame in [products] if isinstance(products, pd.DataFrame) else products:
        missing = {"id", "image_urls"} - set(frame.columns)
        if missing:
            raise ValueError(f"images: products table lacks columns {sorted(missing)}")
        n = len(frame)
        variants = frame["image_variants"] if "image_variants" in frame.columns else [None] * n
        splits = frame["split"] if "split" in frame.columns else [None] * n
        yield from zip(frame["id"].astype(str), frame["image_urls"], variants, splits, strict=True)


def build_image_shards(
    products: pd.DataFrame | Iterable[pd.DataFrame],
    out_dir: str | Path,
    cfg: Images,
    progress: bool = True,
    total: int | None = None,
    lineage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fetch the first max_images images of every product into out_dir; return (and write) the report.

    `lineage` (category, catalog_sha256: what the images are of) goes into manifest.json.

    `products` (a DataFrame, or DataFrames streamed batch by batch) has columns id, image_urls (one entry
    per image, MAIN first; each entry the image's candidate URLs in preference order, or a single URL)
    and optionally image_variants and split. Each image's candidates are tried in order
    (`Fetcher.fetch_first`). Writes shard-NNNNN.parquet (the `url` used), status.parquet (one row per
    image) and report.json (stale shards of an earlier run are removed). At most two images per product
    are stored (main, alt); with max_images > 2 the later images are fallbacks, and a surplus success
    stays `ok` in status.parquet with a null view. In the report, `urls` and `counts` count images (one
    final status each), `urls_tried` the candidate URLs requested and `ok_via_fallback` the images got
    from a candidate after the first, `fallen_back_from` the statuses of the candidates given up for a
    later one.

    Copies across splits: a product whose stored MAIN photo is byte for byte one an earlier product of
    ANOTHER split already has (the same picture relisted under another id, which ingest's URL grouping
    missed) is not stored; its images get status `duplicate_photo` and the report counts them, so a
    photo never sits in two splits. Copies within a split are kept and counted (`same_photo_same_split`):
    in the test gallery they are ties. Raises CliprecError (after writing status and report) when
    products had URLs but none got an image.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("images: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; truncated files would pass")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [
        *out_dir.glob(SHARD_GLOB),
        out_dir / STATUS_FILE,
        out_dir / REPORT_FILE,
        out_dir / MANIFEST_FILE,
    ]:
        stale.unlink(missing_ok=True)
    if total is None and isinstance(products, pd.DataFrame):
        total = len(products)
    log.info(
        "images: %s products, %d workers -> %s", total if total is not None else "?", cfg.workers, out_dir
    )

    writer = _ShardWriter(out_dir, cfg.shard_size)
    status_out = _StatusWriter(out_dir / STATUS_FILE)
    counts: Counter[str] = Counter()
    fallen_back_from: Counter[str] = Counter()  # statuses of candidates that a later one replaced
    n_products = n_urls = with_image = with_alt = urls_tried = via_fallback = 0
    copies = {"dropped_other_split": 0, "same_photo_same_split": 0}
    first_with: dict[bytes, tuple[str, str | None]] = {}  # MAIN photo digest -> (first product, its split)
    # Products in flight: enough to keep every worker busy past a slow head-of-line product, few enough
    # that the encoded JPEGs waiting to be written in order stay small (~20 KB each).
    window = max(64, cfg.workers * 64)

    bar = tqdm(total=total, desc="images", unit="product", disable=not progress, mininterval=1.0)

    def collect(pid: str, variants: list[str], split: str | None, futures: list[Future]) -> None:
        nonlocal n_products, n_urls, with_image, with_alt, urls_tried, via_fallback
        results: list[ImageResult] = [f.result() for f in futures]
        n_products += 1
        n_urls += len(results)
        main = next((r for r in results if r.status == "ok"), None)
        copy_of = None
        if main is not None:
            digest = hashlib.sha256(main.jpeg).digest()
            first = first_with.setdefault(digest, (pid, split))
            if first[0] != pid:
                if first[1] != split:
                    copy_of = first
                    copies["dropped_other_split"] += 1
                else:
                    copies["same_photo_same_split"] += 1
        stored = 0
        for pos, res in enumerate(results):
            urls_tried += len(res.tried)
            fallen_back_from.update(t[1] for t in res.tried[:-1])
            via_fallback += res.status == "ok" and res.candidate > 0
            status, error = res.status, res.error
            if copy_of is not None and status == "ok":
                status, error = "duplicate_photo", f"same photo as {copy_of[0]} (split {copy_of[1]})"
            counts[status] += 1
            view = None
            if status == "ok" and stored < len(VIEWS):
                view = VIEWS[stored]
                stored += 1
                variant = variants[pos] if pos < len(variants) else ""
                writer.add(pid, view, variant, res.url, res.jpeg)
            tried = [dict(zip(TRY_TYPE.names, t)) for t in res.tried]
            status_out.add((pid, res.url, view, status, error, pos, res.attempts, res.candidate, tried))
        with_image += stored > 0
        with_alt += stored > 1
        bar.update(1)

    t0 = time.perf_counter()
    pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="images")
    try:
        with pillow_limits(cfg.max_pixels), Fetcher(cfg) as fetcher:
            pending: deque[tuple[str, list[str], str | None, list[Future]]] = deque()
            for pid, urls, variants, split in _product_rows(products):
                images = [image_candidates(img) for img in _as_list(urls)][: cfg.max_images]
                variants = [str(x) for x in _as_list(variants)]
                pending.append((pid, variants, split, [pool.submit(fetcher.fetch_first, c) for c in images]))
                while len(pending) > window:
                    collect(*pending.popleft())
            while pending:
                collect(*pending.popleft())
        pool.shutdown(wait=True)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    finally:
        bar.close()
    writer.flush()
    status_out.close()
    seconds = time.perf_counter() - t0

    n_ok = counts.get("ok", 0)
    all_counts = {s: counts.get(s, 0) for s in STATUSES} | {
        s: c for s, c in sorted(counts.items()) if s not in STATUSES
    }
    report = {
        "products": n_products,
        "products_with_image": with_image,
        "products_without_image": n_products - with_image,
        "products_with_alt": with_alt,
        "urls": n_urls,
        "urls_tried": urls_tried,
        "ok_via_fallback": via_fallback,
        "fallen_back_from": dict(sorted(fallen_back_from.items())),
        "images": writer.n_rows,
        "counts": all_counts,
        "photo_copies": copies,
        "success_rate": round(n_ok / n_urls, 6) if n_urls else 0.0,
        "shards": len(writer.paths),
        "side": cfg.side,
        "resize": cfg.resize,
    }  # no wall-clock figures: this directory is a DVC output, its hash must follow from the inputs
    write_json(report, out_dir / REPORT_FILE)
    write_manifest(
        out_dir, [p.name for p in writer.paths] + [STATUS_FILE], {"side": cfg.side, **(lineage or {})}
    )
    failed = {s: c for s, c in all_counts.items() if c and s != "ok"}
    log.info(
        "images: %d/%d ok (%.1f%%, %d through a fallback URL) in %.1f s (%.1f img/s); products: %d with "
        "image, %d without, %d with alt; photo copies %s%s",
        n_ok,
        n_urls,
        100 * report["success_rate"],
        via_fallback,
        seconds,
        n_ok / seconds if seconds > 0 else 0.0,
        with_image,
        n_products - with_image,
        with_alt,
        copies,
        f"; failures {failed} (see {out_dir / STATUS_FILE})" if failed else "",
    )
    if n_products and not with_image:
        raise CliprecError(
            f"images: no product got an image ({failed}); see {out_dir / STATUS_FILE} for each image's error"
        )
    return report


def build_images(
    products_path: str | Path,
    out_dir: str | Path,
    cfg: Images,
    progress: bool = True,
    category: str | None = None,
) -> dict[str, Any]:
    """The stage: stream the verified products.parquet through build_image_shards, return the report."""
    products_path = Path(products_path)
    lineage = catalog_identity(products_path, category)
    wanted = ("id", "image_urls", "image_variants", "split")
    with pq.ParquetFile(products_path) as pf:
        columns = [c for c in wanted if c in pf.schema_arrow.names]
        frames = (b.to_pandas() for b in pf.iter_batches(batch_size=PRODUCT_BATCH_ROWS, columns=columns))
        total = pf.metadata.num_rows
        return build_image_shards(frames, out_dir, cfg, progress=progress, total=total, lineage=lineage)


# --- readers --------------------------------------------------------------------------------------------


def list_shards(images_dir: str | Path) -> list[Path]:
    """The shard files of an images directory, in row order, verified against its manifest."""
    manifest = verify_files(images_dir)
    return [Path(images_dir) / name for name in sorted(manifest["files"]) if name.startswith("shard-")]


def _empty_frame(columns: Sequence[str] | None) -> pd.DataFrame:
    schema = SHARD_SCHEMA if columns is None else pa.schema([SHARD_SCHEMA.field(c) for c in columns])
    return schema.empty_table().to_pandas()


def read_image_table(images_dir: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """All shards as one DataFrame (columns id, view, variant, url, jpeg or the ones asked for)."""
    shards = list_shards(images_dir)
    if not shards:
        return _empty_frame(columns)
    cols = list(columns) if columns is not None else None
    table = pa.concat_tables([pq.read_table(s, columns=cols) for s in shards])
    return table.to_pandas()


def iter_image_batches(
    images_dir: str | Path, batch_size: int, columns: Sequence[str] | None = None
) -> Iterator[pd.DataFrame]:
    """Stream the shards as DataFrames of exactly batch_size rows (the last may be shorter).

    Reads one row group (ROW_GROUP_ROWS rows) at a time, so memory stays ~batch_size + 256 rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    cols = list(columns) if columns is not None else None
    buf: list[pa.RecordBatch] = []
    n = 0
    for shard in list_shards(images_dir):
        with pq.ParquetFile(shard) as pf:
            for batch in pf.iter_batches(batch_size=min(batch_size, ROW_GROUP_ROWS), columns=cols):
                buf.append(batch)
                n += batch.num_rows
                while n >= batch_size:
                    table = pa.Table.from_batches(buf)
                    yield table.slice(0, batch_size).to_pandas()
                    rest = table.slice(batch_size)
                    buf, n = rest.to_batches(), rest.num_rows
    if n:
        yield pa.Table.from_batches(buf).to_pandas()


def iter_shard_rows(images_dir: str | Path, columns: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
    """Stream the shard rows as dicts (memory bounded like iter_image_batches)."""
    for frame in iter_image_batches(images_dir, ROW_GROUP_ROWS, columns):
        yield from frame.to_dict("records")


def read_status(images_dir: str | Path) -> pd.DataFrame:
    """status.parquet: one row per image (columns of STATUS_SCHEMA: the URL used, its status, tries)."""
    return pd.read_parquet(Path(images_dir) / STATUS_FILE)
