"""Paired comparisons of two evaluations from their per-query ranks (`metrics/<cat>/<variant>.ranks.json`).

Two evaluations are paired only on the same test set (the same gallery ids, in order: the digest in
`test_set.ids_sha256`); a query counts when both evaluations ranked it. The `compare` stage writes LoRA
vs zero-shot per category: every difference with its CI, p-values and counts to
`metrics/<cat>/compare.detail.json`, and the headline (`HEADLINE`: value and p-value) to the DVC metrics
file `metrics/<cat>/compare.json`, so that `dvc exp show` fits a terminal. `cliprec report` and
`cliprec gate` make the same comparisons from the ranks, against other experiments and revisions.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cliprec.artifacts import write_json
from cliprec.errors import CliprecError
from cliprec.metrics import per_query
from cliprec.stats import Comparison, paired_comparisons

KEY = "lora_minus_zeroshot"
# what the DVC metrics file compare.json holds: (mode, metric) -> fields of the comparison
HEADLINE = {("text_to_image", "recall_at_5"): ("value", "p_value")}


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
        a, b = (np.array([pair[i] for pair in both], dtype=np.int64) for i in (0, 1))
        values_new, values_old = per_query(a, ks), per_query(b, ks)
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


def headline(doc: dict[str, Any]) -> dict[str, Any]:
    """compare.json's few numbers (`HEADLINE`) out of the full comparison document."""
    out: dict[str, Any] = {}
    for (mode, metric), fields in HEADLINE.items():
        c = doc[KEY].get(mode, {}).get(metric)
        if c is not None:  # e.g. evaluate.ks without 5
            out.setdefault(KEY, {}).setdefault(mode, {})[metric] = {f: c[f] for f in fields}
    return out


def write_comparison(
    lora: str | Path,
    zeroshot: str | Path,
    out: str | Path,
    detail: str | Path,
    resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """The `compare` stage: LoRA minus zero-shot of one category -> `detail` and its headline `out`.

    Returns the full document (what `detail` holds).
    """
    doc = {
        KEY: comparison_doc(
            compare_ranks(load_ranks(lora), load_ranks(zeroshot), resamples, confidence, seed)
        ),
        "resamples": resamples,
        "confidence": confidence,
    }
    write_json(doc, detail)
    write_json(headline(doc), out)
    return doc
