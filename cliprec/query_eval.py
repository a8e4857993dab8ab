"""The evaluate stage's `queries` mode: the shopper queries' test split against the whole catalog, as served.

The queries (cliprec.query_embed's vectors) search the catalog's index, the one `cliprec serve` loads,
to depth GRADED_DEPTH (100), and exact search over the fused product vectors is the reference: `exact`
holds the same metrics by brute force and `ann_loss` what the approximate index loses (exact minus
index, per metric). The gallery is every indexed product, train and val ones included (a shopper does
not know the split); `by_target_split` repeats the metrics over the queries whose target product (the
one the query was written from) is a train, val or test product, so a reader sees whether LoRA helps on
products it never trained on. Only `split == "test"` queries are evaluated: every setting is chosen on
val (bench/long_queries.py).

A query's result list is the search's order (ties in exact search: the lower catalog row first); each
relevant product's rank is its 1-based place in it, 0 when it is not in the top 100 or has no vector
(`relevant_not_indexed` counts those). Metrics are cliprec.graded's.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cliprec.artifacts import verify_artifact
from cliprec.errors import CliprecError
from cliprec.graded import GRADED_DEPTH, graded_per_query
from cliprec.paths import rebuild_hint
from cliprec.stats import bootstrap_ci

log = logging.getLogger(__name__)

MODE = "queries"
TARGET_SPLITS = ("train", "val", "test")


@dataclass
class QueryVectors:
    """A verified embed_queries directory: manifest, per-query meta (queries.jsonl) and vectors."""

    dir: Path
    manifest: dict[str, Any]
    meta: list[dict[str, Any]]
    vectors: np.ndarray


def load_query_vectors(directory: str | Path, expect: Mapping[str, Any]) -> QueryVectors:
    """The query vectors of `directory`, verified against their manifest and `expect` (lineage)."""
    directory = Path(directory)
    manifest = verify_artifact(directory, expect)
    meta = [json.loads(line) for line in (directory / "queries.jsonl").read_text().splitlines() if line]
    vectors = np.load(directory / "vectors.npy")
    if len(vectors) != len(meta):
        raise CliprecError(
            f"{directory}: {len(vectors)} vectors for {len(meta)} queries: {rebuild_hint(directory)}"
        )
    return QueryVectors(directory, manifest, meta, np.ascontiguousarray(vectors, dtype=np.float32))


def select_test_queries(qv: QueryVectors) -> tuple[list[dict[str, Any]], np.ndarray]:
    """(meta, vectors) of the test split's queries; CliprecError when there is none."""
    rows = [i for i, m in enumerate(qv.meta) if m["split"] == "test"]
    if not rows:
        raise CliprecError(f"{qv.dir}: no test query (of {len(qv.meta)}): the query set needs a test split")
    return [qv.meta[i] for i in rows], qv.vectors[rows]


def judge(
    positions: np.ndarray, meta: Sequence[Mapping[str, Any]], row_of: Mapping[str, int]
) -> list[list[list[int]]]:
    """Per query, [rank, grade] of each relevant product (grade high to low, then id; rank 0: not found)."""
    out = []
    for found, m in zip(positions.tolist(), meta, strict=True):
        place = {pos: r for r, pos in enumerate(found, 1) if pos >= 0}
        ranked = sorted(m["relevant"].items(), key=lambda item: (-item[1], item[0]))
        out.append([[place.get(row_of.get(pid, -1), 0), int(grade)] for pid, grade in ranked])
    return out


def summarise(
    judged: Sequence[Sequence[Sequence[int]]], resamples: int, confidence: float, seed: int
) -> dict[str, Any]:
    """Mean of each graded metric with its bootstrap CI (`ci95`, as the other modes), and the count."""
    values = graded_per_query(judged)
    out: dict[str, Any] = {name: float(np.mean(v)) if len(v) else 0.0 for name, v in values.items()}
    if judged:
        low, high = bootstrap_ci(np.stack(list(values.values())), resamples, confidence, seed)
        out["ci95"] = {name: {"low": float(lo), "high": float(hi)} for name, lo, hi in zip(values, low, high)}
    out["queries"] = len(judged)
    return out


def query_digest(ids: Sequence[str]) -> str:
    """sha256 of the query ids in order: two evaluations pair their queries only when these agree."""
    return hashlib.sha256("".join(f"{i}\n" for i in ids).encode()).hexdigest()


@dataclass(frozen=True)
class QueryRun:
    """One search of the test queries: the ranked catalog positions of the index and of exact search."""

    meta: list[dict[str, Any]]
    ann_positions: np.ndarray
    exact_positions: np.ndarray
    row_of: Mapping[str, int]
    gallery_size: int


def queries_block(
    ann: Sequence[Sequence[Sequence[int]]],
    exact: Sequence[Sequence[Sequence[int]]],
    query_set: Mapping[str, Any],
    settings: Any,
) -> dict[str, Any]:
    """The detail file's `queries` block from the ranks file's part of it (what cliprec.audit recomputes):
    the index's metrics with CIs, the exact reference, what the index loses, and by target split.

    `settings` has `resamples`, `confidence` and `seed` (cliprec.evaluate.EvalSettings).
    """
    s = settings
    block = summarise(ann, s.resamples, s.confidence, s.seed)
    reference = summarise(exact, s.resamples, s.confidence, s.seed)
    names = [k for k in block if k not in ("ci95", "queries")]
    splits = list(query_set["target_split"])
    return block | {
        "gallery_size": query_set["gallery_size"],
        "depth": query_set["depth"],
        "exact": reference,
        "ann_loss": {name: reference[name] - block[name] for name in names},
        "by_target_split": {
            split: summarise(
                [j for j, t in zip(ann, splits) if t == split], s.resamples, s.confidence, s.seed
            )
            for split in TARGET_SPLITS
            if split in splits
        },
    }


def queries_mode(run: QueryRun, settings: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the detail file's `queries` block, the ranks file's part: ranks, exact ranks, query set)."""
    ann, exact = (judge(p, run.meta, run.row_of) for p in (run.ann_positions, run.exact_positions))
    ids = [m["query_id"] for m in run.meta]
    query_set = {
        "ids_sha256": query_digest(ids),
        "queries": len(ids),
        "depth": GRADED_DEPTH,
        "gallery_size": run.gallery_size,
        "ids": ids,
        "target_split": [m["target_split"] for m in run.meta],
    }
    block = queries_block(ann, exact, query_set, settings)
    # not in the ranks file (a rank of 0 is "not found" either way): reported, not recomputed
    block["relevant_not_indexed"] = sum(pid not in run.row_of for m in run.meta for pid in m["relevant"])
    log.info(
        "evaluate: queries nDCG@10 %.4f (exact %.4f) MRR %.4f (%d test queries, %d products)",
        block["ndcg_at_10"], block["exact"]["ndcg_at_10"], block["mrr"], len(ids), run.gallery_size,
    )  # fmt: skip
    return block, {"ranks": ann, "exact": exact, "query_set": query_set}
