"""Hostile uploads for `cliprec serve`: the inputs of issue 16's attacks, built in memory.

Used by tests/test_serve_hostile_decode.py, tests/test_images.py and the attack run of bench/serve_load.py.
"""

from __future__ import annotations

import io
import struct

from PIL import Image

SOI, EOI, SOS, DHT = b"\xff\xd8", b"\xff\xd9", 0xDA, 0xC4


def _segments(jpeg: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each marker segment of a baseline/progressive JPEG, a scan with its data."""
    out, pos = [], 2
    while pos < len(jpeg):
        marker = jpeg[pos + 1]
        if marker == EOI[1]:
            break
        length = struct.unpack(">H", jpeg[pos + 2 : pos + 4])[0]
        end = pos + 2 + length
        if marker == SOS:  # entropy-coded data runs to the next marker that is not a stuffed 0xFF00 / RSTn
            while not (jpeg[end] == 0xFF and jpeg[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
        out.append((marker, pos, end))
        pos = end
    return out


def progressive_jpeg_bomb(side: int = 6000, scans: int = 23_000) -> bytes:
    """A side x side progressive JPEG whose smallest AC scan is repeated until it has `scans` scans.

    A flat grey picture makes every AC scan a few end-of-band runs (~60 B with its Huffman table), and
    libjpeg decodes each repeat over every block of the picture: the defaults give ~2 MB that take
    libjpeg ~95 s (issue 16, case 1). Pixels stay under any sane bomb limit (36 Mpx).
    """
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (128, 128, 128)).save(buf, "JPEG", progressive=True, quality=90)
    jpeg = buf.getvalue()
    segs = _segments(jpeg)
    sos = [i for i, (m, _, _) in enumerate(segs) if m == SOS]
    if scans < len(sos):
        raise ValueError(f"scans must be >= the {len(sos)} scans of a plain progressive JPEG")

    def unit(i: int) -> bytes:  # the scan with the Huffman table(s) written right before it
        first = i
        while first > 0 and segs[first - 1][0] == DHT:
            first -= 1
        return jpeg[segs[first][1] : segs[i][2]]

    ac = [i for i in sos if jpeg[segs[i][1] + 4 + 1 + 2 * jpeg[segs[i][1] + 4]] > 0]  # Ss > 0: an AC scan
    repeat = min((unit(i) for i in ac), key=len)
    body_end = segs[sos[-1]][2]
    return jpeg[:body_end] + repeat * (scans - len(sos)) + EOI


def truncated_avif(side: int = 64, keep: int = 8) -> bytes:
    """An AVIF whose AV1 data is cut after `keep` bytes and zero-filled to the length its boxes declare.

    The container parses; the AV1 decoder fails, and Pillow's AVIF plugin raises RuntimeError (issue 16,
    case 2). A plain cut of the file is a SyntaxError there instead (`truncated_image`).
    """
    buf = io.BytesIO()
    Image.effect_noise((side, side), 64).convert("RGB").save(buf, "AVIF", quality=60)
    data = buf.getvalue()
    payload = data.index(b"mdat") + 4 + keep
    return data[:payload] + bytes(len(data) - payload)


def truncated_image(fmt: str, side: int = 256, keep: float = 0.5) -> bytes:
    """A `fmt` image (Pillow save name) cut after `keep` of its bytes."""
    buf = io.BytesIO()
    Image.effect_noise((side, side), 64).convert("RGB").save(buf, fmt)
    data = buf.getvalue()
    return data[: max(1, int(len(data) * keep))]
