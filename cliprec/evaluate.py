"""Retrieval evaluation on the test split: four query modes, the seed's similarity metric, ANN recall.

Gallery = the test-split products (products.parquet `split == "test"`) that have embeddings; each query
has exactly one relevant item, its own product. Relevance metrics come from exact numpy search
(cliprec.metrics), so they never depend on the approximate index.

Query modes (query -> gallery):
- text_to_image: the product's summary text embedding -> main-image embeddings.
- image_to_text: the main-image embedding -> text embeddings.
- multimodal: fuse(summary text, the product's OTHER ("alt") image) -> fused vectors. The text half is
  the same text that is in the gallery vector, so this mode mostly measures how much a second photo
  adds or disturbs; only the image half is held out.
- image_to_image: the alt image -> main images.
Products without an alt image cannot be queried in the last two modes without leaking the gallery's
own main image, so they are skipped and counted (`skipped_no_alt`); they stay in the gallery.

Every relevance metric gets a 95 % bootstrap CI over the queries (`ci95`, cliprec.stats), and the
per-query ranks of every mode go to a file of their own (`<variant>.ranks.json`, with the test set's
id digest), from which the `compare` stage and the CI gate make paired comparisons.

Files: the DVC metrics file `<variant>.json` holds the headline only (`HEADLINE`: T->I Recall@5, no
CI), so that `dvc exp show` stays a table of a few columns; everything this module computes, with its
CIs, is in `<variant>.detail.json`, which `cliprec report` and the server's `/api/info` read.

Shopper queries (mode `queries`, given the embed_queries directory): the test split's queries against the
whole catalog through the built index, with exact search as the reference (cliprec.query_eval); graded
nDCG@10/@100, Recall@10/@100 and MRR per query (cliprec.graded), in the same files as the other modes.

Also reported, for comparison with the seed project:
- avg_mean_similarity_at_5: for each test product's fused vector, the mean inner product of its 5
  nearest OTHER products among all catalog fused vectors, averaged. It measures how tight the
  neighbourhoods are, not whether they are relevant: collapsed embeddings score 1.0. The seed counted
  the product itself (cosine 1.0) among its own top 5; that number, for comparing with the seed's
  tables, is `avg_mean_similarity_at_5_with_self`. Both by exact search.
- ann_recall_at_10: the built FAISS index's recall@10 against exact search on the same queries.
  Tie-aware: an index hit counts when its exact score reaches the exact 10th-best score.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cliprec import paths
from cliprec.artifacts import (
    ArtifactError,
    atomic_write_bytes,
    catalog_identity,
    manifest_sha256,
    verify_artifact,
    write_json,
)
from cliprec.errors import CliprecError
from cliprec.graded import GRADED_DEPTH
from cliprec.index import LoadedIndex, load_index, read_ids
from cliprec.metrics import per_query, target_ranks
from cliprec.params import Params
from cliprec.paths import rebuild_hint
from cliprec.query_eval import MODE as QUERIES
from cliprec.query_eval import QueryRun, load_query_vectors, queries_mode, select_test_queries
from cliprec.stats import bootstrap_ci
from cliprec.vectors import fuse

log = logging.getLogger(__name__)

MODES = ("text_to_image", "image_to_text", "multimodal", "image_to_image")
CURVE_KS = tuple(range(1, 11))
SEED_K = 5
ANN_K = 10
TIE_EPS = 1e-5  # float32 inner products of equal vectors can differ in the last bits
# The DVC metrics file's columns: `dvc exp show` has a column per param and dep before any metric, so
# one per variant and category; the key names the category and variant, because DVC heads a column with
# its key alone only where no other metrics file has the same key (else with the file's long path).
HEADLINE = (("text_to_image", "recall_at_5", "t2i_r5"),)  # (mode, metric, key suffix)
# and the shopper queries' block under "queries", the mode's name as in every other file: these metrics,
# the counts, and their CIs as [low, high] LISTS, which DVC does not turn into `dvc exp show` columns (the
# zero-shot and LoRA files share these keys, so DVC heads their columns with the file's path)
QUERIES_HEADLINE = ("ndcg_at_10", "ndcg_at_100", "recall_at_10", "recall_at_100", "mrr")


class Embeddings:
    """The arrays of one embed directory (memory-mapped), verified against its manifest first (and, given
    `expect`, checked to be the category, variant and catalog expected: `check_built`)."""

    def __init__(self, embed_dir: str | Path, expect: Mapping[str, Any] | None = None):
        embed_dir = Path(embed_dir)
        self.dir = embed_dir
        self.manifest: dict[str, Any] = verify_artifact(embed_dir, expect or {})
        self.ids = read_ids(embed_dir / "ids.txt")
        self.text = np.load(embed_dir / "text.npy", mmap_mode="r")
        self.image = np.load(embed_dir / "image.npy", mmap_mode="r")
        self.fused = np.load(embed_dir / "fused.npy", mmap_mode="r")
        for name, arr in (("text", self.text), ("image", self.image), ("fused", self.fused)):
            if len(arr) != len(self.ids):
                raise ValueError(f"{embed_dir}: {name}.npy has {len(arr)} rows, ids.txt {len(self.ids)}")
        self.alt_ids = read_ids(embed_dir / "alt_ids.txt")
        self.alt_image = np.load(embed_dir / "alt_image.npy", mmap_mode="r")
        if len(self.alt_ids) != len(self.alt_image):
            raise ValueError(f"{embed_dir}: alt_image.npy rows != alt_ids.txt lines")
        self.row = {pid: i for i, pid in enumerate(self.ids)}
        self.alt_row = {pid: i for i, pid in enumerate(self.alt_ids)}

    @property
    def d(self) -> int:
        """Embedding dimension."""
        return int(self.fused.shape[1])


def _rows(arr: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(arr[rows], dtype=np.float32)


def _top_columns(scores: np.ndarray, k: int) -> np.ndarray:
    """Per row, the columns of the k highest scores, best first; among ties the lower column first.

    The same as a stable argsort of -scores cut at k, in linear time: a partition finds each row's k-th
    score, the ties at it are taken in column order, and only the k picked columns are sorted.
    """
    kth = -np.partition(-scores, k - 1, axis=1)[:, k - 1 : k]
    above, tied = scores > kth, scores == kth
    take = above | (tied & (np.cumsum(tied, axis=1) <= k - above.sum(axis=1, keepdims=True)))
    cols = np.nonzero(take)[1].reshape(len(scores), k)  # ascending column order within each row
    order = np.argsort(-np.take_along_axis(scores, cols, 1), axis=1, kind="stable")
    return np.take_along_axis(cols, order, 1)


def exact_topk(
    queries: np.ndarray, base: np.ndarray, k: int, q_chunk: int = 256, b_chunk: int = 16_384
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product top-k (positions, scores), best first; memory ~ q_chunk x b_chunk x 20 bytes.

    (~80 MB at the defaults, whatever the catalog size: the blocks of the catalog stream through.)
    """
    k = min(k, len(base))
    n_q = len(queries)
    best_s = np.full((n_q, k), -np.inf, np.float32)
    best_i = np.full((n_q, k), -1, np.int64)
    for qs in range(0, n_q, q_chunk):
        q = queries[qs : qs + q_chunk]
        cur_s, cur_i = best_s[qs : qs + q_chunk], best_i[qs : qs + q_chunk]
        for bs in range(0, len(base), b_chunk):
            scores = q @ np.asarray(base[bs : bs + b_chunk], dtype=np.float32).T
            all_s = np.concatenate([cur_s, scores], axis=1)
            all_i = np.concatenate([cur_i, np.arange(bs, bs + scores.shape[1])[None].repeat(len(q), 0)], 1)
            order = _top_columns(all_s, k)
            cur_s = np.take_along_axis(all_s, order, 1)
            cur_i = np.take_along_axis(all_i, order, 1)
        best_s[qs : qs + q_chunk], best_i[qs : qs + q_chunk] = cur_s, cur_i
    return best_i, best_s


