"""`cliprec serve`'s process: the app under uvicorn until SIGINT/SIGTERM."""

from collections.abc import Sequence
from pathlib import Path

from cliprec.serve.app import create_app
from cliprec.serve.settings import ServeSettings


def run(
    root: str | Path = ".",
    host: str = "127.0.0.1",
    port: int = 8000,
    categories: Sequence[str] | None = None,
    settings: ServeSettings | None = None,
    access_log: bool = False,
) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a graceful stop, 2 when the models or indexes cannot load."""
    import uvicorn

    settings = settings or ServeSettings()
    outcome = {"code": 0}
    server: uvicorn.Server | None = None

    def failed(message: str) -> None:
        outcome["code"] = 2
        if server is not None:
            server.should_exit = True  # the port answered 503 meanwhile; now stop

    app = create_app(root, categories, settings, on_load_error=failed)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=access_log,
        timeout_graceful_shutdown=settings.graceful_s,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    server.run()
    return outcome["code"]
