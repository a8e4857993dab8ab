"""Throughput of the `images` stage's fetcher: default concurrency vs one-at-a-time, on loopback HTTP.

A loopback HTTP server (its own process, so its GIL does not slow the fetcher) serves product-sized JPEGs
(500-1000 px, ~50-150 kB, noise + gradients + shapes so they do not compress to nothing), 2 per product.
`cliprec.images.build_image_shards` fetches them exactly as the stage does (HTTP, decode, resize to
`images.side`, re-encode, parquet shards) with `images.workers` threads from params.yaml and with 1.

Each server answer can be delayed by a simulated CDN latency (`--latency-ms`, default 0 and 50 ms per
request). With no latency, decode+resize on the CPU bounds both runs and the speed-up is at most about
the core count; the speed-up of a thread pool shows where the fetch mostly waits, as on a real CDN.

Reported per (latency, workers): images/s, images/s per core (cores = len(os.sched_getaffinity(0))),
CPU ms per image in the fetching process and in the server, images per CPU-second of the fetching
process (what one idle core could do, robust to other load), the speed-up over workers=1 and the goals
(>= 100 images/s per core at the default concurrency, >= 8x serial). Times are medians of --repeats,
run round-robin over the worker counts so that drifting load on a shared machine hits both alike.
Also reported: `process_image` alone (decode+resize+encode, one thread), the CPU ceiling per core.

Run (from the repo root):
    python bench/fetch_images.py                 # 300 products (600 images), latency 0 and 50 ms, ~3 min
    python bench/fetch_images.py --quick         # 60 products, 1 repeat, ~20 s
    python bench/fetch_images.py --latency-ms 0 20 50 100 --n 500 --repeats 5
Writes bench/results/fetch_images.json (with --quick: bench/results/fetch_images.quick.json).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from _common import REPO_ROOT, median_time, print_table, write_results
from PIL import Image, ImageDraw

from cliprec.codec import pillow_limits, process_image
from cliprec.images import build_image_shards
from cliprec.params import Images, load_params

GOAL_PER_CORE = 100.0  # images/s per core at the default concurrency, decode+resize included
GOAL_SPEEDUP = 8.0  # default concurrency vs workers=1, where waiting dominates
VIEWS_PER_PRODUCT = 2


# --- test images ----------------------------------------------------------------------------------------


def make_photo(seed: int, quality: int = 85) -> bytes:
    """One photo-like JPEG, 500-1000 px a side: gradient, soft blobs, grain and a few solid shapes."""
    rng = np.random.default_rng(seed)
    w, h = int(rng.integers(500, 1001)), int(rng.integers(500, 1001))
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    t = (0.6 * x / w + 0.4 * y / h)[..., None]
    arr = rng.uniform(0, 255, 3) * (1 - t) + rng.uniform(0, 255, 3) * t
    coarse = np.clip(rng.normal(128, 40, (h // 32 + 2, w // 32 + 2, 3)), 0, 255).astype(np.uint8)
    blobs = np.asarray(Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC), np.float32) - 128
    arr = arr + blobs + 6 * rng.standard_normal((h, w, 3), dtype=np.float32)
    im = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(3, 8))):
        x0, y0, s = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(40, 250))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x0, y0, x0 + s, y0 + s], fill=colour)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_pool(directory: Path, unique: int, seed: int) -> dict[str, Any]:
    """Write `unique` distinct photos as <i>.jpg into directory; return their size statistics."""
    sizes, dims = [], []
    for i in range(unique):
        data = make_photo(seed * 100_003 + i)
        (directory / f"{i}.jpg").write_bytes(data)
        sizes.append(len(data))
        with Image.open(io.BytesIO(data)) as im:
            dims.append(im.size)
    return {
        "unique_images": unique,
        "kb_min": round(min(sizes) / 1e3, 1),
        "kb_median": round(statistics.median(sizes) / 1e3, 1),
        "kb_max": round(max(sizes) / 1e3, 1),
        "px_min": min(min(d) for d in dims),
        "px_max": max(max(d) for d in dims),
    }


# --- the loopback server (a child process) --------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the default backlog of 5 drops SYNs when 16 workers connect at once

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients may hang up; that is no error worth printing."""


def _handler(bodies: list[bytes]) -> type[BaseHTTPRequestHandler]:
    """A keep-alive handler for GET /lat/<ms>/<i>.jpg: sleep ms, then send image i mod len(bodies)."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            """Silence the per-request log line."""

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            """Serve one image after the requested latency; 404 for anything else."""
            parts = self.path.split("/")
            if len(parts) != 4 or parts[1] != "lat" or not parts[3].endswith(".jpg"):
                self.send_error(404)
                return
            time.sleep(int(parts[2]) / 1000)
            body = bodies[int(parts[3][:-4]) % len(bodies)]
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def serve_images(image_dir: str, conn: Connection) -> None:
    """Child process: serve image_dir's <i>.jpg on 127.0.0.1, send the port, answer 'cpu' until 'stop'."""
    files = sorted(Path(image_dir).glob("*.jpg"), key=lambda p: int(p.stem))
    server = _Server(("127.0.0.1", 0), _handler([p.read_bytes() for p in files]))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    conn.send(server.server_address[1])
    while (msg := conn.recv()) != "stop":
        if msg == "cpu":
            conn.send(time.process_time())
    server.shutdown()
    server.server_close()


