"""`cliprec serve`: the JSON API, Prometheus metrics, offline OpenAPI docs and the web page.

app (routes and error handlers), worker (the one search thread), middleware (metrics, body cap and
deadline, admission), connections (connection limits: uvicorn's protocol, subclassed), cancel (one log
line for a request cancelled at shutdown), metrics (Prometheus), schemas (response models), settings
(limits), server (uvicorn, the listening socket). Uploads are decoded by cliprec.decode_pool.
"""

from cliprec.serve.app import STATIC_DIR, create_app
from cliprec.serve.schemas import ErrorResponse, SearchResponse
from cliprec.serve.server import run
from cliprec.serve.settings import ServeSettings

__all__ = ["STATIC_DIR", "ErrorResponse", "SearchResponse", "ServeSettings", "create_app", "run"]
