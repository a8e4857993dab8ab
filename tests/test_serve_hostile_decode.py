"""cliprec serve against hostile uploads (issue 16, cases 1, 2 and 7): a real `cliprec serve` process on
loopback for the acceptance figures, in-process for the pieces (decoder pool, per-request errors, the
worker's heartbeat, one-line cancellation). Every wait is bounded; the inputs come from bench/hostile.py.
"""

from __future__ import annotations

import asyncio
import io
import logging
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import pytest
import yaml
from helpers import CAT, serve_process, shared_project, wait_healthy
from PIL import Image, features

from bench.hostile import progressive_jpeg_bomb, truncated_avif
from cliprec.decode_pool import DecodePool
from cliprec.params import Images
from cliprec.query import Query
from cliprec.serve import ServeSettings, create_app
from cliprec.serve.cancel import CancelledInOneLine
from cliprec.serve.worker import SearchWorker
from cliprec.service import SearchRequest, Service, ServiceError

httpx = pytest.importorskip("httpx")
TestClient = pytest.importorskip("fastapi.testclient", reason="the serve extra is not installed").TestClient

# Time bounds that ARE the behaviour under test (issue 16's acceptance), kept as it states them. Each is
# generous against what it guards: a text search alone is answered in tens of milliseconds
# (bench/results/serve_load.json), so 2 s catches one stuck behind a decode, not a loaded machine; the
# upload's 4xx comes from the scan cap (at once) or from the decode time limit, 2 s in those tests (5 s is
# 2.5 x); the exit follows the default 4 s decode limit (10 s is 2.5 x).
SEARCH_BOUND_S = 2.0  # acceptance: a text search sent during an attack is answered within 2 s
UPLOAD_BOUND_S = 5.0  # acceptance: the hostile upload gets its 4xx within 5 s
EXIT_BOUND_S = 10.0  # acceptance: SIGTERM during a slow decode, exit within 10 s


