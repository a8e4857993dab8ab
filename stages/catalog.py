"""Stage `catalog`: what one category's ingest and query set read, fingerprinted -> data/catalog/<category>/.

source.json (the catalog) and queries.json (the query set). Depends on the whole catalog/ folder;
ingest@<category> and queries@<category> depend on these files only (see cliprec.sources).

Usage: python stages/catalog.py <category>
"""

from __future__ import annotations

import logging

from cliprec import paths
from cliprec.params import stage_params
from cliprec.runtime import run_stage
from cliprec.sources import write_fingerprint, write_query_fingerprint

log = logging.getLogger("cliprec.catalog_stage")


def main(argv: list[str]) -> None:
    """Validate params, then fingerprint the files the category's ingest and query set read (if any)."""
    p, (category,) = stage_params(argv, "python stages/catalog.py <category>")
    found = write_fingerprint(category, p.active.ingest, paths.catalog_source_path(category))
    log.info("catalog %s: %s", category, found)
    found = write_query_fingerprint(category, p.active.queries, paths.catalog_queries_path(category))
    log.info("catalog %s: queries %s", category, found)


if __name__ == "__main__":
    run_stage(main)
