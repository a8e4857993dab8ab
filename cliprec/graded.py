"""Graded retrieval metrics (several relevant products per query, each with a grade), and the per-query
values of any mode of a ranks file, so that comparisons and the gate need no case per mode.

Apart from cliprec/metrics.py, which training imports: graded metrics are evaluation's only, and an edit
here must not rerun training.

A graded query is the list of [rank, grade] of every one of its relevant products: rank 1-based in its
results, 0 = not in the top GRADED_DEPTH; grade >= 1 (higher is more relevant). Gain = grade, discount
log2(rank + 1), and the ideal DCG ranks ALL of the query's relevant products by grade, found or not (a
relevant product the results miss, or that has no vector, costs the query).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from cliprec.metrics import per_query

GRADED_DEPTH = 100  # a graded query's results are read to this depth
GRADED_KS = (10, 100)
GRADED_METRICS = (
    *(f"ndcg_at_{k}" for k in GRADED_KS),
    *(f"recall_at_{k}" for k in GRADED_KS),
    "mrr",
)


def graded_per_query(judged: Sequence[Sequence[Sequence[int]]]) -> dict[str, np.ndarray]:
    """Each graded query's nDCG@10/@100, Recall@10/@100 (any relevant product found) and reciprocal rank
    of the first relevant product (see the module doc)."""
    out = {name: np.zeros(len(judged)) for name in GRADED_METRICS}
    for i, pairs in enumerate(judged):
        ranks, grades = np.asarray(pairs, dtype=np.float64).reshape(-1, 2).T
        found = ranks > 0
        ideal = np.sort(grades)[::-1]
        for k in GRADED_KS:
            inside = found & (ranks <= k)
            top = ideal[:k]
            idcg = float(np.sum(top / np.log2(np.arange(2, len(top) + 2))))
            dcg = float(np.sum(grades[inside] / np.log2(ranks[inside] + 1)))
            out[f"ndcg_at_{k}"][i] = dcg / idcg if idcg > 0 else 0.0
            out[f"recall_at_{k}"][i] = float(inside.any())
        out["mrr"][i] = 1.0 / ranks[found].min() if found.any() else 0.0
    return out


def is_graded(entries: Sequence[Any]) -> bool:
    """Whether a ranks-file mode holds graded queries (lists of [rank, grade]) rather than target ranks."""
    return any(isinstance(e, list | tuple) for e in entries if e is not None)


def mode_values(entries: Sequence[Any], ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, np.ndarray]:
    """The per-query values of one mode of a ranks file (None entries, not queried, left out), whatever
    its kind: cliprec.metrics.per_query of target ranks, or `graded_per_query` of graded queries."""
    present = [e for e in entries if e is not None]
    if is_graded(present):
        return graded_per_query(present)
    return per_query(np.array(present, dtype=np.int64), ks)


def mode_metric_names(entries: Sequence[Any], ks: tuple[int, ...] = (1, 5, 10)) -> tuple[str, ...]:
    """The per-query metrics a ranks-file mode has: what a comparison or the gate can pair."""
    present = [e for e in entries if e is not None]
    return tuple(mode_values(present[:1], ks))
