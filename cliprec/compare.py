"""Paired comparisons of two evaluations from their per-query ranks (`metrics/<cat>/<variant>.ranks.json`).

Two evaluations are paired only on the same test set (the same gallery ids, in order: the digest in
`test_set.ids_sha256`) and, for a mode with a query set of its own (`query_sets`, e.g. the shopper
`queries`), the same queries; a query counts when both evaluations ranked it. Every mode's per-query
values come from cliprec.graded.mode_values, whatever its kind (target ranks or graded queries).
The `compare` stage writes LoRA vs zero-shot per category: every difference with its CI, p-values and
counts to `metrics/<cat>/compare.detail.json`, and the headline (`HEADLINE`: T->I Recall@5's difference
and p-value, the shopper queries' nDCG@10 difference) to the DVC metrics file `metrics/<cat>/compare.json`,
so that `dvc exp show` stays narrow. `cliprec report` and `cliprec gate` make the same comparisons from
the ranks, against other experiments and revisions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cliprec import paths
from cliprec.artifacts import write_json
from cliprec.errors import CliprecError
from cliprec.graded import mode_values
from cliprec.stats import Comparison, paired_comparisons

KEY = "lora_minus_zeroshot"
# compare.json, the DVC metrics file: (mode, metric, key, with p) -> {key: difference[, key_p: its p-value]},
# per category (keys unique across metrics files keep `dvc exp show`'s column heads short: cliprec.evaluate;
# one column fewer without the p-value, which compare.detail.json has)
HEADLINE = (
    ("text_to_image", "recall_at_5", "lora_gain_t2i_r5", True),
    ("queries", "ndcg_at_10", "lora_gain_queries_ndcg10", False),
)


class UnpairedTestSets(CliprecError):
    """Two evaluations were made on different test sets: their queries cannot be paired."""


def load_ranks(path: str | Path) -> dict[str, Any]:
    """A ranks file; CliprecError naming the stage that writes it when it is missing or unreadable."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CliprecError(f"{path} is missing: run `dvc repro` (the evaluate stage writes it)") from None
    except ValueError as e:
        raise CliprecError(f"{path} is not JSON ({e}): run `dvc repro -f` on its evaluate stage") from None


def unpaired_reason(new: dict[str, Any], old: dict[str, Any]) -> str | None:
    """Why two ranks files are not on the same test set (gallery size, query counts, ids), or None."""
    a, b = new["test_set"], old["test_set"]
    if a["gallery_size"] != b["gallery_size"]:
        return f"gallery of {a['gallery_size']} products, was {b['gallery_size']}"
    for mode in sorted(set(new["ranks"]) & set(old["ranks"])):
        qa, qb = (sum(r is not None for r in doc["ranks"][mode]) for doc in (new, old))
        if qa != qb:
            return f"{mode}: {qa} queries, was {qb}"
    if a["ids_sha256"] != b["ids_sha256"]:
        return f"other test products (ids digest {a['ids_sha256'][:12]}, was {b['ids_sha256'][:12]})"
    return _unpaired_query_sets(new, old)


def _unpaired_query_sets(new: dict[str, Any], old: dict[str, Any]) -> str | None:
    """Why a mode both files have was asked other queries (its `query_sets` digest), or None."""
    sets_a, sets_b = new.get("query_sets", {}), old.get("query_sets", {})
    for mode in sorted(set(new["ranks"]) & set(old["ranks"])):
        digest_a, digest_b = ((s.get(mode) or {}).get("ids_sha256") for s in (sets_a, sets_b))
        if digest_a != digest_b:
            return f"{mode}: other queries (ids digest {str(digest_a)[:12]}, was {str(digest_b)[:12]})"
    return None


def compare_ranks(
    new: dict[str, Any], old: dict[str, Any], resamples: int = 10_000, confidence: float = 0.95, seed: int = 0
) -> dict[str, dict[str, Comparison]]:
    """{mode: {metric: new - old}} for the modes and metrics both have (UnpairedTestSets if not paired)."""
    reason = unpaired_reason(new, old)
    if reason:
        raise UnpairedTestSets(f"not the same test set: {reason}")
    ks = tuple(k for k in new["ks"] if k in old["ks"])
    out: dict[str, dict[str, Comparison]] = {}
    for mode in [m for m in new["ranks"] if m in old["ranks"]]:
        pairs = zip(new["ranks"][mode], old["ranks"][mode], strict=True)
        both = [(a, b) for a, b in pairs if a is not None and b is not None]
        if not both:  # e.g. no test product has a second photo: nothing to compare in this mode
            continue
        values_new, values_old = (mode_values([pair[i] for pair in both], ks) for i in (0, 1))
        names = list(values_new)
        comparisons = paired_comparisons(
            np.stack([values_new[n] for n in names]),
            np.stack([values_old[n] for n in names]),
            resamples,
            confidence,
            seed,
        )
        out[mode] = dict(zip(names, comparisons))
    return out


def comparison_doc(comparisons: dict[str, dict[str, Comparison]]) -> dict[str, Any]:
    """JSON-ready {mode: {metric: {value, ci_low, ci_high, p_value, ...}}}."""
    return {mode: {m: c.as_dict() for m, c in metrics.items()} for mode, metrics in comparisons.items()}


def headline(doc: dict[str, Any], category: str) -> dict[str, Any]:
    """compare.json: {category: {"lora_gain_t2i_r5": difference, "lora_gain_t2i_r5_p": p-value, ...}}."""
    values: dict[str, Any] = {}
    for mode, metric, key, with_p in HEADLINE:
        c = doc[KEY].get(mode, {}).get(metric)
        if c is not None:  # e.g. evaluate.ks without 5, or no shopper queries
            values.update({key: c["value"], **({f"{key}_p": c["p_value"]} if with_p else {})})
    return {category: values} if values else {}


def write_comparison(
    category: str,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    root: str | Path = ".",
) -> dict[str, Any]:
    """The `compare` stage: LoRA minus zero-shot of one category -> compare.detail.json + compare.json.

    Returns the full document (what compare.detail.json holds).
    """
    root = Path(root)
    lora, zeroshot = (load_ranks(root / paths.ranks_path(category, v)) for v in ("lora", "zeroshot"))
    doc = {
        KEY: comparison_doc(compare_ranks(lora, zeroshot, resamples, confidence, seed)),
        "resamples": resamples,
        "confidence": confidence,
    }
    write_json(doc, root / paths.compare_detail_path(category))
    write_json(headline(doc, category), root / paths.compare_path(category))
    return doc
