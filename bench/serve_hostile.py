"""Issue 16's connection attacks at their own scale against `cliprec serve` with its default limits.

Case 4: one connection streams up to 600 MiB of a header that never ends: how much left the client
before the server closed, its answer, the server's RSS growth. Case 5: 12,000 idle connections (more
than the cap the server derives from a 20,000-fd limit; the client raises its own limit to that):
how many were refused, the server's RSS growth, and health probes every 0.5 s until they answer 200
(the idle connections time out after 5 s). The server's log lines about the cap are kept.

Loopback only; the server is stopped at the end. Run after `dvc repro` (or with `--root` of a checkout
that has the outputs):
    python bench/serve_hostile.py      # ~30 s -> bench/results/serve_hostile.json
"""

from __future__ import annotations

import argparse
import resource
import socket
import time
from pathlib import Path

import httpx
import psutil
import serve_load
from _common import REPO_ROOT, write_results

MIB = 2**20


def header_stream(port: int, pid: int, limit_mib: int) -> dict:
    """Case 4: stream a never-ending header until the server closes or limit_mib are sent."""
    proc = psutil.Process(pid)
    rss0 = proc.memory_info().rss
    sent, chunk = 0, b"a" * 65536
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Never-Ends: ")
        try:
            while sent < limit_mib * MIB:
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass
        sock.settimeout(10)
        try:
            answer = sock.recv(4096).split(b"\r\n", 1)[0].decode()
        except OSError as e:
            answer = type(e).__name__
    return {
        "attempted_mib": limit_mib,
        "sent_mib": round(sent / MIB, 2),
        "answer": answer,
        "rss_growth_mib": round((proc.memory_info().rss - rss0) / MIB, 1),
    }


def idle_flood(port: int, pid: int, count: int) -> dict:
    """Case 5: open `count` idle connections; refused ones, RSS growth, health probes until 200."""
    proc = psutil.Process(pid)
    rss0 = proc.memory_info().rss
    socks, failed = [], 0
    for _ in range(count):
        try:
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        except OSError:
            failed += 1
    opened_at = time.monotonic()
    time.sleep(0.5)
    refused = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            refused += bool(sock.recv(4096).startswith(b"HTTP/1.1 503 "))
        except BlockingIOError:
            pass
        except ConnectionResetError:
            refused += 1
    rss = proc.memory_info().rss
    probes = []
    while time.monotonic() - opened_at < 15:
        try:
            status: int | str = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=3).status_code
        except httpx.TransportError as e:
            status = type(e).__name__
        probes.append((round(time.monotonic() - opened_at, 1), status))
        if status == 200:
            break
        time.sleep(0.5)
    for sock in socks:
        sock.close()
    return {
        "connections": count,
        "connect_failed": failed,
        "refused_by_server": refused,
        "rss_growth_mib": round((rss - rss0) / MIB, 1),
        "health_probes_s_status": probes,
    }


def main() -> None:
    """Run both cases, print and write bench/results/serve_hostile.json."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=REPO_ROOT, help="where the demo outputs are (.)")
    parser.add_argument("--category", default="Amazon_Fashion")
    parser.add_argument("--header-mib", type=int, default=600)
    parser.add_argument("--connections", type=int, default=12_000)
    args = parser.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(20_000, hard), hard))  # the server inherits it
    serve_load.DATA_ROOT = args.root.resolve()
    (REPO_ROOT / "bench" / "scratch").mkdir(parents=True, exist_ok=True)
    proc, port = serve_load.start_server(args.category, 64, 1)
    try:
        case4 = header_stream(port, proc.pid, args.header_mib)
        print(f"case 4: {case4}")
        case5 = idle_flood(port, proc.pid, args.connections)
        print(f"case 5: {case5}")
    finally:
        serve_load.stop_server(proc)
    log = (REPO_ROOT / "bench" / "scratch" / "serve_load.server.log").read_text().splitlines()
    kept = [line for line in log if "connection cap reached" in line or "serve: listening" in line]
    path = write_results("serve_hostile", {"header_stream": case4, "idle_flood": case5, "server_log": kept})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
