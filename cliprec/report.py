"""`cliprec report`: every metric with its 95 % CI and seed spread, and paired differences, zero-shot / LoRA /
LoRA+AMP.

Zero-shot and LoRA come from the workspace (metrics/<cat>/<variant>.detail.json, every metric with its
CI, and .ranks.json: what the last `dvc repro` or `dvc exp run` wrote; a project evaluated before the
detail files existed has it all in <variant>.json).

LoRA+AMP is a run with `amp: true`: the newest DVC experiment (`dvc exp show --json`) of the current
commit whose params have it, or the one named by `--from-exp`, which may derive from an earlier commit
(the report then names that commit: its code and params may differ). It is compared with the commit the
experiment derives from (its baseline in `dvc exp show`), not with the workspace: `dvc exp run` applies
the experiment to the workspace, so the workspace *is* the AMP run. `--against <experiment | git rev>`
names another run to compare with; when the workspace itself has `amp: true`, `--against` compares the
workspace with that run. Each run's detail and per-query ranks are read from its git commit (DVC shows
only the headline metrics), and every difference row names its two runs.

Seed spread comes from metrics/<cat>/noise.detail.json (written by `cliprec noise`): for each value the
mean ± sd over the training seeds, for LoRA - zero-shot the seeds' mean ± sd of the gain, and for
LoRA+AMP - LoRA the 95 % range of what retraining alone moves a metric by (a difference inside it is
no AMP effect).

Differences are paired over the test queries (cliprec.compare): LoRA - zero-shot, and LoRA+AMP - LoRA
when both runs used the same test set. Each comparison is one family of tests (all categories x modes x
metrics): a difference is marked significant when its Holm-adjusted two-sided permutation p-value is
below `gate.alpha`. `--json` prints `{category: {mode: {metric: {"zeroshot": {value, ci_low, ci_high},
"lora": {..., "seeds": {n, mean, sd, min, max}}, "lora_minus_zeroshot": {value, ci_low, ci_high, p_value,
p_holm, significant, between, seeds}, "lora_amp_minus_lora": {..., retrain, inside_retrain_range}}}}}`.
"""

from __future__ import annotations

import json
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cliprec import paths
from cliprec.compare import UnpairedTestSets, compare_ranks, comparison_doc
from cliprec.errors import CliprecError
from cliprec.git import git, show
from cliprec.params import load_params
from cliprec.results import read_json, read_metrics
from cliprec.stats import holm

log = logging.getLogger(__name__)

AMP_HINT = "—, run `dvc exp run -S amp=true`"
NOISE_HINT = "`cliprec noise --seeds 1 2 3 4`"
PARAMS_FILE = "params.yaml"

T2I_METRICS = ("recall_at_1", "recall_at_5", "recall_at_10", "mrr", "ndcg_at_10")
METRICS = (*T2I_METRICS, "recall_at_100", "ndcg_at_100")  # @100: the shopper queries' (cliprec.graded)
MODES = {"text_to_image": "T→I", "image_to_text": "I→T", "image_to_image": "I→I", "multimodal": "T+I→fused",
         "queries": "shopper queries"}  # fmt: skip
LABELS = {"zeroshot": "zero-shot", "lora": "LoRA", "lora_amp": "LoRA+AMP", "lora_base": "LoRA"}
SHORT = {
    "recall_at_1": "R@1",
    "recall_at_5": "R@5",
    "recall_at_10": "R@10",
    "mrr": "MRR",
    "ndcg_at_10": "nDCG@10",
    "recall_at_100": "R@100",
    "ndcg_at_100": "nDCG@100",
}
# (key in the report, new variant, old variant)
COMPARISONS = (("lora_minus_zeroshot", "lora", "zeroshot"), ("lora_amp_minus_lora", "lora_amp", "lora_base"))
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
    """A finished DVC experiment: name, rev, timestamp, params.yaml data, metrics by file, baseline commit."""

    name: str
    rev: str
    timestamp: str
    params: dict[str, Any]
    metrics: dict[str, dict[str, Any]]
    baseline: str = ""


