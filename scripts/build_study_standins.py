"""Build the study rehearsal's offline stand-ins into standins/ (git-ignored; nothing here is committed).

    python scripts/build_study_standins.py [--out standins] [--categories A B] [--n-products N] [--seed S]

Writes, deterministically and without network (cliprec_worlds.standins):
  <out>/clip-vit-base-patch32/   a random CLIP of openai/clip-vit-base-patch32's architecture + CLIP BPE
  <out>/bart-large-cnn/          a random BART of facebook/bart-large-cnn's architecture + byte-level BPE
  <out>/amazon-2023/raw/meta_categories/meta_<Category>.jsonl   the hub repo's layout
  <out>/amazon-cdn/              the photos those records name (file:// URLs: thumb, large, hi_res)
  <out>/amazon-c4/test.csv       Amazon-C4's queries (its exact columns) for products of that catalog
  <out>/standins.json            shapes, parameter counts, tokenizer sizes, build time
~2 GB on disk; a few minutes on 2 cores. bench/study_rehearsal.py runs the study setup on them.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from cliprec_worlds.standins import build_standins


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and build the stand-ins."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("standins"))
    ap.add_argument("--categories", nargs="+", default=["Amazon_Fashion", "Appliances"])
    ap.add_argument("--n-products", type=int, default=400, help="records per category")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    info = build_standins(args.out, args.categories, args.n_products, args.seed)
    print(json.dumps({k: info[k] for k in ("clip", "bart", "catalog", "seconds")}, indent=2))


if __name__ == "__main__":
    main()
