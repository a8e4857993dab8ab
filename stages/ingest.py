"""Stage `ingest`: one category's catalog -> data/ingest/<category>/ (products.parquet, report.json).

Usage: python stages/ingest.py <category>
"""

from __future__ import annotations

from cliprec import paths
from cliprec.params import stage_params
from cliprec.queries import QuerySource, query_targets
from cliprec.runtime import run_stage
from cliprec.sources import check_fingerprint, check_query_fingerprint


def main(argv: list[str]) -> None:
    """Validate params and the fingerprints, then build the category's products table.

    The sample holds every product of the catalog that the query set judges relevant (its targets), so
    that the truth of each query is in the gallery.
    """
    p, (category,) = stage_params(argv, "python stages/ingest.py <category>")
    ingest, queries = p.active.ingest, p.active.queries
    check_fingerprint(category, ingest, paths.catalog_source_path(category))
    check_query_fingerprint("ingest", category, queries, paths.catalog_queries_path(category))
    targets = query_targets(category, QuerySource(queries.source, queries.path, queries.hub_root, p.setup))
    from cliprec.catalog import CatalogSource, build_catalog  # after validation: `datasets` imports slowly

    src = CatalogSource(ingest.source, ingest.path, ingest.n_products, ingest.hub_root, frozenset(targets))
    build_catalog(
        category, src, paths.ingest_dir(category), seed=ingest.data_seed, split=p.active.split.model_dump()
    )


if __name__ == "__main__":
    run_stage(main)