@dataclass(eq=False)
class Run:
    """One evaluated run the report reads: the workspace, a DVC experiment or a git commit."""

    kind: str  # "workspace" | "exp" | "commit"
    rev: str = ""  # its git commit ("" for the workspace)
    name: str = ""  # the experiment's name
    shown: dict[str, dict[str, Any]] = field(default_factory=dict)  # an experiment's metrics per `exp show`

    def describe(self) -> str:
        """How the report names it: "workspace", "exp `x`, abc1234" or "commit abc1234"."""
        if self.kind == "workspace":
            return "workspace"
        return f"exp `{self.name}`, {self.rev[:7]}" if self.kind == "exp" else f"commit {self.rev[:7]}"

    def read(self, root: Path, path: Path) -> Any:
        """A JSON file of this run: from the workspace or from its git commit; None when absent."""
        if self.kind == "workspace":
            return read_json(root / path)
        text = show(root, self.rev, path) if self.rev else None
        try:
            return json.loads(text) if text is not None else None
        except ValueError:
            log.warning("report: %s at %s is not JSON", path, self.rev[:7])
            return None

    def as_dict(self) -> dict[str, str]:
        """The --json form: {"run": describe(), "rev": commit or "workspace"}."""
        return {"run": self.describe(), "rev": self.rev or "workspace"}


WORKSPACE = Run("workspace")


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
                        baseline=baseline.get("rev", ""),
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


def _exp_run(exp: Experiment) -> Run:
    return Run("exp", exp.rev, exp.name, exp.metrics)


def _against_run(
    root: Path, experiments: list[Experiment], name: str, exp_show: Callable[..., list[dict[str, Any]]]
) -> Run:
    """`--against NAME`: a DVC experiment of that name, else a git revision; ReportError when neither."""
    try:
        return _exp_run(_find_anywhere(root, experiments, name, exp_show)[0])
    except ReportError:
        pass
    done = git(root, "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}")
    if done.returncode != 0:
        raise ReportError(f"--against {name!r} names no finished experiment and no git revision")
    return Run("commit", done.stdout.strip())


def _run_amp(root: Path, run: Run) -> bool | None:
    """A run's `amp` param (None when its params.yaml is unreadable or, being older, has no `amp`)."""
    text = (root / PARAMS_FILE).read_text() if run.kind == "workspace" else show(root, run.rev, PARAMS_FILE)
    try:
        return (yaml.safe_load(text) or {}).get("amp") if text else None
    except yaml.YAMLError:
        return None


@dataclass
class AmpPair:
    """The AMP comparison: the AMP run, the run it is compared with, and what the report must say about it."""

    new: Run | None = None
    old: Run | None = None
    notes: list[str] = field(default_factory=list)


def _amp_new(root: Path, experiments: list[Experiment], from_exp: str | None, exp_show: Callable) -> AmpPair:
    """The AMP run (--from-exp, else the newest AMP experiment); its baseline commit as the old run."""
    if from_exp:
        exp, other = _find_anywhere(root, experiments, from_exp, exp_show)
        pair = AmpPair(_exp_run(exp), Run("commit", exp.baseline) if exp.baseline else None)
        if exp.params.get("amp") is not True:
            pair.notes.append(f"Experiment `{exp.name}` does not have `amp: true`: its rows are no AMP run.")
        if other is not None:
            pair.notes.append(
                f"That experiment derives from commit {other}, not the checked-out one: its code and params "
                "may differ from the workspace rows."
            )
        return pair
    exp = newest_amp_experiment(experiments)
    return AmpPair(_exp_run(exp), Run("commit", exp.baseline) if exp.baseline else None) if exp else AmpPair()


def amp_pair(
    root: Path, workspace_amp: bool, names: tuple[str | None, str | None], exp_show: Callable
) -> AmpPair:
    """Which two runs LoRA+AMP − LoRA is between; `names` = (--from-exp, --against)."""
    from_exp, against = names
    experiments = parse_experiments(exp_show(root))
    pair = _amp_new(root, experiments, from_exp, exp_show)
    if pair.new is None and workspace_amp and against:
        pair.new = WORKSPACE
    if pair.new is None and against:
        raise ReportError(
            f"--against {against}: no AMP run to compare with it (no `amp: true` experiment, and the "
            "workspace has `amp: false`)"
        )
    if pair.new is None:
        if workspace_amp:
            pair.notes.append(
                "The workspace params have `amp: true`, and no AMP experiment was found: there is no "
                "fp32 run to compare with, so no LoRA+AMP − LoRA difference is shown (name one with "
                "`--against REV`)."
            )
        return pair
    if against:
        pair.old = _against_run(root, experiments, against, exp_show)
    if pair.old is None:
        pair.notes.append(
            f"{pair.new.describe()}: its baseline commit is unknown; name one with `--against`."
        )
    elif pair.old.rev == pair.new.rev:
        raise ReportError(f"--against names the AMP run itself ({pair.new.describe()})")
    elif _run_amp(root, pair.old) is True:
        pair.notes.append(
            f"The run LoRA+AMP is compared with ({pair.old.describe()}) has `amp: true` too: that difference "
            "is not AMP against fp32."
        )
    return pair


