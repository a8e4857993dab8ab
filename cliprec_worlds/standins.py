"""Offline stand-ins for the study's hub resources, at their real shapes (the study rehearsal's inputs).

- `build_clip`: a CLIP with openai/clip-vit-base-patch32's architecture (ViT-B/32 at 224 px, 12 + 12
  layers, 512-d projection, 77 tokens, 49,408-row token embedding, quick_gelu) and a CLIP BPE tokenizer
  (CLIP's normaliser and pre-tokeniser, `</w>` word ends) trained here; random weights.
- `build_bart`: a summariser with facebook/bart-large-cnn's architecture (BartConfig of bart-large:
  d_model 1024, 12 + 12 layers, 16 heads, 1,024 positions, 50,264-row vocabulary) and its generation
  settings, with a byte-level BPE tokenizer trained here; random weights.
- `build_hub_catalog`: Amazon-2023 item metadata laid out like the hub repo
  (`<hub>/raw/meta_categories/meta_<Category>.jsonl`), drawn by `cliprec_worlds.demo.synthetic`, with the
  hub's quirks (price "None" as text, duplicates, records without title or image; no cut-off lines: the hub's
  files are valid JSON) and Amazon-like images: each photo as thumb (40 px), large (500 px) and hi_res
  (1500 px) JPEGs under a separate "CDN" directory, named by file:// URLs, so they are fetched offline.
  A share of the descriptions is lengthened past BART's 1,024 input tokens, some to a few hundred words.
- `build_c4_queries`: Amazon-C4's `test.csv` (its exact columns) over that catalog: first-person requests
  naming one product each, and a few naming products of no stand-in category.

Both tokenizers are trained with `cliprec_worlds.demo_clip`'s deterministic BPE (tokenizers' BpeTrainer breaks
ties in hash order), so the same arguments give the same files on one machine type. The corpus is the
stand-in catalog plus everyday English: the vocabularies reach what that corpus supports (a few
thousand tokens), while the embedding matrices keep the real models' row counts, so every shape and
parameter count is the real one. Random weights: the rehearsal measures the path and its cost, not the
quality (BART then writes to `max_length`, the worst case for beam search).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cliprec.catalog import AMAZON_META_PATH
from cliprec.queries import C4_COLUMNS, C4_FILE
from cliprec_worlds.demo import synthetic
from cliprec_worlds.demo_clip import ENGLISH, _bpe_merges, make_processor, retail_words, train_tokenizer

log = logging.getLogger(__name__)

CLIP_DIR = "clip-vit-base-patch32"
BART_DIR = "bart-large-cnn"
HUB_DIR = "amazon-2023"  # the hub repo's layout: raw/meta_categories/meta_<Category>.jsonl
CDN_DIR = "amazon-cdn"  # the photos the catalog's image URLs name (file://)
INFO_FILE = "standins.json"
C4_DIR = "amazon-c4"  # Amazon-C4's hub repo layout: test.csv

CLIP_VOCAB = 49408  # OpenAI CLIP's BPE: 2 x 256 byte symbols + 48,894 merges + 2 specials
BART_VOCAB = 50264  # facebook/bart-large-cnn's config.vocab_size
BART_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0-3, as in RoBERTa/BART; <mask> comes last
# facebook/bart-large-cnn's generation_config.json: what its from_pretrained brings along
BART_GENERATION = {
    "bos_token_id": 0,
    "decoder_start_token_id": 2,
    "eos_token_id": 2,
    "forced_bos_token_id": 0,
    "forced_eos_token_id": 2,
    "pad_token_id": 1,
    "early_stopping": True,
    "length_penalty": 2.0,
    "max_length": 142,
    "min_length": 56,
    "no_repeat_ngram_size": 3,
    "num_beams": 4,
}


# --- CLIP -----------------------------------------------------------------------------------------------


def openai_clip_config(
    bos: int,
    eos: int,
    pad: int,
    text: Mapping[str, Any] | None = None,
    vision: Mapping[str, Any] | None = None,
    projection_dim: int = 512,
) -> Any:
    """openai/clip-vit-base-patch32's CLIPConfig with these special ids; `text`/`vision` override keys.

    CLIP pools a text at its first EOS token, so the ids must be the tokenizer's (the hub config's legacy
    eos_token_id 2 makes transformers pool at the highest id instead, which is OpenAI's EOS).
    """
    from transformers import CLIPConfig

    ids = {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad}
    text_config = {
        "vocab_size": CLIP_VOCAB, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
        "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "projection_dim": projection_dim, **ids, **(text or {}),
    }  # fmt: skip
    vision_config = {
        "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
        "image_size": 224, "patch_size": 32, "hidden_act": "quick_gelu", "projection_dim": projection_dim,
        **(vision or {}),
    }  # fmt: skip
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim)
    for key, value in ids.items():  # generation utils and pooling read them from different places
        setattr(config, key, value)
    return config


def build_clip(
    out_dir: str | Path,
    corpus: Iterable[str],
    *,
    vocab_size: int = CLIP_VOCAB,
    seed: int = 0,
    text: Mapping[str, Any] | None = None,
    vision: Mapping[str, Any] | None = None,
    projection_dim: int = 512,
) -> dict[str, Any]:
    """Train a CLIP BPE on `corpus`, build a random CLIP (OpenAI's shape unless overridden), save both."""
    import torch
    from transformers import CLIPModel

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(iter(corpus), vocab_size)
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|startoftext|>", "<|endoftext|>")]
    config = openai_clip_config(ids[0], ids[1], tokenizer.pad_token_id, text, vision, projection_dim)
    if len(tokenizer) > config.text_config.vocab_size:
        raise ValueError(
            f"tokenizer has {len(tokenizer)} tokens, the text tower {config.text_config.vocab_size}"
        )
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = make_processor(tokenizer, config.vision_config.image_size)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    return {
        "architecture": "CLIPModel",
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "tokenizer_vocab": len(tokenizer),
        "embedding_rows": config.text_config.vocab_size,
        "text": {k: getattr(config.text_config, k) for k in _CLIP_KEYS},
        "vision": {
            k: getattr(config.vision_config, k) for k in (*_CLIP_KEYS[1:], "image_size", "patch_size")
        },
        "projection_dim": config.projection_dim,
        "seconds": round(time.perf_counter() - t0, 1),
    }


_CLIP_KEYS = ("max_position_embeddings", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "hidden_act")  # fmt: skip


# --- BART -----------------------------------------------------------------------------------------------


def bart_large_cnn_config(vocab_size: int = BART_VOCAB, **overrides: Any) -> Any:
    """facebook/bart-large-cnn's BartConfig (the architecture of bart-large); `overrides` change keys."""
    from transformers import BartConfig

    values = {
        "vocab_size": vocab_size, "d_model": 1024, "encoder_layers": 12, "decoder_layers": 12,
        "encoder_attention_heads": 16, "decoder_attention_heads": 16, "encoder_ffn_dim": 4096,
        "decoder_ffn_dim": 4096, "max_position_embeddings": 1024, "activation_function": "gelu",
        "dropout": 0.1, "attention_dropout": 0.0, "activation_dropout": 0.0, "init_std": 0.02,
        "scale_embedding": False, "pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2,
        "decoder_start_token_id": 2, "forced_bos_token_id": 0, "forced_eos_token_id": 2,
        **overrides,
    }  # fmt: skip
    return BartConfig(**values)


def train_bart_tokenizer(corpus: Iterable[str], vocab_size: int, out_dir: str | Path) -> Any:
    """A byte-level BPE like BART's (GPT-2's pre-tokeniser, `Ġ` for a leading space) in `out_dir`."""
    from tokenizers import pre_tokenizers
    from transformers import BartTokenizer

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False)
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for text in corpus:
        for piece, _ in pre.pre_tokenize_str(text):
            counts[tuple(piece)] += 1
    vocab = {tok: i for i, tok in enumerate(BART_SPECIALS)}
    for sym in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[sym] = len(vocab)
    merges = _bpe_merges(dict(sorted(counts.items())), max(0, vocab_size - len(vocab) - 1))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<mask>"] = len(vocab)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = BartTokenizer.from_pretrained(str(out_dir), model_max_length=1024)
    for name in ("vocab.json", "merges.txt"):  # save_pretrained writes tokenizer.json, which holds both
        (out_dir / name).unlink()
    return tokenizer


