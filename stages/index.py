"""Stage `index`: the FAISS index over one category's fused product vectors -> data/index/<cat>/<variant>/.

Usage: python stages/index.py <category> <zeroshot|lora>
"""

from __future__ import annotations

from cliprec import paths
from cliprec.params import stage_params
from cliprec.runtime import run_stage


def main(argv: list[str]) -> None:
    """Validate params, then index the category and variant given on the command line."""
    usage = f"python stages/index.py <category> <{'|'.join(paths.VARIANTS)}>"
    p, (category, variant) = stage_params(argv, usage, paths.VARIANTS)
    from cliprec.index import build_from_embeddings

    build_from_embeddings(
        paths.embed_dir(category, variant),
        paths.index_dir(category, variant),
        factory=p.index.factory,
        memory_budget_mb=p.index.memory_budget_mb,
        seed=p.active.ingest.data_seed,
        variant=variant,
        category=category,
    )


if __name__ == "__main__":
    run_stage(main)
