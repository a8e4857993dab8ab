"""Stage `embed_queries`: the shopper queries' vectors of one category and variant -> data/embed_queries/.

Usage: python stages/embed_queries.py <category> <zeroshot|lora>
  zeroshot: the setup's model as is; lora: the model + the category's trained adapter, merged (the same
  model as the product vectors in data/embed/<category>/<variant>, which the manifest names).
"""

from __future__ import annotations

from cliprec import paths
from cliprec.params import stage_params
from cliprec.runtime import run_stage


def main(argv: list[str]) -> None:
    """Validate params, then embed the queries of the category and variant given on the command line."""
    usage = f"python stages/embed_queries.py <category> <{'|'.join(paths.VARIANTS)}>"
    p, (category, variant) = stage_params(argv, usage, paths.VARIANTS)
    from cliprec.artifacts import catalog_identity, manifest_sha256, verify_artifact
    from cliprec.model import load_clip
    from cliprec.query_embed import QueryEmbedOptions, embed_queries, verify_query_set

    name = p.active.model.name
    lineage = catalog_identity(paths.products_path(category), category)
    queries = verify_query_set(paths.queries_dir(category), lineage)
    adapter, adapter_sha256 = None, None
    if variant == "lora":
        verify_artifact(paths.train_dir(category), lineage)
        adapter, adapter_sha256 = (
            paths.train_dir(category) / paths.ADAPTER_DIR,
            manifest_sha256(paths.train_dir(category)),
        )
    # the queries must land in the product vectors' space: the same model, adapter and fusion weight
    embed_dir = paths.embed_dir(category, variant)
    same = {
        "model": name,
        "variant": variant,
        "adapter_sha256": adapter_sha256,
        "text_weight": p.embed.text_weight,
    }
    verify_artifact(embed_dir, {**lineage, **same})
    model, processor = load_clip(name, adapter=adapter)
    embed_queries(
        model,
        processor,
        paths.queries_dir(category),
        paths.embed_queries_dir(category, variant),
        QueryEmbedOptions(
            batch_size=p.embed.batch_size,
            text_weight=p.embed.text_weight,
            long_text=p.embed.long_text,
            amp=p.amp,
        ),
        info={
            "model": name,
            "variant": variant,
            "adapter": adapter.as_posix() if adapter else None,
            **lineage,
            "adapter_sha256": adapter_sha256,
            "embeddings_sha256": manifest_sha256(embed_dir),
            "queries_sha256": queries,
        },
    )


if __name__ == "__main__":
    run_stage(main)
