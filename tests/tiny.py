"""A tiny CLIP and a tiny on-disk catalog for tests (seconds on a CPU, no network, no models/ dir).

make_clip(dir): a 2-layer, 32-d CLIP on 32 px images + a character-level CLIP tokenizer + the PIL image
processor, saved like models/demo-clip. make_catalog(root): products.parquet (id, title, split) with
its manifest, summaries.parquet (id, summary) and image shards in the images-stage format, where a
product's colour is both in its summary and in its photo, so a few LoRA steps have something to learn.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
from transformers.models.clip import CLIPImageProcessorPil

from cliprec.artifacts import catalog_identity, write_manifest
from cliprec.shards import SHARD_SCHEMA

COLORS = {
    "red": (220, 30, 30),
    "green": (30, 180, 40),
    "blue": (30, 60, 220),
    "yellow": (230, 220, 40),
    "black": (15, 15, 15),
    "white": (245, 245, 245),
    "purple": (140, 40, 170),
    "orange": (245, 140, 20),
}
ITEMS = ("shirt", "dress", "shoe", "hat", "bag", "scarf")


def make_clip(path: str | Path, seed: int = 0, image_size: int = 32) -> Path:
    """Save a random tiny CLIPModel + CLIPProcessor (char-level tokenizer, PIL processor) to `path`."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(ByteLevel.alphabet()):  # every byte, with and without the end-of-word mark
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=64)
    images = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    config = CLIPConfig(
        text_config={
            "vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "max_position_embeddings": 64,
            "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "image_size": image_size, "patch_size": 8,
        },
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = CLIPModel(config)
    path = Path(path)
    model.save_pretrained(str(path))
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(path))
    return path


def _photo(rgb: tuple[int, int, int], rng: np.random.Generator, size: int = 64) -> bytes:
    base = np.array(rgb, dtype=np.float64)
    img = np.clip(base + rng.normal(0, 12, (size, size, 3)), 0, 255)
    x0, y0 = rng.integers(0, size // 2, 2)
    img[y0 : y0 + size // 3, x0 : x0 + size // 3] = rng.integers(0, 256, 3)  # a distracting patch
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_catalog(
    root: str | Path, category: str = "Tiny", n: int = 64, seed: int = 0, shard_size: int = 40
) -> dict[str, Path]:
    """Write a tiny catalog laid out like cliprec.paths under `root` (= data/); returns its paths.

    {products, summaries, images}: 1/4 of the products are val, 1/16 test, the rest train.

    Every third product has no "alt" photo, and product 5 has no photo at all (a product the images
    stage could not fetch), so readers must skip it.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    names = list(COLORS)
    rows, summaries, shard_rows = [], [], []
    for i in range(n):
        pid = f"P{i:04d}"
        color, item = names[i % len(names)], ITEMS[(i // len(names)) % len(ITEMS)]
        split = "val" if i % 4 == 1 else ("test" if i % 16 == 3 else "train")
        rows.append({"id": pid, "title": f"{color} {item}", "split": split})
        summaries.append({"id": pid, "summary": f"a {color} {item}, style {i % 5}"})
        if i == 5:
            continue
        views = ["main"] if i % 3 == 0 else ["main", "alt"]
        for view in views:
            jpeg = _photo(COLORS[color], rng)
            shard_rows.append({"id": pid, "view": view, "variant": "MAIN" if view == "main" else "PT01",
                               "url": f"file://{pid}_{view}.jpg", "jpeg": jpeg})  # fmt: skip
    paths = {
        "products": root / "ingest" / category / "products.parquet",
        "summaries": root / "summaries" / category / "summaries.parquet",
        "images": root / "images" / category,
    }
    for p in paths.values():
        (p if p.suffix == "" else p.parent).mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(paths["products"], index=False)
    write_manifest(
        paths["products"].parent, [paths["products"].name], {"category": category}
    )  # as ingest does
    pd.DataFrame(summaries).to_parquet(paths["summaries"], index=False)
    shards = []
    for k in range(0, len(shard_rows), shard_size):
        table = pa.Table.from_pylist(shard_rows[k : k + shard_size], schema=SHARD_SCHEMA)
        shards.append(f"shard-{k // shard_size:05d}.parquet")
        pq.write_table(table, paths["images"] / shards[-1])
    # what the images stage writes last: readers verify it
    write_manifest(paths["images"], shards, catalog_identity(paths["products"], category))
    return paths
