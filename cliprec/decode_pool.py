"""Uploads of `cliprec serve` decoded apart from its search worker: a few decoder processes, time-bounded.

Outside cliprec.serve on purpose: a decoder process imports this module (and cliprec.codec), not the
server's FastAPI, FAISS or torch.

Why processes, not threads: a decode that runs past `timeout_s` can only be stopped by killing what runs
it, and Pillow's decompression-bomb limit is process-global (each decoder sets it once for its life, so
decodes run side by side). Each decoder runs the images stage's `process_image` (the same checks and
limits as the stage and `cliprec recommend`) and sends back the small side x side JPEG it makes; the
search worker then only embeds it.

A decoder runs at a lower CPU priority than the server (nice +10), so a slow decode competes little with
searches. One past its time is killed (SIGKILL) and replaced in the background; its request gets 413. A
decoder that dies on an upload (a crash in a C decoder) is replaced too; its request gets 422. An upload
that finds no decoder free within `timeout_s`, or finds 2 uploads per decoder in the pool already, gets 503
with Retry-After instead of a growing wait: uploads never hold more than a few of the server's admission
slots, whatever their number.

A decoder is a fresh `python -m cliprec.decode_pool` (it imports Pillow and numpy through cliprec.codec;
no pandas, no torch), not a fork of the server with its threads and models. It talks over a socket
pair in plain bytes, not pickles: a decoder handles hostile bytes, so the server trusts nothing it sends.
It exits when the server's end closes, and by itself within a second when the server dies mid-decode.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from pathlib import Path

from cliprec.params import Images

log = logging.getLogger("cliprec.serve")

NICE = 10  # decoders yield the CPU to the search worker
READY_TIMEOUT_S = 60.0  # a decoder that does not start within this is a broken install: logged
PENDING_PER_DECODER = 2  # uploads decoding or waiting per decoder; the next one gets 503 at once
ORPHAN_CHECK_S = 1.0  # how often a decoder checks that the server still runs
PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])  # decoders import the same cliprec as the server


def _exit_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_S)
    os._exit(0)  # the server died (even by SIGKILL) while this one decoded: stop at once


def _reply(data: bytes, cfg: Images) -> bytes:
    """b"ok\n" + JPEG, b"fail\n<status>\n<message>" or b"bug\n<message>" for one upload."""
    from cliprec.codec import ImageFailure, process_image

    try:
        return b"ok\n" + process_image(data, cfg)
    except ImageFailure as f:
        return f"fail\n{f.status}\n{f}".encode()
    except Exception as e:  # a bug in our code, not the file's fault: the server logs it
        return f"bug\n{type(e).__name__}: {e}".encode()


def _blank_png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "PNG")
    return buf.getvalue()


def decoder_main(fd: int) -> None:
    """A decoder process: read the images config, then answer each upload on the socket fd."""
    os.nice(NICE)
    threading.Thread(target=_exit_when_orphaned, args=(os.getppid(),), daemon=True).start()
    from cliprec.codec import pillow_limits

    conn = Connection(fd)
    cfg = Images.model_validate_json(conn.recv_bytes())
    with pillow_limits(cfg.max_pixels):
        _reply(_blank_png(), cfg)  # the first decode loads Pillow's plugins (slow): not on a request
        conn.send_bytes(b"ready")
        while True:
            try:
                data = conn.recv_bytes()
            except (EOFError, OSError):  # the server closed its end: stop
                return
            conn.send_bytes(_reply(data, cfg))


class _Decoder:
    """One decoder process and the server's end of its socket."""

    def __init__(self, cfg: Images, name: str) -> None:
        self.name = name
        ours, theirs = socket.socketpair()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([PACKAGE_ROOT, os.environ.get("PYTHONPATH", "")]))
        with ours, theirs:
            # its own session: a terminal's Ctrl-C goes to the server, which stops its decoders itself
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cliprec.decode_pool", str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                env=env,
                start_new_session=True,
                stdin=subprocess.DEVNULL,
            )
            self.conn = Connection(os.dup(ours.fileno()))
        self.conn.send_bytes(cfg.model_dump_json().encode())

    def wait_ready(self, timeout: float) -> bool:
        """True once the decoder said it is ready."""
        try:
            return self.conn.poll(timeout) and self.conn.recv_bytes() == b"ready"
        except (EOFError, OSError):
            return False

    def ask(self, data: bytes, timeout: float) -> bytes | None:
        """The decoder's reply to data; None when it took longer than timeout. EOFError if it died."""
        self.conn.send_bytes(data)
        if not self.conn.poll(timeout):
            return None
        return self.conn.recv_bytes()

    def kill(self) -> int | None:
        """Stop the process now; its exit code (negative: the signal that ended it)."""
        with contextlib.suppress(OSError):
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        self.conn.close()
        return self.process.returncode


