"""Stage `queries`: one category's shopper queries against its catalog -> data/queries/<category>/.

Usage: python stages/queries.py <category>
"""

from __future__ import annotations

from cliprec import paths
from cliprec.params import stage_params
from cliprec.queries import QuerySource
from cliprec.query_set import QuerySetSpec, build_query_set
from cliprec.runtime import run_stage
from cliprec.sources import check_query_fingerprint


def main(argv: list[str]) -> None:
    """Validate params and the query set's fingerprint, then build the category's query set."""
    p, (category,) = stage_params(argv, "python stages/queries.py <category>")
    q = p.active.queries
    check_query_fingerprint("queries", category, q, paths.catalog_queries_path(category))
    # the demo world writes its shoppers with the data seed (the catalog's)
    spec = QuerySetSpec(
        QuerySource(q.source, q.path, q.hub_root, p.setup),
        q.val_fraction,
        p.images,
        q.n_queries,
        p.active.ingest.data_seed,
    )
    build_query_set(category, spec, paths.ingest_dir(category), paths.queries_dir(category))


if __name__ == "__main__":
    run_stage(main)
