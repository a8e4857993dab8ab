"""`cliprec serve`'s process: the app under uvicorn until SIGINT/SIGTERM.

Exit status: 0 after a graceful stop, 2 when the models or indexes cannot load, 3 when the address
cannot be bound (LISTEN_ERROR_EXIT). SIGTERM ends it as the signal does (uvicorn re-raises it).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from pathlib import Path

from cliprec.errors import CliprecError
from cliprec.serve.app import create_app
from cliprec.serve.connections import GuardedProtocol
from cliprec.serve.settings import ServeSettings

log = logging.getLogger("cliprec.serve")

LISTEN_ERROR_EXIT = 3  # uvicorn's own code for a failed bind, kept
FD_RESERVE = 256  # descriptors kept for the process's own files: models, shards, logs, the listener
DEFAULT_MAX_CONNECTIONS = 10_000


class ListenError(CliprecError):
    """The address cannot be bound (port taken, no permission, unknown host)."""


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard limit; the soft limit now in force."""
    try:
        import resource
    except ImportError:  # not POSIX: nothing to raise
        return 512
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:  # e.g. a hard limit above the kernel's nr_open
            log.warning("serve: cannot raise the open-file limit from %d to %d: %s", soft, target, e)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(requested: int | None, fd_limit: int) -> int:
    """Open connections allowed: what was asked, at most half of the fds left after a reserve.

    Half, because a connection may hold a second descriptor: an upload over 1 MB is spooled to a file
    while it is parsed (one file per request: the search form takes one file part).
    """
    room = max(1, (fd_limit - FD_RESERVE) // 2)
    if requested is None:
        return min(DEFAULT_MAX_CONNECTIONS, room)
    if requested > room:
        log.warning(
            "serve: --max-connections %d is more than the open-file limit %d allows; using %d",
            requested,
            fd_limit,
            room,
        )
        return room
    return requested


def listen(host: str, port: int) -> socket.socket:
    """The bound listening socket, or a one-line ListenError."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as e:  # address in use, permission denied, ...
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise ListenError(f"cannot listen on {host}:{port}: {reason}") from None


def run(
    root: str | Path = ".",
    host: str = "127.0.0.1",
    port: int = 8000,
    categories: Sequence[str] | None = None,
    settings: ServeSettings | None = None,
    access_log: bool = False,
) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a graceful stop, 2 when the models or indexes cannot load.

    Raises ListenError (exit status 3 in the CLI) when the address cannot be bound.
    """
    import uvicorn

    settings = settings or ServeSettings()
    sock = listen(host, port)  # before loading anything: a taken port fails at once
    fd_limit = raise_fd_limit()
    cap = connection_cap(settings.max_connections, fd_limit)
    outcome = {"code": 0}
    server: uvicorn.Server | None = None

    def failed(message: str) -> None:
        outcome["code"] = 2
        if server is not None:
            server.should_exit = True  # the port answered 503 meanwhile; now stop

    app = create_app(root, categories, settings, on_load_error=failed)
    config = uvicorn.Config(
        app,
        access_log=access_log,
        http=GuardedProtocol.configured(settings, app.state.metrics, cap),
        ws="none",  # no WebSocket routes: no upgrade handling either
        timeout_keep_alive=settings.idle_timeout_s,  # type: ignore[arg-type] (a float works)
        timeout_graceful_shutdown=settings.graceful_s,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    log.info(
        "serve: listening on http://%s:%d (at most %d connections; open-file limit %d)",
        shown,
        sock.getsockname()[1],
        cap,
        fd_limit,
    )
    server.run(sockets=[sock])
    return outcome["code"]