class DecodePool:
    """`processes` decoder processes; `decode` bounds one upload's decode, and its wait, by timeout_s."""

    def __init__(self, cfg: Images, processes: int = 2, timeout_s: float = 4.0) -> None:
        self.cfg, self.processes, self.timeout_s = cfg, processes, timeout_s
        self._idle: queue.SimpleQueue[_Decoder] = queue.SimpleQueue()
        self._all: set[_Decoder] = set()
        self._lock = threading.Lock()
        self._started = 0
        self._closed = False
        self._pending = 0  # uploads decoding or waiting for a decoder
        self.max_pending = PENDING_PER_DECODER * processes
        # one thread per decoder: a thread waits on its decoder's socket, the event loop never does
        self._threads = ThreadPoolExecutor(max_workers=processes, thread_name_prefix="cliprec-decode")
        t0 = time.perf_counter()
        starting = [threading.Thread(target=self._start_one) for _ in range(processes)]
        for t in starting:
            t.start()
        for t in starting:
            t.join()
        if self._idle.empty():
            self.close()
            raise RuntimeError(f"none of {processes} image decoder processes started (see the log above)")
        log.info("serve: %d image decoders ready in %.1f s", self._idle.qsize(), time.perf_counter() - t0)

    def _start_one(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._started += 1
            decoder = _Decoder(self.cfg, f"decoder-{self._started}")
            self._all.add(decoder)
        if decoder.wait_ready(READY_TIMEOUT_S):
            self._idle.put(decoder)
            return
        code = decoder.kill()
        if self._closed:  # close() stopped it while it started: nothing went wrong
            return
        log.error("serve: image %s did not start (exit code %s)", decoder.name, code)
        with self._lock:
            self._all.discard(decoder)

    def _retire(self, decoder: _Decoder) -> int | None:
        """Kill a decoder and start its replacement in the background; the old one's exit code."""
        code = decoder.kill()
        with self._lock:
            self._all.discard(decoder)
        threading.Thread(target=self._start_one, name="cliprec-decoder-start", daemon=True).start()
        return code

    async def decode(self, data: bytes) -> bytes:
        """The upload as the images stage stores it (side x side JPEG); ServiceError when refused."""
        if self._pending >= self.max_pending:
            # refused at once: uploads waiting here hold admission slots that searches need
            return self._answer("busy", b"")
        self._pending += 1  # event-loop state: only touched from coroutines
        try:
            submitted = time.monotonic()
            kind, payload = await asyncio.wrap_future(self._threads.submit(self._ask, data, submitted))
        finally:
            self._pending -= 1
        return self._answer(kind, payload)

    def _ask(self, data: bytes, submitted: float) -> tuple[str, bytes]:
        """(kind, payload): a decoder's reply (ok, fail, bug), or busy, timeout, died."""
        deadline = submitted + self.timeout_s  # time queued for this thread counts too
        while True:
            try:
                decoder = self._idle.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return "busy", b""
            if decoder.process.poll() is None:
                break
            self._retire(decoder)  # died while idle (killed from outside): not this upload's fault
        try:
            reply = decoder.ask(data, self.timeout_s)
        except (EOFError, OSError):
            return "died", str(self._retire(decoder)).encode()
        if reply is None:
            self._retire(decoder)
            return "timeout", b""
        self._idle.put(decoder)
        kind, _, payload = reply.partition(b"\n")
        return kind.decode(errors="replace"), payload

    def _answer(self, kind: str, payload: bytes) -> bytes:
        from cliprec.service import IMAGE_STATUS, ServiceError

        if kind == "ok":
            return payload
        text = payload.decode(errors="replace")
        if kind == "fail":
            status, _, message = text.partition("\n")
            raise ServiceError(IMAGE_STATUS.get(status, 422), f"image upload: {status}: {message}")
        limit = f"decode_timeout_s {self.timeout_s:g} s"
        if kind == "timeout":
            raise ServiceError(413, f"image upload: too_large: decoding took over {limit}; stopped")
        if kind == "died":
            raise ServiceError(422, f"image upload: decode_error: its decoder died (exit code {text})")
        if kind == "busy":
            raise ServiceError(503, f"all {self.processes} image decoders busy (limit {limit}); retry")
        log.error("serve: decoding an upload failed: %s", text)  # a bug: one line, this request only
        raise ServiceError(500, "internal error decoding the image (see the server log)")

    def close(self) -> None:
        """Kill every decoder (an unfinished decode is abandoned: shutdown waits for no upload)."""
        with self._lock:
            self._closed = True
            decoders = list(self._all)
            self._all.clear()
        for decoder in decoders:
            decoder.kill()
        self._threads.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    decoder_main(int(sys.argv[1]))
