"""The outermost ASGI layer of `cliprec serve`: a request cancelled at shutdown logs one line, no traceback.

uvicorn cancels the requests still running when its graceful-shutdown timeout (`graceful_s`) passes, and
logs each cancellation as "Exception in ASGI application" with the whole stack through every middleware
(~50 lines a request). Here the cancellation ends: the request logs one line, its client gets a 503 if
no answer had started, and uvicorn sees a finished request.
"""

import asyncio
import contextlib
import logging

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("cliprec.serve")


class CancelledInOneLine:
    """ASGI middleware: a cancelled HTTP request logs one line and answers 503 when it still can."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_tracked)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):  # Python >= 3.11
                task.uncancel()  # handled here: the awaits of the 503 below are not cancelled again
            log.warning("serve: %s %s cancelled (shutting down)", scope.get("method"), scope.get("path"))
            if not started:
                response = JSONResponse({"error": "server shutting down; retry"}, 503, {"Retry-After": "1"})
                with contextlib.suppress(Exception):  # the client may be gone already
                    await response(scope, receive, send)
