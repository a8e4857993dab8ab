"""`cliprec gate`: fail CI when retrieval really got worse than at a git revision, or cannot be compared.

The gate compares the workspace's per-query ranks (`metrics/<cat>/<variant>.ranks.json`, one per
evaluation) with the same files at revision R (`git show`), query by query (cliprec.compare):

- `missing`: a ranks file, a query mode or a metric that R has is gone -> FAIL;
- `new test set`: the gallery size, a mode's query count or the test ids' digest differ -> FAIL, unless
  `--allow-new-test-set`; then it says so loudly and compares nothing on that file (unpaired queries
  cannot show a paired effect, and a shrunk test set must never pass as "improved");
- `regression`: a relevance metric (recall@k, MRR, nDCG@10) dropped by more than `gate.tolerance`
  AND the drop is significant (one-sided paired permutation p < `gate.alpha`) -> FAIL;
- `improved`: the mirror image, reported; `within noise`: any other change, shown with its 95 % CI.

`cliprec gate --reproduce --rev HEAD` is CI's other check, that this commit reproduces the numbers it
committed: every per-query rank equal, every metric file equal. Only figures that do not derive from
ranks may differ, and only by what another CPU's float kernels explain: the seed's similarity and ANN
recall (1e-5 absolute) and DVCLive's training figures (1e-3 relative: they are rounded to 4 digits).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliprec.compare import compare_ranks, unpaired_reason
from cliprec.errors import CliprecError
from cliprec.git import git
from cliprec.graded import mode_metric_names
from cliprec.paths import METRICS
from cliprec.stats import Comparison

log = logging.getLogger(__name__)

RANKS_GLOB = "*/*.ranks.json"
FLOAT_ABS_TOL = 1e-5  # seed similarity, ANN recall: float sums over vectors that other CPUs round otherwise
TRAIN_REL_TOL = 1e-3  # DVCLive figures: 4 significant digits


class GateError(CliprecError):
    """The comparison cannot be made (unknown revision, not a git repository, ...)."""


@dataclass(frozen=True)
class Verdict:
    """One line of the gate's table."""

    path: str
    mode: str
    metric: str
    # missing | new_test_set | new_test_set_allowed | regression | improved | within_noise | unchanged | new
    status: str
    detail: str = ""
    comparison: Comparison | None = None

    @property
    def failed(self) -> bool:
        """True when this line fails the gate."""
        return self.status in ("missing", "new_test_set", "regression")


# --- reading a revision ---------------------------------------------------------------------------------


def revision_files(rev: str, root: Path, pattern: str = RANKS_GLOB) -> dict[str, str]:
    """{path: text} of the files under metrics/ matching `pattern` at git revision `rev`."""
    if git(root, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}").returncode != 0:
        raise GateError(f"unknown git revision {rev!r} in {root}")
    listed = git(root, "ls-tree", "-r", "--name-only", rev, "--", METRICS.as_posix())
    if listed.returncode != 0:
        raise GateError(f"git ls-tree {rev} failed: {listed.stderr.strip()}")
    out = {}
    for name in listed.stdout.splitlines():
        if Path(name).match(pattern):
            shown = git(root, "show", f"{rev}:{name}")
            if shown.returncode != 0:
                raise GateError(f"git show {rev}:{name} failed: {shown.stderr.strip()}")
            out[name] = shown.stdout
    return out


def workspace_files(root: Path, pattern: str = RANKS_GLOB) -> dict[str, str]:
    """{path: text} of the workspace files under metrics/ matching `pattern`."""
    return {p.relative_to(root).as_posix(): p.read_text() for p in sorted((root / METRICS).glob(pattern))}


# --- the noise-aware gate -------------------------------------------------------------------------------


def decide(
    new: dict[str, dict[str, Any]],
    old: dict[str, dict[str, Any]],
    tolerance: float,
    alpha: float,
    allow_new_test_set: bool = False,
    resamples: int = 10_000,
    seed: int = 0,
) -> list[Verdict]:
    """Verdicts for every ranks file, mode and gated metric of `old` (parsed ranks files by path)."""
    out: list[Verdict] = []
    for path in sorted(set(old) | set(new)):
        if path not in new:
            out.append(Verdict(path, "—", "—", "missing", "this evaluation is gone"))
            continue
        if path not in old:
            out.append(Verdict(path, "—", "—", "new", "not at the revision: nothing to compare"))
            continue
        reason = unpaired_reason(new[path], old[path])
        if reason:
            status = "new_test_set_allowed" if allow_new_test_set else "new_test_set"
            out.append(Verdict(path, "—", "—", status, reason))
            continue
        out.extend(_compare_file(path, new[path], old[path], tolerance, alpha, resamples, seed))
    return out


def _compare_file(
    path: str, new: dict, old: dict, tolerance: float, alpha: float, resamples: int, seed: int
) -> Iterator[Verdict]:
    comparisons = compare_ranks(new, old, resamples, seed=seed)  # the test sets are the same: checked
    for mode in old["ranks"]:
        if mode not in new["ranks"]:
            yield Verdict(path, mode, "—", "missing", "query mode gone")
            continue
        for metric in mode_metric_names(old["ranks"][mode], tuple(old["ks"])):  # the mode's own metrics
            c = comparisons[mode].get(metric)
            if c is None:
                yield Verdict(path, mode, metric, "missing", f"{metric} no longer computed (evaluate.ks)")
                continue
            yield Verdict(path, mode, metric, _status(c, tolerance, alpha), comparison=c)


def _status(c: Comparison, tolerance: float, alpha: float) -> str:
    if c.better == 0 and c.worse == 0:
        return "unchanged"
    if c.value < -tolerance and c.p_drop < alpha:
        return "regression"
    if c.value > tolerance and c.p_gain < alpha:
        return "improved"
    return "within_noise"