class LoopbackServer:
    """Runs serve_images in a spawned process; `port`, `cpu_seconds()` and a context manager."""

    def __init__(self, image_dir: Path) -> None:
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=serve_images, args=(str(image_dir), child), daemon=True)
        self._proc.start()
        if not self._conn.poll(60):
            raise RuntimeError("loopback image server did not start within 60 s")
        self.port: int = self._conn.recv()

    def cpu_seconds(self) -> float:
        """CPU time the server process has used so far."""
        self._conn.send("cpu")
        return float(self._conn.recv())

    def close(self) -> None:
        """Stop the server process."""
        with contextlib.suppress(OSError):
            self._conn.send("stop")
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.terminate()

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- measurement ----------------------------------------------------------------------------------------


def products_frame(n: int, port: int, latency_ms: int) -> pd.DataFrame:
    """n products with 2 image URLs each (MAIN, PT01), every URL distinct."""
    urls = [
        [f"http://127.0.0.1:{port}/lat/{latency_ms}/{VIEWS_PER_PRODUCT * i + v}.jpg" for v in range(2)]
        for i in range(n)
    ]
    return pd.DataFrame(
        {"id": [f"P{i:06d}" for i in range(n)], "image_urls": urls, "image_variants": [["MAIN", "PT01"]] * n}
    )


def run_once(products: pd.DataFrame, cfg: Images, server: LoopbackServer) -> dict[str, float]:
    """One build_image_shards into a temp dir: wall seconds, ok images, fetcher and server CPU seconds."""
    with tempfile.TemporaryDirectory(prefix="fetch_bench_") as out:
        server_cpu0, cpu0, t0 = server.cpu_seconds(), time.process_time(), time.perf_counter()
        report = build_image_shards(products, out, cfg, progress=False)
        seconds = time.perf_counter() - t0
        cpu, server_cpu = time.process_time() - cpu0, server.cpu_seconds() - server_cpu0
    failed = {k: v for k, v in report["counts"].items() if v and k != "ok"}
    if failed:
        print(f"  warning: {failed} of {report['urls']} urls failed (workers={cfg.workers})", file=sys.stderr)
    return {"seconds": seconds, "ok": report["counts"]["ok"], "cpu_s": cpu, "server_cpu_s": server_cpu}


def summarize(runs: list[dict[str, float]], latency_ms: int, workers: int, cores: int) -> dict[str, Any]:
    """The median-time run of one (latency, workers) setting as a table row."""
    mid = sorted(runs, key=lambda r: r["seconds"])[len(runs) // 2]
    ok = mid["ok"]
    rate = ok / mid["seconds"] if mid["seconds"] > 0 else 0.0
    return {
        "latency_ms": latency_ms,
        "workers": workers,
        "images": ok,
        "seconds": round(mid["seconds"], 3),
        "images_per_s": round(rate, 1),
        "per_core": round(rate / cores, 1),
        "cpu_ms_per_image": round(1e3 * mid["cpu_s"] / max(ok, 1), 2),
        "server_cpu_ms_per_image": round(1e3 * mid["server_cpu_s"] / max(ok, 1), 2),
        "images_per_cpu_s": round(ok / mid["cpu_s"], 1) if mid["cpu_s"] > 0 else None,
        "all_seconds": [round(r["seconds"], 3) for r in runs],
    }


def measure_latency(
    n: int, latency_ms: int, configs: list[Images], server: LoopbackServer, repeats: int, cores: int
) -> list[dict[str, Any]]:
    """Rows for every config at one latency; repeats run round-robin so load drift hits each alike."""
    products = products_frame(n, server.port, latency_ms)
    runs: list[list[dict[str, float]]] = [[] for _ in configs]
    for _ in range(repeats):
        for i, cfg in enumerate(configs):
            runs[i].append(run_once(products, cfg, server))
    return [summarize(r, latency_ms, cfg.workers, cores) for r, cfg in zip(runs, configs)]


def process_only(image_dir: Path, cfg: Images, repeats: int) -> dict[str, float]:
    """process_image alone (decode, resize, encode; no HTTP), one thread: the per-core CPU ceiling."""
    bodies = [p.read_bytes() for p in sorted(image_dir.glob("*.jpg"))]
    with pillow_limits(cfg.max_pixels):
        seconds = median_time(lambda: [process_image(b, cfg) for b in bodies], repeats=repeats, warmup=1)
    return {
        "images": len(bodies),
        "ms_per_image": round(1e3 * seconds / len(bodies), 2),
        "images_per_s_one_core": round(len(bodies) / seconds, 1),
    }


def default_config(params_path: Path) -> Images:
    """The validated `images:` block of params.yaml."""
    return load_params(params_path).images


def add_speedups(rows: list[dict[str, Any]], default_workers: int) -> None:
    """Fill speed_up (vs workers=1 at the same latency) and the goal columns in place."""
    serial = {r["latency_ms"]: r["images_per_s"] for r in rows if r["workers"] == 1}
    for r in rows:
        base = serial.get(r["latency_ms"])
        r["speed_up"] = round(r["images_per_s"] / base, 2) if base else None
        is_default = r["workers"] == default_workers
        r["goal_per_core"] = (r["per_core"] >= GOAL_PER_CORE) if is_default else None
        r["goal_speed_up"] = (r["speed_up"] >= GOAL_SPEEDUP) if is_default and r["speed_up"] else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=300, help="products (2 images each; default 300)")
    p.add_argument("--latency-ms", type=int, nargs="+", default=[0, 50], help="server latency per request")
    p.add_argument("--workers", type=int, default=None, help="default concurrency (default: params.yaml)")
    p.add_argument("--repeats", type=int, default=3, help="runs per setting; the median is reported")
    p.add_argument("--unique", type=int, default=64, help="distinct images served (URLs stay distinct)")
    p.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="60 products, 1 repeat, 24 distinct images")
    p.add_argument("--no-save", action="store_true", help="print only, write no results file")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.repeats, args.unique = min(args.n, 60), 1, min(args.unique, 24)
    if args.n < 1 or args.repeats < 1 or args.unique < 1 or min(args.latency_ms) < 0:
        p.error("--n, --repeats and --unique must be >= 1, latencies >= 0")
    return args


