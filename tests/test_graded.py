"""cliprec.graded: graded nDCG / Recall / MRR against a by-definition reference, and mode dispatch."""

from __future__ import annotations

import math

import numpy as np
import pytest

from cliprec.graded import GRADED_METRICS, graded_per_query, is_graded, mode_metric_names, mode_values
from cliprec.metrics import per_query


def test_ndcg_by_hand():
    # grades 3 and 1; the grade-1 product first, the grade-3 one third; ideal: 3 then 1
    judged = [[[3, 3], [1, 1]]]
    v = graded_per_query(judged)
    dcg = 1 / math.log2(2) + 3 / math.log2(4)  # 1 + 1.5
    ideal = 3 / math.log2(2) + 1 / math.log2(3)
    assert v["ndcg_at_10"][0] == pytest.approx(dcg / ideal) == pytest.approx(2.5 / 3.6309298)
    assert v["mrr"][0] == 1.0 and v["recall_at_10"][0] == 1.0


def test_a_missed_relevant_product_counts_in_the_ideal_and_misses_score_zero():
    v = graded_per_query([[[1, 1], [0, 3]], [[0, 2]], [[42, 2]]])
    ideal = 3 + 1 / math.log2(3)
    assert v["ndcg_at_10"][0] == pytest.approx(1 / ideal)
    assert v["ndcg_at_10"][1] == v["ndcg_at_100"][1] == v["recall_at_100"][1] == v["mrr"][1] == 0.0
    # found at 42: outside the top 10, inside the top 100
    assert v["recall_at_10"][2] == 0.0 and v["recall_at_100"][2] == 1.0 and v["ndcg_at_10"][2] == 0.0
    assert v["ndcg_at_100"][2] == pytest.approx(1 / math.log2(43))
    assert v["mrr"][2] == pytest.approx(1 / 42)


def _reference(scores: np.ndarray, grades: dict[int, int], k: int) -> tuple[float, float, float]:
    """nDCG@k, Recall@k, RR by definition, from a full ranking (stable: lower column first on ties)."""
    order = list(np.argsort(-scores, kind="stable"))
    gains = [grades.get(int(c), 0) for c in order]
    dcg = sum(g / math.log2(i + 2) for i, g in enumerate(gains[:k]))
    ideal = sorted(grades.values(), reverse=True)
    idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal[:k]))
    first = next(i for i, g in enumerate(gains) if g > 0) + 1
    return dcg / idcg, float(first <= k), 1.0 / first if first <= 100 else 0.0


@pytest.mark.parametrize("seed", range(5))
def test_graded_metrics_match_a_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    n_q, n_g = 40, 300
    scores = rng.standard_normal((n_q, n_g)).astype(np.float32)
    judged, expect = [], {name: [] for name in GRADED_METRICS}
    for q in range(n_q):
        relevant = rng.choice(n_g, size=int(rng.integers(1, 6)), replace=False)
        grades = {int(c): int(rng.integers(1, 4)) for c in relevant}
        order = list(np.argsort(-scores[q], kind="stable")[:100])
        judged.append([[order.index(c) + 1 if c in order else 0, g] for c, g in grades.items()])
        for k in (10, 100):
            ndcg, recall, rr = _reference(scores[q], grades, k)
            expect[f"ndcg_at_{k}"].append(ndcg)
            expect[f"recall_at_{k}"].append(recall)
        expect["mrr"].append(rr)
    got = graded_per_query(judged)
    for name in GRADED_METRICS:
        np.testing.assert_allclose(got[name], expect[name], rtol=1e-12, err_msg=name)
    assert 0 < got["recall_at_10"].mean() < got["recall_at_100"].mean() <= 1  # the draw tests both depths


def test_mode_values_dispatch_on_the_kind_of_a_mode():
    targets = [3, None, 0, 1]
    assert not is_graded(targets)
    plain = mode_values(targets, (1, 5))
    for name, values in per_query(np.array([3, 0, 1]), (1, 5)).items():
        np.testing.assert_array_equal(plain[name], values)
    graded = [[[2, 3]], None, [[0, 1], [1, 2]]]
    assert is_graded(graded)
    assert set(mode_values(graded)) == set(GRADED_METRICS)
    assert mode_metric_names(graded) == GRADED_METRICS
    assert mode_metric_names(targets, (1, 5)) == ("recall_at_1", "recall_at_5", "mrr", "ndcg_at_10")
    assert mode_metric_names([None, None], (1,)) == ("recall_at_1", "mrr", "ndcg_at_10")
