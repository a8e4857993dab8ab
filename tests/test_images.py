"""Tests for the images stage (cliprec.images, fetch, codec, shards): a loopback HTTP server plays every way
an image URL can go wrong."""

from __future__ import annotations

import email.utils
import gzip
import importlib.util
import io
import json
import struct
import threading
import time
import warnings
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pandas as pd
import pytest
import urllib3
import yaml
from PIL import Image, features

import cliprec.codec as codec
import cliprec.fetch as fetch
from cliprec.artifacts import ArtifactError, sha256_file, write_manifest
from cliprec.codec import decode_jpeg, process_image
from cliprec.errors import CliprecError
from cliprec.fetch import fetch_image
from cliprec.images import build_image_shards
from cliprec.params import Images, load_params
from cliprec.runtime import run_stage
from cliprec.shards import STATUS_FILE, iter_image_batches, list_shards, read_image_table

REPO = Path(__file__).resolve().parents[1]


def read_status(images_dir: str | Path) -> pd.DataFrame:
    """status.parquet of an images directory, as pandas reads it."""
    return pd.read_parquet(Path(images_dir) / STATUS_FILE)


def encode(im: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def bands(w: int, h: int, colors=((255, 0, 0), (0, 255, 0), (0, 0, 255))) -> Image.Image:
    """Vertical bands of equal width, left to right."""
    arr = np.zeros((h, w, 3), np.uint8)
    for i, c in enumerate(colors):
        arr[:, i * w // len(colors) : (i + 1) * w // len(colors)] = c
    return Image.fromarray(arr)


def header_bomb(w: int, h: int) -> bytes:
    """A ~60-byte PNG whose header declares w x h pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + chunk(b"IEND", b"")
    )


GOOD_JPEG = encode(bands(320, 240), quality=95)
GOOD2_JPEG = encode(Image.new("RGB", (200, 300), (20, 40, 200)), quality=95)


def alpha_png() -> bytes:
    im = Image.new("RGBA", (200, 200), (0, 0, 0, 0))  # transparent black: must come out white
    im.paste((255, 0, 0, 255), (50, 50, 150, 150))
    return encode(im, "PNG")


# --- loopback server -------------------------------------------------------------------------------------


class LoopbackImages:
    """What the image server serves, how often each full path was asked for, and the User-Agents seen."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.user_agents: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.port = 0
        self.bodies = {
            "/good.jpg": GOOD_JPEG,
            "/good2.jpg": GOOD2_JPEG,
            "/alpha.png": alpha_png(),
            "/truncated.jpg": GOOD_JPEG[: len(GOOD_JPEG) // 2],
            "/notimage.jpg": b"<html><body>Sorry, this image is gone</body></html>",
            # 3000 x 3000 = 9 Mpx in ~9 kB: past 2 x max_pixels (Pillow's DecompressionBombError)
            "/bomb.png": encode(Image.new("L", (3000, 3000)), "PNG"),
            # 1.2 Mpx: between max_pixels and 2 x max_pixels (Pillow would only warn)
            "/bomb2.png": encode(Image.new("L", (1200, 1000)), "PNG"),
            "/header-bomb.png": header_bomb(50_000, 50_000),
            "/hb.png": header_bomb(12_000, 10_000),
            "/big.jpg": GOOD_JPEG + b"\0" * 300_000,
        }
        # 5 MB of zeros in ~5 kB: only the decoded bytes may count against max_bytes
        self.gzip_bomb = gzip.compress(b"\0" * 5_000_000)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"


def _handler(state: LoopbackImages):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def send_body(
            self,
            body: bytes,
            code: int = 200,
            ctype: str = "image/jpeg",
            length: bool = True,
            headers: dict[str, str] | None = None,
        ):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if length:
                self.send_header("Content-Length", str(len(body)))
            else:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            path = urlsplit(self.path).path
            with state.lock:
                state.hits[self.path] += 1
                hits = state.hits[self.path]
                state.user_agents.append(self.headers.get("User-Agent", ""))
            if path.startswith("/delay/"):  # /delay/<ms>/<file>: finish out of order
                _, _, ms, name = path.split("/", 3)
                state.stop.wait(int(ms) / 1000)
                path = "/" + name
            if path in state.bodies:
                self.send_body(state.bodies[path])
            elif path == "/err500":
                self.send_body(b"oops", 500, "text/plain")
            elif path == "/flaky429":
                if hits == 1:
                    self.send_body(b"slow down", 429, "text/plain")
                else:
                    self.send_body(GOOD_JPEG)
            elif path == "/slow.jpg":
                state.stop.wait(2.0)
                self.send_body(GOOD_JPEG)
            elif path.startswith("/ra/"):  # /ra/<code>/<secsN|dateN|always>: Retry-After on the first hit
                _, _, code, kind = path.split("/", 3)
                if kind.startswith("date"):
                    value = email.utils.formatdate(time.time() + int(kind[4:]), usegmt=True)
                else:
                    value = "3600" if kind == "always" else kind[4:]
                if hits == 1 or kind == "always":
                    self.send_body(
                        b"come back later", int(code), "text/plain", headers={"Retry-After": value}
                    )
                else:
                    self.send_body(GOOD_JPEG)
            elif path.startswith("/cut/"):  # /cut/<once|always>: the body breaks off mid-way
                if hits == 1 or path == "/cut/always":
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(GOOD_JPEG)))
                    self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(GOOD_JPEG[: len(GOOD_JPEG) // 2])
                    self.close_connection = True
                else:
                    self.send_body(GOOD_JPEG)
            elif path == "/gzip-bomb.jpg":
                self.send_body(state.gzip_bomb, headers={"Content-Encoding": "gzip"})
            elif path == "/big-nolen.jpg":  # no Content-Length: the streamed count must stop it
                self.send_body(GOOD_JPEG + b"\0" * 300_000, length=False)
            elif path == "/trickle.jpg":  # each read within the timeout, the whole body not
                self.send_response(200)
                self.send_header("Content-Length", str(len(GOOD_JPEG)))
                self.end_headers()
                for i in range(0, len(GOOD_JPEG), 100):
                    if state.stop.wait(0.1):
                        return
                    self.wfile.write(GOOD_JPEG[i : i + 100])
                    self.wfile.flush()
            else:
                self.send_body(b"not here", 404, "text/plain")

    return Handler


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver's default backlog is 5: with 8 fetch workers connecting at once on a loaded CI machine,
    # the kernel dropped a SYN, the client's 0.3 s connect timed out and one attempt never reached us.
    request_queue_size = 128

    def handle_error(self, request, client_address) -> None:  # clients hang up on slow answers
        pass


@pytest.fixture(scope="module")
def image_server():
    """A loopback HTTP server on 127.0.0.1:<free port> serving LoopbackImages routes."""
    state = LoopbackImages()
    server = _QuietServer(("127.0.0.1", 0), _handler(state))
    state.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    state.stop.set()
    server.shutdown()
    server.server_close()


DEFAULTS = load_params(REPO / "params.yaml").images.model_dump()


def images_cfg(**kw) -> Images:
    """params.yaml's images block with `kw` changed (validated like the file)."""
    return Images(**{**DEFAULTS, **kw})


TEST_CFG = dict(
    side=224,
    workers=8,
    timeout_s=0.3,
    retries=2,
    backoff_s=0.01,
    max_bytes=200_000,
    max_pixels=1_000_000,
    shard_size=100,
)


def products_frame(rows: dict[str, list[str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": list(rows),
            "image_urls": list(rows.values()),
            "image_variants": [["MAIN"] + [f"PT{i:02d}" for i in range(1, len(u))] for u in rows.values()],
        }
    )


# --- the whole failure matrix in one stage run --------------------------------------------------------

EXPECTED = {  # product -> [(path, status)]
    "P_good": [("/good.jpg", "ok"), ("/alpha.png", "ok")],
    "P_altonly": [("/missing.jpg", "http_404"), ("/good2.jpg", "ok")],
    "P_404": [("/missing.jpg", "http_404")],
    "P_500": [("/err500", "http_500")],
    "P_429": [("/flaky429", "ok")],
    "P_slow": [("/slow.jpg", "timeout")],
    "P_trunc": [("/truncated.jpg", "decode_error")],
    "P_notimage": [("/notimage.jpg", "not_image")],
    "P_bomb": [("/bomb.png", "too_large")],
    "P_bomb2": [("/bomb2.png", "too_large")],
    "P_headerbomb": [("/header-bomb.png", "too_large")],
    "P_big": [("/big.jpg", "too_large")],
    "P_bignolen": [("/big-nolen.jpg", "too_large")],
    "P_allfail": [("/missing.jpg", "http_404"), ("/err500?again", "http_500")],
    "P_badurl": [("ftp://example.com/x.jpg", "bad_url")],
    "P_nourl": [],
}


@pytest.fixture(scope="module")
def matrix_run(image_server, tmp_path_factory):
    out = tmp_path_factory.mktemp("matrix")
    rows = {
        pid: [p if "://" in p else image_server.url(p) for p, _ in items] for pid, items in EXPECTED.items()
    }
    report = build_image_shards(products_frame(rows), out, images_cfg(**TEST_CFG), progress=False)
    return out, report, rows


def test_every_failure_ends_in_its_own_status(matrix_run):
    out, report, rows = matrix_run
    status = read_status(out)
    got = {(r.id, r.url): r.status for r in status.itertuples()}
    want = {
        (pid, url): st
        for pid, items in EXPECTED.items()
        for url, (_, st) in zip(rows[pid], items, strict=True)
    }
    assert got == want
    errors = dict(zip(status.url, status.error, strict=True))
    assert "bomb" in errors[rows["P_bomb"][0]] and "bomb" in errors[rows["P_bomb2"][0]]
    assert "max_bytes" in errors[rows["P_big"][0]] and "max_bytes" in errors[rows["P_bignolen"][0]]
    assert "truncated" in errors[rows["P_trunc"][0]]
    assert report["counts"]["ok"] == 4
    assert report["counts"]["http_404"] == 3 and report["counts"]["too_large"] == 5
    assert report["urls"] == sum(len(v) for v in EXPECTED.values())
    assert report["success_rate"] == pytest.approx(4 / report["urls"], abs=1e-6)
    assert json.loads((out / "report.json").read_text()) == report


def test_retries_5xx_and_429_but_not_4xx(matrix_run, image_server):
    out, _, rows = matrix_run
    attempts = dict(zip(read_status(out).url, read_status(out).attempts, strict=True))
    path = lambda url: url.split(str(image_server.port), 1)[1]  # noqa: E731
    assert image_server.hits[path(rows["P_500"][0])] == 3 == attempts[rows["P_500"][0]]  # 1 + retries
    assert image_server.hits[path(rows["P_404"][0])] >= 1 and attempts[rows["P_404"][0]] == 1
    assert image_server.hits["/flaky429"] == 2 == attempts[rows["P_429"][0]]
    assert attempts[rows["P_slow"][0]] == 3


def test_user_agent_sent(matrix_run, image_server):
    agents = set(image_server.user_agents)
    assert agents and all(a.startswith("cliprec/") and "(+http" in a for a in agents)


def test_failed_products_absent_and_counted(matrix_run):
    out, report, _ = matrix_run
    table = read_image_table(out)
    stored = set(table.id)
    assert stored == {"P_good", "P_altonly", "P_429"}
    assert report["products"] == len(EXPECTED)
    assert report["products_with_image"] == 3
    assert report["products_without_image"] == len(EXPECTED) - 3
    assert report["products_with_alt"] == 1
    assert report["images"] == len(table) == 4


def test_views_main_then_alt(matrix_run):
    out, _, rows = matrix_run
    table = read_image_table(out)
    good = table[table.id == "P_good"]
    assert list(good.view) == ["main", "alt"]
    assert list(good.variant) == ["MAIN", "PT01"] and list(good.url) == rows["P_good"]
    alt_only = table[table.id == "P_altonly"]  # MAIN failed: the second image becomes "main"
    assert list(alt_only.view) == ["main"] and list(alt_only.variant) == ["PT01"]
    assert alt_only.url.iloc[0].endswith("/good2.jpg")
    status = read_status(out)
    assert status.loc[status.status != "ok", "view"].isna().all()


def test_outputs_are_224_rgb_jpegs(matrix_run):
    out, _, _ = matrix_run
    for data in read_image_table(out).jpeg:
        assert data[:2] == b"\xff\xd8"
        im = decode_jpeg(data)
        assert im.size == (224, 224) and im.mode == "RGB"


def test_alpha_flattened_on_white(matrix_run):
    table = read_image_table(matrix_run[0])
    im = np.asarray(decode_jpeg(table[(table.id == "P_good") & (table.view == "alt")].jpeg.iloc[0]))
    assert (im[5, 5] > 245).all()  # transparent corner -> white, not black
    r, g, b = im[112, 112].astype(int)
    assert r > 230 and g < 30 and b < 30


def test_a_slow_server_costs_its_read_timeout_not_its_delay(matrix_run, image_server):
    # /slow.jpg answers after 2 s: each of its 3 attempts must end at the 0.3 s read timeout, so none
    # waited for the answer (which would have come back "ok")
    out, _, rows = matrix_run
    status = read_status(out).set_index("url").loc[rows["P_slow"][0]]
    assert status.status == "timeout" and status.attempts == 3 == image_server.hits["/slow.jpg"]
    assert "0.3" in status.error, status.error


# --- one image, several candidate URLs ------------------------------------------------------------------


def test_main_photo_falls_back_to_a_smaller_url_of_the_same_photo(image_server, tmp_path):
    # image_urls as cliprec.catalog writes it: per image, its URLs hi_res -> large -> thumb
    hi_res, large, thumb = (
        image_server.url(f"{p}?fb=main") for p in ("/missing.jpg", "/good.jpg", "/alpha.png")
    )
    alt = image_server.url("/good2.jpg?fb=alt")
    dead = [image_server.url(p + "?fb=dead") for p in ("/missing.jpg", "/notimage.jpg")]
    products = pd.DataFrame(
        {
            "id": ["P", "Q"],
            "image_urls": [[[hi_res, large, thumb], [alt]], [dead]],
            "image_variants": [["MAIN", "PT01"], ["MAIN"]],
        }
    )
    report = build_image_shards(products, tmp_path, images_cfg(**TEST_CFG), progress=False)

    table = read_image_table(tmp_path)
    main = table[(table.id == "P") & (table.view == "main")].iloc[0]
    assert (main.variant, main.url) == ("MAIN", large)  # the same photo, not the product's second one
    assert main.jpeg == process_image(GOOD_JPEG, images_cfg(**TEST_CFG))
    assert list(table[table.id == "P"].view) == ["main", "alt"]
    assert image_server.hits["/alpha.png?fb=main"] == 0  # nothing tried after the first success

    status = read_status(tmp_path).set_index(["id", "position"])
    used = status.loc[("P", 0)]
    assert (used.url, used.status, used.view, used.candidate, used.attempts) == (large, "ok", "main", 1, 2)
    assert [(t["url"], t["status"]) for t in used.tried] == [(hi_res, "http_404"), (large, "ok")]
    assert status.loc[("P", 1)].candidate == 0 and len(status.loc[("P", 1)].tried) == 1
    failed = status.loc[("Q", 0)]  # every candidate failed: the last one's status, all of them listed
    assert (failed.url, failed.status, failed.candidate) == (dead[1], "not_image", 1) and pd.isna(failed.view)
    assert [t["status"] for t in failed.tried] == ["http_404", "not_image"]
    assert report["urls"] == 3 and report["urls_tried"] == 5 and report["ok_via_fallback"] == 1
    assert report["counts"]["ok"] == 2 and report["counts"]["not_image"] == 1
    assert "http_404" not in report["counts"]  # counts are final statuses, one per image
    assert report["fallen_back_from"] == {"http_404": 2}  # the candidates given up for a later one
    assert report["products_with_image"] == 1 and report["products_with_alt"] == 1


def test_a_single_url_per_image_still_reads(image_server, tmp_path):
    # older products tables (and hand-made frames) hold one URL string per image
    rows = {"A": [image_server.url("/good.jpg?single")]}
    build_image_shards(products_frame(rows), tmp_path, images_cfg(**TEST_CFG), progress=False)
    status = read_status(tmp_path)
    assert list(status.status) == ["ok"] and list(status.candidate) == [0]
    assert list(read_image_table(tmp_path).url) == rows["A"]


# --- single-item paths ----------------------------------------------------------------------------------


def test_trickling_body_times_out(image_server):
    # every 100 B chunk comes within the 0.3 s read timeout, the whole body in about 4 s: only the
    # body deadline (3 x timeout_s) can end it, and it ends as a timeout, not as "ok"
    res = fetch_image(image_server.url("/trickle.jpg"), images_cfg(**{**TEST_CFG, "retries": 0}))
    assert res.status == "timeout" and res.error.startswith(
        f"body not done within {fetch.BODY_DEADLINE_FACTOR * TEST_CFG['timeout_s']:g} s"
    ), res.error


def test_bomb_over_pillows_default_limit_is_a_status_not_a_warning(image_server):
    # 120 Mpx sits between Pillow's default warning (89 Mpx) and error (179 Mpx) limits
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fetch_image(image_server.url("/hb.png"), images_cfg(**TEST_CFG))
        local = codec.process_image  # same bytes, straight through the decoder under the stage's limits
        with codec.pillow_limits(TEST_CFG["max_pixels"]), pytest.raises(codec.ImageFailure) as failure:
            local(header_bomb(12_000, 10_000), images_cfg(**TEST_CFG))
    assert res.status == "too_large" and "bomb" in res.error
    assert failure.value.status == "too_large"
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


@pytest.mark.parametrize(
    ("width", "height"),
    [(10_000, 9_000), (8_000, 6_000)],  # 90 Mpx: over 2 x the limit (Pillow's error); 48 Mpx: its warning
    ids=["over-twice", "over-once"],
)
def test_bomb_error_quotes_the_configured_max_pixels(width, height):
    # Pillow's own error quotes 2 x MAX_IMAGE_PIXELS (80,000,000 here): the message must quote params
    cfg = images_cfg(max_pixels=40_000_000)
    with codec.pillow_limits(cfg.max_pixels), pytest.raises(codec.ImageFailure) as failure:
        process_image(header_bomb(width, height), cfg)
    message = str(failure.value)
    assert failure.value.status == "too_large"
    assert "max_pixels 40,000,000" in message and f"{width * height:,} px" in message
    assert "80,000,000" not in message and "80000000" not in message


def test_max_bytes_errors_quote_the_configured_limit(matrix_run, image_server, tmp_path):
    out, _, rows = matrix_run
    errors = dict(zip(read_status(out).url, read_status(out).error, strict=True))
    assert "max_bytes 200,000" in errors[rows["P_big"][0]]  # Content-Length
    assert "max_bytes 200,000" in errors[rows["P_bignolen"][0]]  # streamed body
    assert "max_pixels 1,000,000" in errors[rows["P_bomb"][0]]
    gz = fetch_image(image_server.url("/gzip-bomb.jpg"), images_cfg(**TEST_CFG))
    assert gz.status == "too_large" and "max_bytes 200,000" in gz.error  # decoded bytes count
    (tmp_path / "big.jpg").write_bytes(GOOD_JPEG + b"\0" * 300_000)
    local = fetch_image(str(tmp_path / "big.jpg"), images_cfg(**TEST_CFG))
    assert local.status == "too_large" and "max_bytes 200,000" in local.error


def test_max_pixels_above_pillows_default_is_honoured():
    # max_pixels 200 Mpx lets the 120 Mpx header past the size check; its 16-byte body then fails to
    # decode. Under Pillow's default limit it would have been refused as a bomb instead.
    cfg = images_cfg(**{**TEST_CFG, "max_pixels": 200_000_000})
    with codec.pillow_limits(cfg.max_pixels), pytest.raises(codec.ImageFailure) as failure:
        process_image(header_bomb(12_000, 10_000), cfg)
    assert failure.value.status == "decode_error"


def test_unexpected_exception_is_a_status(image_server, tmp_path, monkeypatch, caplog):
    real = fetch.process_image

    def flaky(data, cfg):
        if len(data) == len(GOOD2_JPEG):
            raise RuntimeError("boom")
        return real(data, cfg)

    monkeypatch.setattr(fetch, "process_image", flaky)
    rows = {"A": [image_server.url("/good2.jpg")], "B": [image_server.url("/good.jpg")]}
    report = build_image_shards(products_frame(rows), tmp_path, images_cfg(**TEST_CFG), progress=False)
    status = read_status(tmp_path)
    assert list(status.status) == ["error", "ok"]
    assert "RuntimeError: boom" in status.error.iloc[0]
    assert report["counts"]["error"] == 1 and report["products_with_image"] == 1
    assert "unexpected failure" in caplog.text


def test_local_paths_share_the_code_path(tmp_path, monkeypatch):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.jpg").write_bytes(GOOD_JPEG)
    (tmp_path / "imgs" / "b c.png").write_bytes(alpha_png())
    (tmp_path / "imgs" / "trunc.jpg").write_bytes(GOOD_JPEG[:500])
    (tmp_path / "imgs" / "big.jpg").write_bytes(GOOD_JPEG + b"\0" * 300_000)
    monkeypatch.chdir(tmp_path)
    rows = {
        "rel": ["imgs/a.jpg", (tmp_path / "imgs" / "b c.png").as_uri()],  # file:// with %20
        "abs": [str(tmp_path / "imgs" / "a.jpg")],
        "bad": ["imgs/nope.jpg", "file:///definitely/not/here.jpg"],
        "trunc": ["imgs/trunc.jpg", "imgs/big.jpg"],
        "remote_file": ["file://otherhost/x.jpg"],
    }
    report = build_image_shards(products_frame(rows), "out", images_cfg(**TEST_CFG), progress=False)
    status = read_status("out")
    assert list(status.status) == [
        "ok",
        "ok",
        "ok",
        "not_found",
        "not_found",
        "decode_error",
        "too_large",
        "bad_url",
    ]
    table = read_image_table("out")
    assert list(zip(table.id, table.view, strict=True)) == [("rel", "main"), ("rel", "alt"), ("abs", "main")]
    assert table.jpeg.iloc[0] == table.jpeg.iloc[2]  # same file by relative and absolute path
    assert report["products_without_image"] == 3


def test_center_crop_and_pad_geometry():
    src = encode(bands(300, 100), "PNG")  # red | green | blue, each 100 px wide
    crop = np.asarray(decode_jpeg(process_image(src, images_cfg(resize="center_crop")))).astype(int)
    assert crop.shape == (224, 224, 3)
    for y, x in [(5, 5), (112, 112), (218, 218), (5, 218)]:  # the centre square is all green
        assert crop[y, x, 1] > 220 and crop[y, x, 0] < 40 and crop[y, x, 2] < 40
    pad = np.asarray(decode_jpeg(process_image(src, images_cfg(resize="pad")))).astype(int)
    assert pad.shape == (224, 224, 3)
    # content 224 x 75, letterboxed at rows 74..148 on white
    assert (pad[:70] > 240).all() and (pad[153:] > 240).all()
    assert pad[112, 10, 0] > 220 and pad[112, 10, 1] < 40  # red on the left
    assert pad[112, 112, 1] > 220 and pad[112, 112, 0] < 40  # green in the middle
    assert pad[112, 214, 2] > 220 and pad[112, 214, 1] < 40  # blue on the right


def test_large_jpeg_draft_keeps_geometry():
    arr = np.zeros((2000, 3000, 3), np.uint8)
    arr[:, 1500:] = 255  # left half black, right half white; the centre crop keeps both halves
    out = np.asarray(decode_jpeg(process_image(encode(Image.fromarray(arr)), images_cfg())))
    assert out[112, 50].max() < 20 and out[112, 174].min() > 235


def test_decode_jpeg_min_side_decodes_at_the_smallest_scale_that_is_big_enough():
    arr = np.zeros((224, 224, 3), np.uint8)
    arr[:, 112:] = 255
    data = process_image(encode(Image.fromarray(arr)), images_cfg())
    assert decode_jpeg(data).size == (224, 224) == decode_jpeg(data, 200).size  # 1/2 would be too small
    assert decode_jpeg(data, 64).size == (112, 112)  # 1/4 = 56 < 64
    assert decode_jpeg(data, 28).size == (28, 28)  # 1/8
    small = np.asarray(decode_jpeg(data, 64))
    assert small.shape == (112, 112, 3) and small[:, :50].max() < 20 and small[:, 62:].min() > 235


@pytest.mark.parametrize(
    "im",
    [
        Image.new("CMYK", (120, 80), (0, 255, 255, 0)),
        Image.fromarray((np.arange(120 * 80).reshape(80, 120) * 6).astype(np.uint16)),  # 16-bit grey
        Image.new("LA", (50, 90), (0, 0)),
        Image.new("1", (64, 64), 1),
    ],
    ids=["cmyk", "grey16", "la", "bilevel"],
)
def test_modes_become_rgb(im):
    fmt = "JPEG" if im.mode == "CMYK" else "PNG"
    out = decode_jpeg(process_image(encode(im, fmt), images_cfg()))
    assert out.size == (224, 224) and out.mode == "RGB"
    if im.mode == "LA":
        assert np.asarray(out).min() > 245  # fully transparent -> white
    if im.mode == "CMYK":
        r, g, b = np.asarray(out)[112, 112].astype(int)
        assert r > 230 and g < 30 and b < 30


def test_palette_with_transparency_becomes_white():
    im = Image.new("P", (60, 60), 0)
    im.putpalette([0, 0, 0] + [255, 0, 0] * 255)
    im.info["transparency"] = 0
    out = np.asarray(decode_jpeg(process_image(encode(im, "PNG"), images_cfg())))
    assert out.min() > 245


# --- retries ---------------------------------------------------------------------------------------------


class Delays:
    """A fake sleep: records what the fetcher would have waited."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __call__(self, s: float) -> None:
        self.seconds.append(s)


def test_backoff_is_exponential_with_jitter(image_server):
    # urllib3's schedule: the first retry at once, then backoff_s x 2^(n-1) plus up to backoff_s of jitter
    cfg = images_cfg(**{**TEST_CFG, "retries": 4, "backoff_s": 1.0})
    runs = []
    for n in (1, 2):
        sleep = Delays()
        with fetch.Fetcher(cfg, sleep=sleep) as fetcher:
            res = fetcher.fetch(image_server.url(f"/err500?jitter={n}"))
        assert res.status == "http_500" and res.attempts == 5
        runs.append(sleep.seconds)
    for delays in runs:
        assert len(delays) == 4 and delays[0] == 0
        assert all(2**k <= d <= 2**k + 1.0 for k, d in enumerate(delays) if k)  # doubling, plus jitter
    assert runs[0][1:] != runs[1][1:]  # two threads failing together come back at different times
    assert len({round(d - 2**k, 6) for k, d in enumerate(runs[0]) if k}) == 3  # a fresh draw per retry


def test_retry_policy_is_urllib3s_retry_built_from_params():
    cfg = images_cfg(**{**TEST_CFG, "retries": 3, "backoff_s": 0.5})
    retry = fetch.retry_policy(cfg)
    assert isinstance(retry, urllib3.util.Retry) and retry.total == 3
    assert retry.backoff_factor == 0.5 == retry.backoff_jitter and retry.respect_retry_after_header
    assert {429, 500, 503, 599} <= retry.status_forcelist and not {404, 413} & retry.status_forcelist
    assert retry.retry_after_max == fetch.MAX_RETRY_AFTER_S and not retry.raise_on_status


def test_a_body_that_breaks_off_is_retried_on_the_same_budget(image_server, caplog):
    sleep = Delays()
    with fetch.Fetcher(images_cfg(**TEST_CFG), sleep=sleep) as fetcher:
        once = fetcher.fetch(image_server.url("/cut/once"))
        always = fetcher.fetch(image_server.url("/cut/always"))
        slow = fetcher.fetch(image_server.url("/slow.jpg?quiet"))  # retried by urllib3 itself
    assert slow.status == "timeout" and slow.attempts == 3
    assert "Retrying" not in caplog.text  # urllib3's warning per retry: routine here, not logged
    assert (once.status, once.attempts, image_server.hits["/cut/once"]) == ("ok", 2, 2)
    assert always.status == "connection_error" and always.attempts == 3 == image_server.hits["/cut/always"]
    assert len(sleep.seconds) == 1 + 2 + 2  # one retry for the first, all there are for the others


@pytest.mark.parametrize(
    ("path", "low", "high"),
    [
        ("/ra/429/secs7", 7.0, 7.01),
        ("/ra/503/secs7", 7.0, 7.01),
        ("/ra/429/date20", 18.0, 20.01),  # HTTP-date: whole seconds, so up to one less
        ("/ra/503/date20", 18.0, 20.01),
        ("/ra/503/secs1.5", 1.5, 1.5),  # a decimal is read the obvious way
        ("/ra/500/secs7", 0.0, 0.0),  # Retry-After on a 500 means nothing: plain backoff (none at first)
        ("/ra/503/secssoon", 0.0, 0.0),  # an invalid one is plain backoff too, not an error
    ],
)
def test_retry_after_is_honoured_on_429_and_503(image_server, path, low, high):
    sleep = Delays()
    with fetch.Fetcher(images_cfg(**TEST_CFG), sleep=sleep) as fetcher:
        res = fetcher.fetch(image_server.url(path))
    assert res.status == "ok" and res.attempts == 2
    assert len(sleep.seconds) == 1 and low <= sleep.seconds[0] <= high


def test_retry_after_on_a_413_is_not_a_retry(image_server):
    sleep = Delays()
    with fetch.Fetcher(images_cfg(**TEST_CFG), sleep=sleep) as fetcher:
        res = fetcher.fetch(image_server.url("/ra/413/secs1"))
    assert res.status == "http_413" and res.attempts == 1 and sleep.seconds == []


def test_retry_after_over_the_cap_is_not_waited_for(image_server):
    sleep = Delays()
    with fetch.Fetcher(images_cfg(**TEST_CFG), sleep=sleep) as fetcher:
        res = fetcher.fetch(image_server.url("/ra/429/always"))  # Retry-After: 3600
    assert res.status == "http_429" and res.attempts == 1 and sleep.seconds == []
    assert f"over the {fetch.MAX_RETRY_AFTER_S:g} s cap" in res.error
    assert image_server.hits["/ra/429/always"] == 1


def test_parse_retry_after():
    now = 1_700_000_000.0
    assert fetch.parse_retry_after("120") == 120.0 and fetch.parse_retry_after(" 1.5 ") == 1.5
    assert fetch.parse_retry_after(email.utils.formatdate(now + 42, usegmt=True), now=now) == 42.0
    assert fetch.parse_retry_after("Tue, 14 Nov 2023 22:13:20 GMT", now=now) == 0.0  # exactly now
    assert fetch.parse_retry_after(email.utils.formatdate(now - 60, usegmt=True), now=now) == 0.0  # past
    for bad in (None, "", "soon", "-5", "inf", "nan"):
        assert fetch.parse_retry_after(bad) is None


# --- determinism, order, shards -------------------------------------------------------------------------


def test_deterministic_bytes_and_order_despite_completion_order(image_server, tmp_path):
    # the first products answer last, so completion order is the reverse of product order
    rows = {
        f"D{i}": [image_server.url(f"/delay/{(5 - i) * 60}/good.jpg"), image_server.url("/good2.jpg")]
        for i in range(6)
    }
    cfg = images_cfg(**{**TEST_CFG, "timeout_s": 2.0, "shard_size": 5})
    for run in ("a", "b"):
        build_image_shards(products_frame(rows), tmp_path / run, cfg, progress=False)
    shards_a, shards_b = list_shards(tmp_path / "a"), list_shards(tmp_path / "b")
    assert (
        [p.name for p in shards_a]
        == [p.name for p in shards_b]
        == [f"shard-{i:05d}.parquet" for i in range(3)]
    )
    for pa_, pb_ in zip(shards_a, shards_b, strict=True):
        assert pa_.read_bytes() == pb_.read_bytes()
    assert (tmp_path / "a" / "status.parquet").read_bytes() == (
        tmp_path / "b" / "status.parquet"
    ).read_bytes()
    table = read_image_table(tmp_path / "a")
    assert list(table.id) == [f"D{i // 2}" for i in range(12)]
    assert list(table.view) == ["main", "alt"] * 6


@pytest.fixture
def sharded(tmp_path, monkeypatch):
    """7 local images in shards of 3."""
    monkeypatch.chdir(tmp_path)
    for i in range(7):
        Path(f"{i}.png").write_bytes(encode(Image.new("RGB", (64, 48), (i * 30, 0, 0)), "PNG"))
    rows = {f"S{i}": [f"{i}.png"] for i in range(7)}
    cfg = images_cfg(**{**TEST_CFG, "shard_size": 3})
    report = build_image_shards(products_frame(rows), "out", cfg, progress=False)
    return Path("out"), report


def test_shards_split_at_shard_size(sharded):
    out, report = sharded
    shards = list_shards(out)
    assert [p.name for p in shards] == ["shard-00000.parquet", "shard-00001.parquet", "shard-00002.parquet"]
    assert [len(pd.read_parquet(p)) for p in shards] == [3, 3, 1]
    assert report["shards"] == 3
    table = read_image_table(out)
    assert list(table.columns) == ["id", "view", "variant", "url", "jpeg"]
    assert list(table.id) == [f"S{i}" for i in range(7)]
    assert list(read_image_table(out, columns=["id"]).columns) == ["id"]
    # red channel tracks the source, so rows are matched to the right product
    reds = [int(np.asarray(decode_jpeg(b))[10, 10, 0]) for b in table.jpeg]
    assert all(abs(r - i * 30) <= 3 for i, r in enumerate(reds))


def test_rerun_removes_stale_shards(sharded):
    out, _ = sharded
    rows = {"S0": ["0.png"]}
    build_image_shards(products_frame(rows), out, images_cfg(**TEST_CFG), progress=False)
    assert len(list_shards(out)) == 1 and list(read_image_table(out).id) == ["S0"]


def test_streaming_readers_cross_shard_boundaries(sharded):
    out, _ = sharded
    batches = list(iter_image_batches(out, 2, columns=["id", "jpeg"]))
    assert [len(b) for b in batches] == [2, 2, 2, 1]
    assert [i for b in batches for i in b.id] == [f"S{i}" for i in range(7)]
    assert list(batches[0].columns) == ["id", "jpeg"]
    assert [len(b) for b in iter_image_batches(out, 10)] == [7]


def test_readers_refuse_a_dir_without_manifest(tmp_path):
    images = tmp_path / "data" / "images" / "Cat"
    images.mkdir(parents=True)
    with pytest.raises(
        ArtifactError, match=r"manifest.json is missing: rebuild it with `dvc repro images@Cat`"
    ):
        read_image_table(images)
    with pytest.raises(ArtifactError):
        list(iter_image_batches(images, 4))


def test_a_truncated_or_swapped_shard_is_one_line_naming_the_file(sharded):
    out, _ = sharded
    shard = list_shards(out)[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match=r"shard-00000.parquet has \d+ bytes, its manifest says"):
        read_image_table(out)
    shard.write_bytes(data[::-1])  # same size, other bytes
    with pytest.raises(ArtifactError, match="sha256 differs"):
        list(iter_image_batches(out, 4))
    shard.write_bytes(data)
    assert len(read_image_table(out)) > 0


# --- config, errors, stage wiring -----------------------------------------------------------------------


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="resize"):
        images_cfg(resize="stretch")
    with pytest.raises(ValueError, match="unknown key 'sise'"):
        images_cfg(sise=3)
    with pytest.raises(ValueError, match="shard_size"):
        images_cfg(shard_size=0)


def test_requirements_pin_the_urllib3_the_fetcher_needs():
    # read1 (the body loop's deadline) appeared in urllib3 2.2.0; before 2.6.0 read1 inflated a whole
    # gzip read at once (~22 MB per 64 kB call on a gzip bomb), past max_bytes before we could count.
    from packaging.requirements import Requirement
    from packaging.version import Version

    lines = [ln.split("#")[0].strip() for ln in (REPO / "requirements.txt").read_text().splitlines()]
    (req,) = [Requirement(ln) for ln in lines if ln.startswith("urllib3")]
    assert "2.5.0" not in req.specifier and "2.6.0" in req.specifier and "3.0" not in req.specifier
    import urllib3

    assert Version(urllib3.__version__) in req.specifier
    assert hasattr(urllib3.response.HTTPResponse, "read1")


def test_all_failed_is_a_clear_error_after_writing_the_report(tmp_path):
    rows = {"X": ["nope/a.jpg"], "Y": []}
    with pytest.raises(CliprecError, match="no product got an image"):
        build_image_shards(products_frame(rows), tmp_path, images_cfg(**TEST_CFG), progress=False)
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["products_without_image"] == 2 and report["counts"]["not_found"] == 1
    assert list_shards(tmp_path) == []


def test_stage_main_wiring(tmp_path, monkeypatch, capsys):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["images"]["workers"] = 2
    params["categories"] = ["Cat"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cat_dir = tmp_path / "data" / "ingest" / "Cat"
    (cat_dir / "raw").mkdir(parents=True)
    (cat_dir / "raw" / "a.jpg").write_bytes(GOOD_JPEG)
    products_frame({"A": ["data/ingest/Cat/raw/a.jpg"]}).assign(title="t").to_parquet(
        cat_dir / "products.parquet"
    )
    write_manifest(cat_dir, ["products.parquet"], {"category": "Cat"})  # as ingest does
    monkeypatch.chdir(tmp_path)
    spec = importlib.util.spec_from_file_location("stage_images", REPO / "stages" / "images.py")
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    stage.main(["Cat"])
    out = tmp_path / "data" / "images" / "Cat"
    assert json.loads((out / "report.json").read_text())["products_with_image"] == 1
    assert list(read_image_table(out).id) == ["A"]
    manifest = json.loads((out / "manifest.json").read_text())  # what the photos are of, for their readers
    assert manifest["category"] == "Cat"
    assert manifest["catalog_sha256"] == sha256_file(cat_dir / "products.parquet")
    # a truncated products.parquet: one line naming it and the rebuild, not pyarrow's ArrowInvalid traceback
    capsys.readouterr()  # the first run's progress bar
    data = (cat_dir / "products.parquet").read_bytes()
    (cat_dir / "products.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit) as stop:
        run_stage(stage.main, ["Cat"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        f"error: data/ingest/Cat/products.parquet has {len(data) // 2} bytes, its manifest says {len(data)} "
        "(truncated or replaced): rebuild it with `dvc repro ingest@Cat`\n"
    )


def test_a_photo_copy_never_sits_in_two_splits(tmp_path):
    # relistings ingest could not group (other URLs, same picture): the same bytes under three ids
    for name, seed in (("a", 1), ("b", 2)):
        (tmp_path / f"{name}.jpg").write_bytes(encode(bands(320, 240 + seed), quality=95))
    (tmp_path / "a-copy.jpg").write_bytes((tmp_path / "a.jpg").read_bytes())
    (tmp_path / "a-copy2.jpg").write_bytes((tmp_path / "a.jpg").read_bytes())
    rows = {"P1": [str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")], "P2": [str(tmp_path / "a-copy.jpg")],
            "P3": [str(tmp_path / "a-copy2.jpg")], "P4": [str(tmp_path / "b.jpg")]}  # fmt: skip
    products = products_frame(rows).assign(split=["train", "test", "train", "test"])
    report = build_image_shards(products, tmp_path / "out", images_cfg(**TEST_CFG), progress=False)
    assert report["photo_copies"] == {"dropped_other_split": 1, "same_photo_same_split": 1}
    assert report["counts"]["duplicate_photo"] == 1 and report["products_with_image"] == 3
    stored = read_image_table(tmp_path / "out", columns=["id", "view"])
    assert sorted(stored.loc[stored["view"] == "main", "id"]) == ["P1", "P3", "P4"]  # P2 (test) is not
    status = read_status(tmp_path / "out").set_index("id")
    assert (
        status.loc["P2", "status"] == "duplicate_photo"
        and "same photo as P1 (split train)" in status.loc["P2", "error"]
    )
    # P4's MAIN is P1's second photo: only MAIN photos are compared, so it stays (it is P4's own MAIN)


# --- work caps: JPEG scans, and every decoder exception is this image's decode_error --------------------


def test_jpeg_scans_counts_what_libjpeg_decodes():
    from bench.hostile import progressive_jpeg_bomb

    noise = Image.effect_noise((64, 48), 40).convert("RGB")
    assert codec.jpeg_scans(encode(noise, "JPEG"), 100) == 1  # baseline
    assert codec.jpeg_scans(encode(noise, "JPEG", progressive=True), 100) == 10  # libjpeg's YCbCr progression
    assert codec.jpeg_scans(encode(noise.convert("L"), "JPEG", progressive=True), 100) == 6
    # FF DA bytes inside an APP1 segment are data, not scans: the walk jumps over segments
    assert codec.jpeg_scans(encode(noise, "JPEG", exif=b"Exif\0\0" + b"\xff\xda" * 5000), 100) == 1
    assert codec.jpeg_scans(progressive_jpeg_bomb(side=64, scans=250), 1000) == 250
    # the walk stops one past the limit: a 23,000-scan bomb costs 101 steps
    assert codec.jpeg_scans(progressive_jpeg_bomb(side=64, scans=23_000), 100) == 101


def test_scan_bomb_is_too_large_before_decoding(monkeypatch):
    from bench.hostile import progressive_jpeg_bomb

    assert DEFAULTS["max_jpeg_scans"] == 100  # params.yaml's value
    bomb = progressive_jpeg_bomb()  # 6000 x 6000, 23,000 scans: minutes of libjpeg work without the cap
    big = images_cfg(**{**TEST_CFG, "max_pixels": 40_000_000})
    loads = []
    monkeypatch.setattr(codec.ImageFile.ImageFile, "load", lambda self: loads.append(self))
    with codec.pillow_limits(big.max_pixels), pytest.raises(codec.ImageFailure) as failure:
        process_image(bomb, big)
    assert failure.value.status == "too_large" and "max_jpeg_scans 100" in str(failure.value)
    assert loads == []  # refused from its markers: not one pixel decoded


def test_jpeg_at_the_scan_cap_decodes():
    from bench.hostile import progressive_jpeg_bomb

    cfg = images_cfg(**{**TEST_CFG, "max_jpeg_scans": 40})
    out = process_image(progressive_jpeg_bomb(side=300, scans=40), cfg)
    assert Image.open(io.BytesIO(out)).size == (cfg.side, cfg.side)
    with pytest.raises(codec.ImageFailure, match="max_jpeg_scans 40"):
        process_image(progressive_jpeg_bomb(side=300, scans=41), cfg)


def test_max_jpeg_scans_is_validated():
    with pytest.raises(ValueError, match="max_jpeg_scans"):
        images_cfg(max_jpeg_scans=0)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"])
def test_truncated_file_of_every_format_is_a_decode_error(fmt):
    from bench.hostile import truncated_image

    with codec.pillow_limits(TEST_CFG["max_pixels"]), pytest.raises(codec.ImageFailure) as failure:
        process_image(truncated_image(fmt), images_cfg(**TEST_CFG))
    assert failure.value.status == "decode_error" and "\n" not in str(failure.value)


@pytest.mark.skipif(not features.check("avif"), reason="Pillow built without AVIF")
def test_truncated_avif_is_a_decode_error_not_a_runtime_error(tmp_path):
    from bench.hostile import truncated_avif

    with codec.pillow_limits(TEST_CFG["max_pixels"]), pytest.raises(codec.ImageFailure) as failure:
        process_image(truncated_avif(), images_cfg(**TEST_CFG))
    assert failure.value.status == "decode_error" and "RuntimeError" in str(failure.value)
    (tmp_path / "bad.avif").write_bytes(truncated_avif())
    res = fetch_image(str(tmp_path / "bad.avif"), images_cfg(**TEST_CFG))  # `recommend --image`'s path
    assert res.status == "decode_error"


@pytest.mark.parametrize(
    "error",
    [RuntimeError, SyntaxError, ZeroDivisionError, OverflowError, MemoryError, struct.error, EOFError],
)
def test_any_decoder_exception_is_this_images_decode_error(monkeypatch, error):
    def broken(self):
        raise error("decoder says no")

    monkeypatch.setattr(codec.ImageFile.ImageFile, "load", broken)
    with pytest.raises(codec.ImageFailure) as failure:
        process_image(GOOD_JPEG, images_cfg(**TEST_CFG))
    assert failure.value.status == "decode_error" and error.__name__ in str(failure.value)
