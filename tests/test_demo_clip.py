from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPProcessor

from cliprec_worlds.demo.synthetic import (
    BASIC_COLOURS,
    GEOMETRIC_SHAPES,
    VOCABS,
    generate_catalog,
    stable_rng,
)
from cliprec_worlds.demo_clip import (
    CATALOG_COLOUR_NAMES,
    CATALOG_TYPE_NAMES,
    DISTRACTORS,
    EOS,
    WEB_COLOUR,
    WEB_NOUNS,
    BuildConfig,
    build_demo_clip,
    generic_attributes,
    generic_caption,
    generic_dataset,
    normalise_pixels,
    retail_words,
    train_tokenizer,
    write_readme,
    zero_shot_recall,
)

DEMO_CLIP = Path("models/demo-clip")
TINY = BuildConfig(
    n_images=192,
    n_eval=64,
    steps=3,
    batch_size=32,
    vocab_size=700,
    hidden_size=32,
    intermediate_size=64,
    heads=2,
    text_layers=1,
    vision_layers=1,
    projection_dim=32,
    image_size=32,
    render_size=48,
    workers=1,
)


@pytest.fixture(scope="module")
def demo():
    # a missing dir would make from_pretrained look for a hub repo of that name
    assert (DEMO_CLIP / "config.json").is_file(), f"{DEMO_CLIP} missing: python scripts/build_demo_clip.py"
    return CLIPModel.from_pretrained(DEMO_CLIP), CLIPProcessor.from_pretrained(DEMO_CLIP)


def _text_embeds(model, processor, texts, **kw):
    tok = processor.tokenizer(texts, return_tensors="pt", truncation=True, **kw)
    with torch.no_grad():
        return model.get_text_features(**tok).pooler_output


def test_committed_model_loads_and_is_small(demo):
    model, processor = demo
    size = sum(f.stat().st_size for f in DEMO_CLIP.rglob("*") if f.is_file())
    assert size < 10 * 2**20
    assert (DEMO_CLIP / "README.md").read_text().count("Zero-shot") >= 1
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"  # no torchvision here
    vision = model.config.vision_config
    assert processor.image_processor.crop_size == {"height": vision.image_size, "width": vision.image_size}
    assert processor.tokenizer.model_max_length == model.config.text_config.max_position_embeddings == 77
    assert model.config.text_config.vocab_size == len(processor.tokenizer)


def test_text_pools_at_the_tokenizers_end_of_text(demo):
    model, processor = demo
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids(EOS)
    assert model.config.text_config.eos_token_id == tok.eos_token_id == eos
    assert model.config.text_config.bos_token_id == tok.bos_token_id
    assert model.config.text_config.pad_token_id == tok.pad_token_id
    # one-character words and rare bytes are real tokens, never UNK (= end-of-text, where CLIP pools)
    for text in ["a x", "Crème Brûlée 3 & 4 ™", "q"]:
        ids = tok(text).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == eos and eos not in ids[1:-1]
    # padding after the end-of-text must not change a text's embedding
    texts = ["red", "a large blue striped circle on a white background with some more words"]
    padded = _text_embeds(model, processor, texts, padding="max_length", max_length=77)
    alone = torch.cat([_text_embeds(model, processor, [t]) for t in texts])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-4)


def test_demo_clip_tells_colours_apart(demo):
    # generic pictures it was pre-trained on (other indices than the build's): a colour word must pick
    # its own picture more often than chance
    model, processor = demo
    images, attrs = generic_dataset(40, 123, 96, model.config.vision_config.image_size, offset=10**6)
    rng = np.random.default_rng(0)
    texts = [generic_caption(a, rng) for a in attrs]
    with torch.no_grad():
        img = model.get_image_features(pixel_values=normalise_pixels(images, processor)).pooler_output
    txt = _text_embeds(model, processor, texts, padding=True)
    sims = torch.nn.functional.normalize(txt, dim=-1) @ torch.nn.functional.normalize(img, dim=-1).T
    top1 = (sims.argmax(1) == torch.arange(len(texts))).float().mean().item()
    assert top1 > 5 / len(texts)


def test_generic_data_is_deterministic_and_captions_name_the_attributes():
    a1, attrs1 = generic_dataset(8, 0, 48, 32)
    a2, attrs2 = generic_dataset(8, 0, 48, 32)
    assert a1.shape == (8, 32, 32, 3) and a1.dtype == np.uint8
    assert np.array_equal(a1, a2) and attrs1 == attrs2
    attrs = generic_attributes(stable_rng(0, "x"), object_frac=0.0)
    for long in (False, True):
        caption = generic_caption(attrs, np.random.default_rng(1), long=long)
        assert attrs["colour"] in caption and attrs["shape"] in caption
    shapes = [generic_attributes(stable_rng(0, "y", i), object_frac=0.0) for i in range(50)]
    assert {a["kind"] for a in shapes} == {"shape"}
    assert set(BASIC_COLOURS) >= {a["colour"] for a in shapes}
    assert set(GEOMETRIC_SHAPES) >= {a["shape"] for a in shapes}


