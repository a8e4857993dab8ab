"""Wall time of `dvc repro`: a no-op repro (goal <= 5 s) and the full demo from a fresh clone (goal <= 5 min).

No-op (default): checks with `dvc status` that the repository is up to date -- if it is not, says so and
stops rather than start a real repro -- then times `dvc repro` --repeats times (median) and one
`dvc status` for comparison. Run it in a repository whose pipeline has already been reproduced.

Full (--full): `git clone <--clone-from> <tmpdir>` (committed files only: the working tree's uncommitted
changes are not in it), then `dvc repro` there with PYTHONPATH=<clone> (so the stages import the clone's
cliprec, not the editable install) and PYTHONUNBUFFERED=1, streaming its output. Each
"Running stage '<name>'" line is timestamped; a stage lasts until the next one starts or dvc exits, so
DVC's own work after a command (hashing outputs, caching, dvc.lock) counts towards that stage, and the
time before the first stage is reported as startup. Reported: total, per stage, and per stage kind
(ingest/summarize/images/train/embed_zeroshot/embed_lora/index/evaluate, summed over categories).
The demo's full repro keeps both cores busy for ~4.5 min here.

Results go to bench/results/repro.json under "noop" and "full"; running one mode keeps the other's last
result.

Run (from the repo root):
    python bench/repro.py                          # no-op repro of this checkout, 3 repeats (~10 s)
    python bench/repro.py --full                   # fresh clone of this repo + full demo (~4.5 min, 2 cores)
    python bench/repro.py --full --clone-from /path/to/other/checkout --keep   # keep the clone to inspect
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, RESULTS_DIR, group_watchdog, machine_info, print_table, write_results

GOAL_NOOP_S = 5.0
GOAL_FULL_S = 300.0
RESULTS_NAME = "repro"
STAGE_LINE = re.compile(r"Running stage '([^']+)'")
KIND_ORDER = ("ingest", "summarize", "images", "train", "embed_zeroshot", "embed_lora", "index", "evaluate")


class NotUpToDate(RuntimeError):
    """The repository has stages to run: a no-op timing would turn into a real repro."""


# --- running dvc ----------------------------------------------------------------------------------------


def run_dvc(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, str, int]:
    """Run `dvc <args>` in cwd; return (wall seconds, stdout+stderr, exit code)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["dvc", *args], cwd=cwd, env=env, capture_output=True, text=True)
    return time.perf_counter() - t0, proc.stdout + proc.stderr, proc.returncode


