"""`cliprec noise`: how far retraining alone moves every metric, measured by retraining with other seeds.

A LoRA run's metrics depend on its training seed (adapter init, batch order, dropout) as well as on the
test queries. The gate and the results table need the first source too, so this module retrains with N
training seeds on the same data and test set, as DVC experiments (`dvc exp run --temp -S seed=<s>`: the
stages that read `seed` rerun, everything upstream is reused from DVC's cache), and summarises, per
category, variant, query mode and metric:

- `values`: the metric of each seed's run (the committed run first), their mean, sd, min and max;
- `diff`: every ordered pair of seeds' difference: what a change that only redraws training moves the
  metric by. The gate fails a drop only beyond this range (cliprec.gate).

Written to `metrics/<cat>/noise.detail.json` (everything) and `metrics/<cat>/noise.json` (its headline: a
DVC metrics file declared at the top of dvc.yaml). Each file names the commit the seeds were retrained
from, each seed's experiment commit and the test set's digest: the gate uses a noise file only on that
test set. `--exps` collects experiments made another way, e.g. with the queue (docs/metrics.md).
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from cliprec import paths
from cliprec.artifacts import write_json
from cliprec.compare import unpaired_reason
from cliprec.errors import CliprecError
from cliprec.git import commit_of, git, head_commit, show
from cliprec.graded import mode_values

log = logging.getLogger(__name__)

VARIANTS = ("zeroshot", "lora")
# noise.json, the DVC metrics file: few keys, so that `dvc exp show` stays narrow
HEADLINE = (("lora", "text_to_image", "recall_at_5", "seeds_lora_t2i_r5"),)


class NoiseError(CliprecError):
    """The seeds cannot be retrained or collected (dirty tree, failed experiment, other test set, ...)."""


@dataclass
class Runs:
    """The runs to summarise: training seed -> git commit holding that run's metrics/ files."""

    base: str
    by_seed: dict[int, str] = field(default_factory=dict)
    names: dict[int, str] = field(default_factory=dict)


def experiment_ref(root: Path, base: str, name: str) -> str | None:
    """The commit of DVC experiment `name` derived from `base` (its git ref), or None."""
    return commit_of(root, f"refs/exps/{base[:2]}/{base[2:]}/{name}")


def _require_clean(root: Path) -> None:
    done = git(root, "status", "--porcelain", "--untracked-files=no")
    if done.returncode != 0:
        raise NoiseError(f"{root} is not a git repository: the seeds are retrained from a commit")
    if done.stdout.strip():
        first = done.stdout.splitlines()[0].strip()
        raise NoiseError(
            f"uncommitted changes ({first}, ...): commit first, so that every seed runs the committed code, "
            "data and params"
        )


def dvc_exp_run(root: Path, overrides: list[str], name: str, log_path: Path) -> None:
    """`dvc exp run --temp -n name -S override...` (e.g. seed=3); its output goes to log_path."""
    cmd = ["dvc", "exp", "run", "--temp", "-n", name, *(a for o in overrides for a in ("-S", o))]
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as out:
        try:
            done = subprocess.run(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, check=False)
        except FileNotFoundError:
            raise NoiseError("dvc is not installed (pip install -r requirements.txt)") from None
    if done.returncode != 0:
        raise NoiseError(f"`{' '.join(cmd)}` failed (exit {done.returncode}): see {log_path}")


def retrain(root: str | Path, seeds: Iterable[int], base_seed: int, prefix: str = "seed") -> Runs:
    """Retrain with each seed (reusing an experiment of that name made from HEAD): the runs by seed."""
    root = Path(root)
    _require_clean(root)
    base = head_commit(root)
    if base is None:
        raise NoiseError(f"{root}: no git commit to retrain from")
    runs = Runs(base, {base_seed: base}, {base_seed: f"commit {base[:7]}"})
    todo = [s for s in dict.fromkeys(seeds) if s != base_seed]
    for seed in tqdm(todo, desc="training seeds", unit="seed"):
        name = f"{prefix}-{seed}"
        rev = experiment_ref(root, base, name)
        if rev is None:
            started = time.perf_counter()
            dvc_exp_run(root, [f"seed={seed}"], name, root / "data" / "runs" / "noise" / f"{name}.log")
            rev = experiment_ref(root, base, name)
            if rev is None:
                raise NoiseError(
                    f"experiment {name} finished but has no ref under refs/exps: see dvc exp list"
                )
            log.info(
                "seed %d: experiment %s (%s) in %.0f s", seed, name, rev[:7], time.perf_counter() - started
            )
        else:
            log.info("seed %d: reusing experiment %s (%s)", seed, name, rev[:7])
        runs.by_seed[seed], runs.names[seed] = rev, f"exp {name}"
    return runs


def collect(root: str | Path, exps: Iterable[str], base_seed: int) -> Runs:
    """Runs from experiments made elsewhere (e.g. the queue), each named by `dvc exp` name or commit."""
    root = Path(root)
    base = head_commit(root)
    if base is None:
        raise NoiseError(f"{root}: no git commit")
    runs = Runs(base, {base_seed: base}, {base_seed: f"commit {base[:7]}"})
    for name in exps:
        rev = experiment_ref(root, base, name) or _commit(root, name)
        text = show(root, rev, "params.yaml")
        seed = _seed_of(text, name)
        if seed in runs.by_seed:
            raise NoiseError(f"{name}: training seed {seed} is already among the runs ({runs.names[seed]})")
        runs.by_seed[seed], runs.names[seed] = rev, f"exp {name}"
    return runs


def _commit(root: Path, name: str) -> str:
    rev = commit_of(root, name)
    if rev is None:
        raise NoiseError(f"{name!r} is neither an experiment of HEAD (dvc exp list) nor a git commit")
    return rev


