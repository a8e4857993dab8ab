"""`cliprec gate`: fail CI when retrieval really got worse than at a git revision, or cannot be compared.

The gate compares the workspace's per-query ranks (`metrics/<cat>/<variant>.ranks.json`, one per
evaluation) with the same files at revision R (`git show`), query by query (cliprec.compare):

- `missing`: a ranks file, a query mode or a metric that R has is gone -> FAIL;
- `new test set`: the gallery size, a mode's query count or the test ids' digest differ -> FAIL, unless
  `--allow-new-test-set`; then it says so loudly and compares nothing on that file (unpaired queries
  cannot show a paired effect, and a shrunk test set must never pass as "improved");
- `regression` -> FAIL: a relevance metric (recall@k, MRR, nDCG@10) dropped, and the drop is real on
  both sources of noise. Over the test queries: its one-sided paired permutation p, Holm-corrected over
  every metric the gate tests (one family: files x modes x metrics), is below `gate.alpha`. Over
  training seeds: the drop is larger than `gate.tolerance` and than what retraining alone produces, read
  from R's noise files (`metrics/<cat>/noise.detail.json`, `cliprec noise`; `seed_bound`). A category
  without a noise file for R's test set is judged by the stricter rule, said so in the report: a drop
  larger than `gate.tolerance` with uncorrected p < `gate.alpha`;
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

from cliprec.audit import audit
from cliprec.compare import compare_ranks, unpaired_reason
from cliprec.errors import CliprecError
from cliprec.evaluate import EvalSettings
from cliprec.git import git
from cliprec.graded import mode_metric_names
from cliprec.paths import METRICS, noise_detail_path
from cliprec.stats import Comparison, holm, student_t_quantile

log = logging.getLogger(__name__)

RANKS_GLOB = "*/*.ranks.json"
NOISE_GLOB = "*/noise.detail.json"  # cliprec.noise: each metric's spread over training seeds
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
    # | stale (a metrics file disagrees with the per-query file it was computed from: cliprec.audit)
    status: str
    detail: str = ""
    comparison: Comparison | None = None
    p_corrected: float | None = None  # the p-value the verdict used (Holm-corrected where noise applies)
    seed: str = ""  # the seed-pair range of the base's noise file, or why there is none

    @property
    def failed(self) -> bool:
        """True when this line fails the gate."""
        return self.status in ("missing", "new_test_set", "regression", "stale")


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


@dataclass(frozen=True)
class GateRule:
    """When a drop fails: params `gate.*`, and the draws behind the paired p-values (`evaluate.*`)."""

    tolerance: float = 0.01
    alpha: float = 0.05
    resamples: int = 10_000
    seed: int = 0
    allow_new_test_set: bool = False


def seed_bound(entry: dict[str, Any] | None, alpha: float, family: int) -> float:
    """The largest drop retraining alone explains for one metric, from its noise entry (0 without one).

    A new run minus the base run, when only the training seed differs, has sd sqrt(2) * sigma, and sigma
    is known only from the N seeds' sd: so the bound is the Student t quantile with N - 1 degrees of
    freedom (a prediction interval: wide for few seeds, as it should be), Bonferroni-corrected over the
    `family` metrics that retraining moves (else some of 40 would cross it by chance on every retrain),
    times sqrt(2) * sd; and never inside the largest difference actually seen between two seeds.
    """
    entry = entry or {}
    diff, runs = entry.get("diff") or {}, len(entry.get("values") or [])
    if not diff.get("pairs") or runs < 2:
        return 0.0
    t = student_t_quantile(1.0 - alpha / max(family, 1), runs - 1)
    return max(t * math.sqrt(2.0) * entry["sd"], -diff["min"], diff["max"])


@dataclass(frozen=True)
class _Gated:
    path: str
    mode: str
    metric: str
    comparison: Comparison
    noise: dict[str, Any] | None  # this metric's entry of the base revision's noise file, if it applies


def decide(
    new: dict[str, dict[str, Any]],
    old: dict[str, dict[str, Any]],
    rule: GateRule = GateRule(),
    noise: dict[str, dict[str, Any]] | None = None,
) -> list[Verdict]:
    """Verdicts for every ranks file, mode and gated metric of `old` (parsed ranks files by path).

    `noise`: the base revision's noise files by category (cliprec.noise). Where one applies (same test
    set), a drop fails only when significant after Holm's correction over every gated metric AND beyond
    what retraining alone produces; elsewhere the stricter rule: uncorrected p < alpha.
    """
    out: list[Verdict] = []
    gated: list[_Gated] = []
    for path in sorted(set(old) | set(new)):
        if path not in new:
            out.append(Verdict(path, "—", "—", "missing", "this evaluation is gone"))
        elif path not in old:
            out.append(Verdict(path, "—", "—", "new", "not at the revision: nothing to compare"))
        elif reason := unpaired_reason(new[path], old[path]):
            status = "new_test_set_allowed" if rule.allow_new_test_set else "new_test_set"
            out.append(Verdict(path, "—", "—", status, reason))
        else:
            entries = _noise_entries(path, old[path], noise or {})
            out.extend(_compare_file(path, new[path], old[path], rule, entries, gated))
    return out + _judge(gated, rule)


def _noise_entries(path: str, old: dict[str, Any], noise: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
    """{mode: {metric: entry}} of this file's variant in its category's noise file, if on its test set."""
    category, variant = Path(path).parent.name, Path(path).name.split(".")[0]
    doc = noise.get(category)
    if not doc or doc.get("test_set") != old.get("test_set"):
        return None
    return (doc.get("variants") or {}).get(variant)


def _compare_file(
    path: str, new: dict, old: dict, rule: GateRule, entries: dict[str, Any] | None, gated: list[_Gated]
) -> Iterator[Verdict]:
    """The file's missing modes/metrics as verdicts; its comparisons appended to `gated` for judging."""
    comparisons = compare_ranks(new, old, rule.resamples, seed=rule.seed)  # the test sets are the same
    for mode in old["ranks"]:
        if mode not in new["ranks"]:
            yield Verdict(path, mode, "—", "missing", "query mode gone")
            continue
        for metric in gated_metrics(old, mode):
            c = comparisons.get(mode, {}).get(metric)  # a mode nobody was asked in: no comparison
            if c is None:
                yield Verdict(path, mode, metric, "missing", f"{metric} no longer computed (evaluate.ks)")
                continue
            entry = None if entries is None else (entries.get(mode) or {}).get(metric)  # None: strict rule
            gated.append(_Gated(path, mode, metric, c, entry))


