"""Stage `evaluate`: retrieval metrics of one category and variant on the test split -> metrics/<cat>/.

Self-retrieval modes on the test products, and the shopper queries' test split on the whole catalog.

Usage: python stages/evaluate.py <category> <zeroshot|lora>
"""

from __future__ import annotations

from cliprec import paths
from cliprec.params import stage_params
from cliprec.runtime import run_stage


def main(argv: list[str]) -> None:
    """Validate params, then evaluate the category and variant given on the command line."""
    usage = f"python stages/evaluate.py <category> <{'|'.join(paths.VARIANTS)}>"
    p, (category, variant) = stage_params(argv, usage, paths.VARIANTS)
    from cliprec.evaluate import EvalSettings, evaluate, write_outputs

    metrics, curve, ranks = evaluate(
        paths.products_path(category),
        paths.embed_dir(category, variant),
        paths.index_dir(category, variant),
        EvalSettings.from_params(p),
        category=category,
        variant=variant,
        queries_dir=paths.embed_queries_dir(category, variant),
    )
    write_outputs(metrics, curve, ranks, category, variant)


if __name__ == "__main__":
    run_stage(main)
