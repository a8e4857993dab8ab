"""cliprec.compare: pairing two evaluations' per-query ranks, refusing unpaired test sets."""

from __future__ import annotations

import copy
import json

import pytest
from helpers import ranks_doc, with_queries

from cliprec import paths
from cliprec.compare import UnpairedTestSets, compare_ranks, unpaired_reason, write_comparison
from cliprec.graded import GRADED_METRICS, graded_per_query
from cliprec.metrics import metrics_from_ranks


def test_same_test_set():
    a = ranks_doc([1, 2, 3, 4])
    assert unpaired_reason(a, copy.deepcopy(a)) is None
    assert "gallery of 3 products, was 4" in unpaired_reason(ranks_doc([1, 2, 3]), a)
    other_ids = ranks_doc([1, 2, 3, 4], ids=["A", "B", "C", "D"])
    assert "other test products" in unpaired_reason(other_ids, a)
    fewer_alt = ranks_doc([1, 2, 3, 4], alt=[1, None, None, None])
    assert "image_to_image: 1 queries, was 0" in unpaired_reason(fewer_alt, a)
    with pytest.raises(UnpairedTestSets, match="not the same test set"):
        compare_ranks(other_ids, a, resamples=1000)


def test_comparison_pairs_queries_and_means_match_the_metrics():
    old = ranks_doc([1, 7, 3, 12, 2, 6, 1, 30], alt=[2, None, 1, 8, None, 3, 1, 1])
    new = ranks_doc([1, 2, 1, 4, 2, 9, 1, 1], alt=[1, None, 1, 1, None, 2, 1, 1])
    out = compare_ranks(new, old, resamples=2000)
    assert set(out) == {"text_to_image", "image_to_image"}
    t2i = out["text_to_image"]["recall_at_5"]
    assert t2i.queries == 8 and (t2i.better, t2i.worse) == (3, 0)  # P001, P003, P007 now in the top 5
    assert t2i.new_mean == metrics_from_ranks([1, 2, 1, 4, 2, 9, 1, 1])["recall_at_5"]
    assert t2i.value == pytest.approx(t2i.new_mean - t2i.old_mean)
    assert out["image_to_image"]["mrr"].queries == 6  # only the queries both evaluations made


def test_write_comparison(tmp_path):
    cat = "Appliances"
    (tmp_path / paths.ranks_path(cat, "lora")).parent.mkdir(parents=True)
    (tmp_path / paths.ranks_path(cat, "lora")).write_text(json.dumps(ranks_doc([1, 1, 2, 3] * 20)))
    (tmp_path / paths.ranks_path(cat, "zeroshot")).write_text(json.dumps(ranks_doc([4, 9, 2, 30] * 20)))
    doc = write_comparison(cat, 2000, root=tmp_path)
    assert json.loads((tmp_path / paths.compare_detail_path(cat)).read_text()) == doc
    r5 = doc["lora_minus_zeroshot"]["text_to_image"]["recall_at_5"]
    assert r5["value"] == 0.5 and r5["p_value"] < 0.001 and r5["ci_low"] > 0
    assert set(r5) >= {"value", "ci_low", "ci_high", "p_value", "better", "worse", "min_detectable"}
    assert set(doc["lora_minus_zeroshot"]["text_to_image"]) > {"recall_at_5", "mrr", "ndcg_at_10"}
    # the DVC metrics file: the headline difference and its p-value, two short columns in `dvc exp show`
    shown = json.loads((tmp_path / paths.compare_path(cat)).read_text())
    assert shown == {cat: {"lora_gain_t2i_r5": 0.5, "lora_gain_t2i_r5_p": r5["p_value"]}}


def _graded(first: list[int]) -> list[list[list[int]]]:
    """Queries whose grade-3 product is at rank first[i] (0: not found), a grade-1 one not found."""
    return [[[r, 3], [0, 1]] for r in first]


def test_a_queries_mode_is_paired_like_any_other():
    old = with_queries(ranks_doc([1, 2, 3, 4]), _graded([1, 0, 5, 40, 2, 0] * 10))
    new = with_queries(ranks_doc([1, 2, 3, 4]), _graded([1, 3, 1, 2, 2, 0] * 10))
    out = compare_ranks(new, old, resamples=2000)
    assert set(out["queries"]) == set(GRADED_METRICS) and set(out["text_to_image"]) >= {"recall_at_5"}
    ndcg = out["queries"]["ndcg_at_10"]
    expect = graded_per_query(_graded([1, 3, 1, 2, 2, 0] * 10))["ndcg_at_10"].mean()
    assert ndcg.queries == 60 and ndcg.new_mean == pytest.approx(expect) and ndcg.value > 0
    assert (out["queries"]["recall_at_10"].better, out["queries"]["recall_at_10"].worse) == (20, 0)


def test_other_queries_are_not_paired():
    a = with_queries(ranks_doc([1, 2]), _graded([1, 2, 3]))
    b = with_queries(ranks_doc([1, 2]), _graded([1, 2, 3]), ids=["x", "y", "z"])
    assert "queries: other queries" in unpaired_reason(a, b)
    assert "queries: other queries" in unpaired_reason(a, ranks_doc([1, 2]) | {"ranks": {**a["ranks"]}})
    assert unpaired_reason(a, ranks_doc([1, 2])) is None  # a mode only one file has is not compared


def test_compare_json_carries_the_queries_gain_without_a_p_value(tmp_path):
    cat = "Appliances"
    (tmp_path / paths.ranks_path(cat, "lora")).parent.mkdir(parents=True)
    lora = with_queries(ranks_doc([1, 1, 2, 3] * 20), _graded([1, 2, 1, 0] * 20))
    zeroshot = with_queries(ranks_doc([4, 9, 2, 30] * 20), _graded([3, 0, 0, 0] * 20))
    (tmp_path / paths.ranks_path(cat, "lora")).write_text(json.dumps(lora))
    (tmp_path / paths.ranks_path(cat, "zeroshot")).write_text(json.dumps(zeroshot))
    doc = write_comparison(cat, 2000, root=tmp_path)
    assert set(doc["lora_minus_zeroshot"]["queries"]) == set(GRADED_METRICS)
    shown = json.loads((tmp_path / paths.compare_path(cat)).read_text())[cat]
    gain = doc["lora_minus_zeroshot"]["queries"]["ndcg_at_10"]["value"]
    assert set(shown) == {"lora_gain_t2i_r5", "lora_gain_t2i_r5_p", "lora_gain_queries_ndcg10"}
    assert shown["lora_gain_queries_ndcg10"] == gain > 0