def test_web_objects_are_named_with_everyday_words_and_rarely_with_the_catalogs():
    objects = [generic_attributes(stable_rng(0, "z", i), object_frac=1.0) for i in range(300)]
    assert {a["kind"] for a in objects} == {"object"}
    assert {a["shape"] for a in objects} <= set(WEB_NOUNS)
    assert {a["colour"] for a in objects} - set(BASIC_COLOURS)  # navy, teal ... are drawn too
    rng = np.random.default_rng(0)
    for a in objects:
        # never rare: the object's everyday noun and the basic word for its colour
        caption = generic_caption(a, rng, rare_word_prob=0.0)
        assert any(noun in caption for noun in WEB_NOUNS[a["shape"]]), caption
        assert WEB_COLOUR[a["colour"]] in caption, caption
    brands = [b.lower() for vocab in VOCABS.values() for b in vocab.brands]
    captions = [generic_caption(a, rng, long=True) for a in objects]
    assert not any(b in c for b in brands for c in captions)  # brand names are never said
    # always rare: the catalog's own words for type, colour and pattern
    a = next(a for a in objects if a["pattern"] == "stripes")
    caption = generic_caption(a, rng, rare_word_prob=1.0)
    assert any(n in caption for n in CATALOG_TYPE_NAMES[a["shape"]]), caption
    assert any(n in caption for n in CATALOG_COLOUR_NAMES[a["colour"]]), caption
    assert not set(DISTRACTORS) & {"dress", "shoe", "watch", "steel", "glass"}  # named things are no noise


def test_tokenizer_knows_every_byte():
    tok = train_tokenizer(iter(["a red circle", "a blue square"] * 20), vocab_size=600)
    unk = tok.convert_tokens_to_ids(EOS)
    for ch in ["x", "é", "7", "™", "中"]:
        assert unk not in tok(ch).input_ids[1:-1]
    assert tok.tokenize("red circle") == ["red</w>", "circle</w>"]


def test_tokenizer_reads_everyday_catalog_words_whole_but_not_brands(demo):
    tok = demo[1].tokenizer
    words = " ".join(retail_words()).lower()
    brands = [b for vocab in VOCABS.values() for b in vocab.brands]
    assert "dishwasher" in words and not any(b.lower() in words for b in brands)
    for word in ["dishwasher", "polyester", "skirt", "refrigerator", "stainless"]:
        assert tok.tokenize(word) == [word + "</w>"]
    for brand in brands:  # invented names stay in pieces, as in a real BPE
        assert len(tok.tokenize(brand)) > 1 + brand.count(" ")
    texts = [n for vocab in VOCABS.values() for t in vocab.types for n in t.names] + [
        s for vocab in VOCABS.values() for s in vocab.feature_pool
    ]
    n_words = sum(len(t.split()) for t in texts)
    assert sum(len(tok.tokenize(t)) for t in texts) < 1.6 * n_words  # the old 2,305-token BPE: 2.8


def test_pixels_match_the_processor(demo):
    _, processor = demo
    size = processor.image_processor.crop_size["height"]
    arr = np.random.default_rng(0).integers(0, 256, (2, size, size, 3), dtype=np.uint8)
    expected = processor.image_processor(images=[Image.fromarray(a) for a in arr], return_tensors="pt")
    torch.testing.assert_close(normalise_pixels(arr, processor), expected["pixel_values"], atol=1e-5, rtol=0)


def test_tiny_build_end_to_end(tmp_path):
    out = tmp_path / "clip"
    stats = build_demo_clip(out, TINY)
    assert stats["parameters"] > 0 and np.isfinite(stats["final_loss"])
    model, processor = CLIPModel.from_pretrained(out), CLIPProcessor.from_pretrained(out)
    assert model.config.vision_config.image_size == 32
    assert processor.image_processor.crop_size["height"] == 32
    jsonl = generate_catalog("Appliances", 20, 0, tmp_path / "raw", workers=1)
    z = zero_shot_recall(out, jsonl, gallery_size=10)
    assert z["galleries"] == 2 and 0.0 <= z["recall_at_5"] <= 1.0 and z["chance_recall_at_5"] == 0.5
    readme = write_readme(out, stats, {"Appliances": z}, "python scripts/build_demo_clip.py --out x")
    assert "python scripts/build_demo_clip.py --out x" in readme.read_text()
    assert json.loads((out / "build_stats.json").read_text())["zero_shot"]["Appliances"]["galleries"] == 2
    # same seed, same weights
    again = build_demo_clip(tmp_path / "again", TINY)
    assert again["final_loss"] == stats["final_loss"]
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "again" / "model.safetensors").read_bytes()


def test_zero_shot_on_the_demo_catalog_beats_chance(tmp_path):
    # the committed model, on a small demo catalog it never saw: clearly above chance, far from perfect
    jsonl = generate_catalog("Amazon_Fashion", 100, 0, tmp_path / "raw", workers=1)
    z = zero_shot_recall(DEMO_CLIP, jsonl, gallery_size=100)
    assert z["galleries"] == 1
    assert 2 * z["chance_recall_at_5"] < z["recall_at_5"] < 0.8