def ann_recall(
    index: LoadedIndex, queries: np.ndarray, base: np.ndarray, exact_scores: np.ndarray, k: int
) -> float:
    """Tie-aware recall@k of the index: share of its top-k whose exact score reaches the exact k-th."""
    positions, _ = index.search_positions(queries, k)
    kth = exact_scores[:, k - 1]
    hits = 0
    for start in range(0, len(queries), 1024):
        pos = positions[start : start + 1024]
        found = pos >= 0
        vectors = _rows(base, np.where(found, pos, 0).ravel()).reshape(*pos.shape, -1)
        true_scores = np.einsum("qkd,qd->qk", vectors, queries[start : start + 1024])
        hits += int(np.sum(found & (true_scores >= kth[start : start + 1024, None] - TIE_EPS)))
    return hits / (len(queries) * k)


def mode_metrics(
    ranks: np.ndarray, ks: tuple[int, ...], s: EvalSettings
) -> tuple[dict[str, Any], list[float]]:
    """Metrics dict (with `ci95`) + recall@1..10 curve of one query mode, from its target ranks."""
    values = per_query(ranks, ks)
    out: dict[str, Any] = {name: float(np.mean(v)) if len(v) else 0.0 for name, v in values.items()}
    if len(ranks):
        low, high = bootstrap_ci(np.stack(list(values.values())), s.resamples, s.confidence, s.seed)
        out["ci95"] = {name: {"low": float(lo), "high": float(hi)} for name, lo, hi in zip(values, low, high)}
    hit = ranks > 0
    curve = [float(np.mean(hit & (ranks <= k))) if len(ranks) else 0.0 for k in CURVE_KS]
    return out, curve


