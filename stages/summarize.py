"""Stage `summarize`: one text per product -> data/summaries/<category>/ (summaries.parquet, report.json).

Usage: python stages/summarize.py <category>
"""

from __future__ import annotations

from cliprec import paths
from cliprec.params import stage_params
from cliprec.runtime import run_stage


def main(argv: list[str]) -> None:
    """Validate params, then summarise the category given on the command line."""
    p, (category,) = stage_params(argv, "python stages/summarize.py <category>")
    import pandas as pd

    from cliprec.artifacts import catalog_identity
    from cliprec.summarize import summarize_catalog

    catalog_identity(paths.products_path(category), category)  # intact, and this category's

    columns = ["id", "title", "features", "description"]
    products = pd.read_parquet(paths.products_path(category), columns=columns)
    summarize_catalog(
        products,
        paths.summaries_dir(category),
        paths.summarize_progress_dir(category),
        p.active.summarize,
        run_log=paths.run_log_path("summarize", category),
    )


if __name__ == "__main__":
    run_stage(main)
