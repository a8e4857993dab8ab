"""The project's DVC plots (training curves, Recall@K) as Vega-Lite specs with their data inlined.

DVC collects the plots declared in dvc.yaml and fills its own templates, exactly as `dvc plots show --json`
does, so the web page draws what `dvc plots show` draws. The browser side needs vega, vega-lite and
vega-embed: they are vendored under cliprec/static/vendor (no CDN), and the same files back the offline
HTML template of `dvc plots show` (cliprec/static/dvc_plots_template.html, named in .dvc/config).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_lock = threading.Lock()  # DVC's Repo is not meant for concurrent use; plots are cheap to serialise
_cache: dict[tuple[str, tuple], dict[str, Any]] = {}


def _fingerprint(root: Path) -> tuple:
    """mtimes of dvc.yaml and the metrics tree: a new `dvc repro` invalidates the cached specs."""
    files = [root / "dvc.yaml", *sorted((root / "metrics").rglob("*"))] if (root / "metrics").is_dir() else []
    return tuple((str(f), f.stat().st_mtime_ns) for f in files if f.is_file())


def plot_specs(root: str | Path) -> dict[str, Any]:
    """{"plots": [{"name", "spec"}], "errors": [...]} for the workspace's DVC plots (cached)."""
    root = Path(root).resolve()
    key = (str(root), _fingerprint(root))
    with _lock:
        if key not in _cache:
            _cache.clear()
            _cache[key] = _collect(root)
        return _cache[key]


def _collect(root: Path) -> dict[str, Any]:
    try:
        from dvc.exceptions import NotDvcRepoError
        from dvc.render.match import match_defs_renderers
        from dvc.repo import Repo
    except ImportError as e:  # dvc is a dependency of the project, but not of a bare `pip install .[serve]`
        return {"plots": [], "errors": [f"dvc is not installed ({e})"]}
    plots: list[dict[str, Any]] = []
    errors: list[str] = []
    try:
        with Repo(str(root)) as repo:
            data = repo.plots.show()
            for matched in match_defs_renderers(data=data, templates_dir=repo.plots.templates_dir):
                renderer = matched.renderer
                if renderer.TYPE != "vega" or not renderer.datapoints:
                    continue
                try:
                    spec = renderer.get_filled_template()
                except Exception as e:  # one broken plot definition should not hide the others
                    errors.append(f"{renderer.name}: {e}")
                    continue
                plots.append({"name": str(renderer.name), "spec": spec})
    except NotDvcRepoError:
        errors.append(f"no DVC project at {root}")
    except Exception as e:
        log.warning("plots: DVC could not collect the plots of %s: %s", root, e)
        errors.append(f"DVC could not collect the plots: {e}")
    return {"plots": plots, "errors": errors}
