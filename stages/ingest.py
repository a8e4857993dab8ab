"""Ingest one category: `python stages/ingest.py <category>` -> data/ingest/<category>/."""

from __future__ import annotations

import logging
import sys

from cliprec import paths
from cliprec.catalog import build_catalog
from cliprec.params import load_params


def main(argv: list[str] | None = None) -> None:
    """Read params, build the products table of the category given on the command line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python stages/ingest.py <category>")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    category = argv[0]
    p = load_params()
    ingest = p["ingest"]
    build_catalog(
        category,
        ingest["source"],
        paths.ingest_dir(category),
        path=ingest.get("path"),
        n_products=ingest.get("n_products"),
        seed=int(p["seed"]),
        split=p["split"],
    )


if __name__ == "__main__":
    main()
