"""`cliprec report`: one Markdown table, category x {zero-shot, LoRA, LoRA+AMP}.

Zero-shot and LoRA come from the workspace metric files (metrics/<cat>/<variant>.json, what the last
`dvc repro` or `dvc exp run` wrote). LoRA+AMP comes from DVC experiments (`dvc exp show --json`): the
newest experiment, derived from the current commit, whose params have `amp: true` and that finished,
or the experiment named by `--from-exp`, which may be derived from an earlier commit (the report then
names that commit: its code and params may differ from the workspace's).
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cliprec import paths
from cliprec.errors import CliprecError

log = logging.getLogger(__name__)

AMP_HINT = "—, run `dvc exp run -S amp=true`"
PARAMS_FILE = "params.yaml"

# (column header, path of keys into a metrics file)
COLUMNS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("avg sim@5 (seed)", ("avg_mean_similarity_at_5",)),
    ("T→I R@1", ("text_to_image", "recall_at_1")),
    ("T→I R@5", ("text_to_image", "recall_at_5")),
    ("T→I R@10", ("text_to_image", "recall_at_10")),
    ("T→I MRR", ("text_to_image", "mrr")),
    ("T→I nDCG@10", ("text_to_image", "ndcg_at_10")),
    ("I→I R@5", ("image_to_image", "recall_at_5")),
    ("T+I→fused R@5", ("multimodal", "recall_at_5")),
    ("gallery", ("text_to_image", "gallery_size")),
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


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as e:
        log.warning("report: %s is not JSON (%s)", path, e)
        return None


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _row(category: str, label: str, metrics: dict[str, Any] | None, missing: str) -> str:
    if metrics is None:
        cells = [missing] + ["—"] * (len(COLUMNS) - 1)
    else:
        cells = [_cell(_dig(metrics, keys)) for _, keys in COLUMNS]
    return f"| {category} | {label} | " + " | ".join(cells) + " |"


def build_report(
    root: str | Path = ".",
    categories: list[str] | None = None,
    from_exp: str | None = None,
    exp_show: Callable[..., list[dict[str, Any]]] = dvc_exp_show,
) -> str:
    """The Markdown report (see the module doc)."""
    root = Path(root)
    params = yaml.safe_load((root / PARAMS_FILE).read_text()) if (root / PARAMS_FILE).is_file() else {}
    params = params or {}
    if categories is None:
        categories = list(params.get("categories") or [])
    if not categories:
        categories = sorted(
            p.name for p in (root / paths.METRICS).glob("*") if p.is_dir() and p.name != "train"
        )
    experiments = parse_experiments(exp_show(root))
    other_baseline = None
    if from_exp:
        exp, other_baseline = _find_anywhere(root, experiments, from_exp, exp_show)
        exp_label = f"exp `{exp.name}`" + (" (LoRA+AMP)" if exp.params.get("amp") is True else "")
    else:
        exp = newest_amp_experiment(experiments)
        exp_label = f"LoRA+AMP (exp `{exp.name}`)" if exp else "LoRA+AMP"

    header = "| Category | Variant | " + " | ".join(name for name, _ in COLUMNS) + " |"
    lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
    for cat in categories:
        for variant, label in (("zeroshot", "zero-shot"), ("lora", "LoRA")):
            metrics = _read_json(root / paths.metrics_path(cat, variant))
            lines.append(_row(cat, label, metrics, "— (run `dvc repro`)"))
        key = paths.metrics_path(cat, "lora").as_posix()
        exp_metrics = exp.metrics.get(key) if exp else None
        lines.append(_row(cat, exp_label, exp_metrics or None, AMP_HINT if exp is None else "— (not in exp)"))

    notes = [
        "",
        "avg sim@5 is the seed project's metric (mean cosine of the top-5 neighbours, the product itself "
        "included): it measures tightness, not relevance. The other columns are exact-search retrieval "
        "metrics on the test split; T→I = summary text → main image, I→I = second image → main image, "
        "T+I→fused = text + second image → fused product vectors.",
    ]
    if params.get("amp") is True:
        notes.append(
            "Note: the workspace params have `amp: true`, so the workspace LoRA row is itself an AMP run."
        )
    if exp is not None:
        notes.append(f"LoRA+AMP row: experiment `{exp.name}` ({exp.rev[:7]}, {exp.timestamp}).")
    if other_baseline is not None:
        notes.append(
            f"That experiment derives from commit {other_baseline}, not the checked-out one: its code and "
            "params may differ from the rows above."
        )
    return "\n".join(lines + notes) + "\n"
