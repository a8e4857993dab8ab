"""Load test of `cliprec serve` over loopback, next to the in-process `Recommender` on the same queries.

Starts `cliprec serve` (its own process, the demo project's outputs: run `dvc repro` first) and drives it
with a small asyncio HTTP/1.1 client (keep-alive connections, requests prebuilt as bytes, so the client
spends little of the two cores the server also needs). Queries come from the category's test split:
product titles (text), the products' other photos as uploads (image), and product ids (more like this).

For each query kind, first the in-process baseline -- `Recommender.recommend` in a loop in this process,
the way `cliprec recommend` answers (an image query reads the photo from a file), while the server idles
-- then the HTTP runs at each client count (default 16 and 64 concurrent clients, 30 s each). Per run:
QPS, p50/p95/p99 latency, errors (transport failures and every non-200 answer, 503 included), the status
counts, the server's peak RSS (sampled every 0.25 s) and the client's CPU. Then a saturation run (more
clients than `--max-inflight`: the server must answer 503 + Retry-After, not queue) and a soak: mixed
queries for `--soak-s` seconds (default 300) with the server's RSS sampled every second; growth is the
last sample against the first (taken after the runs above warmed every cache).

Under attack (issue 16): text-query QPS and p99 from `--attack-clients` clients, first clean, then while
64 slow-body connections (a search's head, then a body byte a second), 64 slow-header connections (a
request line, then a header line a second) and one decode bomb a second (bench/hostile.py's progressive
JPEG, `--bomb-side` x `--bomb-side`, `--bomb-scans` scans) are in flight; the ratio of the two, and what
became of each attacker (the server's answer when it cut them). `--attack-only` runs just this and adds
it to the existing results file as `under_attack`, keeping every other figure.

Goals (issue 12): 0 errors below saturation; HTTP text-query QPS >= 0.7 x in-process; soak RSS growth
<= 10 %.

Loopback only (127.0.0.1), bounded in count and time; the server is stopped at the end (SIGTERM).

Run (from the repo root, after `dvc repro`):
    python bench/serve_load.py           # ~11 min: 3 kinds x (10 s in process + 2 x 30 s), 5 min soak, attack
    python bench/serve_load.py --quick   # ~1 min smoke run -> bench/results/serve_load.quick.json
    python bench/serve_load.py --attack-only   # ~1 min: clean vs under attack, 30 s each
Writes bench/results/serve_load.json. `--root DIR` reads the demo outputs of another checkout (this
checkout's code serves them).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import psutil
from _common import REPO_ROOT, RESULTS_DIR, fill_defaults, machine_info, print_table, write_results
from hostile import progressive_jpeg_bomb

from cliprec import paths
from cliprec.shards import read_image_table

GOAL_TEXT_RATIO = 0.7
GOAL_SOAK_GROWTH = 0.10
KINDS = ("text", "image", "product")
DATA_ROOT = REPO_ROOT  # where the demo outputs are read (--root)
SLOW_CONNECTIONS = 64  # of each kind, as in the issue
DRIP_S = 1.0  # a slow connection sends its next byte (body) or header line (head) this often
REQUEST_TIMEOUT_S = 30.0  # a client gives up on an answer after this long


# --- queries ----------------------------------------------------------------------------------------------


def load_queries(category: str, n: int) -> dict[str, list[Any]]:
    """Up to n test-split queries of each kind: titles, other-view photos (JPEG bytes), product ids."""
    import pandas as pd

    products = pd.read_parquet(DATA_ROOT / paths.products_path(category), columns=["id", "title", "split"])
    indexed = set((DATA_ROOT / paths.index_dir(category, "lora") / "ids.txt").read_text().split())
    test = products[(products["split"] == "test") & products["id"].isin(indexed)].head(n)
    photos = read_image_table(DATA_ROOT / paths.images_dir(category), columns=["id", "view", "jpeg"])
    alt = photos[(photos["view"] == "alt") & photos["id"].isin(set(test["id"]))]
    return {
        "text": [str(t) for t in test["title"]],
        "image": [bytes(j) for j in alt["jpeg"]],
        "product": [str(i) for i in test["id"]],
    }


def multipart(fields: dict[str, str], image: bytes | None) -> tuple[bytes, str]:
    """(body, content type) of a multipart/form-data request."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
        for k, v in fields.items()
    ]
    if image is not None:
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="query.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        )
        parts.append(head.encode() + image + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def raw_requests(
    kind: str, queries: list[Any], category: str, variant: str, k: int, port: int
) -> list[bytes]:
    """Every query of a kind as a complete HTTP/1.1 POST /api/search request."""
    out = []
    for q in queries:
        fields = {"category": category, "variant": variant, "k": str(k)}
        if kind == "text":
            fields["text"] = q
        elif kind == "product":
            fields["product"] = q
        body, ctype = multipart(fields, q if kind == "image" else None)
        head = (
            f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        out.append(head.encode() + body)
    return out


# --- the client -------------------------------------------------------------------------------------------


async def _one_client(
    port: int, requests: list[bytes], start: int, deadline: float, out: list[tuple[float, int]]
) -> None:
    """Send requests[start::] round robin on one keep-alive connection until the deadline."""
    reader = writer = None
    for i in itertools.count(start):
        if time.perf_counter() >= deadline:
            break
        t0 = time.perf_counter()
        try:
            if writer is None:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(requests[i % len(requests)])
            await writer.drain()
            # bounded: under attack an answer may never come in time (a timeout is a transport failure)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT_S)
            lines = head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
            headers = {k.lower(): v for k, v in headers.items()}
            await reader.readexactly(int(headers.get("content-length", "0")))
            if headers.get("connection", "").lower() == "close":
                writer.close()
                reader = writer = None
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
            status = -1  # transport failure
            if writer is not None:
                writer.close()
            reader = writer = None
        out.append((time.perf_counter() - t0, status))
        if status == 503:
            await asyncio.sleep(0.05)  # a client honouring Retry-After would wait longer
    if writer is not None:
        writer.close()


def drive(
    port: int, requests: list[bytes], clients: int, seconds: float, attack: Attack | None = None
) -> list[tuple[float, int]]:
    """Run `clients` concurrent clients for `seconds` (while `attack` runs, if given); (latency, status)
    of every request."""
    out: list[tuple[float, int]] = []

    async def main() -> None:
        deadline = time.perf_counter() + seconds
        step = max(1, len(requests) // clients)
        clients_done = asyncio.gather(
            *(_one_client(port, requests, c * step, deadline, out) for c in range(clients))
        )
        if attack is None:
            await clients_done
        else:
            await asyncio.gather(clients_done, attack.run(port, deadline))

    asyncio.run(main())
    return out


def _status(answer: bytes) -> str:
    """The status code of a raw HTTP answer, or 'closed' when the server closed without one."""
    parts = answer.split(b" ", 2)
    return parts[1].decode() if len(parts) > 1 and answer.startswith(b"HTTP/1.") else "closed"


class Attack:
    """Slow-body and slow-header connections and decode bombs, for as long as the clients run."""

    def __init__(self, port: int, category: str, bomb: bytes | None, slow: int = SLOW_CONNECTIONS) -> None:
        self.slow = slow
        body, ctype = multipart({}, None)
        head = f"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ctype}\r\n"
        boundary = ctype.rsplit("=", 1)[1]
        part = f'--{boundary}\r\nContent-Disposition: form-data; name="text"\r\n\r\n'.encode()
        self.slow_body = (head + "Content-Length: 100000\r\n\r\n").encode() + part
        self.slow_head = head.encode()
        self.bomb = raw_requests("image", [bomb], category, "lora", 10, port)[0] if bomb else None
        self.cut: dict[str, dict[str, int]] = {"slow_body": {}, "slow_header": {}}
        self.bombs: list[tuple[float, str]] = []  # (seconds to the answer, status)

    async def run(self, port: int, deadline: float) -> None:
        """Every attacker until the deadline (bombs still unanswered then are waited for 5 s more)."""
        slow = [self._slow(port, self.slow_body, b"x", "slow_body", deadline) for _ in range(self.slow)]
        slow += [
            self._slow(port, self.slow_head, b"X-Slow: 1\r\n", "slow_header", deadline)
            for _ in range(self.slow)
        ]
        bombs = [] if self.bomb is None else [self._bombs(port, deadline)]
        await asyncio.gather(*slow, *bombs)

    async def _slow(self, port: int, first: bytes, drip: bytes, kind: str, deadline: float) -> None:
        counts = self.cut[kind]
        while time.perf_counter() < deadline:
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                counts["refused"] = counts.get("refused", 0) + 1
                await asyncio.sleep(DRIP_S)
                continue
            writer.write(first)
            answer = asyncio.ensure_future(reader.read())  # all the server sends until it closes
            while not answer.done() and time.perf_counter() < deadline:
                await asyncio.wait({answer}, timeout=DRIP_S)
                if not answer.done():
                    writer.write(drip)
            if answer.done():
                status = "closed" if answer.exception() else _status(answer.result())
                counts[status] = counts.get(status, 0) + 1
            else:
                answer.cancel()
                counts["open_at_end"] = counts.get("open_at_end", 0) + 1
            writer.close()

    async def _bombs(self, port: int, deadline: float) -> None:
        tasks = []
        while time.perf_counter() < deadline:
            tasks.append(asyncio.ensure_future(self._one_bomb(port, deadline + 5)))
            await asyncio.sleep(1.0)
        await asyncio.gather(*tasks)

    async def _one_bomb(self, port: int, give_up: float) -> None:
        t0 = time.perf_counter()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(self.bomb)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), give_up - t0)
            status = _status(head)
            writer.close()
        except TimeoutError:  # before OSError, of which it is a subclass
            status = "unanswered"
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError) as e:
            status = f"closed ({type(e).__name__})"
        self.bombs.append((time.perf_counter() - t0, status))

    def summary(self) -> dict:
        """What became of the attackers."""
        answered = sorted(t for t, s in self.bombs if s[0].isdigit())
        statuses: dict[str, int] = {}
        for _, s in self.bombs:
            statuses[s] = statuses.get(s, 0) + 1
        return {
            "slow_connections_each": self.slow,
            "drip_every_s": DRIP_S,
            "slow_body_outcomes": self.cut["slow_body"],
            "slow_header_outcomes": self.cut["slow_header"],
            "bombs_sent": len(self.bombs),
            "bomb_statuses": statuses,
            "bomb_answer_s_max": round(answered[-1], 2) if answered else None,
        }