def build_bart(
    out_dir: str | Path,
    corpus: Iterable[str],
    *,
    vocab_size: int = BART_VOCAB,
    seed: int = 0,
    **overrides: Any,
) -> dict[str, Any]:
    """Train a byte-level BPE on `corpus`, build a random BART (bart-large-cnn's shape unless overridden)
    with bart-large-cnn's generation settings, save both."""
    import torch
    from transformers import BartForConditionalGeneration, GenerationConfig

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    tokenizer = train_bart_tokenizer(corpus, vocab_size, out_dir)
    config = bart_large_cnn_config(vocab_size, **overrides)
    if (
        len(tokenizer) > config.vocab_size + 1
    ):  # bart-large-cnn's <mask> (50264) is outside its 50264 rows too
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model {config.vocab_size}")
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(**BART_GENERATION)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    keys = ("vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
            "encoder_ffn_dim", "max_position_embeddings")  # fmt: skip
    return {
        "architecture": "BartForConditionalGeneration",
        "parameters": int(sum(p.numel() for p in model.parameters())),
        "tokenizer_vocab": len(tokenizer),
        "config": {k: getattr(config, k) for k in keys},
        "generation": BART_GENERATION,
        "seconds": round(time.perf_counter() - t0, 1),
    }


# --- the catalog ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageSides:
    """Long side in pixels of each size Amazon serves a product photo in."""

    hi_res: int = 1500
    large: int = 500
    thumb: int = 40


