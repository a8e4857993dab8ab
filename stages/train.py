"""Stage `train`: LoRA fine-tuning of one category -> data/train/<category>/{adapter/, summary.json}.

Usage: python stages/train.py <category>
  DDP: accelerate launch --multi_gpu --num_processes N stages/train.py <category>  (CPU: gloo, GPU: nccl)
"""

from __future__ import annotations

import logging
import sys

from cliprec import paths
from cliprec.params import load_params
from cliprec.train import TrainConfig, train


def main(argv: list[str] | None = None) -> None:
    """Train the category given on the command line with params.yaml's settings."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        raise SystemExit("usage: python stages/train.py <category>")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    category = args[0]
    train(
        TrainConfig.from_params(load_params()),
        paths.products_path(category),
        paths.summaries_dir(category) / "summaries.parquet",
        paths.images_dir(category),
        paths.train_dir(category),
        paths.checkpoint_dir(category),
        paths.live_dir(category),
    )


if __name__ == "__main__":
    main()
