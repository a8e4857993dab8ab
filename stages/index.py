"""Stage `index`: build the FAISS index over one category's fused product vectors.

Usage: python stages/index.py <category> <variant>
"""

from __future__ import annotations

import logging
import sys

from cliprec.index import build_from_embeddings
from cliprec.params import load_params
from cliprec.paths import VARIANTS, embed_dir, index_dir


def main(argv: list[str] | None = None) -> None:
    """Run the index stage for the category and variant given on the command line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[1] not in VARIANTS:
        raise SystemExit(f"usage: python stages/index.py <category> <{'|'.join(VARIANTS)}>")
    category, variant = args
    p = load_params()
    build_from_embeddings(
        embed_dir(category, variant),
        index_dir(category, variant),
        p["index"],
        seed=p["seed"],
        variant=variant,
    )


if __name__ == "__main__":
    main()