@dataclass
class Sources:
    """Where one category's numbers come from: metrics files, per-query ranks and the run per variant."""

    metrics: dict[str, dict[str, Any] | None]
    ranks: dict[str, dict[str, Any] | None]
    runs: dict[str, Run]


def _run_metrics(root: Path, cat: str, run: Run) -> dict[str, Any] | None:
    if run.kind == "workspace":
        return read_metrics(root, cat, "lora")
    headline = paths.metrics_path(cat, "lora")
    detail = run.read(root, paths.metrics_detail_path(cat, "lora")) or run.read(root, headline)
    return detail or run.shown.get(headline.as_posix()) or None


def _sources(root: Path, cat: str, pair: AmpPair) -> Sources:
    runs = {"zeroshot": WORKSPACE, "lora": WORKSPACE}
    metrics = {v: read_metrics(root, cat, v) for v in runs}
    ranks = {v: read_json(root / paths.ranks_path(cat, v)) for v in runs}
    for variant, run in (("lora_amp", pair.new), ("lora_base", pair.old)):
        if run is not None:
            runs[variant] = run
            metrics[variant] = _run_metrics(root, cat, run)
            ranks[variant] = run.read(root, paths.ranks_path(cat, "lora"))
    return Sources(metrics, ranks, runs)


def _differences(src: Sources, resamples: int, seed: int) -> dict[str, dict[str, dict[str, Any]] | str]:
    """{"lora_minus_zeroshot": {mode: {metric: ...}}, "lora_amp_minus_lora": ...}, or why not."""
    out: dict[str, dict[str, dict[str, Any]] | str] = {}
    for key, new, old in COMPARISONS:
        if old not in src.ranks or new not in src.ranks:
            continue
        if src.ranks[new] is None or src.ranks[old] is None:
            missing = [src.runs[v].describe() for v in (new, old) if src.ranks[v] is None]
            out[key] = f"per-query ranks missing in {' and '.join(missing)} (run `dvc repro`)"
            continue
        try:
            out[key] = comparison_doc(compare_ranks(src.ranks[new], src.ranks[old], resamples, seed=seed))
        except UnpairedTestSets as e:
            out[key] = str(e)
    return out


# --- training-seed noise (metrics/<cat>/noise.detail.json, written by `cliprec noise`) -----------------


def _noise(root: Path, cat: str, ranks: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str | None]:
    """(the category's noise file, or None; why it is not used, when it exists but does not fit)."""
    doc = read_json(root / paths.noise_detail_path(cat))
    if doc is None:
        return None, None
    if not isinstance(doc, dict) or not isinstance(doc.get("variants"), dict):
        return None, f"{paths.noise_detail_path(cat)} has no `variants`: rerun {NOISE_HINT}"
    digest = _dig(doc, ("test_set", "ids_sha256"))
    if ranks is not None and digest != _dig(ranks, ("test_set", "ids_sha256")):
        return None, f"{paths.noise_detail_path(cat)} was measured on another test set: rerun {NOISE_HINT}"
    return doc, None


def _spread(block: Any) -> dict[str, Any] | None:
    """{n, mean, sd, min, max} of a noise file's {values, mean, sd, min, max}, or None."""
    if not isinstance(block, dict) or "mean" not in block:
        return None
    return {"n": len(block.get("values") or []), **{k: block.get(k) for k in ("mean", "sd", "min", "max")}}


def _noise_block(noise: dict[str, Any] | None, keys: tuple[str, ...], mode: str | None, metric: str) -> Any:
    if noise is None:
        return None
    return _dig(noise, (*keys, metric) if mode is None else (*keys, mode, metric))


def _add_noise(entry: dict[str, Any], noise: dict[str, Any] | None, mode: str, metric: str) -> None:
    """Seed spreads into one metric's entry: values, the LoRA gain, and the retraining range for AMP."""
    for variant in ("zeroshot", "lora"):
        spread = _spread(_noise_block(noise, ("variants", variant), mode, metric))
        if spread and variant in entry:
            entry[variant]["seeds"] = spread
    gain = _spread(_noise_block(noise, ("lora_minus_zeroshot",), mode, metric))
    if gain and "lora_minus_zeroshot" in entry:
        entry["lora_minus_zeroshot"]["seeds"] = gain
    d = _noise_block(noise, ("variants", "lora"), mode, metric)
    d = d.get("diff") if isinstance(d, dict) else None
    amp = entry.get("lora_amp_minus_lora")
    if isinstance(d, dict) and d.get("q025") is not None and amp is not None:
        amp["retrain"] = {k: d.get(k) for k in ("pairs", "sd", "q025", "q975")}
        amp["inside_retrain_range"] = bool(d["q025"] <= amp["value"] <= d["q975"])


