"""Stage `embed_<variant>`: product embeddings of one category -> data/embed/<category>/<variant>/.

Usage: python stages/embed.py <category> <zeroshot|lora>
  zeroshot: the setup's model as is; lora: the model + the adapter stages/train.py trained, merged.
  Many GPUs/machines: accelerate launch --multi_gpu --num_processes N stages/embed.py <category> <variant>
  (each rank embeds its share of the batches; the files are the same as one process writes).
"""

from __future__ import annotations

from cliprec import paths
from cliprec.errors import run_stage
from cliprec.params import stage_params


def main(argv: list[str]) -> None:
    """Validate params, then embed the category and variant given on the command line."""
    usage = f"python stages/embed.py <category> <{'|'.join(paths.VARIANTS)}>"
    p, (category, variant) = stage_params(argv, usage, paths.VARIANTS)
    import torch
    from accelerate import Accelerator

    from cliprec.artifacts import verify_files
    from cliprec.embed import embed_catalog
    from cliprec.model import load_clip

    acc = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")  # cpu: gloo under launch

    name = p.active.model.name
    adapter = None
    if variant == "lora":
        verify_files(paths.train_dir(category))
        adapter = paths.train_dir(category) / paths.ADAPTER_DIR
    model, processor = load_clip(name, adapter=adapter, device=acc.device)
    embed_catalog(
        model,
        processor,
        paths.images_dir(category),
        paths.summaries_dir(category) / "summaries.parquet",
        paths.embed_dir(category, variant),
        batch_size=p.embed.batch_size,
        text_weight=p.embed.text_weight,
        amp=p.amp,
        info={"model": name, "variant": variant, "adapter": adapter.as_posix() if adapter else None},
        rank=acc.process_index,
        world=acc.num_processes,
        barrier=acc.wait_for_everyone,
    )


if __name__ == "__main__":
    run_stage(main)
