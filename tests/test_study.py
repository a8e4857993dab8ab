"""The study's path at small shapes, offline (cliprec_worlds.standins): the stand-ins' real shapes, the hub
catalog read through the amazon source with a local hub_root, BART at its 1,024 input tokens, and beam
search without reordering the cross-attention cache."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from cliprec import catalog
from cliprec.params import Bart, Images
from cliprec_worlds import standins

REPO = Path(__file__).resolve().parents[1]
RAW = yaml.safe_load((REPO / "params.yaml").read_text())
CATEGORY = "Appliances"
SMALL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
TINY_BART = {  # max_position_embeddings stays bart-large-cnn's 1024
    "d_model": 16,
    "encoder_layers": 1,
    "decoder_layers": 1,
    "encoder_attention_heads": 2,
    "decoder_attention_heads": 2,
    "encoder_ffn_dim": 32,
    "decoder_ffn_dim": 32,
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest: tiny models run on one thread


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    """Stand-ins at small shapes: the hub-layout catalog (small photos), a tiny CLIP, a tiny BART."""
    root = tmp_path_factory.mktemp("standins")
    sides = standins.ImageSides(hi_res=96, large=48, thumb=16)
    info = standins.build_hub_catalog(root / "hub", root / "cdn", [CATEGORY], 24, seed=0, sides=sides)
    corpus = list(standins.catalog_corpus([info[CATEGORY]["file"]], repeats=1))
    standins.build_clip(
        root / "clip", corpus, vocab_size=800, text={**SMALL, "vocab_size": 800},
        vision={**SMALL, "image_size": 32, "patch_size": 8}, projection_dim=16,
    )  # fmt: skip
    standins.build_bart(root / "bart", corpus, vocab_size=800, **TINY_BART)
    return {"root": root, "hub": root / "hub", "clip": root / "clip", "bart": root / "bart"}


# --- the stand-ins -----------------------------------------------------------------------------------------


def test_the_standins_have_the_real_architectures_and_parameter_counts():
    from transformers import BartForConditionalGeneration, CLIPModel

    with torch.device("meta"):  # shapes only: no memory, no time
        clip = CLIPModel(standins.openai_clip_config(49406, 49407, 49407))
        bart = BartForConditionalGeneration(standins.bart_large_cnn_config())
    assert sum(p.numel() for p in clip.parameters()) == 151_277_313  # openai/clip-vit-base-patch32
    assert sum(p.numel() for p in bart.parameters()) == 406_290_432  # facebook/bart-large-cnn
    c = clip.config
    assert (c.vision_config.image_size, c.vision_config.patch_size, c.projection_dim) == (224, 32, 512)
    assert (c.text_config.num_hidden_layers, c.vision_config.num_hidden_layers) == (12, 12)
    assert c.text_config.max_position_embeddings == 77 and c.text_config.vocab_size == 49408
    b = bart.config
    assert (b.d_model, b.encoder_layers, b.decoder_layers, b.encoder_attention_heads) == (1024, 12, 12, 16)
    assert b.max_position_embeddings == 1024 and b.vocab_size == 50264


def test_hub_layout_catalog_is_real_looking_and_valid_json(small):
    path = small["hub"] / catalog.AMAZON_META_PATH.format(category=CATEGORY)
    records = [json.loads(line) for line in path.read_text().splitlines()]  # every line is valid JSON
    assert len(records) >= 24
    urls = [img[k] for r in records for img in r["images"] for k in ("thumb", "large") if img]
    assert urls and all(u.startswith("file:///") and Path(u[7:]).is_file() for u in urls)
    assert any(r["price"] == "None" for r in records)  # as in the hub's raw files
    assert any(len(" ".join(r["description"]).split()) > 800 for r in records)  # past 1,024 BART tokens


def test_standin_tokenizers_load_the_way_the_study_loads_models(small):
    from cliprec.model import load_clip, text_max_length
    from cliprec.summarize import load_seq2seq

    model, processor = load_clip(small["clip"])  # CLIPModel + CLIPProcessor(backend="pil")
    assert text_max_length(model, processor) == 77
    ids = processor.tokenizer(["a red kettle"])["input_ids"][0]
    assert ids[-1] == model.config.text_config.eos_token_id  # CLIP pools at the first EOS
    bart, tokenizer, _ = load_seq2seq(str(small["bart"]), device="cpu")  # AutoModelForSeq2SeqLM
    assert tokenizer.model_max_length == 1024 and bart.generation_config.no_repeat_ngram_size == 3


# --- the amazon source with a local copy of the hub ------------------------------------------------------


def test_amazon_source_reads_a_local_hub_copy_through_the_same_call(small, tmp_path, monkeypatch):
    calls = []
    real = catalog.load_meta

    def spy(data_files, cache_dir=None):
        calls.append(data_files)
        return real(data_files, cache_dir=cache_dir)

    monkeypatch.setattr(catalog, "load_meta", spy)
    report = catalog.build_catalog(
        CATEGORY, catalog.CatalogSource("amazon", n_products=12, hub_root=small["hub"]), tmp_path / "out"
    )
    assert calls == [catalog.amazon_data_files(CATEGORY, small["hub"])]
    assert calls[0].endswith("raw/meta_categories/meta_Appliances.jsonl")
    assert report["source"] == "amazon" and report["n_products"] == 12
    assert report["dropped"]["no_title"] >= 1 and report["dropped"]["duplicate_id"] >= 1
    products = pd.read_parquet(tmp_path / "out" / "products.parquet")
    # per product, per photo: its URLs hi_res -> large -> thumb
    assert all(u.startswith("file:///") for photos in products["image_urls"] for urls in photos for u in urls)


def test_the_c4_path_offline_through_the_same_loader(small, tmp_path):
    """Stand-in C4 queries (its exact columns) over the stand-in catalog: the sample holds every target,
    the query set loads from a local hub_root, and queries naming another category's products are counted."""
    from cliprec.queries import QuerySource, query_targets
    from cliprec.query_set import QuerySetSpec, build_query_set

    files = {CATEGORY: small["hub"] / catalog.AMAZON_META_PATH.format(category=CATEGORY)}
    c4 = standins.build_c4_queries(tmp_path / "amazon-c4", files, per_category=6, seed=0)
    src = QuerySource("c4", hub_root=str(tmp_path / "amazon-c4"), setup="study")
    targets = query_targets(CATEGORY, src)
    ingest = catalog.CatalogSource("amazon", n_products=8, hub_root=small["hub"], include=frozenset(targets))
    report = catalog.build_catalog(CATEGORY, ingest, tmp_path / "ingest")
    assert report["n_products"] == 8
    sampled = set(pd.read_parquet(tmp_path / "ingest" / "products.parquet")["id"])
    assert targets - {"B0OTHER0000"} <= sampled and "B0OTHER0000" in targets  # 6 of the 8: every target
    spec = QuerySetSpec(src, 0.5, Images(**RAW["images"]))
    got = build_query_set(CATEGORY, spec, tmp_path / "ingest", tmp_path / "queries")
    assert got["rows_read"] == c4["queries"] == 7 and got["kept"] == 6
    assert got["dropped"]["unknown_product"] == 1  # the request for a product of no stand-in category


