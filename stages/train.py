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
    from cliprec.train import TrainConfig, train  # torch + transformers: seconds, so after validation

    # the catalog and the photos must be this category's, and the photos of this catalog
    lineage = catalog_identity(paths.products_path(category), category)
    verify_artifact(paths.images_dir(category), lineage)
    train(
        TrainConfig.from_params(p),
        paths.products_path(category),
        paths.summaries_dir(category) / "summaries.parquet",
        paths.images_dir(category),
        paths.train_dir(category),
        paths.checkpoint_dir(category),
        paths.live_dir(category),
        run_log=paths.run_log_path("train", category),
        lineage=lineage,
    )


if __name__ == "__main__":
    run_stage(main)
