"""Stage `embed_<variant>`: product embeddings of one category -> data/embed/<category>/<variant>/.

Usage: python stages/embed.py <category> <zeroshot|lora>
  zeroshot: the setup's model as is; lora: the model + the adapter stages/train.py trained, merged.
  Many GPUs/machines: accelerate launch --multi_gpu --num_processes N stages/embed.py <category> <variant>
  (each rank embeds its share of the batches; the files are the same as one process writes).
"""

from __future__ import annotations

from cliprec import paths
from cliprec.params import stage_params
from cliprec.runtime import run_stage


def main(argv: list[str]) -> None:
    """Validate params, then embed the category and variant given on the command line."""
    usage = f"python stages/embed.py <category> <{'|'.join(paths.VARIANTS)}>"
    p, (category, variant) = stage_params(argv, usage, paths.VARIANTS)
    import torch
    from accelerate import Accelerator

    from cliprec.artifacts import catalog_identity, manifest_sha256, verify_artifact
    from cliprec.embed import EmbedOptions, embed_catalog
    from cliprec.model import load_clip

    name = p.active.model.name
    # the photos, and the adapter, must be of this category's current catalog
    lineage = catalog_identity(paths.products_path(category), category)
    verify_artifact(paths.images_dir(category), lineage)
    adapter, adapter_sha256 = None, None
    if variant == "lora":
        train_dir = paths.train_dir(category)
        verify_artifact(train_dir, lineage)
        adapter, adapter_sha256 = train_dir / paths.ADAPTER_DIR, manifest_sha256(train_dir)
    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")  # cpu: gloo under launch
    model, processor = load_clip(name, adapter=adapter, device=acc.device)
    embed_catalog(
        model,
        processor,
        paths.images_dir(category),
        paths.summaries_dir(category) / "summaries.parquet",
        paths.embed_dir(category, variant),
        options=EmbedOptions(
            batch_size=p.embed.batch_size,
            text_weight=p.embed.text_weight,
            amp=p.amp,
            rank=acc.process_index,
            world=acc.num_processes,
            barrier=acc.wait_for_everyone,
        ),
        info={
            "model": name,
            "variant": variant,
            "adapter": adapter.as_posix() if adapter else None,
            **lineage,
            "adapter_sha256": adapter_sha256,
        },
    )


if __name__ == "__main__":
    run_stage(main)
