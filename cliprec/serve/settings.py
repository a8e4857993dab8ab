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
    threads: int | None = None  # torch/FAISS threads per query; None keeps their defaults
    max_batch: int = 32  # searches answered by one Service.search_many call
    decode_workers: int = 2  # decoder processes for image uploads (cliprec.decode_pool)
    decode_timeout_s: float = 4.0  # one upload's decode (and its wait for a free decoder): 413 / 503 past it
    stall_s: float = 30.0  # /healthz says 503 when waiting work saw no worker progress for this long