# --- the report's numbers ---------------------------------------------------------------------------------


def _value(metrics: dict[str, Any] | None, mode: str | None, metric: str) -> dict[str, Any] | None:
    """{value, ci_low, ci_high} of one metric of a metrics file (CI missing in old files: None)."""
    if metrics is None:
        return None
    block = metrics if mode is None else metrics.get(mode)
    if not isinstance(block, dict) or metric not in block:
        return None
    ci = (block.get(f"{metric}_ci95") if mode is None else (block.get("ci95") or {}).get(metric)) or {}
    return {"value": block[metric], "ci_low": ci.get("low"), "ci_high": ci.get("high")}


def _entry(src: Sources, diffs: dict[str, Any], mode: str, metric: str) -> dict[str, Any]:
    """One metric of one mode: every variant's value and every paired difference, with its two runs."""
    entry: dict[str, Any] = {}
    for variant, metrics in src.metrics.items():
        value = _value(metrics, mode, metric)
        if value is not None:
            entry[variant] = value
    for key, new, old in COMPARISONS:
        doc = diffs.get(key)
        if isinstance(doc, dict) and metric in doc.get(mode, {}):
            c = doc[mode][metric]
            entry[key] = {k: c[k] for k in ("value", "ci_low", "ci_high", "p_value")}
            entry[key]["between"] = {"new": src.runs[new].as_dict(), "old": src.runs[old].as_dict()}
    return entry


def _correct(report: dict[str, Any], alpha: float) -> dict[str, int]:
    """Holm over each comparison's family (all categories x modes x metrics): p_holm and significant."""
    sizes = {}
    for key, _, _ in COMPARISONS:
        family = [
            e[key] for modes in report.values() for per in modes.values() for e in per.values() if key in e
        ]
        for d, adjusted in zip(family, holm([d["p_value"] for d in family]), strict=True):
            d["p_holm"] = float(adjusted)
            d["significant"] = bool(adjusted < alpha)
        sizes[key] = len(family)
    return sizes