def pipeline_status(repo: Path) -> tuple[dict[str, Any], float]:
    """`dvc status --json` of repo: (stages with changes, {} when up to date; seconds it took)."""
    t0 = time.perf_counter()
    proc = subprocess.run(["dvc", "status", "--json"], cwd=repo, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc status` failed in {repo} (exit {proc.returncode}):\n{proc.stderr.strip()}")
    try:
        status = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError as e:
        raise RuntimeError(f"`dvc status --json` printed no JSON in {repo}:\n{proc.stdout[:2000]}") from e
    return status, seconds


def check_up_to_date(repo: Path) -> float:
    """Raise NotUpToDate (listing the changed stages) unless repo's pipeline is up to date; return seconds."""
    status, seconds = pipeline_status(repo)
    if status:
        lines = [f"  {stage}: {json.dumps(change)}" for stage, change in status.items()]
        raise NotUpToDate(
            f"{repo} is not up to date ({len(status)} stage(s) would run), so a `dvc repro` would be a real "
            "reproduction, not a no-op. Run `dvc repro` there first (or use --full). Changes:\n"
            + "\n".join(lines[:20])
            + ("\n  ..." if len(lines) > 20 else "")
        )
    return seconds


def time_noop(repo: Path, repeats: int) -> dict[str, Any]:
    """Check repo is up to date, then time `dvc repro` repeats times; a repro that runs a stage stops it."""
    status_s = check_up_to_date(repo)
    times = []
    for i in range(repeats):
        seconds, output, code = run_dvc(["repro"], repo)
        if code != 0:
            raise RuntimeError(f"`dvc repro` failed in {repo} (exit {code}):\n{output[-3000:]}")
        ran = STAGE_LINE.findall(output)
        if ran:
            raise RuntimeError(f"`dvc repro` run {i + 1} ran {ran}: not a no-op (did something change?)")
        times.append(seconds)
        print(f"  no-op dvc repro {i + 1}/{repeats}: {seconds:.2f} s", flush=True)
    median = statistics.median(times)
    return {
        "repo": str(repo),
        "repeats": repeats,
        "times_s": [round(t, 3) for t in times],
        "median_s": round(median, 3),
        "dvc_status_s": round(status_s, 3),
        "goal_s": GOAL_NOOP_S,
        "meets_goal": median <= GOAL_NOOP_S,
    }


# --- the full demo from a fresh clone -------------------------------------------------------------------


def stage_kind(stage: str) -> str:
    """ingest@Amazon_Fashion -> ingest; index@Appliances-lora -> index."""
    return stage.split("@", 1)[0]


def split_stages(starts: list[tuple[str, float]], end: float) -> list[dict[str, Any]]:
    """Per-stage wall time from (stage, start seconds) in order: each runs until the next starts."""
    rows = []
    for i, (stage, start) in enumerate(starts):
        stop = starts[i + 1][1] if i + 1 < len(starts) else end
        rows.append(
            {"stage": stage, "kind": stage_kind(stage), "start_s": round(start, 2), "seconds": stop - start}
        )
    return rows


def per_kind(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Seconds per stage kind, summed over categories/variants, in pipeline order (unknown kinds last)."""
    totals: dict[str, list[float]] = {}
    for s in stages:
        totals.setdefault(s["kind"], []).append(s["seconds"])
    order = sorted(totals, key=lambda k: (KIND_ORDER.index(k) if k in KIND_ORDER else len(KIND_ORDER), k))
    return [{"kind": k, "stages": len(totals[k]), "seconds": sum(totals[k])} for k in order]


def stream_repro(clone: Path, env: dict[str, str], timeout_s: float, echo: bool) -> dict[str, Any]:
    """Run `dvc repro` in clone, timestamping every output line; returns stage starts, end, exit code."""
    proc = subprocess.Popen(
        ["dvc", "repro"],
        cwd=clone,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # its own process group: a timeout stops dvc and the stage it runs
    )
    watchdog, timed_out = group_watchdog(proc, timeout_s)
    t0 = time.perf_counter()
    starts: list[tuple[str, float]] = []
    tail: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - t0
            if match := STAGE_LINE.search(line):
                starts.append((match.group(1), now))
            tail = [*tail[-199:], line.rstrip("\n")]
            if echo:
                print(f"[{now:7.1f}s] {line}", end="", flush=True)
        code = proc.wait()
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise
    finally:
        watchdog.cancel()
    return {
        "end_s": time.perf_counter() - t0,
        "starts": starts,
        "returncode": code,
        "timed_out": timed_out.is_set(),
        "tail": tail,
    }


def dirty_files(repo: Path) -> list[str]:
    """Tracked files with uncommitted changes in repo (a clone will not have them); [] if not a checkout."""
    proc = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True
    )
    return proc.stdout.splitlines() if proc.returncode == 0 else []


def time_full(clone_from: str, keep: bool, timeout_s: float, echo: bool) -> dict[str, Any]:
    """Clone clone_from into a temp dir, run the whole pipeline there, return totals and the stage split."""
    if Path(clone_from).is_dir() and (dirty := dirty_files(Path(clone_from))):
        print(
            f"note: {len(dirty)} uncommitted change(s) in {clone_from} are not in the clone", file=sys.stderr
        )
    tmp = Path(tempfile.mkdtemp(prefix="cliprec_repro_"))
    clone = tmp / "repo"
    try:
        t0 = time.perf_counter()
        subprocess.run(["git", "clone", "--quiet", clone_from, str(clone)], check=True)
        clone_s = time.perf_counter() - t0
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True, check=True
        ).stdout.strip()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(clone), env.get("PYTHONPATH", "")) if p)
        print(
            f"cloned {clone_from} @ {commit[:12]} into {clone} in {clone_s:.1f} s; running dvc repro",
            flush=True,
        )
        run = stream_repro(clone, env, timeout_s, echo)
    finally:
        if keep:
            print(f"kept the clone: {clone}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    stages = split_stages(run["starts"], run["end_s"])
    startup = run["starts"][0][1] if run["starts"] else run["end_s"]
    ok = run["returncode"] == 0 and not run["timed_out"]
    return {
        "clone_from": clone_from,
        "commit": commit,
        "clone_s": round(clone_s, 2),
        "total_s": round(run["end_s"], 1),
        "startup_s": round(startup, 2),
        "ok": ok,
        "returncode": run["returncode"],
        "timed_out": run["timed_out"],
        "stages": [{**s, "seconds": round(s["seconds"], 2)} for s in stages],
        "per_kind": [{**k, "seconds": round(k["seconds"], 2)} for k in per_kind(stages)],
        "goal_s": GOAL_FULL_S,
        "meets_goal": ok and run["end_s"] <= GOAL_FULL_S,
        "kept_at": str(clone) if keep else None,
        "output_tail": None if ok else run["tail"][-60:],
    }


# --- results --------------------------------------------------------------------------------------------


def save(mode: str, result: dict[str, Any]) -> Path:
    """Merge result under `mode` into bench/results/repro.json, keeping the other mode's last result."""
    path = RESULTS_DIR / f"{RESULTS_NAME}.json"
    merged: dict[str, Any] = {}
    if path.exists():
        try:
            merged = json.loads(path.read_text())
        except json.JSONDecodeError:
            print(f"warning: {path} was not valid JSON; starting afresh", file=sys.stderr)
    if not isinstance(merged, dict):
        merged = {}
    merged.pop("machine", None)  # write_results stamps the current machine; each mode keeps its own
    merged[mode] = {"machine": machine_info(), **result}
    return write_results(RESULTS_NAME, merged)


def print_noop(result: dict[str, Any]) -> None:
    """The no-op table."""
    row = {k: result[k] for k in ("repo", "repeats", "median_s", "dvc_status_s", "goal_s", "meets_goal")}
    row["runs_s"] = ", ".join(f"{t:.2f}" for t in result["times_s"])
    print_table([row], title="No-op `dvc repro`")


def print_full(result: dict[str, Any]) -> None:
    """The per-stage and per-kind tables and the total."""
    print_table(result["stages"], ["stage", "kind", "start_s", "seconds"], title="Full demo: per stage")
    kinds = [
        *result["per_kind"],
        {"kind": "(startup before first stage)", "stages": None, "seconds": result["startup_s"]},
    ]
    print_table(kinds, ["kind", "stages", "seconds"], title="Full demo: per stage kind")
    verdict = "meets" if result["meets_goal"] else "misses"
    status = (
        "ok" if result["ok"] else f"FAILED (exit {result['returncode']}, timed out: {result['timed_out']})"
    )
    print(
        f"\nfull demo from a fresh clone: {result['total_s']:.1f} s of dvc repro ({status}) + "
        f"{result['clone_s']:.1f} s clone; {verdict} the {GOAL_FULL_S:g} s goal"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--repo", type=Path, default=REPO_ROOT, help="repository for the no-op repro (default: this one)"
    )
    p.add_argument("--repeats", type=int, default=3, help="no-op repros to time (median)")
    p.add_argument("--full", action="store_true", help="time the full demo in a fresh clone (~4.5 min)")
    p.add_argument("--clone-from", default=None, help="what --full clones (default: --repo)")
    p.add_argument("--keep", action="store_true", help="keep the --full clone instead of deleting it")
    p.add_argument(
        "--timeout", type=float, default=1800, help="--full: stop dvc repro after this many seconds"
    )
    p.add_argument("--quiet", action="store_true", help="--full: do not echo dvc's output")
    p.add_argument("--no-save", action="store_true", help="print only, leave bench/results/repro.json alone")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.timeout <= 0:
        p.error("--repeats must be >= 1 and --timeout > 0")
    if not args.full and (args.clone_from or args.keep or args.quiet):
        p.error("--clone-from, --keep and --quiet go with --full")
    args.repo = args.repo.resolve()
    if not args.full and not (args.repo / "dvc.yaml").is_file():
        p.error(f"{args.repo} has no dvc.yaml")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the chosen mode, print its tables, merge the result into bench/results/repro.json."""
    args = parse_args(argv)
    if args.full:
        result = time_full(args.clone_from or str(args.repo), args.keep, args.timeout, not args.quiet)
        print_full(result)
        mode = "full"
    else:
        try:
            result = time_noop(args.repo, args.repeats)
        except NotUpToDate as e:
            print(f"not timing: {e}", file=sys.stderr)
            return 2
        print_noop(result)
        mode = "noop"
    if not args.no_save:
        print(f"wrote {save(mode, result)} ({mode!r}; the other mode's last result is kept)")
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
