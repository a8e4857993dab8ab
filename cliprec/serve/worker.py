"""The search worker: ONE thread answering searches, whatever queued while it worked in one batch.

One thread, because torch spreads one query over `threads` cores and a Recommender's tokenizer is not
safe to call from two threads at once. What queued while the worker was busy is answered in one
`Service.search_many` call, where the text queries share one batch through the text encoder
(bench/serve_load.py measures it). Uploads reach it decoded already (cliprec.decode_pool): it never
waits on a decode.

Each request of a batch gets its own answer or error (`Service.search_many`). The worker beats a
heartbeat when it takes a batch and when it finishes one; `stalled` says when work has waited longer
than a bound without a beat (or the thread died), which /healthz reports as 503.
"""

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from cliprec.errors import one_line
from cliprec.service import SearchRequest, Service, request_error

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
        self.beat = time.monotonic()  # last progress: a batch taken or finished
        self._busy = False
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

    def stalled(self, bound_s: float) -> str | None:
        """Why the worker looks stuck (dead, or no progress for bound_s with work waiting), else None."""
        if not self._thread.is_alive():
            return "the search worker thread has died"
        idle_for = time.monotonic() - self.beat
        if (self._busy or self.pending) and idle_for > bound_s:
            return f"the search worker has made no progress for {idle_for:.0f} s (bound {bound_s:g} s)"
        return None

    def _answers(self, batch: list) -> list[Any]:
        try:
            return batch[0][0].search_many([b[1] for b in batch])
        except Exception as e:  # a bug in search_many itself: retry alone, so only the one at fault fails
            log.error(
                "serve: a batch of %d searches failed (%s: %s); retrying each",
                len(batch),
                type(e).__name__,
                one_line(e),
            )
        answers: list[Any] = []
        for service, req, _, _ in batch:
            try:
                answers.extend(service.search_many([req]))
            except Exception as e:
                answers.append(request_error(req, e))
        return answers

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
            self.beat, self._busy = time.monotonic(), True
            if self.on_batch is not None:
                self.on_batch(len(batch))
            answers = self._answers(batch)
            for (_, _, loop, future), answer in zip(batch, answers, strict=True):
                loop.call_soon_threadsafe(_settle, future, answer)
            self.beat, self._busy = time.monotonic(), False

    def stop(self, timeout: float | None = None) -> None:
        """Answer what is queued, then end the thread."""
        self._queue.put(None)
        self._thread.join(timeout)
