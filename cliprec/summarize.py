"""One short text per product for CLIP's text tower (77 tokens): extractive or BART summaries.

Methods (params `summarize.method`):
- `extractive`: `cliprec.text.extractive_summary` with IDF weights computed over the whole catalog.
- `bart`: a seq2seq model (`summarize.model`, hub id or local dir) reads "title. features. description"
  (truncated to `max_input_tokens` and the model's limit) and `generate`s with `num_beams`,
  `max_length`, `min_length` (in tokens), `batch_size` inputs at a time.
Both: summaries go through `clean_text` and are cut to `max_words` words. A product whose features and
description are empty has nothing to summarise: its summary is its title (as is a generated summary
that is empty after cleaning). The report's `title_fallbacks` counts summaries equal to the title.

Resume: products are processed in chunks of `chunk_size`; each finished chunk is written to the
progress dir as chunk-<i>.parquet (id, summary), atomically. `fingerprint.json` there identifies the
run (method, every summarize param, the model's identity, sha256 of the ids and texts, the code and the
library versions) and says whether it finished. A rerun reuses the finished chunks of an UNFINISHED run
with the same fingerprint; anything else (other inputs, params, code or versions, or a finished run,
e.g. under `dvc repro -f`) is deleted first, so a rerun always computes. report.json says with which
code and library versions the summaries were made; how the run went (chunks resumed, seconds) is no
property of the summaries, so it goes to the log and to the run log (`run_log`, outside the DVC outputs):
a killed and resumed run writes the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from cliprec import provenance
from cliprec.artifacts import model_identity, write_json
from cliprec.hub import SUMMARIZER_SETTING, hub_errors, pretrained_kwargs
from cliprec.params import Bart, Summarize
from cliprec.provenance import append_run_log
from cliprec.text import clean_text, extractive_summary, idf_weights

logger = logging.getLogger(__name__)

SUMMARIZE_LIBRARIES = ("torch", "transformers", "tokenizers", "numpy")
FINGERPRINT_FILE = "fingerprint.json"
SUMMARIES_SCHEMA = pa.schema([("id", pa.string()), ("summary", pa.string())])


def _as_list(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    return [x for x in v if isinstance(x, str)]


def body_text(features: Sequence[str] | None, description: Sequence[str] | None) -> str:
    """Features then description, each item ended by a full stop, cleaned: what there is to summarise."""
    parts = [clean_text(x) for x in [*_as_list(features), *_as_list(description)]]
    parts = [p if p.endswith((".", "!", "?", "。", "！", "？")) else p + "." for p in parts if p]
    return " ".join(parts)


def source_text(title: str, features: Sequence[str] | None, description: Sequence[str] | None) -> str:
    """The BART input: "title. features. description", cleaned."""
    title = clean_text(title)
    body = body_text(features, description)
    if title and body:
        return f"{title.rstrip('.')}. {body}"
    return title or body


def cap_words(text: str, max_words: int) -> str:
    """At most `max_words` whitespace-separated words."""
    return " ".join(text.split()[:max_words])


# --------------------------------------------------------------------------------------------------
# fingerprint and progress files


def input_hash(ids: Sequence[str], texts: Sequence[str]) -> str:
    """sha256 over the ordered (id, text) pairs."""
    h = hashlib.sha256()
    for i, t in zip(ids, texts, strict=True):
        h.update(json.dumps([i, t], ensure_ascii=False).encode())
        h.update(b"\n")
    return h.hexdigest()


def run_identity() -> dict[str, Any]:
    """The code (this module's import closure) and library versions a run uses."""
    return provenance.run_identity(__name__, SUMMARIZE_LIBRARIES)


def fingerprint(params: Summarize, ids: Sequence[str], texts: Sequence[str]) -> dict[str, Any]:
    """What identifies a summarize run: all summarize params, model identity, inputs, code, versions."""
    inputs = {
        "method": params.method,
        "params": params.model_dump(),
        "model": model_identity(params.model) if isinstance(params, Bart) else None,
        "inputs": input_hash(ids, texts),
        "n": len(ids),
    }
    return provenance.resume_fingerprint(inputs, run_identity())


def _chunk_path(progress_dir: Path, index: int) -> Path:
    return progress_dir / f"chunk-{index:05d}.parquet"


def prepare_progress_dir(progress_dir: str | Path, fp: Mapping[str, Any]) -> bool:
    """Keep progress_dir's chunks only for an unfinished run with this fingerprint; else clear them.

    Returns True when existing progress was kept.
    """
    progress_dir = Path(progress_dir)
    progress_dir.mkdir(parents=True, exist_ok=True)
    fp_file = progress_dir / FINGERPRINT_FILE
    try:
        old = json.loads(fp_file.read_text())
    except (OSError, ValueError):
        old = None
    if old == {**json.loads(json.dumps(fp)), "done": False}:
        return True
    stale = [*progress_dir.glob("chunk-*.parquet"), *progress_dir.glob("chunk-*.tmp"), fp_file]
    removed = 0
    for f in stale:
        if f.exists():
            f.unlink()
            removed += f.name != FINGERPRINT_FILE
    if removed:
        why = (
            "the last run finished" if old and old.get("done") else "inputs, params, code or versions changed"
        )
        logger.info("summarize: %s: cleared %d progress chunks in %s", why, removed, progress_dir)
    _write_fingerprint(fp_file, fp, done=False)
    return False


def _write_fingerprint(fp_file: Path, fp: Mapping[str, Any], done: bool) -> None:
    tmp = fp_file.with_suffix(".tmp")
    tmp.write_text(json.dumps({**fp, "done": done}, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, fp_file)


def _read_chunk(path: Path, ids: Sequence[str]) -> list[str] | None:
    """The summaries of a finished chunk, or None if it is missing, unreadable or for other ids."""
    if not path.is_file():
        return None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        logger.warning("summarize: unreadable progress chunk %s (%s), recomputing it", path, e)
        return None
    if table.column("id").to_pylist() != list(ids):
        return None
    return table.column("summary").to_pylist()


def _write_chunk(path: Path, ids: Sequence[str], summaries: Sequence[str]) -> None:
    tmp = path.with_suffix(".tmp")
    pq.write_table(pa.table({"id": list(ids), "summary": list(summaries)}, schema=SUMMARIES_SCHEMA), tmp)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# BART


def load_seq2seq(name: str, device: str | None = None):
    """(model, tokenizer, device) for a seq2seq summariser from a hub id or a local directory, eval mode."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = pretrained_kwargs(name, "summarize", SUMMARIZER_SETTING)  # offline: one line, at once
    with hub_errors(name, "summarize", SUMMARIZER_SETTING):
        tokenizer = AutoTokenizer.from_pretrained(name, **kwargs)
        model = AutoModelForSeq2SeqLM.from_pretrained(name, **kwargs)
    return model.to(device).eval(), tokenizer, device


def input_token_limit(model: Any, tokenizer: Any, max_input_tokens: int | None) -> int:
    """The input length BART may read: the smallest of the param, the model's positions, the tokenizer's."""
    limits = [int(max_input_tokens)] if max_input_tokens else []
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions:
        limits.append(int(positions))
    # Tokenizers without a known limit report a huge sentinel (1e30).
    if getattr(tokenizer, "model_max_length", None) and tokenizer.model_max_length < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    if not limits:
        raise ValueError("summarize: set summarize.max_input_tokens, the model declares no input limit")
    return min(limits)


@functools.cache
def _beam_search_cache_class() -> type:
    from transformers.cache_utils import EncoderDecoderCache

    class BeamSearchCache(EncoderDecoderCache):
        """Reorders only the self-attention cache between beam-search steps (see `beam_search_cache`)."""

        def reorder_cache(self, beam_idx: Any) -> None:
            self.self_attention_cache.reorder_cache(beam_idx)

    return BeamSearchCache


def beam_search_cache() -> Any:
    """A fresh cache for one encoder-decoder `generate`: its beam reorder skips the cross-attention cache.

    After every step, beam search reorders each cached key/value tensor (index_select). The cross-attention
    keys and values come from the encoder output, which `generate` repeats for each beam, so the rows of one
    input's beams are identical; a reorder only moves rows among the beams of one input, so reordering them
    changes no value, but copies them all, every step: with BART's long inputs and several beams that copy
    is a large share of beam search's time (docs/study.md, the rehearsal's BART cache fix).
    """
    from transformers.cache_utils import DynamicCache

    return _beam_search_cache_class()(DynamicCache(), DynamicCache())


def generate_summaries(
    model: Any, tokenizer: Any, texts: Sequence[str], *, params: Bart, device: str, bar: tqdm | None = None
) -> list[str]:
    """Raw decoded summaries of `texts`, batched by similar length (less padding), in input order.

    `params` gives the batch size, beam count, output lengths (tokens) and input limit.
    """
    import torch

    if not texts:
        return []
    limit = input_token_limit(model, tokenizer, params.max_input_tokens)
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=limit)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (-lengths[i], i))
    out: list[str] = [""] * len(texts)
    with torch.inference_mode():
        for start in range(0, len(order), params.batch_size):
            batch = order[start : start + params.batch_size]
            enc = tokenizer(
                [texts[i] for i in batch],
                truncation=True,
                max_length=limit,
                padding=True,
                return_tensors="pt",
            ).to(device)
            beams = (
                {"cache": beam_search_cache()}
                if params.num_beams > 1 and model.config.is_encoder_decoder
                else {}
            )
            generated = model.generate(
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                num_beams=params.num_beams,
                max_length=params.max_length,
                min_length=params.min_length,
                **beams,
            )
            for i, text in zip(batch, tokenizer.batch_decode(generated, skip_special_tokens=True)):
                out[i] = text
            if bar is not None:
                bar.update(len(batch))
    return out


# --------------------------------------------------------------------------------------------------
# the stage


@dataclass(frozen=True)
class _Catalog:
    """The catalog's columns that summarising reads, cleaned, in catalog order."""

    ids: list[str]
    titles: list[str]
    features: list[list[str]]
    descriptions: list[list[str]]
    texts: list[str]  # what BART reads (and what the fingerprint hashes)
    has_body: list[bool]  # False: nothing to summarise, the title stands in

    @classmethod
    def of(cls, products: pd.DataFrame) -> _Catalog:
        """The columns of a products table."""
        titles = [clean_text(t) for t in products["title"]]
        features = [_as_list(v) for v in products["features"]]
        descriptions = [_as_list(v) for v in products["description"]]
        return cls(
            ids=[str(i) for i in products["id"]],
            titles=titles,
            features=features,
            descriptions=descriptions,
            texts=[source_text(t, f, d) for t, f, d in zip(titles, features, descriptions)],
            has_body=[bool(body_text(f, d)) for f, d in zip(features, descriptions)],
        )


class _Summariser:
    """One chunk of products at a time; BART is loaded on the first chunk that is not already done."""

    def __init__(self, params: Summarize, catalog: _Catalog) -> None:
        self.params, self.catalog = params, catalog
        self.idf = idf_weights(catalog.texts) if params.method == "extractive" else None
        self.model = self.tokenizer = self.device = None

    def chunk(self, lo: int, hi: int, bar: tqdm) -> list[str]:
        """The final summaries of products lo..hi-1 (cleaned, capped, the title where none came out)."""
        c, max_words = self.catalog, self.params.max_words
        if self.params.method == "extractive":
            raw = [
                extractive_summary(c.titles[i], c.features[i], c.descriptions[i], max_words, idf=self.idf)
                for i in range(lo, hi)
            ]
            bar.update(hi - lo)
        else:
            raw = self._generated(lo, hi, bar)
        return [
            cap_words(clean_text(s), max_words) or cap_words(c.titles[lo + k], max_words)
            for k, s in enumerate(raw)
        ]

    def _generated(self, lo: int, hi: int, bar: tqdm) -> list[str]:
        if self.model is None:
            self.model, self.tokenizer, self.device = load_seq2seq(self.params.model)
        todo = [i for i in range(lo, hi) if self.catalog.has_body[i]]
        texts = [self.catalog.texts[i] for i in todo]
        generated = generate_summaries(
            self.model, self.tokenizer, texts, params=self.params, device=self.device, bar=bar
        )
        raw = [""] * (hi - lo)
        for i, g in zip(todo, generated):
            raw[i - lo] = g
        bar.update((hi - lo) - len(todo))
        return raw


def summarize_catalog(
    products: pd.DataFrame,
    out_dir: str | Path,
    progress_dir: str | Path,
    params: Summarize,
    *,
    on_chunk_done: Callable[[int], None] | None = None,
    run_log: str | Path | None = None,
) -> dict[str, Any]:
    """Summarise every product (resuming an unfinished run's chunks); write summaries.parquet + report.json.

    `on_chunk_done(i)` is called after chunk i is safely on disk (progress reporting, tests). `run_log`, if
    given, gets a line saying how the run went (`cliprec.provenance.append_run_log`).
    """
    started = time.perf_counter()
    out_dir, progress_dir = Path(out_dir), Path(progress_dir)
    catalog = _Catalog.of(products)
    fp = fingerprint(params, catalog.ids, catalog.texts)
    prepare_progress_dir(progress_dir, fp)
    summaries, resumed = _summarise_chunks(catalog, params, progress_dir, on_chunk_done)
    report = _write_summaries(out_dir, catalog, summaries, params, fp)
    _write_fingerprint(progress_dir / FINGERPRINT_FILE, fp, done=True)
    seconds = time.perf_counter() - started
    if run_log is not None:
        run = {"stage": "summarize", "out": out_dir.as_posix(), "n": report["n"], "chunks": report["chunks"],
               "resumed_chunks": resumed, "seconds": round(seconds, 1)}  # fmt: skip
        append_run_log(run_log, run)
    logger.info(
        "summarize: %d products with %s, %d/%d chunks resumed, mean %.1f words, %d title fallbacks, %.1f s",
        report["n"], params.method, resumed, report["chunks"], report["mean_words"],
        report["title_fallbacks"], seconds,
    )  # fmt: skip
    return report


def _summarise_chunks(
    catalog: _Catalog, params: Summarize, progress_dir: Path, on_chunk_done: Callable[[int], None] | None
) -> tuple[list[str], int]:
    """(every product's summary, how many chunks were resumed): finished chunks read, the others made."""
    ids, size = catalog.ids, params.chunk_size
    summariser = _Summariser(params, catalog)
    summaries: list[str] = []
    resumed = 0
    with tqdm(total=len(ids), desc=f"summarize ({params.method})", unit="product", mininterval=2.0) as bar:
        for c in range((len(ids) + size - 1) // size):
            lo, hi = c * size, min((c + 1) * size, len(ids))
            chunk_file = _chunk_path(progress_dir, c)
            done = _read_chunk(chunk_file, ids[lo:hi])
            if done is not None:
                summaries.extend(done)
                resumed += 1
                bar.update(hi - lo)
                continue
            chunk = summariser.chunk(lo, hi, bar)
            _write_chunk(chunk_file, ids[lo:hi], chunk)
            summaries.extend(chunk)
            if on_chunk_done is not None:
                on_chunk_done(c)
    return summaries, resumed


def _write_summaries(
    out_dir: Path, catalog: _Catalog, summaries: list[str], params: Summarize, fp: Mapping[str, Any]
) -> dict[str, Any]:
    """summaries.parquet and report.json into out_dir; the report."""
    max_words = params.max_words
    out_dir.mkdir(parents=True, exist_ok=True)
    table = pa.table({"id": catalog.ids, "summary": summaries}, schema=SUMMARIES_SCHEMA)
    pq.write_table(table, out_dir / "summaries.parquet")
    # neither wall-clock time nor resumed chunks in the report: the directory is a DVC output, its hash
    # must follow from the inputs alone (how the run went goes to the log and the run log)
    report = {
        "method": params.method,
        "model": params.model if isinstance(params, Bart) else None,
        "n": len(catalog.ids),
        "chunks": (len(catalog.ids) + params.chunk_size - 1) // params.chunk_size,
        "mean_words": round(float(np.mean([len(s.split()) for s in summaries])), 3) if summaries else 0.0,
        "title_fallbacks": sum(s == cap_words(t, max_words) for s, t in zip(summaries, catalog.titles)),
        "code": fp["code"],
        "versions": fp["versions"],
    }
    write_json(report, out_dir / "report.json")
    return report
