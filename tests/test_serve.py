"""cliprec serve: every endpoint and every bad input, in-process (FastAPI TestClient) on the tiny project of
test_recommend, plus the `cliprec serve` process itself (SIGTERM/SIGINT, load failure)."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import pytest
from helpers import CAT, photo_file, serve_process, shared_project, wait_healthy
from PIL import Image

from cliprec import paths
from cliprec.artifacts import ArtifactError
from cliprec.cli import main
from cliprec.recommend import RecommendError
from cliprec.serve import STATIC_DIR, SearchResponse, ServeSettings, create_app
from cliprec.service import Service

fastapi_testclient = pytest.importorskip("fastapi.testclient", reason="the serve extra is not installed")
TestClient = fastapi_testclient.TestClient

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ServeSettings(max_upload_bytes=200_000, max_k=20, max_inflight=8)
METRICS_WITH_CI = {
    "text_to_image": {"recall_at_5": 0.25, "recall_at_5_ci": [0.2, 0.3], "mrr": 0.1, "queries": 4},
    "ann_recall_at_10": 1.0,
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A copy of the tiny project (so that this module can add files) with a metrics file that has a CI."""
    root = tmp_path_factory.mktemp("serve") / "project"
    shutil.copytree(shared_project(tmp_path_factory), root)
    (root / paths.metrics_path(CAT, "lora")).parent.mkdir(parents=True, exist_ok=True)
    (root / paths.metrics_path(CAT, "lora")).write_text(json.dumps(METRICS_WITH_CI))
    return root


def wait_ready(client, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/healthz")
        if response.status_code == 200:
            return
        assert response.json()["status"] == "loading", response.json()
        time.sleep(0.05)
    raise AssertionError("the app did not load in time")


@pytest.fixture(scope="module")
def client(root):
    app = create_app(root, categories=[CAT], settings=SETTINGS)
    with TestClient(app) as c:
        wait_ready(c)
        yield c


def cli_json(root, *args) -> dict:
    """`cliprec recommend --json` output for the same project."""
    buf = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "stdout", buf)
        assert main(["--root", str(root), "recommend", "--category", CAT, "--json", *args]) == 0
    return json.loads(buf.getvalue())


def ranking(hits: list[dict]) -> list[tuple]:
    return [(h["rank"], h["id"], h["score"], h["title"]) for h in hits]


def search(client, files=None, **fields):
    data = {k: str(v) for k, v in fields.items()}
    data.setdefault("category", CAT)
    return client.post("/api/search", data=data, files=files)


