"""Retrieval metrics for queries that each have one relevant gallery item.

Ranks are pessimistic about ties: a target's rank is the number of gallery items scoring at least as
high as it, so collapsed (all-equal) embeddings score ~0 instead of a perfect recall.
"""

from __future__ import annotations

import numpy as np

ABSENT = -1  # target index of a query whose relevant item is not in the gallery


def target_ranks(
    queries: np.ndarray, gallery: np.ndarray, targets: np.ndarray, chunk: int = 256
) -> np.ndarray:
    """1-based rank of each query's target under inner-product search; 0 where the target is ABSENT.

    Exact: scores every gallery item, `chunk` queries at a time, so memory stays at chunk x gallery.
    """
    targets = np.asarray(targets, dtype=np.int64)
    ranks = np.zeros(len(targets), dtype=np.int64)
    for start in range(0, len(targets), chunk):
        stop = min(start + chunk, len(targets))
        scores = queries[start:stop] @ gallery.T
        ranks[start:stop] = ranks_from_scores(scores, targets[start:stop])
    return ranks


def ranks_from_scores(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Ranks (see `target_ranks`) from a dense query x gallery score matrix."""
    targets = np.asarray(targets, dtype=np.int64)
    present = targets != ABSENT
    rows = np.arange(len(targets))
    target_scores = scores[rows, np.where(present, targets, 0)]
    ranks = (scores >= target_scores[:, None]).sum(axis=1)
    return np.where(present, ranks, 0)


def per_query(ranks: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, np.ndarray]:
    """Each query's hit@k, reciprocal rank and nDCG@10 from target ranks (0 = target absent: a miss).

    Every metric of this module is the mean of one of these arrays, which is what makes bootstrap CIs
    and paired per-query comparisons (cliprec.stats) possible.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    hit = ranks > 0
    safe = np.where(hit, ranks, np.inf)
    out = {f"recall_at_{k}": (hit & (ranks <= k)).astype(np.float64) for k in ks}
    out["mrr"] = np.where(hit, 1.0 / safe, 0.0)
    # one relevant item per query, so the ideal DCG is 1 and nDCG@10 = 1 / log2(rank + 1) inside the top 10
    out["ndcg_at_10"] = np.where(hit & (ranks <= 10), 1.0 / np.log2(safe + 1.0), 0.0)
    return out


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Recall@k, MRR and nDCG@10 from target ranks (0 = target absent, which counts as a miss)."""
    return {name: float(np.mean(values)) for name, values in per_query(ranks, ks).items()}


def retrieval_metrics(
    queries: np.ndarray, gallery: np.ndarray, targets: np.ndarray, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Exact-search metrics of `queries` against `gallery` (rows L2-normalised), plus sizes."""
    out = metrics_from_ranks(target_ranks(queries, gallery, targets), ks)
    out["gallery_size"] = int(len(gallery))
    out["queries"] = int(len(queries))
    return out
