"""Which local file a category's ingest reads, and what it holds: the `catalog` stage's fingerprint.

DVC reruns a stage when one of its dependencies changes, and fails a stage whose dependency does not
exist. The sources read different things: `synthetic` nothing, `amazon` the hub (nothing local) or its
copy `<hub_root>/raw/meta_categories/meta_<Category>.jsonl`, `jsonl` the file its `path` template names.
No one path in dvc.yaml fits all three, so `catalog@<category>` depends on the whole catalog/ folder and
writes `data/catalog/<category>/source.json` (the source, and for a local file its path and sha256);
`ingest@<category>` depends on that file instead of the folder. An edit to one category's file reruns
the catalog stages (a hash each), and only that category's ingest.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Protocol

from cliprec.artifacts import sha256_file
from cliprec.errors import CliprecError

log = logging.getLogger(__name__)

AMAZON_META_PATH = "raw/meta_categories/meta_{category}.jsonl"  # inside the hub repo, or a local copy of it


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


def write_fingerprint(category: str, ingest: IngestSettings, out: Path) -> dict[str, Any]:
    """Write `fingerprint` to out (JSON); return it."""
    found = fingerprint(category, ingest)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(found, indent=2) + "\n")
    return found


def check_fingerprint(category: str, ingest: IngestSettings, recorded: Path) -> None:
    """Fail in one line when the file changed since `catalog@<category>` wrote `recorded`.

    `dvc repro` always runs the catalog stage first; this catches `dvc repro -s ingest@<category>`, which
    would otherwise record the old fingerprint next to products built from the new file. Without a
    recorded fingerprint (the stage script run by hand, outside DVC) there is nothing to keep in step.
    """
    if not recorded.is_file():
        log.debug("ingest %s: no %s (not run by DVC): catalog fingerprint not checked", category, recorded)
        return
    try:
        before = json.loads(recorded.read_text())
    except (OSError, ValueError) as e:
        raise CliprecError(
            f"ingest {category}: cannot read {recorded}: run `dvc repro ingest@{category}`"
        ) from e
    if before != fingerprint(category, ingest):
        raise CliprecError(
            f"ingest {category}: the catalog changed since {recorded} was written: "
            f"run `dvc repro ingest@{category}` (without -s), which runs catalog@{category} first"
        )