def report_data(
    root: str | Path = ".",
    categories: list[str] | None = None,
    from_exp: str | None = None,
    exp_show: Callable[..., list[dict[str, Any]]] = dvc_exp_show,
    against: str | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the --json report, notes for the Markdown: the AMP pair, alpha, family sizes, unpaired reasons)."""
    root = Path(root)
    p = load_params(root / PARAMS_FILE)
    pair = amp_pair(root, p.amp, (from_exp, against), exp_show)
    report: dict[str, Any] = {}
    unpaired: dict[tuple[str, str], str] = {}
    sources = {cat: _sources(root, cat, pair) for cat in categories or p.categories}
    noise = {cat: _noise(root, cat, src.ranks.get("lora")) for cat, src in sources.items()}
    for cat, src in sources.items():
        diffs = _differences(src, p.evaluate.resamples, p.evaluate.seed)
        per_mode: dict[str, Any] = {}
        for mode in MODES:
            per_metric = {metric: _entry(src, diffs, mode, metric) for metric in METRICS}
            for metric, entry in per_metric.items():
                _add_noise(entry, noise[cat][0], mode, metric)
            if any(per_metric.values()):
                per_mode[mode] = {m: e for m, e in per_metric.items() if e}
        report[cat] = per_mode
        unpaired.update({(cat, k): v for k, v in diffs.items() if isinstance(v, str)})
    notes = {"pair": pair, "alpha": p.gate.alpha, "unpaired": unpaired, "amp": p.amp, "sources": sources,
             "noise": noise, "family": _correct(report, p.gate.alpha)}  # fmt: skip
    return report, notes


# --- Markdown ---------------------------------------------------------------------------------------------


def _ci_cell(v: dict[str, Any] | None) -> str:
    if v is None or v.get("value") is None:
        return "—"
    if v.get("ci_low") is None:
        return f"{v['value']:.3f}"
    return f"{v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"


def _seed_cell(spread: dict[str, Any] | None, sign: str = "") -> str:
    if not spread or spread.get("mean") is None:
        return "—"
    return f"{spread['mean']:{sign}.3f} ± {spread['sd']:.3f}"


def _diff_cell(d: dict[str, Any] | None) -> str:
    if d is None:
        return "—"
    mark = (" ▲" if d["value"] > 0 else " ▼") if d["significant"] else ""
    return (
        f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] "
        f"p={d['p_value']:.2g} (Holm {d['p_holm']:.2g}){mark}"
    )


def _range_cell(d: dict[str, Any] | None) -> str:
    r = (d or {}).get("retrain")
    return "—" if not r else f"{r['q025']:+.3f}..{r['q975']:+.3f}"


def _seeds_label(noise: dict[str, Any] | None) -> str:
    return f"{len(noise.get('seeds') or [])} training seeds" if noise else "training seeds"


def _value_rows(cat: str, src: Sources, noise: dict[str, Any] | None) -> list[str]:
    """One category's rows of the value table; under LoRA, its mean ± sd over training seeds."""
    lines = []
    for variant in ("zeroshot", "lora", "lora_amp", "lora_base"):
        if variant not in src.metrics:
            continue
        metrics = src.metrics[variant]
        run = src.runs[variant]
        label = LABELS[variant] + ("" if run.kind == "workspace" else f" ({run.describe()})")
        if metrics is None:
            lines.append(f"| {cat} | {label} | — (run `dvc repro`) |" + " — |" * len(COLUMNS))
        else:
            cells = [_ci_cell(_value(metrics, mode, metric)) for _, mode, metric in COLUMNS]
            gallery = (metrics.get("text_to_image") or {}).get("gallery_size", "—")
            lines.append(f"| {cat} | {label} | " + " | ".join(cells) + f" | {gallery} |")
        if variant == "lora":
            spreads = [_spread(_noise_block(noise, ("variants", "lora"), m, k)) for _, m, k in COLUMNS]
            cells = [_seed_cell(s) for s in spreads]
            lines.append(f"| {cat} | LoRA, {_seeds_label(noise)} | " + " | ".join(cells) + " | |")
    if "lora_amp" not in src.metrics:
        lines.append(f"| {cat} | LoRA+AMP | {AMP_HINT} |" + " — |" * len(COLUMNS))
    return lines


def _comparison_label(src: Sources, key: str) -> str:
    _, new, old = next(c for c in COMPARISONS if c[0] == key)
    if key == "lora_minus_zeroshot":
        return "LoRA − zero-shot (workspace)"
    return f"{LABELS[new]} ({src.runs[new].describe()}) − {LABELS[old]} ({src.runs[old].describe()})"


def _noise_row(
    cat: str, key: str, short: str, diffs: list[dict[str, Any] | None], noise: dict[str, Any]
) -> str:
    """The row under a difference: the seeds' mean ± sd of the LoRA gain, or retraining's range for AMP."""
    if key == "lora_minus_zeroshot":
        label, cells = (
            f"↳ {_seeds_label(noise)}, mean ± sd",
            [_seed_cell((d or {}).get("seeds"), "+") for d in diffs],
        )
    else:
        label, cells = "↳ retraining alone, 95 % range", [_range_cell(d) for d in diffs]
    return f"| {cat} | {label} | {short} | " + " | ".join(cells) + " |"


def _diff_rows(cat: str, modes: dict[str, Any], notes: dict[str, Any]) -> list[str]:
    """One category's rows of the difference table, each followed by what retraining alone does."""
    src, noise = notes["sources"][cat], notes["noise"][cat][0]
    lines = []
    for key, _, _ in COMPARISONS:
        if key == "lora_amp_minus_lora" and "lora_base" not in src.runs:
            continue
        label = _comparison_label(src, key)
        if (cat, key) in notes["unpaired"]:
            why = notes["unpaired"][(cat, key)]
            lines.append(f"| {cat} | {label} | — | {why} |" + " |" * (len(METRICS) - 1))
            continue
        for mode, short in MODES.items():
            diffs = [modes.get(mode, {}).get(m, {}).get(key) for m in METRICS]
            if all(d is None for d in diffs):
                continue
            lines.append(f"| {cat} | {label} | {short} | " + " | ".join(_diff_cell(d) for d in diffs) + " |")
            if noise is not None:  # else the value table's seed row says "—", and a note how to measure it
                lines.append(_noise_row(cat, key, short, diffs, noise))
    return lines