def gallery_digest(ids: list[str]) -> str:
    """sha256 of the gallery ids in order: two evaluations are paired only when their digests agree."""
    return hashlib.sha256("".join(f"{i}\n" for i in ids).encode()).hexdigest()


@dataclass(frozen=True)
class EvalSettings:
    """What an evaluation reads from params.yaml: evaluate.*, embed.text_weight, the search knobs, seed."""

    ks: tuple[int, ...] = (1, 5, 10)
    text_weight: float = 0.5
    nprobe: int | None = None
    ef_search: int | None = None
    k_factor: float | None = None
    resamples: int = 10_000
    confidence: float = 0.95
    seed: int = 0

    @classmethod
    def from_params(cls, p: Params) -> EvalSettings:
        """The settings of the validated params.yaml."""
        return cls(
            ks=tuple(p.evaluate.ks),
            text_weight=p.embed.text_weight,
            nprobe=p.index.nprobe,
            ef_search=p.index.ef_search,
            k_factor=p.index.k_factor,
            resamples=p.evaluate.resamples,
            confidence=p.evaluate.confidence,
            seed=p.evaluate.seed,
        )


@dataclass
class _Gallery:
    """The test products that have embeddings, in embed row order, with their vectors."""

    test_ids: list[str]
    rows: np.ndarray
    ids: list[str]
    text: np.ndarray
    image: np.ndarray
    fused: np.ndarray

    @property
    def missing(self) -> int:
        """Test products without an embedding (no image)."""
        return len(self.test_ids) - len(self.rows)


def _gallery(products_path: str | Path, emb: Embeddings) -> _Gallery:
    """The gallery: the test-split products that have embeddings (a CliprecError when there is none)."""
    products = pd.read_parquet(products_path, columns=["id", "split"])
    test_ids = products.loc[products["split"] == "test", "id"].astype(str).tolist()
    rows = np.array([emb.row[pid] for pid in test_ids if pid in emb.row], dtype=np.int64)
    rows.sort()  # embed row order, so the gallery does not depend on the parquet's row order
    missing = len(test_ids) - len(rows)
    if missing:
        log.warning("evaluate: %d of %d test products have no embedding (no image)", missing, len(test_ids))
    if len(rows) == 0:
        raise CliprecError(f"evaluate: no test product of {products_path} has an embedding in {emb.dir}")
    ids = [emb.ids[r] for r in rows]
    return _Gallery(
        test_ids, rows, ids, _rows(emb.text, rows), _rows(emb.image, rows), _rows(emb.fused, rows)
    )


def _query_modes(emb: Embeddings, g: _Gallery, text_weight: float) -> dict[str, tuple[np.ndarray, ...]]:
    """(queries, gallery, target positions) of every mode; alt-image modes only where there is an alt."""
    everyone = np.arange(len(g.ids))
    alt_pos = np.array([i for i, pid in enumerate(g.ids) if pid in emb.alt_row], dtype=np.int64)
    alt_img = _rows(emb.alt_image, np.array([emb.alt_row[g.ids[i]] for i in alt_pos], dtype=np.int64))
    multimodal = fuse(g.text[alt_pos], alt_img, text_weight) if len(alt_pos) else alt_img
    return {
        "text_to_image": (g.text, g.image, everyone),
        "image_to_text": (g.image, g.text, everyone),
        "multimodal": (multimodal, g.fused, alt_pos),
        "image_to_image": (alt_img, g.image, alt_pos),
    }


