"""`cliprec gate`: fail CI when a relevance metric regressed against a git revision.

Runs `dvc metrics diff --json <rev>` (which always exits 0 and has no threshold) and decides:
- a relevance metric (leaf key recall_at_<k>, mrr, ndcg_at_<k>) that dropped by more than `tolerance`
  (absolute) fails, and so does one that disappeared or became non-numeric/NaN;
- everything else (gallery sizes, query counts, the seed's avg_mean_similarity_at_5, ann_recall_at_10)
  is shown but never fails;
- DVCLive training curves under metrics/train/ are shown but not gated: the held-out test metrics are
  the contract, and validation numbers move with every training change.
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliprec.errors import CliprecError

log = logging.getLogger(__name__)

RELEVANCE = re.compile(r"^(recall_at_\d+|mrr|ndcg_at_\d+)$")
UNGATED_PREFIXES = ("metrics/train/",)
EPS = 1e-9  # 0.50 - 0.49 is 0.010000000000000009 in floats: a drop of exactly `tolerance` passes


class GateError(CliprecError):
    """DVC could not produce the diff (unknown revision, not a DVC repo, ...)."""


@dataclass(frozen=True)
class Row:
    """One metric of the diff with its verdict."""

    path: str
    metric: str
    old: Any
    new: Any
    status: str  # regression | missing | improved | unchanged | new | within_tolerance | info

    @property
    def failed(self) -> bool:
        """True when this row fails the gate."""
        return self.status in ("regression", "missing")

    @property
    def change(self) -> float | None:
        """new - old where both are numbers."""
        if _is_number(self.old) and _is_number(self.new):
            return float(self.new) - float(self.old)
        return None


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def is_relevance(metric: str) -> bool:
    """True for recall_at_<k>, mrr and ndcg_at_<k> (matched on the last component of a dotted key)."""
    return bool(RELEVANCE.match(metric.rsplit(".", 1)[-1]))


def is_gated(path: str, metric: str) -> bool:
    """True when a drop of this metric can fail the gate."""
    return is_relevance(metric) and not any(path.replace("\\", "/").startswith(p) for p in UNGATED_PREFIXES)


def decide(diff: dict[str, dict[str, dict[str, Any]]], tolerance: float) -> list[Row]:
    """Verdict for every metric of a parsed `dvc metrics diff --json` result, sorted by path and name."""
    rows = []
    for path in sorted(diff):
        for metric in sorted(diff[path]):
            entry = diff[path][metric] or {}
            old, new = entry.get("old"), entry.get("new")
            rows.append(Row(path, metric, old, new, _status(path, metric, old, new, tolerance)))
    return rows


def _status(path: str, metric: str, old: Any, new: Any, tolerance: float) -> str:
    gated = is_gated(path, metric)
    if not _is_number(old):
        return "new" if _is_number(new) else "info"
    if not _is_number(new) or not math.isfinite(float(new)):
        return "missing" if gated else "info"
    if not gated:
        return "info"
    drop = float(old) - float(new)
    if drop > tolerance + EPS:
        return "regression"
    if drop > EPS:
        return "within_tolerance"
    return "improved" if drop < -EPS else "unchanged"


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if _is_number(x):
        return f"{x:.4f}" if isinstance(x, float) else str(x)
    return str(x)


_MARK = {
    "regression": "❌ regression",
    "missing": "❌ missing",
    "within_tolerance": "⚠️ within tolerance",
    "improved": "✅ improved",
    "unchanged": "unchanged",
    "new": "new",
    "info": "not gated",
}


def markdown(rows: list[Row], rev: str, tolerance: float) -> str:
    """The verdict line and a Markdown table of the changed metrics."""
    failed = [r for r in rows if r.failed]
    head = (
        f"**cliprec gate: FAIL** — {len(failed)} relevance metric(s) dropped by more than {tolerance} "
        f"or disappeared (vs `{rev}`)"
        if failed
        else f"**cliprec gate: PASS** — no relevance metric dropped by more than {tolerance} (vs `{rev}`)"
    )
    if not rows:
        return head + "\n\nNo metric changed.\n"
    lines = [
        head,
        "",
        f"| Path | Metric | {rev} | workspace | Change | Verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (not r.failed, r.path, r.metric)):
        change = r.change
        lines.append(
            f"| {r.path} | {r.metric} | {_fmt(r.old)} | {_fmt(r.new)} | "
            f"{'—' if change is None else f'{change:+.4f}'} | {_MARK[r.status]} |"
        )
    return "\n".join(lines) + "\n"


def metrics_diff(rev: str, root: str | Path = ".") -> dict[str, dict[str, dict[str, Any]]]:
    """Parsed `dvc metrics diff --json <rev>` run in `root`; raises GateError when DVC fails."""
    cmd = ["dvc", "metrics", "diff", "--json", rev]
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise GateError("dvc is not installed (pip install -r requirements.txt)") from e
    if proc.returncode != 0:
        message = next((ln for ln in proc.stderr.splitlines() if ln.startswith("ERROR")), proc.stderr.strip())
        raise GateError(f"`{' '.join(cmd)}` failed: {message or f'exit code {proc.returncode}'}")
    if proc.stderr.strip():
        log.warning("dvc: %s", proc.stderr.strip())
    try:
        return json.loads(proc.stdout or "{}")
    except json.JSONDecodeError as e:
        raise GateError(f"`{' '.join(cmd)}` printed no JSON: {proc.stdout[:200]!r}") from e


def run_gate(rev: str = "HEAD", tolerance: float = 0.01, root: str | Path = ".") -> tuple[bool, str]:
    """(passed, Markdown report) for the workspace metrics against `rev`."""
    rows = decide(metrics_diff(rev, root), tolerance)
    passed = not any(r.failed for r in rows)
    log.info("gate: %s (%d metrics changed vs %s)", "pass" if passed else "FAIL", len(rows), rev)
    return passed, markdown(rows, rev, tolerance)
