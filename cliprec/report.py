"""`cliprec report`: every metric with its 95 % CI, and paired differences, zero-shot / LoRA / LoRA+AMP.

Zero-shot and LoRA come from the workspace (metrics/<cat>/<variant>.detail.json, every metric with its
CI, and .ranks.json: what the last `dvc repro` or `dvc exp run` wrote; a project evaluated before the
detail files existed has it all in <variant>.json). LoRA+AMP comes from a DVC experiment (`dvc exp show
--json`): the newest experiment derived from the current commit whose params have `amp: true`, or the
one named by `--from-exp`, which may derive from an earlier commit (the report then names that commit:
its code and params may differ). Its detail and per-query ranks are read from the experiment's git
commit (DVC shows only the headline metrics).

Differences are paired over the test queries (cliprec.compare): LoRA - zero-shot, and LoRA+AMP - LoRA
when the experiment used the same test set; a difference is marked significant when its two-sided
permutation p-value is below `gate.alpha`. `--json` prints
`{category: {mode: {metric: {"zeroshot": {value, ci_low, ci_high}, "lora": {...},
"lora_minus_zeroshot": {value, ci_low, ci_high, p_value}, ...}}}}`.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cliprec import paths
from cliprec.compare import UnpairedTestSets, compare_ranks, comparison_doc
from cliprec.errors import CliprecError
from cliprec.git import show
from cliprec.params import load_params
from cliprec.results import read_json, read_metrics

log = logging.getLogger(__name__)

AMP_HINT = "—, run `dvc exp run -S amp=true`"
PARAMS_FILE = "params.yaml"

T2I_METRICS = ("recall_at_1", "recall_at_5", "recall_at_10", "mrr", "ndcg_at_10")
METRICS = (*T2I_METRICS, "recall_at_100", "ndcg_at_100")  # @100: the shopper queries' (cliprec.graded)
MODES = {"text_to_image": "T→I", "image_to_text": "I→T", "image_to_image": "I→I", "multimodal": "T+I→fused",
         "queries": "shopper queries"}  # fmt: skip
LABELS = {"zeroshot": "zero-shot", "lora": "LoRA", "lora_amp": "LoRA+AMP"}
SHORT = {
    "recall_at_1": "R@1",
    "recall_at_5": "R@5",
    "recall_at_10": "R@10",
    "mrr": "MRR",
    "ndcg_at_10": "nDCG@10",
    "recall_at_100": "R@100",
    "ndcg_at_100": "nDCG@100",
}
# (key in the report, new variant, old variant, label)
COMPARISONS = (
    ("lora_minus_zeroshot", "lora", "zeroshot", "LoRA − zero-shot"),
    ("lora_amp_minus_lora", "lora_amp", "lora", "LoRA+AMP − LoRA"),
)
# the value table: (column header, mode or None for a top-level metric, metric)
COLUMNS = (
    *((f"T→I {SHORT[m]}", "text_to_image", m) for m in T2I_METRICS),
    ("I→T R@5", "image_to_text", "recall_at_5"),
    ("I→I R@5", "image_to_image", "recall_at_5"),
    ("T+I→fused R@5", "multimodal", "recall_at_5"),
    ("queries nDCG@10", "queries", "ndcg_at_10"),
    ("sim@5 (seed, w/o self)", None, "avg_mean_similarity_at_5"),
)


class ReportError(CliprecError):
    """The report cannot be made (e.g. --from-exp names no experiment)."""


@dataclass
class Experiment:
    """One finished DVC experiment: name, rev, timestamp, params.yaml data and metrics by file."""

    name: str
    rev: str
    timestamp: str
    params: dict[str, Any]
    metrics: dict[str, dict[str, Any]]


def _dig(data: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def parse_experiments(exp_show: list[dict[str, Any]]) -> list[Experiment]:
    """Finished experiments out of `dvc exp show --json` output (baseline commits themselves excluded)."""
    out = []
    for baseline in exp_show or []:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                data = rev.get("data") or {}
                if rev.get("error") or not data.get("metrics"):
                    continue  # failed, queued or running
                metrics = {p: (m or {}).get("data") or {} for p, m in data["metrics"].items()}
                out.append(
                    Experiment(
                        name=rev.get("name") or exp.get("name") or rev.get("rev", "")[:7],
                        rev=rev.get("rev", ""),
                        timestamp=data.get("timestamp") or "",
                        params=_dig(data, ("params", PARAMS_FILE, "data")) or {},
                        metrics=metrics,
                    )
                )
    return out


def newest_amp_experiment(experiments: list[Experiment]) -> Experiment | None:
    """The newest experiment with `amp: true` in its params, or None."""
    amp = [e for e in experiments if e.params.get("amp") is True]
    return max(amp, key=lambda e: e.timestamp) if amp else None


def find_experiment(experiments: list[Experiment], name: str) -> Experiment:
    """The experiment called `name` (or whose rev starts with it); raises ReportError."""
    for e in experiments:
        if name in (e.name, e.rev) or (len(name) >= 7 and e.rev.startswith(name)):
            return e
    known = ", ".join(sorted(e.name for e in experiments)) or "none"
    raise ReportError(f"no finished experiment named {name!r} (known: {known})")


def dvc_exp_show(root: str | Path = ".", rev: str | None = None) -> list[dict[str, Any]]:
    """`dvc exp show --json [--rev rev]` in root; an empty list (with a warning) when DVC cannot answer."""
    cmd = ["dvc", "exp", "show", "--json", *(["--rev", rev] if rev else [])]
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        log.warning("report: dvc is not installed; no experiments")
        return []
    if proc.returncode != 0:
        log.warning("report: `%s` failed: %s", " ".join(cmd), proc.stderr.strip().splitlines()[-1:] or "")
        return []
    try:
        return json.loads(proc.stdout or "[]")
    except json.JSONDecodeError:
        log.warning("report: `%s` printed no JSON", " ".join(cmd))
        return []


def experiment_baselines(root: str | Path = ".") -> dict[str, str]:
    """Experiment name -> the commit it derives from, over all commits (`dvc exp list --all-commits`)."""
    cmd = ["dvc", "exp", "list", "--all-commits"]
    try:
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return {}
    if proc.returncode != 0:
        log.warning("report: `%s` failed: %s", " ".join(cmd), proc.stderr.strip().splitlines()[-1:] or "")
        return {}
    out, baseline = {}, None
    for line in proc.stdout.splitlines():  # "<baseline>:" then "\t<exp rev> [<name>]" lines
        if line and not line[0].isspace() and line.rstrip().endswith(":"):
            baseline = line.strip().rstrip(":")
        elif baseline and line.strip():
            name = line.strip().split(" ", 1)[-1].strip("[]")
            out[name] = baseline
    return out


def _find_anywhere(
    root: Path, experiments: list[Experiment], name: str, exp_show: Callable[..., list[dict[str, Any]]]
) -> tuple[Experiment, str | None]:
    # (experiment, its baseline commit when that is not the current one)
    try:
        return find_experiment(experiments, name), None
    except ReportError:
        baseline = experiment_baselines(root).get(name)
        if baseline is None:
            raise
        return find_experiment(parse_experiments(exp_show(root, baseline)), name), baseline


def _git_show(root: Path, rev: str, path: Path) -> dict[str, Any] | None:
    """A JSON file at git commit `rev` (an experiment's commit), or None."""
    text = show(root, rev, path)
    return json.loads(text) if text is not None else None


def _value(metrics: dict[str, Any] | None, mode: str | None, metric: str) -> dict[str, Any] | None:
    """{value, ci_low, ci_high} of one metric of a metrics file (CI missing in old files: None)."""
    if metrics is None:
        return None
    block = metrics if mode is None else metrics.get(mode)
    if not isinstance(block, dict) or metric not in block:
        return None
    ci = (block.get(f"{metric}_ci95") if mode is None else (block.get("ci95") or {}).get(metric)) or {}
    return {"value": block[metric], "ci_low": ci.get("low"), "ci_high": ci.get("high")}


@dataclass
class Sources:
    """Where one category's numbers come from: metrics files and per-query ranks per variant."""

    metrics: dict[str, dict[str, Any] | None]
    ranks: dict[str, dict[str, Any] | None]


def _sources(root: Path, cat: str, exp: Experiment | None) -> Sources:
    metrics = {v: read_metrics(root, cat, v) for v in ("zeroshot", "lora")}
    ranks = {v: read_json(root / paths.ranks_path(cat, v)) for v in ("zeroshot", "lora")}
    if exp is not None:
        detail = _git_show(root, exp.rev, paths.metrics_detail_path(cat, "lora")) if exp.rev else None
        metrics["lora_amp"] = detail or exp.metrics.get(paths.metrics_path(cat, "lora").as_posix()) or None
        ranks["lora_amp"] = _git_show(root, exp.rev, paths.ranks_path(cat, "lora")) if exp.rev else None
    return Sources(metrics, ranks)


def _differences(src: Sources, resamples: int, seed: int) -> dict[str, dict[str, dict[str, Any]] | str]:
    """{"lora_minus_zeroshot": {mode: {metric: ...}}, "lora_amp_minus_lora": ...}, or why not."""
    out: dict[str, dict[str, dict[str, Any]] | str] = {}
    for key, new, old, _ in COMPARISONS:
        if old not in src.ranks or new not in src.ranks:
            continue
        if src.ranks[new] is None or src.ranks[old] is None:
            out[key] = "per-query ranks missing (run `dvc repro`)"
            continue
        try:
            out[key] = comparison_doc(compare_ranks(src.ranks[new], src.ranks[old], resamples, seed=seed))
        except UnpairedTestSets as e:
            out[key] = str(e)
    return out


def report_data(
    root: str | Path = ".",
    categories: list[str] | None = None,
    from_exp: str | None = None,
    exp_show: Callable[..., list[dict[str, Any]]] = dvc_exp_show,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the --json report, notes for the Markdown: experiment, baseline, alpha, unpaired reasons)."""
    root = Path(root)
    p = load_params(root / PARAMS_FILE)
    categories = categories or p.categories
    experiments = parse_experiments(exp_show(root))
    other_baseline = None
    if from_exp:
        exp, other_baseline = _find_anywhere(root, experiments, from_exp, exp_show)
    else:
        exp = newest_amp_experiment(experiments)
    report: dict[str, Any] = {}
    unpaired: dict[tuple[str, str], str] = {}
    sources = {cat: _sources(root, cat, exp) for cat in categories}
    for cat, src in sources.items():
        diffs = _differences(src, p.evaluate.resamples, p.seed)
        per_mode: dict[str, Any] = {}
        for mode in MODES:
            per_metric: dict[str, Any] = {}
            for metric in METRICS:
                entry: dict[str, Any] = {}
                for variant, metrics in src.metrics.items():
                    value = _value(metrics, mode, metric)
                    if value is not None:
                        entry[variant] = value
                for key, doc in diffs.items():
                    if isinstance(doc, dict) and metric in doc.get(mode, {}):
                        c = doc[mode][metric]
                        entry[key] = {k: c[k] for k in ("value", "ci_low", "ci_high", "p_value")}
                        entry[key]["significant"] = c["p_value"] < p.gate.alpha
                if entry:
                    per_metric[metric] = entry
            if per_metric:
                per_mode[mode] = per_metric
        report[cat] = per_mode
        unpaired.update({(cat, k): v for k, v in diffs.items() if isinstance(v, str)})
    notes = {"exp": exp, "other_baseline": other_baseline, "alpha": p.gate.alpha, "unpaired": unpaired,
             "amp": p.amp, "sources": sources}  # fmt: skip
    return report, notes


def _ci_cell(v: dict[str, Any] | None) -> str:
    if v is None or v.get("value") is None:
        return "—"
    if v.get("ci_low") is None:
        return f"{v['value']:.3f}"
    return f"{v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"


def _diff_cell(d: dict[str, Any] | None) -> str:
    if d is None:
        return "—"
    mark = (" ▲" if d["value"] > 0 else " ▼") if d["significant"] else ""
    return f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] p={d['p_value']:.3g}{mark}"


def build_report(
    root: str | Path = ".",
    categories: list[str] | None = None,
    from_exp: str | None = None,
    exp_show: Callable[..., list[dict[str, Any]]] = dvc_exp_show,
) -> str:
    """The Markdown report (see the module doc)."""
    report, notes = report_data(root, categories, from_exp, exp_show)
    exp = notes["exp"]
    variants = ["zeroshot", "lora"] + (["lora_amp"] if exp is not None else [])
    lines = ["Values on the test split, with 95 % bootstrap CIs over the queries:", ""]
    lines += ["| Category | Variant | " + " | ".join(c[0] for c in COLUMNS) + " | gallery |"]
    lines += ["|" + "---|" * (len(COLUMNS) + 3)]
    for cat, src in notes["sources"].items():
        for variant in (*variants, *(() if exp else ("amp",))):
            if variant == "amp":
                lines.append(f"| {cat} | LoRA+AMP | {AMP_HINT} |" + " — |" * len(COLUMNS))
                continue
            metrics = src.metrics.get(variant)
            label = LABELS[variant] + (f" (exp `{exp.name}`)" if variant == "lora_amp" else "")
            if metrics is None:
                lines.append(f"| {cat} | {label} | — (run `dvc repro`) |" + " — |" * len(COLUMNS))
                continue
            cells = [_ci_cell(_value(metrics, mode, metric)) for _, mode, metric in COLUMNS]
            gallery = (metrics.get("text_to_image") or {}).get("gallery_size", "—")
            lines.append(f"| {cat} | {label} | " + " | ".join(cells) + f" | {gallery} |")
    lines += ["", f"Paired differences over the same test queries: value [95 % CI], two-sided permutation "
              f"p-value; ▲/▼ = significant at p < {notes['alpha']}:", ""]  # fmt: skip
    lines += ["| Category | Difference | Mode | " + " | ".join(SHORT[m] for m in METRICS) + " |"]
    lines += ["|" + "---|" * (len(METRICS) + 3)]
    for cat, modes in report.items():
        for key, _, _, label in COMPARISONS:
            if (cat, key) in notes["unpaired"]:
                why = notes["unpaired"][(cat, key)]
                lines.append(f"| {cat} | {label} | — | {why} |" + " |" * (len(METRICS) - 1))
                continue
            for mode, short in MODES.items():
                cells = [_diff_cell(modes.get(mode, {}).get(m, {}).get(key)) for m in METRICS]
                if any(c != "—" for c in cells):
                    lines.append(f"| {cat} | {label} | {short} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "T→I = summary text → main image, I→T = main image → summary, I→I = second image → main image, "
        "T+I→fused = text + second image → fused product vectors. sim@5 is the seed project's metric (mean "
        "cosine of the 5 nearest other products): it measures tightness, not relevance.",
    ]
    if notes["amp"]:
        lines.append(
            "Note: the workspace params have `amp: true`, so the workspace LoRA row is itself an AMP run."
        )
    if exp is not None:
        lines.append(f"LoRA+AMP: experiment `{exp.name}` ({exp.rev[:7]}, {exp.timestamp}).")
    if notes["other_baseline"] is not None:
        lines.append(
            f"That experiment derives from commit {notes['other_baseline']}, not the checked-out one: its "
            "code and params may differ from the rows above."
        )
    return "\n".join(lines) + "\n"


def build_report_json(
    root: str | Path = ".",
    categories: list[str] | None = None,
    from_exp: str | None = None,
    exp_show: Callable[..., list[dict[str, Any]]] = dvc_exp_show,
) -> str:
    """`cliprec report --json`: the report's numbers (see the module doc)."""
    return json.dumps(report_data(root, categories, from_exp, exp_show)[0], indent=2) + "\n"