def _seed_of(params_text: str | None, name: str) -> int:
    import yaml

    try:
        seed = (yaml.safe_load(params_text or "") or {}).get("seed")
    except yaml.YAMLError:
        seed = None
    if not isinstance(seed, int):
        raise NoiseError(f"{name}: its params.yaml has no integer `seed`")
    return seed


# --- summarising ----------------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, Any]:
    a = np.asarray(values, dtype=np.float64)
    sd = float(a.std(ddof=1)) if len(a) > 1 else 0.0
    return {"values": [round(float(v), 6) for v in a], "mean": round(float(a.mean()), 6),
            "sd": round(sd, 6), "min": round(float(a.min()), 6), "max": round(float(a.max()), 6)}  # fmt: skip


def _pair_spread(values: list[float]) -> dict[str, Any]:
    """The differences of every ordered pair of runs: what retraining alone moves the metric by."""
    diffs = np.array([a - b for a, b in itertools.permutations(values, 2)], dtype=np.float64)
    if len(diffs) == 0:
        return {"pairs": 0}
    q025, q975 = np.quantile(diffs, [0.025, 0.975])
    return {"pairs": int(len(diffs)), "sd": round(float(diffs.std(ddof=1)), 6) if len(diffs) > 1 else 0.0,
            "q025": round(float(q025), 6), "q975": round(float(q975), 6),
            "min": round(float(diffs.min()), 6), "max": round(float(diffs.max()), 6)}  # fmt: skip


def run_means(doc: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{mode: {metric: mean over the mode's queries}} of one ranks file."""
    ks = tuple(doc["ks"])
    out = {}
    for mode, entries in doc["ranks"].items():
        values = mode_values([e for e in entries if e is not None], ks)
        out[mode] = {m: float(v.mean()) if len(v) else 0.0 for m, v in values.items()}
    return out


def summarise(category: str, docs: dict[int, dict[str, dict[str, Any]]], runs: Runs) -> dict[str, Any]:
    """noise.detail.json of one category from {seed: {variant: ranks file}}; NoiseError if not paired."""
    seeds = list(docs)
    first = docs[seeds[0]]["lora"]
    for seed in seeds[1:]:
        for variant in VARIANTS:
            reason = unpaired_reason(docs[seed][variant], first)
            if reason:
                raise NoiseError(
                    f"{category}: seed {seed} ({runs.names[seed]}) is on another test set: {reason}"
                )
    means = {s: {v: run_means(docs[s][v]) for v in VARIANTS} for s in seeds}
    layout = means[seeds[0]]["lora"]  # {mode: {metric: ...}}: the same in every run (same test set, ks)

    def over_seeds(value) -> dict[str, dict[str, list[float]]]:
        return {
            mode: {m: [value(means[s], mode, m) for s in seeds] for m in ms} for mode, ms in layout.items()
        }

    variants = {}
    for variant in VARIANTS:
        per_seed = over_seeds(lambda run, mode, m, v=variant: run[v][mode][m])
        variants[variant] = {
            mode: {m: {**_spread(vals), "diff": _pair_spread(vals)} for m, vals in ms.items()}
            for mode, ms in per_seed.items()
        }
    gains = over_seeds(lambda run, mode, m: run["lora"][mode][m] - run["zeroshot"][mode][m])
    gain = {mode: {m: _spread(vals) for m, vals in ms.items()} for mode, ms in gains.items()}
    return {
        "category": category,
        "seeds": seeds,
        "runs": {str(s): runs.by_seed[s] for s in seeds},
        "run_names": {str(s): runs.names[s] for s in seeds},
        "base": runs.base,
        "test_set": first["test_set"],
        "variants": variants,
        "lora_minus_zeroshot": gain,
    }


def headline(doc: dict[str, Any]) -> dict[str, Any]:
    """noise.json: {category: {seeds, seeds_lora_t2i_r5_sd, seeds_lora_t2i_r5_diff_q025}}."""
    values: dict[str, Any] = {"seeds": len(doc["seeds"])}
    for variant, mode, metric, key in HEADLINE:
        entry = doc["variants"].get(variant, {}).get(mode, {}).get(metric)
        if entry:
            values.update({f"{key}_sd": entry["sd"], f"{key}_diff_q025": entry["diff"].get("q025")})
    return {doc["category"]: values}


def _ranks_at(root: Path, rev: str, category: str, variant: str) -> dict[str, Any]:
    import json

    path = paths.ranks_path(category, variant)
    text = show(root, rev, path)
    if text is None:
        raise NoiseError(f"{rev[:7]} has no {path}: did that run's evaluate stage finish?")
    return json.loads(text)


def write_noise(root: str | Path, categories: list[str], runs: Runs) -> dict[str, dict[str, Any]]:
    """Summarise the runs of every category into its noise.detail.json and noise.json; the details."""
    root = Path(root)
    if len(runs.by_seed) < 2:
        raise NoiseError("need at least 2 training seeds (the committed one and another): --seeds 1 2 3 4")
    out = {}
    for category in categories:
        order = sorted(runs.by_seed, key=lambda s: (runs.by_seed[s] != runs.base, s))  # committed run first
        docs = {s: {v: _ranks_at(root, runs.by_seed[s], category, v) for v in VARIANTS} for s in order}
        doc = summarise(category, docs, runs)
        write_json(doc, root / paths.noise_detail_path(category))
        write_json(headline(doc), root / paths.noise_path(category))
        out[category] = doc
        log.info(
            "%s: noise over %d seeds written to %s", category, len(docs), paths.noise_detail_path(category)
        )
    return out