# Text a long listing carries beyond the synthetic description (manual-like, as in real Appliances pages).
_LONG_SENTENCES = (
    "Please read all instructions carefully before first use and keep them for future reference.",
    "The {noun} is designed for everyday use and has been tested to meet strict quality standards.",
    "Clean the {noun} with a soft, damp cloth; do not use abrasive cleaners or scouring pads.",
    "If you have any questions about your {noun}, our customer service team is happy to help.",
    "Package contents: one {noun}, a quick start guide and a warranty card.",
    "Our {brand} team designs every product to last, using durable materials and careful assembly.",
    "Store the {noun} in a cool, dry place away from direct sunlight when it is not in use.",
    "Colours may vary slightly from the pictures because of different monitor settings.",
    "Measurements are taken by hand, so please allow a small difference of one to two centimetres.",
    "Satisfaction guarantee: if you are not happy with your {noun}, return it within thirty days.",
    "Each {noun} is inspected by hand before it leaves our warehouse.",
    "This listing is for the {noun} only; other items shown in the photos are not included.",
)


def _lengthen(rec: dict[str, Any], words: int, rng: np.random.Generator) -> None:
    """Append manual-like paragraphs to the description until it has about `words` more words."""
    noun = (rec.get("title") or "product").split()[-1].lower()
    brand = rec.get("store") or "our"
    added: list[str] = []
    n = 0
    while n < words:
        sentence = _LONG_SENTENCES[int(rng.integers(len(_LONG_SENTENCES)))].format(noun=noun, brand=brand)
        added.append(sentence)
        n += len(sentence.split())
    paragraphs = [" ".join(added[i : i + 6]) for i in range(0, len(added), 6)]
    rec["description"] = [*(rec.get("description") or []), *paragraphs]


