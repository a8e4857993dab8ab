"""Stage `images`: fetch, check, resize and shard the product images of one category.

Usage: python stages/images.py <category>
"""

from __future__ import annotations

import logging
import sys

from cliprec.images import ImageConfig, build_images
from cliprec.params import load_params
from cliprec.paths import images_dir, products_path


def main(argv: list[str] | None = None) -> None:
    """Run the images stage for the category given on the command line."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python stages/images.py <category>")
    category = args[0]
    cfg = ImageConfig.from_params(load_params()["images"])
    build_images(products_path(category), images_dir(category), cfg)


if __name__ == "__main__":
    main()