# --- the study path at small shapes ----------------------------------------------------------------------


def test_the_study_path_at_small_shapes(small, tmp_path, monkeypatch):
    """amazon source (local hub copy) -> photos over file:// -> BART at 1,024 tokens -> embeddings."""
    from transformers import BartForConditionalGeneration

    from cliprec.embed import EmbedOptions, embed_catalog
    from cliprec.images import build_image_shards
    from cliprec.model import load_clip
    from cliprec.summarize import summarize_catalog

    catalog.build_catalog(
        CATEGORY, catalog.CatalogSource("amazon", n_products=16, hub_root=small["hub"]), tmp_path / "ingest"
    )
    products = pd.read_parquet(tmp_path / "ingest" / "products.parquet")
    images = Images(**{**RAW["images"], "side": 32, "workers": 2})
    report = build_image_shards(products[["id", "image_urls", "image_variants"]], tmp_path / "images", images,
                                progress=False)  # fmt: skip
    assert report["counts"]["ok"] == report["urls"] and report["products_with_image"] == 16

    widths = []
    real_generate = BartForConditionalGeneration.generate

    def spy(self, *args, **kwargs):
        widths.append(kwargs["input_ids"].shape[1])
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(BartForConditionalGeneration, "generate", spy)
    study = RAW["setups"]["study"]["summarize"]
    params = Bart(**{**study, "model": str(small["bart"]), "max_length": 8, "min_length": 2, "num_beams": 2})
    summarize_catalog(products, tmp_path / "summaries", tmp_path / "progress", params)
    assert max(widths) == 1024  # a long listing fills BART's 1,024 positions, and no more
    summaries = pd.read_parquet(tmp_path / "summaries" / "summaries.parquet")
    assert summaries["summary"].str.len().min() > 0

    model, processor = load_clip(small["clip"])
    summaries_path = tmp_path / "summaries" / "summaries.parquet"
    manifest = embed_catalog(
        model,
        processor,
        tmp_path / "images",
        summaries_path,
        tmp_path / "embed",
        options=EmbedOptions(batch_size=8),
    )
    assert manifest["n"] == 16 and manifest["d"] == 16


# --- BART's beam search at 1,024 input tokens -------------------------------------------------------------


def test_beam_search_skips_reordering_the_cross_attention_cache_and_changes_nothing(small, monkeypatch):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.cache_utils import DynamicCache

    from cliprec.params import Bart
    from cliprec.summarize import beam_search_cache, generate_summaries

    model = AutoModelForSeq2SeqLM.from_pretrained(small["bart"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(small["bart"])
    texts = ["A red kettle. " * 400, "Blue toaster with two slots.", "Steel fridge, quiet. " * 30]
    enc = tokenizer(texts, truncation=True, max_length=1024, padding=True, return_tensors="pt")
    assert enc["input_ids"].shape[1] == 1024  # padded: beams of different inputs differ in length
    reordered = []
    real = DynamicCache.reorder_cache

    def spy(self, beam_idx):
        reordered.append(id(self))
        return real(self, beam_idx)

    monkeypatch.setattr(DynamicCache, "reorder_cache", spy)
    cache = beam_search_cache()
    kwargs = {"num_beams": 4, "max_length": 10, "min_length": 10}
    with torch.inference_mode():
        plain = model.generate(**enc, **kwargs)
        fast = model.generate(**enc, **kwargs, cache=cache)
    assert torch.equal(plain, fast)  # the same tokens, bit for bit
    assert id(cache.self_attention_cache) in reordered and id(cache.cross_attention_cache) not in reordered

    seen = []
    real_generate = type(model).generate
    monkeypatch.setattr(
        type(model), "generate", lambda self, **kw: seen.append(kw) or real_generate(self, **kw)
    )
    bart = Bart(method="bart", model="x", max_input_tokens=1024, max_length=10, min_length=2, num_beams=4,
                batch_size=2, max_words=10, chunk_size=2)  # fmt: skip
    out = generate_summaries(model, tokenizer, texts, params=bart, device="cpu")
    assert len(out) == 3 and all(type(kw["cache"]).__name__ == "BeamSearchCache" for kw in seen)
