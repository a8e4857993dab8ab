"""Recompute every metric a metrics file states from its per-query file, and list where they disagree.

`cliprec gate` compares per-query ranks, but people and dashboards read the metrics files: one edited by
hand or left stale (recall raised, gallery size changed) must not pass because its ranks did. For each
`metrics/<cat>/<variant>.ranks.json` this recomputes, with the functions the stages use, what the
evaluate stage wrote from it (every mode's metrics, their bootstrap CIs, query and gallery counts, and
the headline `<variant>.json`) and what the compare stage wrote from the two variants' ranks
(`compare.detail.json`, `compare.json`). Figures that do not derive from ranks (the seed's similarity,
ANN recall, the catalog's identity) are not checked here; `cliprec gate --reproduce` checks those.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from cliprec import compare, evaluate, paths, query_eval
from cliprec.graded import is_graded

TOLERANCE = 1.5e-6  # the files round to 6 decimals


def _mismatches(stated: Any, expected: Any, where: str) -> Iterator[str]:
    """`where: stated X, recomputed Y` for every value of `expected` that `stated` lacks or differs on."""
    if isinstance(expected, dict):
        if not isinstance(stated, dict):
            yield f"{where.rstrip('.')}: missing (recomputed {json.dumps(expected)[:60]})"
            return
        for key, value in expected.items():
            yield from _mismatches(stated.get(key), value, f"{where}{key}.")
        return
    if isinstance(expected, list):  # e.g. a headline's [low, high]
        if not isinstance(stated, list) or len(stated) != len(expected):
            yield f"{where.rstrip('.')}: stated {stated!r}, its per-query file gives {len(expected)} values"
            return
        for i, (a, b) in enumerate(zip(stated, expected)):
            yield from _mismatches(a, b, f"{where}{i}.")
        return
    name = where.rstrip(".")
    if stated is None:
        yield f"{name}: missing (recomputed {expected!r})"
    elif isinstance(expected, float) or isinstance(stated, float):
        ok = isinstance(stated, int | float) and not isinstance(stated, bool)
        if not ok or not math.isclose(float(stated), float(expected), rel_tol=0, abs_tol=TOLERANCE):
            yield f"{name}: stated {stated!r}, its per-query file gives {round(float(expected), 6)!r}"
    elif stated != expected:
        yield f"{name}: stated {stated!r}, its per-query file gives {expected!r}"


def expected_detail(ranks: dict[str, Any], settings: evaluate.EvalSettings) -> dict[str, Any]:
    """What the evaluate stage writes per mode from these ranks: metrics, ci95, queries, gallery_size."""
    out: dict[str, Any] = {}
    for mode, by_position in ranks["ranks"].items():
        if is_graded(
            by_position
        ):  # shopper queries: their block from their graded ranks (cliprec.query_eval)
            exact, query_set = ranks["exact"][mode], ranks["query_sets"][mode]
            out[mode] = query_eval.queries_block(by_position, exact, query_set, settings)
            continue
        values = np.array([r for r in by_position if r is not None], dtype=np.int64)
        metrics, _ = evaluate.mode_metrics(values, tuple(ranks["ks"]), settings)
        metrics.update(queries=int(len(values)), gallery_size=int(ranks["test_set"]["gallery_size"]))
        out[mode] = metrics
    return out


def _read(root: Path, path: Path) -> tuple[Any, str | None]:
    try:
        return json.loads((root / path).read_text()), None
    except FileNotFoundError:
        return None, f"{path.as_posix()}: missing"
    except ValueError as e:
        return None, f"{path.as_posix()}: not JSON ({e})"


def audit_evaluation(root: Path, category: str, variant: str, settings: evaluate.EvalSettings) -> list[str]:
    """Problems of one evaluation's detail and headline files against its ranks file."""
    ranks, problem = _read(root, paths.ranks_path(category, variant))
    if problem:
        return [problem]
    detail = expected_detail(ranks, settings)
    problems = []
    for path, expected in (
        (paths.metrics_detail_path(category, variant), detail),
        (paths.metrics_path(category, variant), evaluate.headline(detail, category, variant)),
    ):
        stated, problem = _read(root, path)
        problems += (
            [problem] if problem else [f"{path.as_posix()}: {m}" for m in _mismatches(stated, expected, "")]
        )
    return problems


def audit_comparison(root: Path, category: str, settings: evaluate.EvalSettings) -> list[str]:
    """Problems of one category's compare files against the two variants' ranks files."""
    docs = {}
    for variant in ("lora", "zeroshot"):
        docs[variant], problem = _read(root, paths.ranks_path(category, variant))
        if problem:
            return []  # audit_evaluation reports it
    try:
        diffs = compare.compare_ranks(
            docs["lora"], docs["zeroshot"], settings.resamples, settings.confidence, settings.seed
        )
    except compare.UnpairedTestSets as e:
        return [f"{paths.compare_path(category).as_posix()}: its variants' ranks are {e}"]
    detail = {compare.KEY: compare.comparison_doc(diffs)}
    problems = []
    for path, expected in (
        (paths.compare_detail_path(category), detail),
        (paths.compare_path(category), compare.headline(detail, category)),
    ):
        stated, problem = _read(root, path)
        problems += (
            [problem] if problem else [f"{path.as_posix()}: {m}" for m in _mismatches(stated, expected, "")]
        )
    return problems


def audit(root: str | Path, settings: evaluate.EvalSettings) -> list[str]:
    """Every disagreement between the workspace's metrics files and its per-query files, one line each."""
    root = Path(root)
    problems = []
    evaluations = sorted((root / paths.METRICS).glob("*/*.ranks.json"))
    categories = sorted({p.parent.name for p in evaluations})
    for path in evaluations:
        problems += audit_evaluation(root, path.parent.name, path.name.split(".")[0], settings)
    for category in categories:
        if all((root / paths.ranks_path(category, v)).exists() for v in ("lora", "zeroshot")):
            problems += audit_comparison(root, category, settings)
    return problems