def jpeg_bytes(color=(200, 30, 30), size=(80, 60)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def assert_error(response, status: int, pattern: str = "") -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and "Traceback" not in body["error"]
    assert re.search(pattern, body["error"]), body["error"]


# --- health and loading -----------------------------------------------------------------------------------


def test_healthz_is_503_until_loaded(root):
    gate = threading.Event()

    def slow_loader():
        gate.wait(30)
        return Service(root, [CAT])

    with TestClient(create_app(root, settings=SETTINGS, loader=slow_loader)) as c:
        response = c.get("/healthz")
        assert response.status_code == 503 and response.json() == {"status": "loading"}
        assert response.headers["retry-after"] == "1"
        assert_error(search(c, text="a red shirt"), 503, "loading")
        assert_error(c.get("/api/info"), 503, "loading")
        assert c.get("/").status_code == 200  # the page itself is there at once and polls /healthz
        gate.set()
        wait_ready(c)
        assert c.get("/healthz").json() == {"status": "ok", "categories": [CAT]}


def test_load_failure_is_reported(root):
    reported = []

    def broken_loader():
        raise RecommendError("pipeline not run yet: no index")

    app = create_app(root, settings=SETTINGS, loader=broken_loader, on_load_error=reported.append)
    with TestClient(app) as c:
        deadline = time.monotonic() + 10
        while not reported and time.monotonic() < deadline:
            time.sleep(0.01)
        response = c.get("/healthz")
        assert response.status_code == 503
        assert response.json() == {"status": "failed", "error": "pipeline not run yet: no index"}
        assert_error(search(c, text="x"), 503, "not ready: pipeline not run yet")
    assert reported == ["pipeline not run yet: no index"]


def test_the_service_refuses_another_variants_index(root, tmp_path):
    # what `cliprec serve` loads goes through the Recommender's checks: a copied index is not served
    swapped = tmp_path / "swapped"
    shutil.copytree(root, swapped)
    shutil.rmtree(swapped / paths.index_dir(CAT, "lora"))
    shutil.copytree(root / paths.index_dir(CAT, "zeroshot"), swapped / paths.index_dir(CAT, "lora"))
    with pytest.raises(ArtifactError, match=f"index/{CAT}/lora/manifest.json was built for variant zeroshot"):
        Service(swapped, [CAT])


# --- search: the same answers as `cliprec recommend` ------------------------------------------------------


def test_text_search_matches_cli(root, client):
    response = search(client, text="a red shirt", variant="both", k=5)
    assert response.status_code == 200, response.text
    answer = SearchResponse.model_validate(response.json()).model_dump()
    for variant in ("lora", "zeroshot"):
        want = cli_json(root, "--text", "a red shirt", "--k", "5", "--variant", variant)["results"]
        assert ranking(answer["results"][variant]) == [tuple(h.values()) for h in want]
    assert answer["query"] == {
        "kind": "text",
        "text": "a red shirt",
        "image": None,
        "product": None,
        "weight": None,
    }
    zero, lora = ([h["id"] for h in answer["results"][v]] for v in ("zeroshot", "lora"))
    assert answer["shared"] == [pid for pid in zero if pid in lora]
    hit = answer["results"]["lora"][0]
    assert hit["image"] == f"/api/products/{CAT}/{hit['id']}/thumb"
    assert hit["photo"] == f"/api/products/{CAT}/{hit['id']}/photo"


def test_one_variant(client):
    answer = search(client, text="a blue hat", variant="zeroshot", k=3).json()
    assert list(answer["results"]) == ["zeroshot"] and answer["shared"] == []
    assert len(answer["results"]["zeroshot"]) == 3


def test_image_and_text_image_search_match_cli(root, client, tmp_path):
    path = photo_file(tmp_path / "q.jpg", "green")
    data = path.read_bytes()
    answer = search(client, files={"image": ("q.jpg", data, "image/jpeg")}, k=4).json()
    both = search(client, files={"image": ("q.jpg", data, "image/jpeg")}, text="a green dress", k=4).json()
    assert both["query"]["kind"] == "text+image" and both["query"]["weight"] == 0.5
    assert answer["query"]["image"] == "q.jpg"
    for variant in ("lora", "zeroshot"):
        want = cli_json(root, "--image", str(path), "--k", "4", "--variant", variant)["results"]
        assert ranking(answer["results"][variant]) == [tuple(h.values()) for h in want]
        args = ("--image", str(path), "--text", "a green dress", "--k", "4", "--variant", variant)
        want = cli_json(root, *args)["results"]
        assert ranking(both["results"][variant]) == [tuple(h.values()) for h in want]


def test_weight_moves_between_text_and_image(client):
    files = {"image": ("q.jpg", jpeg_bytes((30, 60, 220)), "image/jpeg")}
    text_only = search(client, text="a red shirt", variant="lora", k=6).json()["results"]["lora"]
    image_only = search(client, files=files, variant="lora", k=6).json()["results"]["lora"]
    all_text = search(client, files=files, text="a red shirt", weight=1, variant="lora", k=6).json()
    all_image = search(client, files=files, text="a red shirt", weight=0, variant="lora", k=6).json()
    assert all_text["query"]["weight"] == 1.0
    assert [h["id"] for h in all_text["results"]["lora"]] == [h["id"] for h in text_only]
    assert [h["id"] for h in all_image["results"]["lora"]] == [h["id"] for h in image_only]


def test_product_search_matches_cli(root, client):
    answer = search(client, product="P0001", k=5).json()
    assert answer["query"]["kind"] == "product"
    for variant in ("lora", "zeroshot"):
        ids = [h["id"] for h in answer["results"][variant]]
        assert "P0001" not in ids and len(ids) == 5
        want = cli_json(root, "--product", "P0001", "--k", "5", "--variant", variant)["results"]
        assert ranking(answer["results"][variant]) == [tuple(h.values()) for h in want]


def test_html_form_empty_file_and_blank_text_are_ignored(client):
    # an HTML form sends an empty file part without a filename when no photo was chosen
    response = search(client, files={"image": ("", b"", "application/octet-stream")}, text="a red shirt", k=2)
    assert response.status_code == 200 and response.json()["query"]["kind"] == "text"
    assert_error(search(client, text="   ", k=2), 422, "no query")


# --- bad input: 4xx with one line of JSON, never a 500 ----------------------------------------------------


def png_bomb(side: int = 50_000) -> bytes:
    """A 1x1 PNG whose header claims side x side pixels (a decompression bomb's header)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", side, side)
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr : ihdr + 17])))
    return bytes(data)


@pytest.mark.parametrize(
    ("fields", "files", "status", "pattern"),
    [
        ({}, None, 422, "no query"),
        ({"product": "P0001", "text": "x"}, None, 422, "cannot be combined"),
        ({"text": "x", "k": 0}, None, 422, "^k: .*greater than or equal to 1"),
        ({"text": "x", "k": 21}, None, 422, "^k: .*less than or equal to 20"),
        ({"text": "x", "k": "ten"}, None, 422, "^k: "),
        ({"text": "x", "weight": 1.5}, None, 422, "^weight: "),
        ({"text": "x", "variant": "best"}, None, 422, "^variant: "),
        ({"text": "x", "variant": ""}, None, 422, "^variant: must not be empty"),  # not the default
        ({"text": "x", "k": ""}, None, 422, "^k: must not be empty"),
        ({"text": "x", "category": "Nope"}, None, 422, "unknown category 'Nope'"),
        ({"text": "x" * 1001}, None, 422, "^text: .*at most 1000"),
        ({"product": "NOPE"}, None, 404, "unknown product 'NOPE'"),
        ({"product": "../../params.yaml"}, None, 404, "unknown product"),
        ({"product": "P0005"}, None, 404, "no embedding"),  # in the catalog, its photo never arrived
        ({}, {"image": ("notes.jpg", b"<html>not a picture</html>", "image/jpeg")}, 415, "not_image"),
        ({}, {"image": ("cut.jpg", jpeg_bytes()[:300], "image/jpeg")}, 422, "decode_error"),
        ({}, {"image": ("bomb.png", png_bomb(), "image/png")}, 413, "too_large"),
        ({}, {"image": ("empty.jpg", b"", "image/jpeg")}, 422, "empty"),
        ({"product": "P0001"}, {"image": ("q.jpg", jpeg_bytes(), "image/jpeg")}, 422, "cannot be combined"),
    ],
    ids=[
        "no-query", "product+text", "k0", "k-too-big", "k-not-int", "weight", "variant", "blank-variant",
        "blank-k", "category",
        "text-too-long", "unknown-product", "path-like-product", "no-embedding", "not-image", "truncated",
        "bomb", "empty-image", "product+image",
    ],
)  # fmt: skip
def test_bad_search_input(client, fields, files, status, pattern):
    assert_error(search(client, files=files, **fields), status, pattern)


def rejected(client, reason: str) -> float:
    text = client.get("/metrics").text
    found = re.search(rf'cliprec_http_rejected_total\{{reason="{reason}"\}} ([0-9.]+)', text)
    return float(found.group(1)) if found else 0.0


def test_over_long_form_field_is_422(client):
    # multipart: the form parser refuses the part (starlette says 400); the API says 422, as for any field
    long_field = {"text": (None, "red " * 50_000)}
    assert_error(client.post("/api/search", files=long_field), 422, "form field is longer than 65536 B")
    assert_error(search(client, text="red " * 50_000), 422, "form field is longer")  # url-encoded too


def test_upload_size_limit(client):
    too_large = rejected(client, "too_large")
    big = b"\xff" * 300_000  # > max_upload_bytes + 64 KiB of form overhead
    assert_error(search(client, files={"image": ("big.jpg", big, "image/jpeg")}), 413, "larger than")
    # also without a Content-Length: the body is counted while it streams in
    boundary = "cliprecboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="big.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + big
        + f"\r\n--{boundary}--\r\n".encode()
    )

    def chunks():
        for i in range(0, len(body), 16_384):
            yield body[i : i + 16_384]

    response = client.post(
        "/api/search", content=chunks(), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    assert_error(response, 413, "larger than")
    assert response.headers["connection"] == "close"  # the rest of the body is not read
    assert rejected(client, "too_large") == too_large + 2  # with and without a Content-Length
    # just under the cap the upload itself is checked (and is no image)
    just_under = b"\xff" * (SETTINGS.max_upload_bytes - 10)
    assert_error(search(client, files={"image": ("x.jpg", just_under, "image/jpeg")}), 415, "not_image")


def test_malformed_requests(client):
    assert_error(client.post("/api/search", content=b"text=hi", headers={"content-type": "text/plain"}), 422)
    response = client.post(
        "/api/search", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert 400 <= response.status_code < 500
    assert set(response.json()) == {"error"}
    assert_error(client.get("/api/search"), 405)
    assert_error(client.get("/no/such/page"), 404)


def blocking_loader(root, gate: threading.Event, started: threading.Event):
    """A loader whose service holds the worker's first batch until `gate` is set."""

    def load():
        service = Service(root, [CAT])
        real = service.search_many

        def held(reqs):
            started.set()
            gate.wait(30)
            return real(reqs)

        service.search_many = held
        return service

    return load


def test_saturated_server_answers_503(root):
    settings = ServeSettings(max_inflight=1, max_k=20, max_upload_bytes=200_000)
    gate, started = threading.Event(), threading.Event()
    with TestClient(create_app(root, settings=settings, loader=blocking_loader(root, gate, started))) as c:
        wait_ready(c)
        first = {}
        worker = threading.Thread(target=lambda: first.update(r=search(c, text="a red shirt", k=2)))
        worker.start()
        try:
            assert started.wait(30)
            busy = search(c, text="a red shirt", k=2)
            assert_error(busy, 503, "busy")
            assert busy.headers["retry-after"] == "1"
            assert_error(c.get(f"/api/products/{CAT}/P0001"), 503, "busy")  # same budget
            assert c.get("/healthz").status_code == 200  # health and metrics stay outside it
        finally:
            gate.set()
            worker.join(30)
        assert first["r"].status_code == 200
        assert search(c, text="a red shirt", k=2).status_code == 200  # admitted again
        assert 'cliprec_http_rejected_total{reason="saturated"} 2.0' in c.get("/metrics").text


def test_queued_searches_are_answered_in_one_batch(root, client):
    texts = ["a red shirt", "a blue hat", "green dress with long sleeves", "a bag", "a black shoe"]
    alone = {t: search(client, text=t, k=5).json() for t in texts}
    gate, started = threading.Event(), threading.Event()
    with TestClient(create_app(root, settings=SETTINGS, loader=blocking_loader(root, gate, started))) as c:
        wait_ready(c)
        answers: dict[str, dict] = {}

        def ask(text):
            answers[text] = search(c, text=text, k=5).json()

        threads = [threading.Thread(target=ask, args=(t,)) for t in texts]
        try:
            threads[0].start()
            assert started.wait(30)  # the worker holds the first search; the others queue behind it
            for t in threads[1:]:
                t.start()
            answers["bad"] = search(c, text="x", k=99).json()  # refused before it reaches the worker
            deadline = time.monotonic() + 30
            while c.app.state.worker.pending < len(texts) - 1:
                assert time.monotonic() < deadline, "the searches did not queue"
                time.sleep(0.01)
            assert "cliprec_http_work_in_flight 5.0" in c.get("/metrics").text
        finally:
            gate.set()
            for t in threads:
                t.join(30)
        sizes = c.get("/metrics").text
    assert answers["bad"]["error"].startswith("k: ")
    assert 'cliprec_search_batch_size_bucket{le="4.0"} 2.0' in sizes  # [first] then the other four
    assert 'cliprec_search_batch_size_bucket{le="1.0"} 1.0' in sizes
    for text in texts:
        for variant in ("zeroshot", "lora"):
            got, want = answers[text]["results"][variant], alone[text]["results"][variant]
            assert [h["id"] for h in got] == [h["id"] for h in want]
            assert [h["score"] for h in got] == pytest.approx([h["score"] for h in want], abs=2e-6)


def test_search_many_keeps_each_answer_in_its_place(root, client):
    from cliprec.query import Query
    from cliprec.service import SearchRequest, ServiceError

    service = client.app.state.service
    reqs = [
        SearchRequest(CAT, Query(text="a red shirt", k=3)),
        SearchRequest(CAT, Query(product="NOPE")),
        SearchRequest(CAT, Query(product="P0001", k=3)),
        SearchRequest(CAT, Query(text="a blue hat", k=4), "lora"),
        SearchRequest(CAT, Query(image="upload"), upload=b"not an image"),
        SearchRequest(CAT, Query(text="a blue hat", k=2), "lora"),
    ]
    out = service.search_many(reqs)
    assert isinstance(out[1], ServiceError) and out[1].status == 404
    assert isinstance(out[4], ServiceError) and out[4].status == 415
    assert out[2]["query"]["kind"] == "product" and len(out[2]["results"]["lora"]) == 3
    assert [len(out[i]["results"]["lora"]) for i in (0, 3, 5)] == [3, 4, 2]
    assert [h["id"] for h in out[5]["results"]["lora"]] == [h["id"] for h in out[3]["results"]["lora"]][:2]


# --- products and photos ----------------------------------------------------------------------------------


def test_product_detail(client):
    detail = client.get(f"/api/products/{CAT}/P0001").json()
    assert detail["id"] == "P0001" and detail["title"] == "green shirt" and detail["category"] == CAT
    assert detail["photos"] == {
        "main": f"/api/products/{CAT}/P0001/photo?view=main",
        "alt": f"/api/products/{CAT}/P0001/photo?view=alt",
    }
    assert detail["indexed"] == {"zeroshot": True, "lora": True}
    no_photo = client.get(f"/api/products/{CAT}/P0005").json()  # in the catalog, no photo
    assert no_photo["photos"] == {} and no_photo["indexed"] == {"zeroshot": False, "lora": False}
    assert_error(client.get(f"/api/products/{CAT}/NOPE"), 404, "unknown product")
    assert_error(client.get("/api/products/Nope/P0001"), 404, "unknown category")
    assert_error(client.get(f"/api/products/{CAT}/..%2F..%2Fparams.yaml"), 404)


def test_photos_and_thumbnails(root, client):
    from cliprec.shards import read_image_table

    table = read_image_table(root / paths.images_dir(CAT))
    stored = {(r.id, r.view): r.jpeg for r in table.itertuples()}
    for view in ("main", "alt"):
        response = client.get(f"/api/products/{CAT}/P0001/photo", params={"view": view})
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        assert response.content == stored[("P0001", view)]
    thumb = client.get(f"/api/products/{CAT}/P0001/thumb")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    image = Image.open(io.BytesIO(thumb.content))
    assert image.format == "JPEG" and max(image.size) <= SETTINGS.thumb_side
    assert_error(
        client.get(f"/api/products/{CAT}/P0000/photo", params={"view": "alt"}), 404, "no 'alt' photo"
    )
    assert_error(client.get(f"/api/products/{CAT}/P0005/thumb"), 404, "no 'main' photo")
    assert_error(client.get(f"/api/products/{CAT}/P0001/photo", params={"view": "../x"}), 422, "^view: ")
    assert_error(client.get(f"/api/products/{CAT}/NOPE/photo"), 404, "unknown product")


# --- info, metrics, docs, page ----------------------------------------------------------------------------


def test_info(root, client):
    info = client.get("/api/info").json()
    assert info["model"] == "models/demo-clip" and info["variants"] == ["zeroshot", "lora"]
    assert info["commit"] is None  # the temp project is no git repository
    cat = info["categories"][CAT]
    ids = (root / paths.index_dir(CAT, "lora") / "ids.txt").read_text().split()
    assert cat["products"] == 32 and cat["photos"] == len(ids) + sum(1 for i in ids if int(i[1:]) % 3)
    for variant in ("zeroshot", "lora"):
        v = cat["variants"][variant]
        assert v["index"] == "Flat" and v["ntotal"] == len(ids) and v["d"] == 16
    assert cat["variants"]["lora"]["metrics"] == METRICS_WITH_CI  # CIs passed through where present
    assert cat["variants"]["zeroshot"]["metrics"] is None
    assert info["limits"]["max_k"] == 20


def test_prometheus_metrics(client):
    search(client, text="a red shirt", k=2)
    search(client, text="x", k=0)
    client.get(f"/api/products/{CAT}/P0001/thumb")
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    assert re.search(
        r'cliprec_http_requests_total\{method="POST",route="/api/search",status="200"\} [1-9]', text
    )
    assert re.search(
        r'cliprec_http_requests_total\{method="POST",route="/api/search",status="422"\} [1-9]', text
    )
    assert 'route="/api/products/{category}/{product_id}/thumb"' in text  # templates, not raw paths
    assert (
        'cliprec_http_request_duration_seconds_bucket{le="0.005",method="POST",route="/api/search"}' in text
    )
    assert re.search(r'cliprec_search_duration_seconds_count\{kind="text"\} [1-9]', text)
    assert "process_resident_memory_bytes" in text


def test_docs_work_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href|url)\s*[=:]\s*['"]([^'"]+)['"]""", page.text)
    assert urls and all(u.startswith("/") for u in urls), urls  # nothing from a CDN
    for url in urls:
        assert client.get(url).status_code == 200, url
    assert "validatorUrl" in page.text  # Swagger UI's online validator badge is off
    spec = client.get("/openapi.json").json()
    assert {"/api/search", "/api/info", "/healthz", "/api/products/{category}/{product_id}"} <= set(
        spec["paths"]
    )


def test_openapi_tells_what_a_form_can_send(client):
    spec = client.get("/openapi.json").json()
    search_op = spec["paths"]["/api/search"]["post"]
    assert {"400", "408", "413", "415", "422", "503"} <= set(search_op["responses"])
    ref = search_op["requestBody"]["content"]["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
    fields = spec["components"]["schemas"][ref]["properties"]
    assert {"text", "image", "product", "weight", "category", "variant", "k"} == set(fields)
    assert "null" not in json.dumps(fields)  # a multipart form cannot send a null
    assert fields["text"]["type"] == "string" and fields["weight"]["type"] == "number"


def test_head_of_page_and_health(client):
    for path in ("/", "/healthz"):
        response = client.head(path)
        assert response.status_code == 200 and response.content == b"", path


def test_page_loads_only_local_files(client):
    page = client.get("/")
    assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
    urls = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    local = [u for u in urls if not u.startswith(("#", "data:"))]
    assert local and all(u.startswith("/") for u in local), urls
    for url in local:
        if url.startswith("/static/"):
            assert client.get(url).status_code == 200, url
    script = client.get("/static/app.js").text
    assert "innerHTML" not in script  # server text goes in as textContent only
    assert not re.search(r"https?://", script + client.get("/static/app.css").text)


def test_vendored_files_match_their_manifest():
    vendor = STATIC_DIR / "vendor"
    manifest = json.loads((vendor / "VENDOR.json").read_text())
    assert {"vega", "vega-lite", "vega-embed", "swagger-ui-dist"} <= set(manifest)
    for package in manifest.values():
        for name, digest in package["files"].items():
            assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name


def test_plots(client):
    answer = client.get("/api/plots").json()  # the temp project is no DVC repository
    assert answer["plots"] == [] and "no DVC project" in answer["errors"][0]
    from cliprec.plots import plot_specs

    specs = plot_specs(REPO)  # the committed metrics of this repository
    names = [p["name"] for p in specs["plots"]]
    assert any("recall_at_k" in n for n in names) and any("val_loss" in n for n in names), names
    for plot in specs["plots"]:
        assert plot["spec"]["$schema"].startswith("https://vega.github.io/schema/vega-lite/v5")
        assert plot["spec"]["data"]["values"], plot["name"]  # data inlined: nothing to fetch


# --- the `cliprec serve` process ------------------------------------------------------------------------


@pytest.mark.slow  # each case a fresh `cliprec serve` process: over 10 s here
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_command_stops_gracefully(root, sig):
    import httpx

    proc, url, head = serve_process(root, "--category", CAT)
    try:
        wait_healthy(url, 90, 0.2, proc)
        response = httpx.post(f"{url}/api/search", data={"text": "a red shirt", "k": "3"}, timeout=30)
        assert response.status_code == 200 and len(response.json()["results"]["lora"]) == 3
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=30)
        out = head + out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    # after its graceful shutdown uvicorn re-raises the signal: SIGTERM ends the process as the signal
    # does (-15), Ctrl-C becomes exit status 130
    assert proc.returncode == (-signal.SIGTERM if sig == signal.SIGTERM else 130), out
    assert "Application shutdown complete" in out and "serve: stopped" in out and "Traceback" not in out
    assert re.search(r"serve: listening on http://127\.0\.0\.1:[1-9][0-9]* \(", head), head  # the bound port


def test_serve_command_exits_3_when_its_port_is_taken(root, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = main(["--root", str(root), "serve", "--port", str(port), "--category", CAT])
    assert code == 3
    err = capsys.readouterr().err
    assert err == f"cliprec serve: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"


def test_serve_command_exits_2_when_nothing_can_load(root, capsys):
    code = main(["--root", str(root), "serve", "--port", "0", "--category", "Nope"])
    assert code == 2
    for bad in (["--port", "65536"], ["--max-inflight", "0"], ["--max-upload-mb", "-1"], ["--threads", "x"]):
        with pytest.raises(SystemExit) as stop:  # argparse: usage and one line, no server started
            main(["--root", str(root), "serve", *bad])
        assert stop.value.code == 2
    assert "argument --threads: must be an integer >= 1, not 'x'" in capsys.readouterr().err


def test_serve_command_on_a_corrupt_index_exits_2_with_one_line(root, tmp_path, caplog):
    # it once logged a 28-line traceback (ArtifactError was not among serve's user errors)
    broken = tmp_path / "broken"
    shutil.copytree(root, broken)
    index_file = broken / paths.index_dir(CAT, "zeroshot") / "index.faiss"
    index_file.write_bytes(index_file.read_bytes()[:-8] + b"garbage!")
    with caplog.at_level("ERROR", logger="cliprec.serve"):
        assert main(["--root", str(broken), "serve", "--port", "0", "--category", CAT]) == 2
    failed = [r for r in caplog.records if r.name == "cliprec.serve" and "cannot load" in r.getMessage()]
    assert len(failed) == 1 and not failed[0].exc_info  # no traceback
    assert failed[0].getMessage() == (
        f"serve: cannot load: {index_file} does not match its manifest (sha256 differs: corrupted or "
        f"replaced): rebuild it with `dvc repro index@{CAT}-zeroshot`"
    )
