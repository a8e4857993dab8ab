"""Does `cliprec gate --rev HEAD` pass pure retraining noise and fail real regressions?

Each case is a DVC experiment made from HEAD (`dvc exp run --temp -n gate-<case> -S ...`; a finished one
of that name is reused). The gate then judges the experiment's per-query ranks against HEAD's exactly as
`cliprec gate --rev HEAD` does with those ranks in the workspace (cliprec.gate.decide, with HEAD's noise
files), and also by the strict rule (no noise files) for contrast. Cases:

- `seed-S` for each --seeds S: only the training seed changes. Every one should PASS; the share that
  fails is the gate's false-failure rate on retraining noise. The seeds should not be among those of the
  noise file (`cliprec noise`), or the check is circular.
- `epochs-1` (-S epochs=1) and `lr-x10` (-S setups.demo.train.lr_scale=10.0): real regressions: FAIL.
- `shrunk-test` (-S setups.demo.split.test=0.05 and train 0.80): a smaller test set: FAIL (new test set).

Prints a table; writes bench/results/gate_noise.json. Takes ~2 min a retraining case on 2 cores.
Usage: python bench/gate_noise.py [--seeds 5 6 7 8] [--no-regressions] [--base REV]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from _common import REPO_ROOT, print_table, write_results

sys.path.insert(0, str(REPO_ROOT))
from cliprec.gate import GateRule, decide, noise_at, revision_files  # noqa: E402
from cliprec.git import commit_of, head_commit  # noqa: E402
from cliprec.noise import dvc_exp_run, experiment_ref  # noqa: E402
from cliprec.params import load_params  # noqa: E402

REGRESSIONS = {
    "epochs-1": ["epochs=1"],
    "lr-x10": ["setups.demo.train.lr_scale=10.0"],
    "shrunk-test": ["setups.demo.split.train=0.80", "setups.demo.split.test=0.05"],
}


def run_case(root: Path, bases: list[str], name: str, overrides: list[str]) -> tuple[str, str, float | None]:
    """(the experiment's commit, the commit it derives from, seconds it took: None when reused).

    A finished experiment of that name made from any of `bases` is reused; else it is made from HEAD.
    """
    for base in bases:
        rev = experiment_ref(root, base, name)
        if rev is not None:
            return rev, base, None
    head = head_commit(root)
    started = time.perf_counter()
    dvc_exp_run(root, overrides, name, root / "data" / "runs" / "gate_noise" / f"{name}.log")
    rev = experiment_ref(root, head, name)
    if rev is None:
        raise SystemExit(f"experiment {name} left no ref: see dvc exp list")
    return rev, head, round(time.perf_counter() - started, 1)


def judge(root: Path, rev: str, base: str, rule: GateRule, noise: dict) -> dict:
    """The gate's verdict on the experiment's ranks against the base's, with and without the noise files."""
    old = {p: json.loads(t) for p, t in revision_files(base, root).items()}
    new = {p: json.loads(t) for p, t in revision_files(rev, root).items()}
    out = {}
    for label, files in (("with_noise", noise), ("strict", {})):
        verdicts = decide(new, old, rule, files)
        failed = [v for v in verdicts if v.failed]
        out[label] = {
            "passed": not failed,
            "failures": len(failed),
            "failed": [f"{Path(v.path).parent.name}/{Path(v.path).name.split('.')[0]} {v.mode} {v.metric} "
                       f"({v.status}{'' if v.comparison is None else f', {v.comparison.value:+.3f}'})"
                       for v in failed][:12],
        }  # fmt: skip
    return out


def _commit(root: Path, rev: str) -> str:
    commit = commit_of(root, rev)
    if commit is None:
        raise SystemExit(f"--base {rev}: not a commit")
    return commit


def _cell(verdict: dict) -> str:
    return "PASS" if verdict["passed"] else f"FAIL ({verdict['failures']})"


def main(argv: list[str] | None = None) -> int:
    """Run the cases, judge each, print the table and write bench/results/gate_noise.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[5, 6, 7, 8])
    ap.add_argument("--no-regressions", action="store_true", help="only the seed cases")
    ap.add_argument("--base", help="also reuse the experiments made from this commit, judged against its "
                    "ranks and noise files (e.g. to re-judge them after a change to the gate)")  # fmt: skip
    args = ap.parse_args(argv)
    root, p = REPO_ROOT, load_params(REPO_ROOT / "params.yaml")
    head = head_commit(root)
    bases = list(dict.fromkeys([_commit(root, args.base) if args.base else head, head]))
    rule = GateRule(p.gate.tolerance, p.gate.alpha, p.evaluate.resamples, p.evaluate.seed)
    cases = {f"seed-{s}": [f"seed={s}"] for s in args.seeds}
    cases |= {} if args.no_regressions else REGRESSIONS
    rows, results = [], {}
    for case, overrides in cases.items():
        rev, base, seconds = run_case(root, bases, f"gate-{case}", overrides)
        verdict = judge(root, rev, base, rule, noise_at(base, root))
        results[case] = {"overrides": overrides, "rev": rev, "base": base, "seconds": seconds, **verdict}
        row = {
            "case": case,
            "overrides": " ".join(overrides),
            "gate (noise files)": _cell(verdict["with_noise"]),
        }
        rows.append(row | {"strict rule": _cell(verdict["strict"]), "seconds": seconds})
    seeds = [results[f"seed-{s}"] for s in args.seeds]
    summary = {
        "bases": bases,
        "judged_with": head,
        "noise_seeds": {cat: doc.get("seeds") for cat, doc in noise_at(bases[0], root).items()},
        "false_failures": sum(not r["with_noise"]["passed"] for r in seeds),
        "false_failures_strict": sum(not r["strict"]["passed"] for r in seeds),
        "seed_runs": len(seeds),
    }
    print_table(rows)
    print(f"false failures on retraining noise: {summary['false_failures']} of {len(seeds)} with the noise "
          f"files, {summary['false_failures_strict']} of {len(seeds)} by the strict rule")  # fmt: skip
    write_results("gate_noise", {**summary, "cases": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