def _rank_modes(
    runs: Mapping[str, tuple[np.ndarray, ...]], n_g: int, s: EvalSettings
) -> tuple[dict[str, Any], dict[str, list[float]], dict[str, list[int | None]]]:
    """Per mode: metrics with CIs, the recall@1..10 curve, and the target rank by gallery position."""
    metrics: dict[str, Any] = {}
    curves: dict[str, list[float]] = {}
    per_mode_ranks: dict[str, list[int | None]] = {}
    skipped = n_g - len(runs["multimodal"][2])
    for mode, (queries, gallery, targets) in runs.items():
        ranks = target_ranks(queries, gallery, targets.astype(np.int64)) if len(queries) else np.zeros(0, int)
        m, curves[mode] = mode_metrics(ranks, s.ks, s)
        m["gallery_size"] = n_g
        m["queries"] = int(len(queries))
        if mode in ("multimodal", "image_to_image"):
            m["skipped_no_alt"] = int(skipped)
        metrics[mode] = m
        by_position: list[int | None] = [None] * n_g
        for pos, rank in zip(targets.tolist(), ranks.tolist()):
            by_position[pos] = int(rank)
        per_mode_ranks[mode] = by_position
        log.info(
            "evaluate: %s MRR %.4f nDCG@10 %.4f (%d queries)", mode, m["mrr"], m["ndcg_at_10"], len(queries)
        )
    return metrics, curves, per_mode_ranks


def _neighbourhoods(emb: Embeddings, g: _Gallery, s: EvalSettings) -> tuple[dict[str, Any], np.ndarray]:
    """The seed's similarity metrics of the test products against the whole catalog, + exact top scores."""
    k_top = min(max(ANN_K, SEED_K) + 1, len(emb.ids))  # + 1: the product itself is among its neighbours
    top_i, top_s = exact_topk(g.fused, emb.fused, k_top)
    is_self = top_i == g.rows[:, None]
    others_first = np.argsort(is_self, axis=1, kind="stable")  # drops the product, keeps the order
    without_self = np.take_along_axis(top_s, others_first, axis=1)[:, : min(SEED_K, k_top - 1)]
    seed_values = without_self.mean(axis=1)
    low, high = bootstrap_ci(seed_values[None], s.resamples, s.confidence, s.seed)
    out = {
        "avg_mean_similarity_at_5": float(seed_values.mean()),
        "avg_mean_similarity_at_5_ci95": {"low": float(low[0]), "high": float(high[0])},
        # the seed project's own definition, for its tables: the product itself (cosine 1) among the top 5
        "avg_mean_similarity_at_5_with_self": float(np.mean(top_s[:, :SEED_K])),
    }
    return out, top_s


def _verified_index(
    emb: Embeddings, index_dir: str | Path, expect: Mapping[str, Any], s: EvalSettings
) -> LoadedIndex:
    """The built index, verified to be of these embeddings (ArtifactError otherwise)."""
    index = load_index(
        index_dir,
        expect_model=emb.manifest.get("model"),
        expect_variant=emb.manifest.get("variant"),
        expect_d=emb.d,
        nprobe=s.nprobe,
        ef_search=s.ef_search,
        k_factor=s.k_factor,
        expect={**expect, "embeddings_sha256": manifest_sha256(emb.dir)},
    )
    if index.ids != emb.ids:
        raise ArtifactError(
            f"evaluate: {index_dir} was built from other embeddings than {emb.dir}: rebuild it with "
            f"`{rebuild_hint(index_dir)}`"
        )
    return index


