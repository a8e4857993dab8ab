"""Hostile inputs for the serve benchmarks and tests (issue 16): what an attacker would upload."""

from __future__ import annotations

import io

from PIL import Image

SOS = 0xDA
EOI = 0xD9
STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length


def _segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of every segment after SOI; a scan's segment runs to the end of its data."""
    out, pos = [], 2
    while pos < len(data):
        if data[pos] != 0xFF:
            raise ValueError(f"not a JPEG marker at byte {pos}")
        marker = data[pos + 1]
        if marker == EOI:
            out.append((marker, pos, pos + 2))
            break
        end = pos + 2 if marker in STANDALONE else pos + 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker == SOS:  # entropy-coded data: up to the next marker that is not a stuffed 0xFF or RSTn
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] != 0x00 and not 0xD0 <= data[end + 1] <= 0xD7:
                    break
                end += 2
        out.append((marker, pos, end))
        pos = end
    return out


def progressive_jpeg_bomb(side: int = 6000, scans: int = 23_000) -> bytes:
    """A progressive JPEG of side x side grey pixels in which one AC scan is repeated until the file has
    `scans` scans. libjpeg decodes every scan over the whole image and Pillow sets no limit on their
    number: the issue's 6000 x 6000, 23,000-scan file is 2.1 MB and took 95 s to decode."""
    buf = io.BytesIO()
    Image.new("L", (side, side), 128).save(buf, "JPEG", progressive=True, quality=90)
    data = buf.getvalue()
    segments = _segments(data)
    scan_at = [i for i, (marker, _, _) in enumerate(segments) if marker == SOS]
    ac = [i for i in scan_at if data[segments[i][1] + 4 + 2 * data[segments[i][1] + 4] + 1] > 0]  # Ss > 0
    if not ac or scans < len(scan_at):
        raise ValueError(f"need at least {len(scan_at)} scans and an AC scan, the encoder wrote {scan_at}")
    last_ac = ac[-1]
    unit_start = segments[last_ac - 1][1] if segments[last_ac - 1][0] == 0xC4 else segments[last_ac][1]
    unit = data[unit_start : segments[last_ac][2]]  # its Huffman table (if any) and the scan
    end = segments[last_ac][2]
    repeats = scans - len(scan_at)
    return data[:end] + unit * repeats + data[end:]