def photo_bytes(fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((320, 240), 40).convert("RGB").save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The tiny project with params.yaml's limits (max_jpeg_scans 100)."""
    root = tmp_path_factory.mktemp("hostile") / "project"
    shutil.copytree(shared_project(tmp_path_factory), root)
    return root


@pytest.fixture(scope="module")
def uncapped_root(tmp_path_factory, root):
    """The same project with the scan cap lifted: a scan bomb reaches the decoders' time limit."""
    out = tmp_path_factory.mktemp("hostile-uncapped") / "project"
    shutil.copytree(root, out)
    params = yaml.safe_load((out / "params.yaml").read_text())
    params["images"]["max_jpeg_scans"] = 10_000_000
    (out / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return out


@contextmanager
def server(root, *args) -> Iterator[tuple[str, object, list[str]]]:
    """A `cliprec serve` process on port 0: (url, process, its log once stopped)."""
    proc, url, head = serve_process(root, "--category", CAT, *args)
    log: list[str] = head.splitlines()
    try:
        wait_healthy(url, 90, 0.2, proc)
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
        log.extend(out.splitlines())


def text_searches(url: str, stop: threading.Event) -> list[tuple[int, float]]:
    """(status, seconds) of text searches sent one after the other until stop is set."""
    out = []
    with httpx.Client(timeout=30) as client:
        while not stop.is_set():
            t0 = time.perf_counter()
            status = client.post(f"{url}/api/search", data={"text": "a red shirt", "k": "3"}).status_code
            out.append((status, time.perf_counter() - t0))
    return out


def during(url: str, attack: Callable[[], list], clients: int = 2) -> tuple[list, list[tuple[int, float]]]:
    """Run attack() while `clients` threads send text searches: (attack's result, every search)."""
    stop = threading.Event()
    with ThreadPoolExecutor(clients) as pool:
        searches = [pool.submit(text_searches, url, stop) for _ in range(clients)]
        time.sleep(0.3)  # searches are flowing before the attack starts
        try:
            result = attack()
        finally:
            stop.set()
        return result, [s for f in searches for s in f.result()]


def upload(url: str, data: bytes, name: str = "upload.jpg") -> tuple[int, float, str]:
    t0 = time.perf_counter()
    response = httpx.post(f"{url}/api/search", files={"image": (name, data)}, timeout=60)
    return response.status_code, time.perf_counter() - t0, response.json().get("error", "")


def assert_searches_unaffected(searches: list[tuple[int, float]]) -> None:
    assert searches, "no text search was answered during the attack"
    assert {status for status, _ in searches} == {200}
    slowest = max(seconds for _, seconds in searches)
    assert slowest < SEARCH_BOUND_S, f"a text search took {slowest:.2f} s during the attack"


def assert_quiet(log: list[str]) -> None:
    assert not [line for line in log if "Traceback" in line], "\n".join(log)


# --- acceptance, on a real server process -----------------------------------------------------------------


@pytest.mark.slow  # its own `cliprec serve` process and an attack: over 10 s here
def test_scan_bomb_is_refused_while_searches_go_on(root):
    bomb = progressive_jpeg_bomb()  # 6000 x 6000, 23,000 scans (~1.3 MB)
    with server(root) as (url, _, log):
        (status, seconds, error), searches = during(url, lambda: upload(url, bomb))
        assert status == 413 and "max_jpeg_scans 100" in error
        assert seconds < UPLOAD_BOUND_S
        assert_searches_unaffected(searches)
        assert upload(url, photo_bytes())[0] == 200  # the decoders still work
    assert_quiet(log)


@pytest.mark.slow  # its own `cliprec serve` process and an attack: over 10 s here
def test_slow_decode_is_cut_off_while_searches_go_on(uncapped_root):
    # no scan cap here: the bomb decodes until the decoders' time limit kills it
    bombs = [progressive_jpeg_bomb(), progressive_jpeg_bomb(scans=20_000)]
    with server(uncapped_root, "--decode-timeout", "2") as (url, _, log):
        with ThreadPoolExecutor(2) as pool:
            results, searches = during(url, lambda: list(pool.map(lambda b: upload(url, b), bombs)))
        for status, seconds, error in results:
            assert status == 413 and "decode_timeout_s 2 s" in error
            assert seconds < UPLOAD_BOUND_S
        assert_searches_unaffected(searches)
        # the killed decoders were replaced: an ordinary upload is answered again
        deadline = time.monotonic() + 30
        while (answer := upload(url, photo_bytes()))[0] == 503 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert answer[0] == 200, answer
    assert_quiet(log)


@pytest.mark.slow  # its own `cliprec serve` process and an attack: over 10 s here
@pytest.mark.skipif(not features.check("avif"), reason="Pillow built without AVIF")
def test_truncated_avif_is_422_and_no_one_else_sees_an_error(root):
    bad = truncated_avif()  # Pillow's AVIF plugin raises RuntimeError on it

    def attack() -> list:
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda _: upload(url, bad, "bad.avif"), range(40)))

    with server(root) as (url, _, log):
        results, searches = during(url, attack, clients=4)
        assert {status for status, _, _ in results} == {422}
        assert all("RuntimeError" in error for _, _, error in results)
        assert_searches_unaffected(searches)
    assert_quiet(log)


@pytest.mark.slow  # its own `cliprec serve` process and an attack: over 10 s here
def test_sigterm_during_a_slow_decode_exits_in_time_without_tracebacks(uncapped_root):
    with server(uncapped_root) as (url, proc, log), ThreadPoolExecutor(2) as pool:
        bombs = [pool.submit(upload, url, progressive_jpeg_bomb()) for _ in range(2)]
        time.sleep(1.0)  # both decoders are busy with a bomb until the time limit (default 4 s)
        text = httpx.post(f"{url}/api/search", data={"text": "shirt"}, timeout=30)
        assert text.status_code == 200 and not any(b.done() for b in bombs)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)  # while both decodes run
        proc.wait(timeout=EXIT_BOUND_S + 5)
        exit_s = time.monotonic() - t0
        answers = [b.result()[0] for b in bombs]
    # a graceful stop: uvicorn re-raises the signal once it is done (as in test_serve)
    assert exit_s <= EXIT_BOUND_S and proc.returncode == -signal.SIGTERM
    assert answers == [413, 413]  # each in-flight upload got its answer before the exit
    assert_quiet(log)
    assert any("serve: stopped" in line for line in log) and any("shutdown complete" in x for x in log)