def _photo_sizes(src: Path, stem: Path, sides: ImageSides) -> dict[str, str]:
    """Write `src` as thumb/large/hi_res JPEGs named like Amazon's; return {size key: file:// URL}."""
    im = Image.open(src).convert("RGB")
    urls = {}
    for key, side, suffix in (("thumb", sides.thumb, "_SS40_"), ("large", sides.large, "_AC_"),
                              ("hi_res", sides.hi_res, "_AC_SL1500_")):  # fmt: skip
        path = stem.with_name(f"{stem.name}.{suffix}.jpg")
        im.resize((side, side), Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)
        urls[key] = path.resolve().as_uri()
    return urls


def build_hub_catalog(
    hub_dir: str | Path,
    cdn_dir: str | Path,
    categories: Sequence[str],
    n_products: int,
    seed: int = 0,
    sides: ImageSides = ImageSides(),  # noqa: B008 (frozen dataclass: immutable)
    long_fraction: float = 0.1,
    long_words: int = 900,
    medium_fraction: float = 0.3,
    medium_words: int = 250,
) -> dict[str, Any]:
    """Write `hub_dir/raw/meta_categories/meta_<Category>.jsonl` and the photos under `cdn_dir`.

    About `long_fraction` of the records get ~`long_words` more description words (past BART's 1,024
    tokens), `medium_fraction` ~`medium_words`; the rest keep the synthetic catalog's short texts.
    """
    hub_dir, cdn_dir = Path(hub_dir), Path(cdn_dir)
    stats: dict[str, Any] = {}
    for category in categories:
        jsonl = hub_dir / AMAZON_META_PATH.format(category=category)
        jsonl.parent.mkdir(parents=True, exist_ok=True)
        photos = cdn_dir / category / "images" / "I"
        if photos.exists():
            shutil.rmtree(photos)
        photos.mkdir(parents=True)
        with tempfile.TemporaryDirectory(prefix="standin-catalog-") as tmp:
            raw = synthetic.generate_catalog(category, n_products, seed, Path(tmp))
            lines, kept, skipped = [], 0, 0
            for line in raw.read_text(encoding="utf-8").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:  # the synthetic catalog's cut-off line: the hub's files are valid JSON
                    skipped += 1
                    continue
                rng = synthetic.stable_rng(seed, category, "standin", rec.get("parent_asin"))
                for img in rec.get("images") or []:
                    src = Path(img["large"])
                    urls = _photo_sizes(src, photos / f"{rec['parent_asin']}_{img['variant']}", sides)
                    img.update(thumb=urls["thumb"], large=urls["large"])
                    img["hi_res"] = urls["hi_res"] if img.get("hi_res") else None
                u = rng.random()
                if u < long_fraction:
                    _lengthen(rec, long_words, rng)
                elif u < long_fraction + medium_fraction:
                    _lengthen(rec, medium_words, rng)
                if rec.get("price") is None:
                    rec["price"] = "None"  # as in the hub's raw files
                lines.append(json.dumps(rec, ensure_ascii=False))
                kept += 1
        jsonl.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        stats[category] = {"records": kept, "cut_off_lines_left_out": skipped, "file": jsonl.as_posix()}
        log.info("stand-in hub catalog %s: %d records -> %s", category, kept, jsonl)
    return stats


def catalog_corpus(jsonl_files: Iterable[str | Path], repeats: int = 3) -> Iterator[str]:
    """Titles, features and descriptions of catalog files, then everyday English (tokenizer training)."""
    for path in jsonl_files:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            yield from (x for x in [rec.get("title"), *(rec.get("features") or []),
                                    *(rec.get("description") or [])] if x)  # fmt: skip
    for _ in range(repeats):  # a few times, so common words become whole tokens
        # as running text: a byte-level BPE learns words with their leading space ("Ġword")
        yield from (" ".join(ENGLISH[i : i + 20]) for i in range(0, len(ENGLISH), 20))
        yield from retail_words()


# --- Amazon-C4's queries ------------------------------------------------------------------------------------