_MARK = {
    "missing": "❌ missing",
    "new_test_set": "❌ NEW TEST SET",
    "new_test_set_allowed": "⚠️ NEW TEST SET (allowed)",
    "regression": "❌ regression",
    "improved": "✅ improved",
    "within_noise": "within noise",
    "unchanged": "unchanged",
    "new": "new",
}


def markdown(verdicts: list[Verdict], rev: str, tolerance: float, alpha: float) -> str:
    """The verdict line and a Markdown table of everything that is not unchanged."""
    failed = [v for v in verdicts if v.failed]
    rule = f"a drop > {tolerance} with one-sided paired p < {alpha}"
    head = (
        f"**cliprec gate: FAIL** — {len(failed)} problem(s) vs `{rev}` (a regression is {rule})"
        if failed
        else f"**cliprec gate: PASS** — no significant regression vs `{rev}` (a regression is {rule})"
    )
    lines = [head]
    for v in (v for v in verdicts if v.status == "new_test_set_allowed"):
        lines += ["", f"> ⚠️ **NEW TEST SET** in `{v.path}` ({v.detail}): allowed by --allow-new-test-set; "
                  "its metrics are NOT compared with the revision's."]  # fmt: skip
    shown = [v for v in verdicts if v.status != "unchanged"]
    if not shown:
        return "\n".join([*lines, "", "Every per-query rank is unchanged."]) + "\n"
    lines += ["", f"| Path | Mode | Metric | {rev} | workspace | Change [95% CI] | p (one-sided) | Verdict |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for v in sorted(shown, key=lambda v: (not v.failed, v.path, v.mode, v.metric)):
        c = v.comparison
        if c is None:
            lines.append(f"| {v.path} | {v.mode} | {v.metric} | | | {v.detail} | | {_MARK[v.status]} |")
            continue
        p = c.p_drop if c.value < 0 else c.p_gain
        lines.append(
            f"| {v.path} | {v.mode} | {v.metric} | {c.old_mean:.4f} | {c.new_mean:.4f} | {c.value:+.4f} "
            f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}] ({c.better} better, {c.worse} worse of {c.queries}) "
            f"| {p:.4f} | {_MARK[v.status]} |"
        )
    return "\n".join(lines) + "\n"


def run_gate(
    rev: str = "HEAD",
    tolerance: float = 0.01,
    alpha: float = 0.05,
    root: str | Path = ".",
    allow_new_test_set: bool = False,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[bool, str]:
    """(passed, Markdown report) for the workspace's evaluations against revision `rev`."""
    root = Path(root)
    old = {p: json.loads(t) for p, t in revision_files(rev, root).items()}
    new = {p: json.loads(t) for p, t in workspace_files(root).items()}
    if not old and not new:
        raise GateError(f"no {METRICS}/{RANKS_GLOB} at {rev} nor in the workspace: run `dvc repro` first")
    verdicts = decide(new, old, tolerance, alpha, allow_new_test_set, resamples, seed)
    passed = not any(v.failed for v in verdicts)
    log.info("gate: %s (%d verdicts vs %s)", "pass" if passed else "FAIL", len(verdicts), rev)
    return passed, markdown(verdicts, rev, tolerance, alpha)


# --- reproduction check ---------------------------------------------------------------------------------


def reproduce(rev: str = "HEAD", root: str | Path = ".") -> tuple[bool, str]:
    """(passed, report): do the workspace's metric files equal the ones committed at `rev`?"""
    root = Path(root)
    old = revision_files(rev, root, "*.json") | revision_files(rev, root, "*.tsv")
    new = workspace_files(root, "**/*.json") | workspace_files(root, "**/*.tsv")
    problems = []
    for path in sorted(set(old) | set(new)):
        if path not in new or path not in old:
            problems.append(f"{path}: {'missing in the workspace' if path not in new else 'not committed'}")
            continue
        rel = TRAIN_REL_TOL if path.startswith(f"{METRICS.as_posix()}/train/") else 0.0
        problems += [
            f"{path}: {d}" for d in _differences(_parse(path, old[path]), _parse(path, new[path]), rel)
        ]
    head = (
        f"**cliprec reproduce: FAIL** — {len(problems)} difference(s) from the metrics committed at `{rev}`"
        if problems
        else f"**cliprec reproduce: PASS** — every per-query rank and metric equals `{rev}`'s"
    )
    return not problems, "\n".join([head, *(f"- {p}" for p in problems[:50])]) + "\n"


def _parse(path: str, text: str) -> Any:
    if path.endswith(".tsv"):
        return [line.split("\t") for line in text.splitlines()]
    return json.loads(text)


def _differences(old: Any, new: Any, rel: float, where: str = "") -> Iterator[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            if key not in old or key not in new:
                yield f"{where}{key}: {'gone' if key not in new else 'new'}"
            else:
                yield from _differences(old[key], new[key], rel, f"{where}{key}.")
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            yield from _differences(a, b, rel, f"{where}{i}.")
    elif old != new and not _close(old, new, rel, where):
        yield f"{where.rstrip('.')}: {old!r} -> {new!r}"


def _close(old: Any, new: Any, rel: float, where: str) -> bool:
    try:
        a, b = float(old), float(new)
    except (TypeError, ValueError):
        return False
    if isinstance(old, bool) or isinstance(new, bool) or not (math.isfinite(a) and math.isfinite(b)):
        return False
    if rel:
        return abs(a - b) <= rel * max(abs(a), abs(b))
    return ("avg_mean_similarity" in where or "ann_recall" in where) and abs(a - b) <= FLOAT_ABS_TOL