def gated_metrics(doc: dict[str, Any], mode: str) -> tuple[str, ...]:
    """The relevance metrics the gate tests in one mode of a ranks file: the mode's own (cliprec.graded)."""
    return tuple(mode_metric_names(doc["ranks"][mode], tuple(doc["ks"])))


def _judge(gated: list[_Gated], rule: GateRule) -> list[Verdict]:
    """Each gated comparison's verdict: Holm over the whole family, and the seed bound where known."""
    p_drop = holm([g.comparison.p_drop for g in gated])
    p_gain = holm([g.comparison.p_gain for g in gated])
    family = sum(1 for g in gated if g.noise and (g.noise.get("diff") or {}).get("sd", 0) > 0)
    out = []
    for g, drop_adj, gain_adj in zip(gated, p_drop, p_gain, strict=True):
        c = g.comparison
        if g.noise is None:  # no noise file for this test set: the stricter rule, uncorrected
            bound, p_down, p_up = 0.0, c.p_drop, c.p_gain
        else:
            bound, p_down, p_up = seed_bound(g.noise, rule.alpha, family), float(drop_adj), float(gain_adj)
        limit = max(rule.tolerance, bound)
        if c.better == 0 and c.worse == 0:
            status = "unchanged"
        elif c.value < -limit and p_down < rule.alpha:
            status = "regression"
        elif c.value > limit and p_up < rule.alpha:
            status = "improved"
        else:
            status = "within_noise"
        p = p_down if c.value < 0 else p_up
        out.append(Verdict(g.path, g.mode, g.metric, status, comparison=c, p_corrected=p,
                           seed=_seed_range(g.noise, bound)))  # fmt: skip
    return out


def _seed_range(entry: dict[str, Any] | None, bound: float) -> str:
    if entry is None:
        return "no noise file"
    diff = entry.get("diff") or {}
    if not diff.get("pairs"):
        return "not retrained"
    return f"[{diff['q025']:+.4f}, {diff['q975']:+.4f}] (bound ±{bound:.4f})"


_MARK = {
    "missing": "❌ missing",
    "stale": "❌ metrics file ≠ its per-query file",
    "new_test_set": "❌ NEW TEST SET",
    "new_test_set_allowed": "⚠️ NEW TEST SET (allowed)",
    "regression": "❌ regression",
    "improved": "✅ improved",
    "within_noise": "within noise",
    "unchanged": "unchanged",
    "new": "new",
}


def _rule_text(rule: GateRule, with_noise: bool) -> str:
    if with_noise:
        return (f"a drop > max({rule.tolerance}, what retraining alone explains) with one-sided paired p < "
                f"{rule.alpha} after Holm's correction over every gated metric")  # fmt: skip
    return f"a drop > {rule.tolerance} with one-sided paired p < {rule.alpha}, uncorrected"


