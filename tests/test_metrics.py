"""cliprec.metrics against a brute-force reference written with plain Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cliprec.metrics import ABSENT, metrics_from_ranks, ranks_from_scores, retrieval_metrics, target_ranks

KS = (1, 5, 10)


# --- the reference: one query at a time, every gallery item compared by hand -------------------------


def ref_dot(a, b) -> float:
    total = 0.0
    for x, y in zip(a, b):
        total += float(x) * float(y)
    return total


def ref_rank(query, gallery, target) -> int:
    """Pessimistic 1-based rank: items scoring >= the target (itself included); 0 if no target."""
    if target == ABSENT:
        return 0
    target_score = ref_dot(query, gallery[target])
    return sum(1 for item in gallery if ref_dot(query, item) >= target_score)


def ref_metrics(ranks, ks=KS) -> dict[str, float]:
    n = len(ranks)
    out = {}
    for k in ks:
        hits = 0
        for r in ranks:
            if r != 0 and r <= k:
                hits += 1
        out[f"recall_at_{k}"] = hits / n
    rr = 0.0
    for r in ranks:
        if r != 0:
            rr += 1.0 / r
    out["mrr"] = rr / n
    ndcg = 0.0
    for r in ranks:
        # one relevant item: relevance list over positions 1..10, DCG / ideal DCG (= 1 / log2(2) = 1)
        relevance = [1 if position == r else 0 for position in range(1, 11)]
        dcg = sum(rel / math.log2(position + 1) for position, rel in enumerate(relevance, start=1))
        ndcg += dcg / 1.0
    out["ndcg_at_10"] = ndcg / n
    return out


# --- data ---------------------------------------------------------------------------------------------


def int_vectors(seed: int, n: int, d: int = 6) -> np.ndarray:
    """Small-integer vectors: every inner product is an exact integer, so ties are real and frequent."""
    return np.random.default_rng(seed).integers(-2, 3, size=(n, d)).astype(np.float32)


def unit_vectors(seed: int, n: int, d: int = 16) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def assert_metrics_equal(got: dict, want: dict) -> None:
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-12), key


# --- tests --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ranks_and_metrics_match_reference_with_exact_ties(seed):
    gallery = int_vectors(seed, 60)
    queries = int_vectors(seed + 100, 45)
    targets = np.random.default_rng(seed).integers(0, len(gallery), size=len(queries))
    targets[::9] = ABSENT  # a few queries whose relevant item is not in the gallery
    want_ranks = [ref_rank(q, gallery, t) for q, t in zip(queries, targets)]
    # the data must really contain ties between a target and another item, or the test proves little
    tied = sum(
        1
        for q, t in zip(queries, targets)
        if t != ABSENT and sum(ref_dot(q, g) == ref_dot(q, gallery[t]) for g in gallery) > 1
    )
    assert tied >= 5
    got_ranks = target_ranks(queries, gallery, targets, chunk=7)  # chunk boundary inside the queries
    assert got_ranks.tolist() == want_ranks
    assert_metrics_equal(metrics_from_ranks(got_ranks, KS), ref_metrics(want_ranks))
    full = retrieval_metrics(queries, gallery, targets, KS)
    assert_metrics_equal(full, ref_metrics(want_ranks))
    assert full["gallery_size"] == len(gallery) and full["queries"] == len(queries)


def test_random_unit_vectors_match_reference():
    gallery = unit_vectors(3, 200)
    queries = unit_vectors(4, 50)
    targets = np.arange(50) * 3
    scores = [[ref_dot(q, g) for g in gallery] for q in queries]
    # no near-ties, so float32 BLAS and float64 loops must agree on every rank
    gaps = [min(abs(s - row[t]) for j, s in enumerate(row) if j != t) for row, t in zip(scores, targets)]
    assert min(gaps) > 1e-6
    want = [ref_rank(q, gallery, t) for q, t in zip(queries, targets)]
    got = target_ranks(queries, gallery, targets)
    assert got.tolist() == want
    assert_metrics_equal(
        retrieval_metrics(queries, gallery, targets, (1, 3, 5, 10)), ref_metrics(want, (1, 3, 5, 10))
    )


def test_ranks_from_scores_matches_reference():
    scores = np.array([[0.5, 0.9, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2], [0.0, 1.0, 0.3, 0.3]], dtype=np.float32)
    targets = np.array([0, 3, ABSENT])
    want = []
    for row, t in zip(scores.tolist(), targets.tolist()):
        want.append(0 if t == ABSENT else sum(1 for s in row if s >= row[t]))
    assert ranks_from_scores(scores, targets).tolist() == want == [3, 4, 0]


def test_hand_computed_example():
    ranks = np.array([1, 2, 0, 11])
    got = metrics_from_ranks(ranks, KS)
    assert got["recall_at_1"] == 0.25
    assert got["recall_at_5"] == 0.5
    assert got["recall_at_10"] == 0.5  # rank 11 and the absent target are misses
    assert got["mrr"] == pytest.approx((1 + 1 / 2 + 0 + 1 / 11) / 4)
    assert got["ndcg_at_10"] == pytest.approx((1 + 1 / math.log2(3)) / 4)


def test_ties_count_against_the_query():
    # collapsed embeddings: every item ties with the target, so the target ranks last, not first
    gallery = np.ones((8, 4), np.float32) / 2
    queries = np.ones((8, 4), np.float32) / 2
    ranks = target_ranks(queries, gallery, np.arange(8))
    assert ranks.tolist() == [8] * 8
    m = metrics_from_ranks(ranks, (1, 5))
    assert m["recall_at_1"] == 0 and m["recall_at_5"] == 0
    assert m["mrr"] == pytest.approx(1 / 8)


def test_identical_query_and_gallery_is_perfect():
    x = unit_vectors(5, 40)
    m = retrieval_metrics(x, x, np.arange(40), KS)
    assert m["recall_at_1"] == m["mrr"] == m["ndcg_at_10"] == 1.0


def test_absent_target_is_a_miss_not_dropped():
    x = unit_vectors(6, 10)
    targets = np.arange(10)
    targets[0] = ABSENT
    ranks = target_ranks(x, x, targets)
    assert ranks[0] == 0
    m = metrics_from_ranks(ranks, KS)
    assert m["recall_at_10"] == pytest.approx(0.9)  # 9 of 10, the absent one still in the denominator
    assert m["mrr"] == pytest.approx(0.9)