def main(argv: list[str] | None = None) -> None:
    """Generate the images, start the server, measure every (latency, workers) pair, print and save."""
    args = parse_args(argv)
    cores = len(os.sched_getaffinity(0))
    base_cfg = default_config(args.params)
    workers = args.workers or base_cfg.workers
    configs = [base_cfg.model_copy(update={"workers": w}) for w in (workers, 1)]
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fetch_bench_pool_") as pool_dir:
        pool = Path(pool_dir)
        stats = write_pool(pool, args.unique, args.seed)
        print(
            f"{args.n} products x 2 = {2 * args.n} images, {stats['unique_images']} distinct, "
            f"{stats['px_min']}-{stats['px_max']} px, {stats['kb_min']}-{stats['kb_max']} kB "
            f"(median {stats['kb_median']}); resize to {base_cfg.side} ({base_cfg.resize}); {cores} cores"
        )
        ceiling = process_only(pool, base_cfg, args.repeats)
        rows = []
        with LoopbackServer(pool) as server:
            run_once(products_frame(8, server.port, 0), configs[0], server)  # warm-up
            for latency in args.latency_ms:
                for row in measure_latency(args.n, latency, configs, server, args.repeats, cores):
                    print(f"  latency {latency} ms, workers {row['workers']}: {row['images_per_s']} images/s")
                    rows.append(row)
    add_speedups(rows, workers)
    total = time.perf_counter() - t_start

    print(
        f"\nprocess_image alone (decode+resize+encode, 1 thread): {ceiling['ms_per_image']} ms/image = "
        f"{ceiling['images_per_s_one_core']} images/s per core (the ceiling with no HTTP)"
    )
    columns = [
        "latency_ms",
        "workers",
        "images",
        "seconds",
        "images_per_s",
        "per_core",
        "speed_up",
        "cpu_ms_per_image",
        "server_cpu_ms_per_image",
        "images_per_cpu_s",
        "goal_per_core",
        "goal_speed_up",
    ]
    print_table(rows, columns, title=f"Image fetch, median of {args.repeats} (wall {total:.0f} s)")
    print(
        f"\nGoals at workers={workers}: >= {GOAL_PER_CORE:g} images/s per core, >= {GOAL_SPEEDUP:g}x "
        "workers=1. At 0 ms the CPU bounds both runs (speed-up <= ~cores): the speed-up goal is for a "
        "real latency.\nimages_per_cpu_s (images per CPU-second of the fetching process) is what one idle "
        "core could do: it holds on a shared machine, where images/s per core does not."
    )
    if not args.no_save:
        payload = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "cores": cores,
            "default_workers": workers,
            "image_config": dataclasses.asdict(base_cfg),
            "images": stats,
            "process_image_only": ceiling,
            "goals": {"per_core": GOAL_PER_CORE, "speed_up": GOAL_SPEEDUP},
            "rows": rows,
            "wall_s": round(total, 1),
        }
        print(f"wrote {write_results('fetch_images.quick' if args.quick else 'fetch_images', payload)}")


if __name__ == "__main__":
    main()
