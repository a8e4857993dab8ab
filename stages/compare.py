"""Stage `compare`: LoRA minus zero-shot on one category's test queries, paired.

Writes metrics/<cat>/compare.detail.json (every difference) and compare.json (its headline, a DVC metric).

Usage: python stages/compare.py <category>
"""

from __future__ import annotations

from cliprec.params import stage_params
from cliprec.runtime import run_stage


def main(argv: list[str]) -> None:
    """Validate params, then compare the two variants of the category given on the command line."""
    p, (category,) = stage_params(argv, "python stages/compare.py <category>")
    from cliprec.compare import write_comparison

    write_comparison(
        category, resamples=p.evaluate.resamples, confidence=p.evaluate.confidence, seed=p.evaluate.seed
    )


if __name__ == "__main__":
    run_stage(main)
