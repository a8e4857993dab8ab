"""Which local file a category's ingest reads, and what it holds: the `catalog` stage's fingerprint.

DVC reruns a stage when one of its dependencies changes, and fails a stage whose dependency does not
exist. The sources read different things: `synthetic` nothing, `amazon` the hub (nothing local) or its
copy `<hub_root>/raw/meta_categories/meta_<Category>.jsonl`, `jsonl` the file its `path` template names.
No one path in dvc.yaml fits all three, so `catalog@<category>` depends on the whole catalog/ folder and
writes `data/catalog/<category>/source.json` (the source, and for a local file its path and sha256);
`ingest@<category>` depends on that file instead of the folder. An edit to one category's file reruns
the catalog stages (a hash each), and only that category's ingest.

The query sets likewise (`query_fingerprint` -> `data/catalog/<category>/queries.json`): `synthetic` reads
nothing, `c4` the hub or `<hub_root>/test.csv`, `jsonl` its `path` and the photos it names under catalog/.
The `queries@<category>` stage (and, for the targets its sample must hold, ingest) depends on that file.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from cliprec.artifacts import sha256_file
from cliprec.errors import CliprecError
from cliprec.params import CATALOG_DIR

log = logging.getLogger(__name__)

AMAZON_META_PATH = "raw/meta_categories/meta_{category}.jsonl"  # inside the hub repo, or a local copy of it
C4_PATH = "test.csv"  # Amazon-C4's queries, inside its hub repo or a local copy of it


class QuerySettings(Protocol):
    """What of `setups.<setup>.queries` decides the file read (cliprec.params.Queries has it)."""

    source: str
    path: str | None
    hub_root: str | None


class IngestSettings(Protocol):
    """What of `setups.<setup>.ingest` decides the file read (cliprec.params.Ingest has it)."""

    source: str
    path: str | None
    hub_root: str | None


def local_file(category: str, ingest: IngestSettings) -> Path | None:
    """The local file ingest reads for `category`, or None (synthetic, or the hub)."""
    if ingest.source == "jsonl" and ingest.path:
        return Path(ingest.path.replace("{category}", category))
    if ingest.source == "amazon" and ingest.hub_root is not None:
        return Path(ingest.hub_root) / AMAZON_META_PATH.format(category=category)
    return None


def fingerprint(category: str, ingest: IngestSettings) -> dict[str, Any]:
    """{source, file, sha256} of what ingest reads for `category` (file and sha256 null when not local)."""
    file = local_file(category, ingest)
    digest = None
    if file is not None:
        if not file.is_file():
            raise CliprecError(
                f"ingest {category}: catalog file {file} does not exist (source {ingest.source!r}; "
                "see docs/pipeline.md 'Your own catalog')"
            )
        digest = sha256_file(file)
    return {"source": ingest.source, "file": file.as_posix() if file else None, "sha256": digest}


def query_file(category: str, queries: QuerySettings) -> Path | None:
    """The local file the category's query set reads, or None (synthetic, or the hub)."""
    if queries.source == "jsonl" and queries.path:
        return Path(queries.path.replace("{category}", category))
    if queries.source == "c4" and queries.hub_root is not None:
        return Path(queries.hub_root) / C4_PATH
    return None


def _photos_digest(query_file: Path) -> str:
    """sha256 over the (path, sha256) of every local photo a jsonl query file names, under catalog/."""
    h = hashlib.sha256()
    names = set()
    with open(query_file, "rb") as f:
        for raw in f:
            try:
                image = json.loads(raw).get("image")
            except (ValueError, RecursionError, AttributeError):  # a bad line: the loader counts it
                continue
            if isinstance(image, str) and image.strip() and "://" not in image:
                names.add(image.strip())
    for name in sorted(names):
        path = CATALOG_DIR / name
        digest = sha256_file(path) if path.is_file() and ".." not in Path(name).parts else "unreadable"
        h.update(f"{name}\0{digest}\n".encode())
    return h.hexdigest()


def query_fingerprint(category: str, queries: QuerySettings) -> dict[str, Any]:
    """{source, file, sha256, photos_sha256} of what the query set reads (null: nothing local)."""
    file = query_file(category, queries)
    found: dict[str, Any] = {"source": queries.source, "file": None, "sha256": None, "photos_sha256": None}
    if file is not None:
        if not file.is_file():
            raise CliprecError(
                f"queries {category}: query file {file} does not exist (source {queries.source!r}; see "
                "docs/pipeline.md 'Your own queries')"
            )
        found.update(file=file.as_posix(), sha256=sha256_file(file))
        if queries.source == "jsonl":  # its photos live under catalog/ too
            found["photos_sha256"] = _photos_digest(file)
    return found


def write_fingerprint(category: str, ingest: IngestSettings, out: Path) -> dict[str, Any]:
    """Write `fingerprint` to out (JSON); return it."""
    return _write(fingerprint(category, ingest), out)


def write_query_fingerprint(category: str, queries: QuerySettings, out: Path) -> dict[str, Any]:
    """Write `query_fingerprint` to out (JSON); return it."""
    return _write(query_fingerprint(category, queries), out)


def _write(found: dict[str, Any], out: Path) -> dict[str, Any]:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(found, indent=2) + "\n")
    return found


def check_fingerprint(category: str, ingest: IngestSettings, recorded: Path) -> None:
    """Fail in one line when the catalog file changed since `catalog@<category>` wrote `recorded`.

    `dvc repro` always runs the catalog stage first; this catches `dvc repro -s ingest@<category>`, which
    would otherwise record the old fingerprint next to products built from the new file. Without a
    recorded fingerprint (the stage script run by hand, outside DVC) there is nothing to keep in step.
    """
    _check("ingest", category, recorded, lambda: fingerprint(category, ingest), "catalog")


def check_query_fingerprint(stage: str, category: str, queries: QuerySettings, recorded: Path) -> None:
    """As `check_fingerprint`, for the query set that `stage` (ingest or queries) reads."""
    _check(stage, category, recorded, lambda: query_fingerprint(category, queries), "query set")


def _check(stage: str, category: str, recorded: Path, current: Callable[[], dict], what: str) -> None:
    if not recorded.is_file():
        log.debug(
            "%s %s: no %s (not run by DVC): %s fingerprint not checked", stage, category, recorded, what
        )
        return
    try:
        before = json.loads(recorded.read_text())
    except (OSError, ValueError) as e:
        raise CliprecError(
            f"{stage} {category}: cannot read {recorded}: run `dvc repro {stage}@{category}`"
        ) from e
    if before != current():
        raise CliprecError(
            f"{stage} {category}: the {what} changed since {recorded} was written: "
            f"run `dvc repro {stage}@{category}` (without -s), which runs catalog@{category} first"
        )
