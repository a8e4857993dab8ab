"""The shopper queries' vectors (stage `embed_queries`): text, photo or both, fused as the product vectors.

Reads the query set the `queries` stage wrote (data/queries/<cat>/queries.jsonl, one row per query:
query_id, text, image (a photo under the set's folder), relevant {product_id: grade}, split, target_split,
kind) and embeds every query, val and test, with one variant's model: a text query is its text vector,
a photo query its image vector, a text+photo query `fuse(text, image, embed.text_weight)`, exactly as
cliprec.embed fuses a product's summary and photo.

A shopper's text can be longer than the text tower reads (`text_max_length`: 77 tokens for CLIP, the demo
CLIP's max_position_embeddings too). `embed.long_text` says what happens then:
- truncate: the first 77 tokens, as the product summaries are embedded;
- windows: the text's tokens in overlapping windows of 77 (each a full BOS ... EOS sequence, half a window
  apart, the last one flush with the end), each window's unit vector averaged, the mean renormalised.
A text that fits is embedded the same way under both. docs/metrics.md says which one is chosen and why.

Output (data/embed_queries/<cat>/<variant>/): vectors.npy (n x d float32, unit rows, in the query set's
order), queries.jsonl (per row: query_id, split, target_split, kind, relevant, tokens, windows), report.json
(counts, long texts) and manifest.json, whose lineage (category, catalog_sha256, variant, model,
adapter_sha256, embeddings_sha256 of the product vectors, queries_sha256) the evaluate stage checks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cliprec.artifacts import (
    ArtifactError,
    atomic_write_bytes,
    check_built,
    manifest_sha256,
    verify_files,
    write_json,
    write_manifest,
)
from cliprec.codec import decode_jpeg
from cliprec.embed import encode_images, encode_texts
from cliprec.model import decode_side, model_device, text_features, text_max_length
from cliprec.paths import rebuild_hint
from cliprec.precision import autocast
from cliprec.vectors import fuse, l2_normalise

log = logging.getLogger(__name__)

QUERIES_FILE = "queries.jsonl"
FILES = ("vectors.npy", QUERIES_FILE, "report.json")
LONG_TEXT = ("truncate", "windows")
SPLITS = ("val", "test")
TARGET_SPLITS = ("train", "val", "test")
KINDS = ("text", "image", "text+image")


@dataclass(frozen=True)
class ShopperQuery:
    """One row of a query set's queries.jsonl."""

    query_id: str
    text: str | None
    image: str | None
    relevant: dict[str, int]
    split: str
    target_split: str
    kind: str


def _row(line: str, where: str) -> ShopperQuery:
    """One queries.jsonl line, checked (ArtifactError naming file and line)."""
    try:
        raw = json.loads(line)
        q = ShopperQuery(**{f: raw[f] for f in ShopperQuery.__dataclass_fields__})
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{where}: not a query row ({type(e).__name__}: {e})") from None
    kind = "+".join(k for k, v in (("text", q.text), ("image", q.image)) if v)
    problems = [
        not isinstance(q.query_id, str) and "query_id is not a string",
        (q.split not in SPLITS) and f"split {q.split!r} is not one of {SPLITS}",
        (q.target_split not in TARGET_SPLITS) and f"target_split {q.target_split!r}",
        kind != q.kind and f"kind {q.kind!r} but it has {kind or 'neither text nor image'}",
        not (isinstance(q.relevant, dict) and q.relevant) and "no relevant product",
        isinstance(q.relevant, dict)
        and any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in q.relevant.values())
        and "a grade is not an integer >= 1",
    ]
    problem = next((p for p in problems if p), None)
    if problem:
        raise ArtifactError(f"{where}: {problem}")
    return q


