"""The fan-out of a one-line edit: for each library module, which stages `dvc status` then reports stale.

Measured: `git clone` of this repository at --rev into a temporary folder, the demo's outputs copied in
from --data (a checkout whose `dvc repro` is done, default this one: data/ only; metrics/ and models/
are in git), `dvc commit -f` there (so dvc.lock records that clone's code, params and outputs: the
pipeline is up to date and `dvc status` is empty), then for each setup (`setup:` set in the clone's
params.yaml, `dvc commit -f` again) and each module: append one line (a comment to a .py, a newline to a
data table), `dvc status --json`, restore the file. A stage counts when it is stale after the edit and
was not before. `dvc status` shows only the stages that list the module in their deps; what is
downstream of them goes stale once they rerun.

Static: the same table from dvc.yaml alone (a module reruns the stages whose deps name it or a folder
holding it, `${setup}` resolved per setup). tests/test_fanout.py checks that docs/layout.md's table is
this one; the measured run records whether dvc status agreed with it.

Run (from the repo root; ~2 s of dvc per module and setup on 2 busy cores):
    python bench/fanout.py                        # HEAD: bench/results/fanout.json
    python bench/fanout.py --rev 0b650a7 --name fanout.before
    python bench/fanout.py --static               # print the static table only (no clone, no dvc)
    python bench/fanout.py --write-docs           # rewrite the table in docs/layout.md from dvc.yaml
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from _common import REPO_ROOT, markdown_table, print_table, write_results

PACKAGES = ("cliprec", "cliprec_worlds")  # the library: the runtime and the worlds (demo generator, ...)
WORLDS = "cliprec_worlds"
DATA_SUFFIXES = (".json",)  # the worlds' data tables (the demo vocabulary): an edit reruns like code
SETUPS = ("demo", "study")
DOCS = REPO_ROOT / "docs" / "layout.md"
BEGIN, END = "<!-- fanout table: python bench/fanout.py --write-docs -->", "<!-- end of fanout table -->"
PROBE = "# fanout probe: a one-line edit\n"


def library_modules(root: Path) -> list[str]:
    """The library's files under `root`: every .py of the packages, and the worlds' data tables, sorted."""
    files = [p for pkg in PACKAGES for p in (root / pkg).rglob("*.py")]
    files += [p for p in (root / WORLDS).rglob("*") if p.suffix in DATA_SUFFIXES]
    return sorted(p.relative_to(root).as_posix() for p in files)


def _instances(name: str, spec: dict[str, Any], categories: list[str]) -> list[str]:
    """The stage names DVC gives a foreach/matrix stage over `${categories}` (`index@Appliances-lora`)."""
    if "foreach" in spec:
        if spec["foreach"] != "${categories}":
            raise ValueError(f"fanout: stage {name}: foreach over {spec['foreach']!r}, not ${{categories}}")
        return [f"{name}@{c}" for c in categories]
    if "matrix" in spec:
        axes = [categories if v == "${categories}" else v for v in spec["matrix"].values()]
        return [f"{name}@{'-'.join(combo)}" for combo in itertools.product(*axes)]
    return [name]


def _pipeline(root: Path) -> tuple[dict[str, Any], list[str]]:
    """dvc.yaml's stage specs, and the categories params.yaml runs them over."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return stages, yaml.safe_load((root / "params.yaml").read_text())["categories"]


def stage_order(root: Path) -> list[str]:
    """Every stage name, in dvc.yaml's order: the order the tables list stages in."""
    stages, categories = _pipeline(root)
    return [s for name, spec in stages.items() for s in _instances(name, spec, categories)]


def static_table(root: Path, setups: tuple[str, ...] = SETUPS) -> dict[str, dict[str, list[str]]]:
    """setup -> module -> the stages whose dvc.yaml deps name it (or a folder holding it), from dvc.yaml."""
    stages, categories = _pipeline(root)
    modules = library_modules(root)
    table: dict[str, dict[str, list[str]]] = {}
    for setup in setups:
        rows: dict[str, list[str]] = {m: [] for m in modules}
        for name, spec in stages.items():
            body = spec.get("do", spec)
            deps = [(d if isinstance(d, str) else next(iter(d))) for d in body.get("deps", [])]
            deps = [d.replace("${setup}", setup).rstrip("/") for d in deps]
            for module in modules:
                if any(module == d or module.startswith(d + "/") for d in deps):
                    rows[module] += _instances(name, spec, categories)
        table[setup] = rows
    return table


def summary(stages: list[str]) -> str:
    """`ingest ×2, train ×2` for a list of stage names (in pipeline order of first appearance)."""
    kinds = Counter(s.split("@")[0] for s in stages)
    return ", ".join(f"{k} ×{n}" if n > 1 else k for k, n in kinds.items()) or "—"


