"""Stage `evaluate`: retrieval metrics of one category and variant on the test split.

Usage: python stages/evaluate.py <category> <variant>
"""

from __future__ import annotations

import logging
import sys

from cliprec.evaluate import evaluate, write_outputs
from cliprec.params import load_params
from cliprec.paths import VARIANTS, embed_dir, index_dir, metrics_path, products_path, recall_plot_path


def main(argv: list[str] | None = None) -> None:
    """Run the evaluate stage for the category and variant given on the command line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[1] not in VARIANTS:
        raise SystemExit(f"usage: python stages/evaluate.py <category> <{'|'.join(VARIANTS)}>")
    category, variant = args
    p = load_params()
    metrics, curve = evaluate(
        products_path(category),
        embed_dir(category, variant),
        index_dir(category, variant),
        ks=tuple(p["evaluate"]["ks"]),
        text_weight=float(p["embed"]["text_weight"]),
        nprobe=p["index"].get("nprobe"),
        ef_search=p["index"].get("ef_search"),
        k_factor=p["index"].get("k_factor"),
    )
    write_outputs(metrics, curve, metrics_path(category, variant), recall_plot_path(category, variant))


if __name__ == "__main__":
    main()