def read_queries(queries_dir: str | Path) -> list[ShopperQuery]:
    """The rows of a query set's queries.jsonl (ArtifactError on a malformed row or a duplicate id)."""
    path = Path(queries_dir) / QUERIES_FILE
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise ArtifactError(f"{path} is missing: rebuild it with `{rebuild_hint(path)}`") from None
    rows = [_row(line, f"{path}:{i}") for i, line in enumerate(lines, 1) if line.strip()]
    ids = [q.query_id for q in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ArtifactError(f"{path}: query_id {dup!r} appears twice: rebuild it with `{rebuild_hint(path)}`")
    return rows


@dataclass(frozen=True)
class QueryEmbedOptions:
    """How to embed queries: batch size, the text+photo fusion weight, the long-text policy, precision."""

    batch_size: int = 256
    text_weight: float = 0.5
    long_text: str = "truncate"
    amp: bool = False
    device: str | torch.device | None = None


def token_counts(processor: Any, texts: Sequence[str]) -> list[int]:
    """Tokens of each text with its BOS and EOS, untruncated: what is compared with `text_max_length`."""
    encoded = processor.tokenizer(list(texts), truncation=False, verbose=False)  # verbose: no >77 warning
    return [len(ids) for ids in encoded["input_ids"]]


def text_windows(ids: Sequence[int], max_length: int, bos: int, eos: int) -> list[list[int]]:
    """The `windows` policy's token sequences of one text (its tokens without BOS/EOS): overlapping
    windows of max_length tokens with BOS and EOS, half a window apart, the last flush with the end."""
    width = max_length - 2
    body = list(ids)
    if len(body) <= width:
        return [[bos, *body, eos]]
    stride = max(1, width // 2)
    starts = list(range(0, len(body) - width + 1, stride))
    if starts[-1] + width < len(body):
        starts.append(len(body) - width)
    return [[bos, *body[s : s + width], eos] for s in starts]


@torch.inference_mode()
def _window_vectors(
    model: torch.nn.Module, processor: Any, windows: list[list[int]], opt: QueryEmbedOptions
) -> np.ndarray:
    """Unit vectors of token sequences (each <= max_length), `opt.batch_size` at a time."""
    device = torch.device(opt.device) if opt.device is not None else model_device(model)
    out = []
    for s in range(0, len(windows), opt.batch_size):
        batch = processor.tokenizer.pad({"input_ids": windows[s : s + opt.batch_size]}, return_tensors="pt")
        with autocast(device, opt.amp):
            vec = text_features(model, batch["input_ids"].to(device), batch["attention_mask"].to(device))
        out.append(vec.float().cpu().numpy())
    return np.concatenate(out)


def encode_long_texts(
    model: torch.nn.Module, processor: Any, texts: Sequence[str], opt: QueryEmbedOptions
) -> tuple[np.ndarray, list[int]]:
    """(n x d unit text vectors, windows per text) under `opt.long_text` (see the module doc)."""
    if opt.long_text not in LONG_TEXT:
        raise ValueError(f"long_text {opt.long_text!r} is not one of {LONG_TEXT}")
    if opt.long_text == "truncate" or not texts:
        vectors = encode_texts(model, processor, texts, opt.batch_size, opt.device, opt.amp)
        return vectors, [1] * len(texts)
    tok = processor.tokenizer
    max_length = text_max_length(model, processor)
    bodies = tok(list(texts), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    per_text = [text_windows(ids, max_length, tok.bos_token_id, tok.eos_token_id) for ids in bodies]
    flat = _window_vectors(model, processor, [w for ws in per_text for w in ws], opt)
    bounds = np.cumsum([0, *map(len, per_text)])
    means = np.stack([flat[a:b].mean(axis=0) for a, b in zip(bounds[:-1], bounds[1:])])
    return l2_normalise(means), [len(ws) for ws in per_text]


def _photos(processor: Any, queries_dir: Path, names: Sequence[str]) -> list[Any]:
    """The query photos, decoded as the catalog's are (cliprec.codec); ArtifactError on an unreadable one."""
    side = decode_side(processor)
    out = []
    for name in names:
        path = queries_dir / name
        try:
            out.append(decode_jpeg(path.read_bytes(), side))
        except (OSError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
            raise ArtifactError(
                f"{path}: unreadable query photo ({e}): rebuild it with `{rebuild_hint(queries_dir)}`"
            ) from None
    return out


def query_vectors(
    model: torch.nn.Module,
    processor: Any,
    queries_dir: Path,
    rows: Sequence[ShopperQuery],
    opt: QueryEmbedOptions,
) -> tuple[np.ndarray, list[int]]:
    """(n x d unit vectors of the queries, windows per query: 0 for a photo-only one)."""
    with_text = [i for i, q in enumerate(rows) if q.text]
    with_photo = [i for i, q in enumerate(rows) if q.image]
    text, windows = encode_long_texts(model, processor, [rows[i].text for i in with_text], opt)
    photos = _photos(processor, queries_dir, [rows[i].image for i in with_photo])
    image = encode_images(model, processor, photos, opt.batch_size, opt.device, opt.amp)
    d = text.shape[1] if len(text) else image.shape[1]
    out = np.zeros((len(rows), d), np.float32)
    text_of = dict(zip(with_text, text))
    for i, vec in zip(with_photo, image):
        out[i] = fuse(text_of[i][None], vec[None], opt.text_weight)[0] if i in text_of else vec
    for i in set(with_text) - set(with_photo):
        out[i] = text_of[i]
    window_of = dict(zip(with_text, windows))
    return out, [window_of.get(i, 0) for i in range(len(rows))]


def embed_queries(
    model: torch.nn.Module,
    processor: Any,
    queries_dir: str | Path,
    out_dir: str | Path,
    options: QueryEmbedOptions = QueryEmbedOptions(),
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Embed every query of `queries_dir` into `out_dir` (module doc); returns the manifest written last.

    `info` (model, variant, adapter and the lineage) goes into the manifest.
    """
    queries_dir, out_dir = Path(queries_dir), Path(out_dir)
    rows = read_queries(queries_dir)
    if not rows:
        raise ArtifactError(f"{queries_dir / QUERIES_FILE} has no query: `{rebuild_hint(queries_dir)}`")
    vectors, windows = query_vectors(model, processor, queries_dir, rows, options)
    max_length = text_max_length(model, processor)
    texts = [q.text for q in rows if q.text]
    tokens = iter(token_counts(processor, texts))
    counts = [next(tokens) if q.text else 0 for q in rows]
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / "vectors.npy", vectors)
    meta = [
        {"query_id": q.query_id, "split": q.split, "target_split": q.target_split, "kind": q.kind,
         "relevant": q.relevant, "tokens": n, "windows": w}
        for q, n, w in zip(rows, counts, windows)
    ]  # fmt: skip
    atomic_write_bytes(out_dir / QUERIES_FILE, "".join(json.dumps(m) + "\n" for m in meta).encode())
    report = long_text_report(meta, max_length, options.long_text)
    write_json(report, out_dir / "report.json")
    info = {**dict(info or {}), "d": int(vectors.shape[1]), "n": len(rows), "max_length": max_length,
            "text_weight": float(options.text_weight), "long_text": options.long_text}  # fmt: skip
    manifest = write_manifest(out_dir, FILES, info)
    log.info(
        "embedded %d queries (%d texts over %d tokens, %s) -> %s",
        len(rows), report["texts_over_max_length"], max_length, options.long_text, out_dir,
    )  # fmt: skip
    return manifest


def long_text_report(meta: Sequence[Mapping[str, Any]], max_length: int, policy: str) -> dict[str, Any]:
    """Counts by split and kind, and how many texts are longer than the text tower reads."""
    with_text = [m for m in meta if m["tokens"]]
    over = [m for m in with_text if m["tokens"] > max_length]
    return {
        "queries": len(meta),
        "by_split": {s: sum(m["split"] == s for m in meta) for s in SPLITS},
        "by_kind": {k: sum(m["kind"] == k for m in meta) for k in KINDS},
        "max_length": max_length,
        "long_text": policy,
        "texts": len(with_text),
        "texts_over_max_length": len(over),
        "texts_over_max_length_by_split": {s: sum(m["split"] == s for m in over) for s in SPLITS},
        "max_tokens": max((m["tokens"] for m in with_text), default=0),
    }


def verify_query_set(queries_dir: str | Path, lineage: Mapping[str, Any]) -> str:
    """The sha256 of a verified query set's manifest: its files intact and, where the manifest records
    them, of this category and catalog (`lineage`)."""
    manifest = verify_files(queries_dir)
    check_built(queries_dir, manifest, {k: v for k, v in lineage.items() if k in manifest})
    return manifest_sha256(queries_dir)