# --- the pieces, in process -------------------------------------------------------------------------------


def decode_when_free(pool: DecodePool, data: bytes) -> bytes:
    """pool.decode(data), retried while it says 503 (a killed decoder's replacement is starting)."""
    deadline = time.monotonic() + 30
    while True:
        try:
            return asyncio.run(pool.decode(data))
        except ServiceError as e:
            if e.status != 503 or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


@pytest.fixture(scope="module")
def service(root):
    return Service(root, [CAT])


@pytest.mark.slow  # decodes until the time limit kills them, twice: over 10 s here
def test_decoder_pool_bounds_each_decode_and_replaces_what_it_kills(service):
    cfg = Images(**{**service.image_config.model_dump(), "max_jpeg_scans": 10_000_000})
    pool = DecodePool(cfg, processes=1, timeout_s=1.0)
    try:
        jpeg = asyncio.run(pool.decode(photo_bytes("PNG")))
        assert Image.open(io.BytesIO(jpeg)).size == (cfg.side, cfg.side)
        with pytest.raises(ServiceError) as slow:
            asyncio.run(pool.decode(progressive_jpeg_bomb()))
        assert slow.value.status == 413 and "decode_timeout_s 1 s" in str(slow.value)
        with pytest.raises(ServiceError) as bad:
            decode_when_free(pool, truncated_avif())  # the replacement decoder answers
        assert bad.value.status == 422 and "RuntimeError" in str(bad.value)

        async def three_bombs() -> list:
            return await asyncio.gather(
                *[pool.decode(progressive_jpeg_bomb()) for _ in range(3)], return_exceptions=True
            )

        statuses = [e.status for e in asyncio.run(three_bombs())]
        # one decodes until killed, one waits for the decoder, the third is refused at once (2 per decoder)
        assert statuses[0] == 413 and statuses[1] in (413, 503) and statuses[2] == 503
        with pytest.raises(ServiceError) as bad:
            decode_when_free(pool, truncated_avif())
        assert bad.value.status == 422 and "RuntimeError" in str(bad.value)
        victim = next(iter(pool._all)).process  # a decoder that died while idle costs no request
        victim.kill()
        victim.wait(5)
        assert decode_when_free(pool, photo_bytes())  # not a 422 "decoder died": the dead one was skipped
    finally:
        pool.close()