def table_rows(table: dict[str, dict[str, list[str]]]) -> list[dict[str, Any]]:
    """One row per module: the stages an edit reruns in the first setup, and in the others if they differ."""
    first, *others = list(table)
    rows = []
    for module, stages in table[first].items():
        row: dict[str, Any] = {"module": module, f"{first}: stages an edit reruns": summary(stages)}
        row["n"] = len(stages)
        for setup in others:
            theirs = table[setup][module]
            row[setup] = "same" if theirs == stages else f"{summary(theirs)} ({len(theirs)})"
        rows.append(row)
    return rows


def _run(args: list[str], cwd: Path) -> str:
    """stdout of a command in the clone; a failure ends the benchmark with its stderr's last line."""
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no stderr)"])[-1]
        sys.exit(f"fanout: {' '.join(args)} failed in {cwd} (exit {proc.returncode}): {last}")
    return proc.stdout


def _stale(clone: Path) -> set[str]:
    """The stages `dvc status` reports in the clone."""
    out = _run(["dvc", "status", "--json"], clone).strip()
    return set(json.loads(out or "{}"))


def _prepare(clone: Path, rev: str, data: Path) -> str:
    """Clone this repository at `rev` into `clone` with `data`'s outputs; the full commit hash."""
    _run(["git", "clone", "--quiet", "--no-checkout", str(REPO_ROOT), str(clone)], REPO_ROOT)
    _run(["git", "checkout", "--quiet", rev], clone)
    shutil.copytree(data / "data", clone / "data", dirs_exist_ok=True)  # git holds data/.gitignore
    _run(["dvc", "config", "--local", "cache.type", "copy"], clone)  # never a link into another checkout
    return _run(["git", "rev-parse", "HEAD"], clone).strip()


def _set_setup(clone: Path, setup: str) -> None:
    """Select `setup` in the clone's params.yaml and record the pipeline as up to date for it."""
    params = clone / "params.yaml"
    text, n = re.subn(r"(?m)^setup: *\S+", f"setup: {setup}", params.read_text())
    if n != 1:
        sys.exit(f"fanout: {params} has no single top-level `setup:` line")
    params.write_text(text)
    _run(["dvc", "commit", "--force", "--quiet"], clone)


def measure(clone: Path, setup: str, modules: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """module -> stages stale after a one-line edit to it (not before), and the stages stale before."""
    _set_setup(clone, setup)
    order = {s: i for i, s in enumerate(stage_order(clone))}
    before = _stale(clone)
    out = {}
    for module in modules:
        path = clone / module
        original = path.read_bytes()
        probe = PROBE if path.suffix == ".py" else "\n"
        path.write_bytes(original + (b"" if original.endswith(b"\n") else b"\n") + probe.encode())
        try:
            out[module] = sorted(_stale(clone) - before, key=order.__getitem__)
        finally:
            path.write_bytes(original)
        print(f"{setup:5} {module:45} {summary(out[module])}", flush=True)
    return out, sorted(before, key=order.__getitem__)


def docs_table(root: Path = REPO_ROOT) -> str:
    """The Markdown table docs/layout.md carries: the static fan-out of `root`'s dvc.yaml."""
    return markdown_table(table_rows(static_table(root)))


def write_docs(root: Path = REPO_ROOT) -> Path:
    """Replace the table between the markers of docs/layout.md with the static one."""
    text = DOCS.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(f"{head}{BEGIN}\n{docs_table(root)}\n{END}{tail}")
    return DOCS


def run(args: argparse.Namespace) -> None:
    """Measure in a throwaway clone, compare with the static table, print and write the results."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cliprec-fanout-") as tmp:
        clone = Path(tmp) / "repo"
        commit = _prepare(clone, args.rev, Path(args.data))
        modules = library_modules(clone)
        static = static_table(clone, tuple(args.setups))
        measured, stale_before = {}, {}
        for setup in args.setups:
            measured[setup], stale_before[setup] = measure(clone, setup, modules)
    agrees = {s: measured[s] == static[s] for s in args.setups}
    print_table(table_rows(measured), title=f"Fan-out at {args.rev} ({commit[:7]}), measured with dvc status")
    print(f"\nmeasured == static (dvc.yaml): {agrees}")
    payload = {
        "rev": args.rev,
        "commit": commit,
        "data_from": str(args.data),
        "setups": args.setups,
        "measured": measured,
        "static": static,
        "agrees": agrees,
        "stale_before_edit": stale_before,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(f"wrote {write_results(args.name, payload)}")


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, then print the static table, rewrite the docs, or measure."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", default="HEAD", help="commit to measure (committed files only)")
    ap.add_argument("--data", default=str(REPO_ROOT), help="checkout whose data/ holds the demo's outputs")
    ap.add_argument("--setups", nargs="+", default=list(SETUPS), choices=SETUPS)
    ap.add_argument("--name", default="fanout", help="results file: bench/results/<name>.json")
    ap.add_argument("--static", action="store_true", help="print the table from dvc.yaml and stop")
    ap.add_argument("--write-docs", action="store_true", help="rewrite docs/layout.md's table and stop")
    args = ap.parse_args(argv)
    if args.static:
        print(docs_table())
    elif args.write_docs:
        print(f"wrote {write_docs()}")
    else:
        run(args)


if __name__ == "__main__":
    main()
