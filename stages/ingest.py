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
    from cliprec.catalog import CatalogSource, build_catalog  # after validation: `datasets` imports slowly

    src = CatalogSource(ingest.source, ingest.path, ingest.n_products, ingest.hub_root)
    build_catalog(category, src, paths.ingest_dir(category), seed=ingest.data_seed, split=p.active.split.model_dump())


if __name__ == "__main__":
    run_stage(main)