def _shopper_queries(
    queries_dir: str | Path, emb: Embeddings, index: LoadedIndex, expect: Mapping[str, Any], s: EvalSettings
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `queries` mode: the test queries through the index and by exact search (cliprec.query_eval)."""
    qv = load_query_vectors(queries_dir, {**expect, "embeddings_sha256": manifest_sha256(emb.dir)})
    meta, vectors = select_test_queries(qv)
    depth = min(GRADED_DEPTH, len(emb.ids))
    ann_positions, _ = index.search_positions(vectors, depth)
    exact_positions, _ = exact_topk(vectors, emb.fused, depth)
    run = QueryRun(meta, ann_positions, exact_positions, emb.row, len(emb.ids))
    return queries_mode(run, s)


def evaluate(
    products_path: str | Path,
    embed_dir: str | Path,
    index_dir: str | Path,
    settings: EvalSettings = EvalSettings(),
    category: str | None = None,
    variant: str | None = None,
    queries_dir: str | Path | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any]]:
    """(metrics, recall@k curve, per-query ranks) of one category/variant (see the module doc); with
    `queries_dir` (an embed_queries directory) also the `queries` mode.

    products.parquet, the embeddings, the index and the query vectors must be of one category (`category`,
    or the catalog's own), of `variant` when given, and built from one another (their manifests' lineage);
    else ArtifactError.
    """
    catalog = catalog_identity(products_path, category)
    emb = Embeddings(embed_dir, {**catalog, **({"variant": variant} if variant else {})})
    g = _gallery(products_path, emb)
    n_g = len(g.ids)
    metrics, curves, per_mode_ranks = _rank_modes(_query_modes(emb, g, settings.text_weight), n_g, settings)
    # the seed's metric and ANN recall: test products' fused vectors against the whole catalog
    seed_metrics, top_s = _neighbourhoods(emb, g, settings)
    metrics.update(seed_metrics)
    index = _verified_index(emb, index_dir, catalog, settings)
    k_ann = min(ANN_K, len(emb.ids))
    metrics["ann_recall_at_10"] = ann_recall(index, g.fused, emb.fused, top_s[:, :k_ann], k_ann)
    shopper = None
    if queries_dir is not None:
        expect = {**catalog, **({"variant": variant} if variant else {})}
        metrics[QUERIES], shopper = _shopper_queries(queries_dir, emb, index, expect, settings)
    _, copies = np.unique(g.image, axis=0, return_counts=True)
    metrics["catalog"] = {
        "products": len(emb.ids),
        "test_products": len(g.test_ids),
        "test_without_embedding": int(g.missing),
        # gallery products whose MAIN photo is another's too (relistings in the test split): exact ties,
        # which the pessimistic rank counts against the query
        "gallery_photo_ties": int(copies[copies > 1].sum()),
    }
    curve = [{"k": k, **{mode: _round(curves[mode][i]) for mode in MODES}} for i, k in enumerate(CURVE_KS)]
    ranks_doc = {
        "test_set": {"ids_sha256": gallery_digest(g.ids), "gallery_size": n_g},
        "ks": list(settings.ks),
        "ids": g.ids,
        "ranks": per_mode_ranks,
    }
    if shopper is not None:  # a mode with its own queries: their set, and the exact reference's ranks
        ranks_doc["ranks"][QUERIES] = shopper["ranks"]
        ranks_doc["query_sets"] = {QUERIES: shopper["query_set"]}
        ranks_doc["exact"] = {QUERIES: shopper["exact"]}
    return _round(metrics), curve, ranks_doc


def _round(value: Any, digits: int = 6) -> Any:
    """Round floats (recursively) so that the metric files do not churn on the last bits."""
    if isinstance(value, dict):
        return {k: _round(v, digits) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, digits)
    return value


def _check_keys(value: Any, where: str = "") -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if "." in k:
                raise ValueError(f"metric key {where}{k!r} has a dot: `dvc metrics diff` would split it")
            _check_keys(v, f"{where}{k}/")


def headline(metrics: dict[str, Any], category: str, variant: str) -> dict[str, Any]:
    """The DVC metrics file: `HEADLINE`'s metrics, as {category: {"<variant>_t2i_r5": value}}, no CIs, and
    the shopper queries' block {category: {"queries": {...}}} (`QUERIES_HEADLINE`).

    A metric that `evaluate.ks` leaves out is left out.
    """
    values: dict[str, Any] = {
        f"{variant}_{suffix}": metrics[mode][metric]
        for mode, metric, suffix in HEADLINE
        if metric in metrics.get(mode, {})
    }
    q = metrics.get(QUERIES)
    if q is not None:
        ci = q.get("ci95", {})
        values[QUERIES] = {
            **{m: q[m] for m in QUERIES_HEADLINE},
            "queries": q["queries"],
            "gallery_size": q["gallery_size"],
            "ci95": {m: [ci[m]["low"], ci[m]["high"]] for m in QUERIES_HEADLINE if m in ci},
        }
    return {category: values} if values else {}


def write_outputs(
    metrics: dict[str, Any],
    curve: list[dict[str, Any]],
    ranks: dict[str, Any],
    category: str,
    variant: str,
    root: str | Path = ".",
) -> None:
    """Write metrics/<cat>/<variant>.json (the headline), .detail.json, .ranks.json and the recall@k plot."""
    _check_keys(metrics)
    root = Path(root)
    written = [
        root / paths.metrics_path(category, variant),
        root / paths.metrics_detail_path(category, variant),
        root / paths.ranks_path(category, variant),
        root / paths.recall_plot_path(category, variant),
    ]
    write_json(headline(metrics, category, variant), written[0])
    write_json(metrics, written[1])
    atomic_write_bytes(written[2], (json.dumps(ranks, separators=(",", ":")) + "\n").encode())
    write_json(curve, written[3])
    log.info("evaluate: wrote %s", ", ".join(map(str, written)))