def test_search_many_keeps_each_failure_to_its_request(service, monkeypatch, caplog):
    rec = service.recommenders[CAT]["lora"]
    real_vectors, real_vector = rec.text_vectors, rec.text_vector

    def text_vectors(texts):
        if "boom" in texts:
            raise ZeroDivisionError("a bug")
        return real_vectors(texts)

    monkeypatch.setattr(rec, "text_vectors", text_vectors)
    monkeypatch.setattr(rec, "text_vector", lambda t: text_vectors([t])[0] if t == "boom" else real_vector(t))
    reqs = [
        SearchRequest(CAT, Query(text="a red shirt")),
        SearchRequest(CAT, Query(text="boom")),
        SearchRequest(CAT, Query(image="bad.avif"), upload=truncated_avif()),
        SearchRequest(CAT, Query(text="blue jeans")),
        SearchRequest("nope", Query(text="x")),
    ]
    with caplog.at_level(logging.WARNING, logger="cliprec"):
        out = service.search_many(reqs)
    assert [a.status if isinstance(a, ServiceError) else 200 for a in out] == [200, 500, 422, 200, 422]
    assert out[0]["results"]["lora"] and out[3]["results"]["lora"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "ZeroDivisionError: a bug at" in errors[0].getMessage()
    assert errors[0].exc_info is None  # one line, no traceback


class _GatedService:
    """Stands in for Service: the first call waits on a gate; requests with text "bug" fail."""

    def __init__(self) -> None:
        self.gate, self.calls = threading.Event(), []

    def search_many(self, reqs):
        self.calls.append(len(reqs))
        if len(self.calls) == 1:
            self.gate.wait(10)
        if any(r.query.text == "bug" for r in reqs):
            raise RuntimeError("search_many itself broke")
        return [{"text": r.query.text} for r in reqs]


def test_worker_answers_each_request_when_a_batch_breaks():
    service, worker = _GatedService(), SearchWorker(max_batch=8)

    async def run() -> list:
        first = worker.submit(service, SearchRequest(CAT, Query(text="first")))
        await asyncio.sleep(0.2)  # the worker is inside the first call: the next three queue up
        rest = [worker.submit(service, SearchRequest(CAT, Query(text=t))) for t in ("a", "bug", "b")]
        service.gate.set()
        return await asyncio.gather(first, *rest, return_exceptions=True)

    try:
        answers = asyncio.run(asyncio.wait_for(run(), 20))
    finally:
        worker.stop(5)
    assert answers[0] == {"text": "first"} and answers[1] == {"text": "a"} and answers[3] == {"text": "b"}
    assert isinstance(answers[2], ServiceError) and answers[2].status == 500
    assert service.calls[1] == 3  # one batch, then each of its requests alone


def test_healthz_says_503_while_the_worker_is_stuck(root):
    settings = ServeSettings(stall_s=0.5)
    with TestClient(create_app(root, [CAT], settings=settings)) as client:
        deadline = time.monotonic() + 60
        while client.get("/healthz").status_code != 200:
            assert time.monotonic() < deadline, "the app did not load"
            time.sleep(0.05)
        svc, gate = client.app.state.service, threading.Event()
        real = svc.search_many
        svc.search_many = lambda reqs: gate.wait(30) and real(reqs)  # a worker stuck in a search
        with ThreadPoolExecutor(1) as pool:
            stuck = pool.submit(client.post, "/api/search", data={"text": "a red shirt"})
            deadline = time.monotonic() + 10
            while (health := client.get("/healthz")).status_code == 200:
                assert time.monotonic() < deadline, "healthz never reported the stuck worker"
                time.sleep(0.1)
            assert health.status_code == 503 and health.json()["status"] == "stalled"
            assert "no progress" in health.json()["error"]
            gate.set()
            assert stuck.result(timeout=30).status_code == 200
        assert client.get("/healthz").status_code == 200  # progress again: healthy again


def test_product_without_a_photo_advertises_no_thumb(root):
    with TestClient(create_app(root, [CAT], settings=ServeSettings())) as client:
        deadline = time.monotonic() + 60
        while client.get("/healthz").status_code != 200:
            assert time.monotonic() < deadline, "the app did not load"
            time.sleep(0.05)
        assert client.get(f"/api/products/{CAT}/P0005").json()["thumb"] is None  # no stored photo
        thumb = client.get(f"/api/products/{CAT}/P0001").json()["thumb"]
        assert thumb == f"/api/products/{CAT}/P0001/thumb" and client.get(thumb).status_code == 200


def test_a_request_cancelled_at_shutdown_logs_one_line_and_gets_503(caplog):
    started, sent = asyncio.Event(), []

    async def slow_app(scope, receive, send):
        started.set()
        await asyncio.sleep(60)  # a request uvicorn will cancel at its graceful-shutdown timeout

    async def send(message):
        sent.append(message)

    async def run() -> None:
        scope = {"type": "http", "method": "POST", "path": "/api/search", "headers": []}
        task = asyncio.create_task(CancelledInOneLine(slow_app)(scope, None, send))
        await started.wait()
        task.cancel()
        await asyncio.wait_for(task, 5)  # the task ends normally: uvicorn logs no traceback

    with caplog.at_level(logging.WARNING, logger="cliprec"):
        asyncio.run(run())
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 503
    records = [r for r in caplog.records if "cancelled" in r.getMessage()]
    assert len(records) == 1 and records[0].exc_info is None


@pytest.mark.skipif(not features.check("avif"), reason="Pillow built without AVIF")
def test_recommend_prints_one_line_for_a_truncated_avif(root, tmp_path, capsys):
    from cliprec.cli import main

    (tmp_path / "bad.avif").write_bytes(truncated_avif())
    code = main(["--root", str(root), "recommend", "--category", CAT, "--image", str(tmp_path / "bad.avif")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()  # one line, whatever libavif's words
    assert line.startswith(f"cliprec recommend: error: unreadable image '{tmp_path / 'bad.avif'}'")
    assert "decode_error (RuntimeError: " in line
