"""Stage `catalog`: what one category's ingest reads, fingerprinted -> data/catalog/<category>/source.json.

Depends on the whole catalog/ folder; ingest@<category> depends on this file only (see cliprec.sources).

Usage: python stages/catalog.py <category>
"""

from __future__ import annotations

import logging

from cliprec import paths
from cliprec.params import stage_params
from cliprec.runtime import run_stage
from cliprec.sources import write_fingerprint

log = logging.getLogger("cliprec.catalog_stage")


def main(argv: list[str]) -> None:
    """Validate params, then fingerprint the file the category's ingest reads (if it reads one)."""
    p, (category,) = stage_params(argv, "python stages/catalog.py <category>")
    found = write_fingerprint(category, p.active.ingest, paths.catalog_source_path(category))
    log.info("catalog %s: %s", category, found)


if __name__ == "__main__":
    run_stage(main)