def markdown(verdicts: list[Verdict], rev: str, rule: GateRule, noise_note: str = "") -> str:
    """The verdict line, the rule, and a Markdown table of everything that is not unchanged."""
    failed = [v for v in verdicts if v.failed]
    with_noise = any(v.seed not in ("", "no noise file") for v in verdicts)
    head = (
        f"**cliprec gate: FAIL** — {len(failed)} problem(s) vs `{rev}`"
        if failed
        else f"**cliprec gate: PASS** — no significant regression vs `{rev}`"
    )
    lines = [head, "", f"A regression is {_rule_text(rule, with_noise)}."]
    if noise_note:
        lines += ["", noise_note]
    for v in (v for v in verdicts if v.status == "new_test_set_allowed"):
        lines += ["", f"> ⚠️ **NEW TEST SET** in `{v.path}` ({v.detail}): allowed by --allow-new-test-set; "
                  "its metrics are NOT compared with the revision's."]  # fmt: skip
    shown = [v for v in verdicts if v.status != "unchanged"]
    if not shown:
        return "\n".join([*lines, "", "Every per-query rank is unchanged."]) + "\n"
    columns = ["Path", "Mode", "Metric", rev, "workspace", "Change [95% CI]", "p (one-sided)", "corrected p",
               "retraining alone: seed-pair range", "Verdict"]  # fmt: skip
    lines += ["", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for v in sorted(shown, key=lambda v: (not v.failed, v.path, v.mode, v.metric)):
        lines.append(_row(v))
    return "\n".join(lines) + "\n"


def _row(v: Verdict) -> str:
    c = v.comparison
    if c is None:
        return f"| {v.path} | {v.mode} | {v.metric} | | | {v.detail} | | | | {_MARK[v.status]} |"
    p = c.p_drop if c.value < 0 else c.p_gain
    return (
        f"| {v.path} | {v.mode} | {v.metric} | {c.old_mean:.4f} | {c.new_mean:.4f} | {c.value:+.4f} "
        f"[{c.ci_low:+.4f}, {c.ci_high:+.4f}] ({c.better} better, {c.worse} worse of {c.queries}) "
        f"| {p:.4f} | {v.p_corrected:.4f} | {v.seed} | {_MARK[v.status]} |"
    )


def noise_at(rev: str, root: Path) -> dict[str, dict[str, Any]]:
    """The noise files (cliprec.noise) committed at `rev`, by category."""
    files = revision_files(rev, root, NOISE_GLOB)
    return {Path(path).parent.name: json.loads(text) for path, text in files.items()}


def run_gate(
    rev: str = "HEAD",
    rule: GateRule = GateRule(),
    root: str | Path = ".",
    audit_with: EvalSettings | None = None,
) -> tuple[bool, str]:
    """(passed, Markdown report) for the workspace's evaluations against revision `rev`.

    With `audit_with` (the evaluate params), every metrics file must also agree with its per-query file
    (cliprec.audit): a disagreement fails, one line each.
    """
    root = Path(root)
    stale = audit(root, audit_with) if audit_with is not None else []
    old = {p: json.loads(t) for p, t in revision_files(rev, root).items()}
    new = {p: json.loads(t) for p, t in workspace_files(root).items()}
    if not old and not new:
        raise GateError(f"no {METRICS}/{RANKS_GLOB} at {rev} nor in the workspace: run `dvc repro` first")
    noise = noise_at(rev, root)
    verdicts = decide(new, old, rule, noise)
    verdicts += [Verdict(line.split(":", 1)[0], "—", "—", "stale", line.split(": ", 1)[1]) for line in stale]
    passed = not any(v.failed for v in verdicts)
    log.info("gate: %s (%d verdicts vs %s)", "pass" if passed else "FAIL", len(verdicts), rev)
    return passed, markdown(verdicts, rev, rule, _noise_note(old, noise, rev))


def _noise_note(old: dict[str, dict[str, Any]], noise: dict[str, dict[str, Any]], rev: str) -> str:
    """Which categories are judged without training-seed noise, and why."""
    missing = []
    for path, doc in sorted(old.items()):
        category = Path(path).parent.name
        if category not in noise:
            missing.append(f"`{category}` has no {noise_detail_path(category).as_posix()} at `{rev}`")
        elif noise[category].get("test_set") != doc.get("test_set"):
            missing.append(f"`{category}`'s noise file at `{rev}` is for another test set")
    if not missing:
        return "Training-seed noise: from the noise files at the revision (`cliprec noise`)."
    where = "; ".join(dict.fromkeys(missing))
    return (
        f"> ⚠️ Without training-seed noise, so the stricter rule applies there: {where}. "
        "Make one with `cliprec noise --seeds 1 2 3 4` and commit it."
    )


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
