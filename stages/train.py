"""Stage `train`: LoRA fine-tuning of one category -> data/train/<category>/ (adapter/, summary.json).

Usage: python stages/train.py <category>
  DDP: accelerate launch --multi_gpu --num_processes N stages/train.py <category>  (CPU: gloo, GPU: nccl)
"""

from __future__ import annotations

from cliprec import paths
from cliprec.params import stage_params
from cliprec.runtime import run_stage


def main(argv: list[str]) -> None:
    """Validate params, then train the category given on the command line."""
    p, (category,) = stage_params(argv, "python stages/train.py <category>")
    from cliprec.artifacts import catalog_identity, verify_artifact
    from cliprec.train import (
        TrainConfig,
        TrainPaths,
        train,
    )  # torch + transformers: seconds, so after validation

    # the catalog and the photos must be this category's, and the photos of this catalog
    lineage = catalog_identity(paths.products_path(category), category)
    verify_artifact(paths.images_dir(category), lineage)
    where = TrainPaths(
        products_path=paths.products_path(category),
        summaries_path=paths.summaries_dir(category) / "summaries.parquet",
        images_dir=paths.images_dir(category),
        out_dir=paths.train_dir(category),
        checkpoint_dir=paths.checkpoint_dir(category),
        live_dir=paths.live_dir(category),
        run_log=paths.run_log_path("train", category),
    )
    train(TrainConfig.from_params(p), where, lineage=lineage)


if __name__ == "__main__":
    run_stage(main)
