"""Stage `ingest`: one category's catalog -> data/ingest/<category>/ (products.parquet, report.json).

Usage: python stages/ingest.py <category>
"""

from __future__ import annotations

from cliprec import paths
from cliprec.params import stage_params
from cliprec.runtime import run_stage
from cliprec.sources import check_fingerprint


def main(argv: list[str]) -> None:
    """Validate params and the catalog's fingerprint, then build the category's products table."""
    p, (category,) = stage_params(argv, "python stages/ingest.py <category>")
    ingest = p.active.ingest
    check_fingerprint(category, ingest, paths.catalog_source_path(category))
    from cliprec.catalog import build_catalog  # after validation: `datasets` takes seconds to import

    build_catalog(
        category,
        ingest.source,
        paths.ingest_dir(category),
        path=ingest.path,
        n_products=ingest.n_products,
        seed=p.seed,
        split=p.active.split.model_dump(),
        hub_root=ingest.hub_root,
    )


if __name__ == "__main__":
    run_stage(main)