class RssSampler:
    """Samples a process's RSS in a thread: peak and every sample."""

    def __init__(self, pid: int, every_s: float) -> None:
        self.proc = psutil.Process(pid)
        self.every_s = every_s
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        t0 = time.perf_counter()
        while not self._stop.is_set():
            self.samples.append((time.perf_counter() - t0, self.proc.memory_info().rss))
            self._stop.wait(self.every_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append((self.samples[-1][0] if self.samples else 0.0, self.proc.memory_info().rss))

    @property
    def peak_mb(self) -> float:
        """Largest RSS seen, MiB."""
        return round(max(r for _, r in self.samples) / 2**20, 1)


def summarize(
    kind: str, clients: int, seconds: float, results: list[tuple[float, int]], cpu_s: float
) -> dict:
    """QPS (200s per second), latency percentiles of the 200s, errors and status counts."""
    ok = sorted(t for t, s in results if s == 200)
    statuses: dict[str, int] = {}
    for _, s in results:
        statuses[str(s)] = statuses.get(str(s), 0) + 1
    q = statistics.quantiles(ok, n=100, method="inclusive") if len(ok) >= 2 else [float("nan")] * 99
    return {
        "kind": kind,
        "clients": clients,
        "seconds": seconds,
        "requests": len(results),
        "qps": round(len(ok) / seconds, 1),
        "p50_ms": round(1000 * q[49], 1),
        "p95_ms": round(1000 * q[94], 1),
        "p99_ms": round(1000 * q[98], 1),
        "errors": len(results) - len(ok),
        "statuses": statuses,
        "client_cpu_ms_per_request": round(1000 * cpu_s / max(1, len(results)), 3),
    }


def http_run(
    pid: int,
    port: int,
    kind: str,
    requests: list[bytes],
    clients: int,
    seconds: float,
    attack: Attack | None = None,
) -> dict:
    """One load run with the server's RSS sampled; its summary, with the server's CPU per request."""
    server = psutil.Process(pid)
    cpu0, server0 = time.process_time(), server.cpu_times()
    with RssSampler(pid, 0.25) as rss:
        results = drive(port, requests, clients, seconds, attack)
    row = summarize(kind, clients, seconds, results, time.process_time() - cpu0)
    server1 = server.cpu_times()
    server_cpu = (server1.user + server1.system) - (server0.user + server0.system)
    row["server_cpu_ms_per_request"] = round(1000 * server_cpu / max(1, row["requests"]), 3)
    row["peak_rss_mb"] = rss.peak_mb
    return row


def under_attack(pid: int, port: int, requests: list[bytes], args: argparse.Namespace) -> dict:
    """Text queries clean, then under attack, same clients and duration; both runs and their ratio."""
    bomb = progressive_jpeg_bomb(args.bomb_side, args.bomb_scans) if args.bomb_scans else None
    clean = http_run(pid, port, "text", requests, args.attack_clients, args.seconds)
    attack = Attack(port, args.category, bomb)
    hostile = http_run(pid, port, "text", requests, args.attack_clients, args.seconds, attack)
    print(f"text x{args.attack_clients}: clean {clean['qps']} QPS, p99 {clean['p99_ms']} ms; under attack "
          f"{hostile['qps']} QPS, p99 {hostile['p99_ms']} ms; attackers {attack.summary()}")  # fmt: skip
    return {
        "settings": {
            "clients": args.attack_clients,
            "seconds": args.seconds,
            "bomb_side": args.bomb_side,
            "bomb_scans": args.bomb_scans,
            "bomb_bytes": len(bomb) if bomb else 0,
            "load_average_at_end": os.getloadavg(),
            "note": args.note,
        },
        "clean": clean,
        "attack": hostile,
        "attackers": attack.summary(),
        "qps_ratio": round(hostile["qps"] / clean["qps"], 3) if clean["qps"] else None,
        "p99_ratio": round(hostile["p99_ms"] / clean["p99_ms"], 3) if clean["p99_ms"] else None,
        "machine": machine_info(),
    }


def add_section(name: str, key: str, section: dict) -> Path:
    """Put `section` under `key` of bench/results/<name>.json, keeping everything else in it."""
    path = RESULTS_DIR / f"{name}.json"
    payload = json.loads(path.read_text()) if path.is_file() else {}
    payload[key] = section
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


# --- in-process baseline ----------------------------------------------------------------------------------


def in_process(rec: Any, kind: str, queries: list[Any], k: int, seconds: float, threads: int) -> dict:
    """`Recommender.recommend` in a loop with `threads` torch/FAISS threads, as `cliprec recommend`
    answers (an image query reads its photo from a file): QPS, median latency, CPU per query."""
    import faiss
    import torch

    from cliprec.query import Query

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        if kind == "image":
            files = []
            for i, data in enumerate(queries):
                path = Path(tmp) / f"q{i}.jpg"
                path.write_bytes(data)
                files.append(str(path))
            queries = files
        make = {
            "text": lambda q: Query(text=q, k=k),
            "image": lambda q: Query(image=q, k=k),
            "product": lambda q: Query(product=q, k=k),
        }
        for q in queries[:5]:  # warm-up
            rec.recommend(make[kind](q))
        n, latencies = 0, []
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        t_end = t0 + seconds
        while time.perf_counter() < t_end:
            t = time.perf_counter()
            rec.recommend(make[kind](queries[n % len(queries)]))
            latencies.append(time.perf_counter() - t)
            n += 1
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    return {
        "kind": kind,
        "threads": threads,
        "queries": n,
        "seconds": round(elapsed, 2),
        "qps": round(n / elapsed, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "cpu_ms_per_query": round(1000 * cpu / n, 3),
    }


def check_answer(port: int, kind: str, query: Any, category: str, variant: str, k: int) -> None:
    """One request of the kind must answer 200 with k results (the load runs only count statuses)."""
    fields = {"category": category, "variant": variant, "k": str(k)}
    files = None
    if kind == "image":
        files = {"image": ("q.jpg", query, "image/jpeg")}
    else:
        fields[kind] = query
    answer = httpx.post(f"http://127.0.0.1:{port}/api/search", data=fields, files=files, timeout=30)
    answer.raise_for_status()
    if len(answer.json()["results"][variant]) != k:
        raise RuntimeError(f"{kind} query: expected {k} results, got {answer.text[:500]}")


# --- the server -------------------------------------------------------------------------------------------


LISTENING = re.compile(r"serve: listening on http://127\.0\.0\.1:([0-9]+) ")


def start_server(category: str, max_inflight: int, threads: int) -> tuple[subprocess.Popen, int]:
    """`cliprec serve` of this checkout on a loopback port it binds itself, ready: (process, port)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]))
    # port 0: the kernel picks a free one while binding it (a port found free here could be taken by the
    # time the server binds it); the server logs the one it got
    cmd = [sys.executable, "-m", "cliprec.cli", "--root", str(DATA_ROOT), "serve", "--port", "0"]
    cmd += ["--category", category, "--max-inflight", str(max_inflight), "--threads", str(threads)]
    log_path = REPO_ROOT / "bench" / "scratch" / "serve_load.server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    port = None
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"cliprec serve exited with {proc.returncode}; see {log_path}")
        if port is None and (found := LISTENING.search(log_path.read_text())):
            port = int(found.group(1))
        try:
            if (
                port is not None
                and httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
            ):
                return proc, port
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"cliprec serve did not get ready in 120 s; see {log_path}")


def stop_server(proc: subprocess.Popen) -> int | None:
    """SIGTERM, then wait for the graceful shutdown; the exit status."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return None


# --- main -------------------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    """The command line, defaults filled in (quick or full)."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--category", default="Amazon_Fashion")
    parser.add_argument("--variant", default="lora", choices=("lora", "zeroshot", "both"))
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--clients", type=int, nargs="+")
    parser.add_argument("--seconds", type=float, help="per HTTP run (default 30)")
    parser.add_argument("--inproc-s", type=float, help="per in-process baseline (default 10)")
    parser.add_argument("--soak-s", type=float, help="soak duration (default 300; 0 skips it)")
    parser.add_argument("--soak-clients", type=int, default=16)
    parser.add_argument("--max-inflight", type=int, default=64)
    parser.add_argument("--saturation-clients", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200, help="distinct queries per kind")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch/FAISS threads per query, server and in process (1)"
    )
    parser.add_argument("--quick", action="store_true", help="5 s runs, 20 s soak")
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="where the demo outputs are (.)")
    parser.add_argument("--attack-only", action="store_true", help="only the clean vs under-attack runs")
    parser.add_argument("--attack-clients", type=int, default=16, help="text clients of those runs (16)")
    parser.add_argument("--bomb-side", type=int, default=6000, help="decode bomb side, px (6000)")
    parser.add_argument("--bomb-scans", type=int, default=23_000, help="its scans (23000; 0: no bombs)")
    parser.add_argument("--note", default="", help="a remark kept with the under-attack results")
    args = parser.parse_args()
    quick = {"clients": [16, 64], "seconds": 5.0, "inproc_s": 3.0, "soak_s": 20.0}
    full = {"clients": [16, 64], "seconds": 30.0, "inproc_s": 10.0, "soak_s": 300.0}
    return fill_defaults(args, quick if args.quick else full)