_C4_OPENERS = (
    "I'm looking for",
    "I need",
    "Can you recommend",
    "I want to buy",
    "I'd like",
)
_C4_REASONS = (
    "my old one broke after years of daily use and I want something that lasts just as long",
    "it is a gift for my mother, who cooks for the whole family every weekend",
    "we just moved into a small apartment and space on the counter is tight",
    "I use it every morning before work, so it has to be quick and easy to clean",
    "the reviews I read said the cheaper ones fall apart, and I do not want to buy twice",
)


def _c4_query(rec: dict[str, Any], rng: np.random.Generator) -> str:
    """A first-person request for the product of a catalog record, about as long as C4's (~230 characters)."""
    title = " ".join(str(rec.get("title") or "a good one").split()[:8]).lower()
    feature = next(iter(rec.get("features") or []), "")
    wish = f" It should have {str(feature).lower()}." if feature else ""
    opener, reason = (_C4_OPENERS[int(rng.integers(len(_C4_OPENERS)))], _C4_REASONS[int(rng.integers(5))])
    return f"{opener} something like a {title}, because {reason}.{wish}"


def build_c4_queries(
    c4_dir: str | Path, catalog_files: Mapping[str, str | Path], per_category: int, seed: int = 0
) -> dict[str, Any]:
    """Write c4_dir/test.csv in Amazon-C4's exact columns: `per_category` requests per category's catalog.

    As in C4, each names one product (item_id = its parent_asin), and the review it was rewritten from
    (ori_review, never read by cliprec) comes with it. A few name products of no stand-in catalog, as
    C4's other categories do for any one category.
    """
    import csv

    c4_dir = Path(c4_dir)
    c4_dir.mkdir(parents=True, exist_ok=True)
    rows: list[list[Any]] = []
    for category, path in catalog_files.items():
        records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
        records = [r for r in records if r.get("title") and r.get("images")]
        rng = synthetic.stable_rng(seed, category, "c4")
        for i in rng.permutation(len(records))[:per_category]:
            rec = records[int(i)]
            review = f"Five stars. {rec['title']} works as described."
            rows.append([_c4_query(rec, rng), rec["parent_asin"], f"AU{len(rows):06d}", 5, review])
    for k in range(max(1, per_category // 10)):
        rows.append(
            [f"I need a book about {('birds', 'rivers', 'bread')[k % 3]}", f"B0OTHER{k:04d}", "AU", 5, "-"]
        )
    with open(c4_dir / C4_FILE, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(C4_COLUMNS)
        writer.writerows([qid, *row] for qid, row in enumerate(rows))
    log.info("stand-in C4 queries: %d -> %s", len(rows), c4_dir / C4_FILE)
    return {"queries": len(rows), "file": (c4_dir / C4_FILE).as_posix()}


# --- all of it ------------------------------------------------------------------------------------------


def build_standins(
    out_dir: str | Path, categories: Sequence[str], n_products: int, seed: int = 0
) -> dict[str, Any]:
    """Catalog, C4, CLIP and BART stand-ins in out_dir (HUB_DIR, CDN_DIR, C4_DIR, CLIP_DIR, BART_DIR)."""
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    catalog = build_hub_catalog(out_dir / HUB_DIR, out_dir / CDN_DIR, categories, n_products, seed)
    files = [c["file"] for c in catalog.values()]
    c4 = build_c4_queries(
        out_dir / C4_DIR, {c: catalog[c]["file"] for c in categories}, n_products // 4, seed
    )
    clip = build_clip(out_dir / CLIP_DIR, catalog_corpus(files), seed=seed)
    log.info("CLIP stand-in: %s", clip)
    bart = build_bart(out_dir / BART_DIR, catalog_corpus(files), seed=seed)
    log.info("BART stand-in: %s", bart)
    info = {
        "categories": list(categories), "n_products": n_products, "seed": seed, "catalog": catalog, "c4": c4,
        "clip": clip, "bart": bart, "seconds": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n")
    return info
