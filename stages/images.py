"""Stage `images`: fetch, check, resize and shard one category's product photos -> data/images/<category>/.

Usage: python stages/images.py <category>
"""

from __future__ import annotations

from cliprec import paths
from cliprec.params import stage_params
from cliprec.runtime import run_stage


def main(argv: list[str]) -> None:
    """Validate params, then build the image shards of the category given on the command line."""
    p, (category,) = stage_params(argv, "python stages/images.py <category>")
    from cliprec.images import build_images

    build_images(paths.products_path(category), paths.images_dir(category), p.images, category=category)


if __name__ == "__main__":
    run_stage(main)
