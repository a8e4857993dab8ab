"""The limits of `cliprec serve` (its command-line options)."""

from dataclasses import dataclass


@dataclass(frozen=True)
class ServeSettings:
    """Limits of the server (the `cliprec serve` options)."""

    max_upload_bytes: int = 10 * 2**20
    max_k: int = 100
    max_inflight: int = 64
    retry_after_s: int = 1
    max_text_chars: int = 1000
    thumb_side: int = 128
    graceful_s: int = 10
    # torch/FAISS threads per query; None keeps their defaults (every core). 1 is the default of the
    # command: on 2 busy cores a second thread's spin-waits cost more than it computes (docs/serving.md, Load)
    threads: int | None = None
    max_batch: int = 32  # searches answered by one Service.search_many call
    decode_workers: int = 2  # decoder processes for image uploads (cliprec.decode_pool)
    decode_timeout_s: float = 4.0  # one upload's decode (and its wait for a free decoder): 413 / 503 past it
    stall_s: float = 30.0  # /healthz says 503 when waiting work saw no worker progress for this long
    # connection limits (cliprec/serve/connections.py); None: derived from the fd limit at start
    max_connections: int | None = None
    max_header_bytes: int = 16 * 1024  # the request line and headers (h11's and Node's default)
    header_timeout_s: float = 10.0  # from a request's first byte to the end of its head
    body_timeout_s: float = 30.0  # from the end of the head to the end of the body (10 MB: 2.8 Mbit/s)
    idle_timeout_s: float = 5.0  # a connection with no request under way (uvicorn's keep-alive default)