def attack_only(args: argparse.Namespace) -> None:
    """Only the clean and under-attack runs, added to the results file as `under_attack`."""
    queries = load_queries(args.category, args.queries)
    proc, port = start_server(args.category, args.max_inflight, args.threads)
    requests = raw_requests("text", queries["text"], args.category, args.variant, args.k, port)
    try:
        variant = "lora" if args.variant == "both" else args.variant
        check_answer(port, "text", queries["text"][0], args.category, variant, args.k)
        section = under_attack(proc.pid, port, requests, args)
    finally:
        stop_server(proc)
    print_table(
        [section["clean"], section["attack"]], ["kind", "clients", "qps", "p50_ms", "p99_ms", "errors"]
    )
    path = add_section("serve_load.quick" if args.quick else "serve_load", "under_attack", section)
    print(f"qps ratio {section['qps_ratio']}, p99 ratio {section['p99_ratio']}; wrote {path}")


def main() -> None:
    """Measure, print, write bench/results/serve_load[.quick].json."""
    global DATA_ROOT
    args = parse_args()
    DATA_ROOT = args.root.resolve()
    (REPO_ROOT / "bench" / "scratch").mkdir(parents=True, exist_ok=True)
    if args.attack_only:
        attack_only(args)
        return

    from cliprec.recommend import Recommender

    load_at_start = os.getloadavg()
    queries = load_queries(args.category, args.queries)
    variant = "lora" if args.variant == "both" else args.variant
    rec = Recommender(args.category, variant, root=DATA_ROOT)
    proc, port = start_server(args.category, args.max_inflight, args.threads)
    default_threads = max(args.threads, len(os.sched_getaffinity(0)))
    pid = proc.pid
    counts = ", ".join(f"{k}: {len(v)}" for k, v in queries.items())
    print(f"cliprec serve pid {pid} on 127.0.0.1:{port}; queries {counts}")
    requests = {
        kind: raw_requests(kind, queries[kind], args.category, args.variant, args.k, port) for kind in KINDS
    }
    runs, baseline = [], {}
    try:
        for kind in KINDS:
            check_answer(port, kind, queries[kind][0], args.category, variant, args.k)
            # in process with the server's threads and with every core; the faster one is the baseline
            tried = [
                in_process(rec, kind, queries[kind], args.k, args.inproc_s, t)
                for t in {args.threads, default_threads}
            ]
            best = max(tried, key=lambda r: r["qps"])
            baseline[kind] = {**best, "tried": tried}
            print(
                f"in process {kind}: " + ", ".join(f"{r['qps']} QPS at {r['threads']} threads" for r in tried)
            )
            for clients in args.clients:
                row = http_run(pid, port, kind, requests[kind], clients, args.seconds)
                row["vs_in_process"] = round(row["qps"] / baseline[kind]["qps"], 3)
                runs.append(row)
                print(
                    f"http {kind} x{clients}: {row['qps']} QPS, p50 {row['p50_ms']} ms, {row['errors']} err"
                )
        saturation = http_run(
            pid, port, "text", requests["text"], args.saturation_clients, min(10.0, args.seconds)
        )
        print(f"saturation x{args.saturation_clients}: {saturation['statuses']}")
        soak = None
        if args.soak_s > 0:
            mixed = [r for trio in zip(*(requests[k] for k in KINDS)) for r in trio]
            with RssSampler(pid, 1.0) as rss:
                cpu0 = time.process_time()
                results = drive(port, mixed, args.soak_clients, args.soak_s)
            soak = summarize("mixed", args.soak_clients, args.soak_s, results, time.process_time() - cpu0)
            first, last = rss.samples[0][1], rss.samples[-1][1]
            soak.update(
                rss_start_mb=round(first / 2**20, 1),
                rss_end_mb=round(last / 2**20, 1),
                peak_rss_mb=rss.peak_mb,
                rss_growth=round((last - first) / first, 4),
                rss_peak_growth=round((max(r for _, r in rss.samples) - first) / first, 4),
                rss_samples_mb=[
                    round(r / 2**20, 1) for _, r in rss.samples[:: max(1, len(rss.samples) // 60)]
                ],
            )
            print(f"soak {args.soak_s:.0f} s: RSS {soak['rss_start_mb']} -> {soak['rss_end_mb']} MiB")
        attacked = under_attack(pid, port, requests["text"], args)
        metrics_text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    finally:
        exit_status = stop_server(proc)

    text_ratio = min(r["vs_in_process"] for r in runs if r["kind"] == "text")
    below = [r for r in runs if r["clients"] <= args.max_inflight]
    payload = {
        "settings": {
            "category": args.category,
            "variant": args.variant,
            "k": args.k,
            "clients": args.clients,
            "seconds": args.seconds,
            "in_process_seconds": args.inproc_s,
            "max_inflight": args.max_inflight,
            "threads": args.threads,
            "queries_per_kind": {k: len(v) for k, v in queries.items()},
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
        },
        "in_process": baseline,
        "runs": runs,
        "saturation": saturation,
        "soak": soak,
        "under_attack": attacked,
        "server_exit_status_after_sigterm": exit_status,
        "server_rejected_total": [
            line for line in metrics_text.splitlines() if line.startswith("cliprec_http_rejected_total")
        ],
        "goals": {
            "errors_below_saturation": sum(r["errors"] for r in below),
            "text_qps_ratio_min": text_ratio,
            "text_qps_ratio_goal": GOAL_TEXT_RATIO,
            "soak_rss_growth": soak["rss_growth"] if soak else None,
            "soak_rss_growth_goal": GOAL_SOAK_GROWTH,
            "met": {
                "no_errors_below_saturation": sum(r["errors"] for r in below) == 0,
                "text_qps_ratio": text_ratio >= GOAL_TEXT_RATIO,
                "soak_rss_growth": bool(soak) and soak["rss_growth"] <= GOAL_SOAK_GROWTH,
            },
        },
    }
    cols = ["kind", "clients", "qps", "vs_in_process", "p50_ms", "p95_ms", "p99_ms", "errors", "peak_rss_mb"]
    cols += ["server_cpu_ms_per_request"]
    print_table(runs, cols, title="HTTP runs")
    tried = [r for b in baseline.values() for r in b["tried"]]
    print_table(
        tried, ["kind", "threads", "qps", "p50_ms", "cpu_ms_per_query", "queries"], title="in process"
    )
    path = write_results("serve_load.quick" if args.quick else "serve_load", payload)
    print(f"\ngoals: {payload['goals']}\nwrote {path}")


if __name__ == "__main__":
    main()