def _family_note(notes: dict[str, Any], categories: str) -> str:
    sizes = notes["family"]
    parts = [f"{lab} over its {sizes[key]} differences" for key, lab in
             (("lora_minus_zeroshot", "LoRA − zero-shot"), ("lora_amp_minus_lora", "LoRA+AMP − LoRA"))
             if sizes.get(key)]  # fmt: skip
    return (
        f"▲/▼ = significant after Holm's correction within each comparison's family of tests (its "
        f"{categories} × modes × metrics: {'; '.join(parts) or 'none'}) at adjusted "
        f"p < {notes['alpha']}; p is the raw two-sided permutation p-value, Holm the adjusted one."
    )


def _noise_notes(notes: dict[str, Any]) -> list[str]:
    lines = []
    missing = [cat for cat, (doc, why) in notes["noise"].items() if doc is None and why is None]
    if missing:
        lines.append(
            f"Seed spread: no {paths.noise_detail_path('<cat>')} for {', '.join(missing)} (—): "
            f"make it with {NOISE_HINT}."
        )
    lines += [f"Seed spread: {why}." for _, why in notes["noise"].values() if why]
    for cat, (doc, _) in notes["noise"].items():
        if doc is not None:
            lines.append(
                f"Seed spread ({cat}): mean ± sd over training seeds {doc.get('seeds')}, retrained "
                f"from commit {str(doc.get('base', '?'))[:7]} on the same data "
                f"({paths.noise_detail_path(cat)}); "
                "zero-shot does not depend on the training seed. A LoRA+AMP − LoRA difference inside "
                "retraining's 95 % range (LoRA − LoRA over pairs of seeds) is no AMP effect."
            )
    return lines


def _amp_notes(notes: dict[str, Any]) -> list[str]:
    pair: AmpPair = notes["pair"]
    lines = []
    if notes["amp"] and pair.new is not WORKSPACE:
        lines.append(
            "Note: the workspace params have `amp: true`, so the workspace LoRA row is itself an AMP run."
        )
    if pair.new is not None and pair.old is not None:
        lines.append(f"LoRA+AMP − LoRA is between {pair.new.describe()} (AMP) and {pair.old.describe()}.")
    return lines + pair.notes


def build_report(
    root: str | Path = ".",
    categories: list[str] | None = None,
    from_exp: str | None = None,
    exp_show: Callable[..., list[dict[str, Any]]] = dvc_exp_show,
    against: str | None = None,
) -> str:
    """The Markdown report (see the module doc)."""
    report, notes = report_data(root, categories, from_exp, exp_show, against)
    lines = ["Values on the test split, with 95 % bootstrap CIs over the queries, and under LoRA its mean "
             "± sd over training seeds (what a retrain would show):", ""]  # fmt: skip
    lines += ["| Category | Variant | " + " | ".join(c[0] for c in COLUMNS) + " | gallery |"]
    lines += ["|" + "---|" * (len(COLUMNS) + 3)]
    for cat, src in notes["sources"].items():
        lines += _value_rows(cat, src, notes["noise"][cat][0])
    lines += ["", "Paired differences over the same test queries: value [95 % CI], two-sided permutation "
              "p-value (Holm-adjusted in brackets); under each, what retraining alone shows:",
              ""]  # fmt: skip
    lines += ["| Category | Difference | Mode | " + " | ".join(SHORT[m] for m in METRICS) + " |"]
    lines += ["|" + "---|" * (len(METRICS) + 3)]
    for cat, modes in report.items():
        lines += _diff_rows(cat, modes, notes)
    lines += [
        "",
        _family_note(notes, f"{len(report)} categor{'y' if len(report) == 1 else 'ies'}"),
        "T→I = summary text → main image, I→T = main image → summary, I→I = second image → main image, "
        "T+I→fused = text + second image → fused product vectors. sim@5 is the seed project's metric (mean "
        "cosine of the 5 nearest other products): it measures tightness, not relevance.",
        *_noise_notes(notes),
        *_amp_notes(notes),
    ]
    return "\n".join(lines) + "\n"


def build_report_json(
    root: str | Path = ".",
    categories: list[str] | None = None,
    from_exp: str | None = None,
    exp_show: Callable[..., list[dict[str, Any]]] = dvc_exp_show,
    against: str | None = None,
) -> str:
    """`cliprec report --json`: the report's numbers (see the module doc)."""
    return json.dumps(report_data(root, categories, from_exp, exp_show, against)[0], indent=2) + "\n"
