"""What the pipeline wrote, read back for `cliprec report` and `cliprec serve`: metrics, ranks."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from cliprec import paths

log = logging.getLogger(__name__)


def read_json(path: str | Path) -> Any:
    """A JSON file's content; None when it is absent, or (with a warning) unreadable or not JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("%s cannot be read as JSON (%s)", path, e)
        return None


def read_metrics(root: str | Path, category: str, variant: str) -> dict[str, Any] | None:
    """Every metric of a variant with its CI: the detail file, or in a project evaluated before detail
    files existed, the metrics file that held it all; None when neither exists."""
    root = Path(root)
    return read_json(root / paths.metrics_detail_path(category, variant)) or read_json(
        root / paths.metrics_path(category, variant)
    )
