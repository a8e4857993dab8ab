"""The search worker: ONE thread answering searches, whatever queued while it worked in one batch.

One thread, because torch spreads one query over `threads` cores, a Recommender's tokenizer is not safe
to call from two threads at once, and Pillow's decompression-bomb limit is process-global. What queued
while the worker was busy is answered in one `Service.search_many` call, where the text queries share
one batch through the text encoder (bench/serve_load.py measures it).
"""

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

from cliprec.service import SearchRequest, Service

log = logging.getLogger("cliprec.serve")


def _settle(future: asyncio.Future, answer: Any) -> None:
    if future.cancelled():  # the client went away
        return
    if isinstance(answer, BaseException):
        future.set_exception(answer)
    else:
        future.set_result(answer)


class SearchWorker:
    """One thread answering searches; whatever queued while it worked is answered in one batch."""

    def __init__(self, max_batch: int = 32, on_batch: Callable[[int], None] | None = None) -> None:
        self.max_batch = max_batch
        self.on_batch = on_batch
        # unbounded on purpose: GuardMiddleware admits at most max_inflight requests, which bounds it
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="cliprec-search", daemon=True)
        self._thread.start()

    def submit(self, service: Service, req: SearchRequest) -> asyncio.Future:
        """Queue a search; the future (of the running loop) gets its answer or its ServiceError."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.put((service, req, loop, future))
        return future

    @property
    def pending(self) -> int:
        """Searches queued and not yet taken by the worker."""
        return self._queue.qsize()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            batch = [item]
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(nxt)
            if self.on_batch is not None:
                self.on_batch(len(batch))
            try:
                answers: list[Any] = batch[0][0].search_many([b[1] for b in batch])
            except Exception as e:  # a bug: log it once, every request of the batch gets a 500
                log.error("serve: search batch failed", exc_info=e)
                answers = [e] * len(batch)
            for (_, _, loop, future), answer in zip(batch, answers):
                loop.call_soon_threadsafe(_settle, future, answer)

    def stop(self, timeout: float | None = None) -> None:
        """Answer what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)
