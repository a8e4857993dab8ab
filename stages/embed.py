"""Stage `embed_<variant>`: product embeddings of one category -> data/embed/<category>/<variant>/.

Usage: python stages/embed.py <category> <zeroshot|lora>
  zeroshot: params model.name as is; lora: model.name + the adapter trained by stages/train.py, merged.
"""

from __future__ import annotations

import logging
import sys

from cliprec import paths
from cliprec.embed import embed_catalog
from cliprec.model import ADAPTER_DIR, load_clip
from cliprec.params import load_params


def main(argv: list[str] | None = None) -> None:
    """Embed the category and variant given on the command line."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[1] not in paths.VARIANTS:
        raise SystemExit(f"usage: python stages/embed.py <category> <{'|'.join(paths.VARIANTS)}>")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    category, variant = args
    p = load_params()
    name = p["model"]["name"]
    adapter = paths.train_dir(category) / ADAPTER_DIR if variant == "lora" else None
    model, processor = load_clip(name, adapter=adapter)
    embed_catalog(
        model,
        processor,
        paths.images_dir(category),
        paths.summaries_dir(category) / "summaries.parquet",
        paths.embed_dir(category, variant),
        batch_size=int(p["embed"]["batch_size"]),
        text_weight=float(p["embed"]["text_weight"]),
        amp=bool(p["amp"]),
        info={"model": name, "variant": variant, "adapter": adapter.as_posix() if adapter else None},
    )


if __name__ == "__main__":
    main()
