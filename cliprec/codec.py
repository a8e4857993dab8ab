"""Untrusted image bytes -> a side x side RGB JPEG, and stored JPEGs -> PIL images.

What the `images` stage, `cliprec recommend --image` and `cliprec serve`'s upload decoders run on bytes:
only the formats in ACCEPTED_FORMATS are opened (a product photo comes in those; fewer decoders face
untrusted bytes). Before any pixel is decoded, the declared size is checked against `max_pixels` and a
JPEG's scans are counted against `max_jpeg_scans`; every exception a decoder raises on bad bytes is the
image's `decode_error`, never a crash of the caller. RGB (alpha flattened onto white), EXIF orientation
applied, then `center_crop` (short side scaled to `side`, centre square kept) or `pad` (long side scaled to
`side`, letterboxed on white, the usual product-photo background), JPEG at `jpeg_quality`.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import re
import struct
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from cliprec.params import Images

log = logging.getLogger(__name__)

# Formats a product photo comes in. Others (EPS runs Ghostscript, fonts, PSD, ...) are not_image: fewer
# decoders facing untrusted bytes.
ACCEPTED_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
DRAFT_FACTOR = 1  # JPEG DCT-downscale to >= the target size (DCT scaling averages, no aliasing)
REDUCING_GAP = 3.0
RESAMPLE = Image.Resampling.BICUBIC
WHITE = (255, 255, 255)


class ImageFailure(Exception):
    """A per-item failure that ends in `status`; `retryable` failures are tried again (cliprec.fetch)."""

    def __init__(self, status: str, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.retryable = retryable
        self.attempts = 1


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
    progressive JPEG repeating one tiny scan many times costs a long decode within any pixel limit
    (bench/hostile.py builds one; libjpeg-turbo's own tools have a -maxscans option for this). The walk
    jumps segment to segment (a regex finds each scan's end) and stops at EOI: it costs O(stop_after)
    steps, never a decode.
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
    >= min_side, so a shard read for a smaller model decodes less.
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
