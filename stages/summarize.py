"""Summarise one category: `python stages/summarize.py <category>` -> data/summaries/<category>/."""

from __future__ import annotations

import logging
import sys

import pandas as pd

from cliprec import paths
from cliprec.params import load_params
from cliprec.summarize import summarize_catalog


def main(argv: list[str] | None = None) -> None:
    """Read params and products.parquet, write the summaries of the category given on the command line."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        raise SystemExit("usage: python stages/summarize.py <category>")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    category = argv[0]
    p = load_params()
    columns = ["id", "title", "features", "description"]
    products = pd.read_parquet(paths.products_path(category), columns=columns)
    summarize_catalog(
        products,
        paths.summaries_dir(category),
        paths.summarize_progress_dir(category),
        p["summarize"],
    )


if __name__ == "__main__":
    main()
