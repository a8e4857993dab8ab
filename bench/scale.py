"""The cost curve: the real pipeline stages on synthetic catalogs of growing size, wall time and peak RSS.

    python bench/scale.py                                  # 2k, 20k, 200k products (~1 h on 2 cores)
    python bench/scale.py --sizes 1000 10000 --quick       # smoke test
    python bench/scale.py --sizes 1000 10000 100000 --keep /tmp/scale --reuse --stages evaluate
        # after a code change: rerun stages on the kept projects, replacing their rows in the results

For each size a fresh project (this checkout's cliprec/, stages/, params.yaml, models/) gets a synthetic
Amazon-2023 catalog of that many products as its own JSONL (`source: jsonl`, catalog/meta_<cat>.jsonl;
the drawing is not a stage, so it is not timed), and then every stage script runs once, as `dvc repro`
would run it, each in its own process under /usr/bin/time: ingest, summarize, images, train (1 epoch),
embed (lora), index, evaluate (lora). Photos are drawn at and stored at `--image-side` px (64, the demo
CLIP's input: cheap at 200k; the model sees what it sees in the demo). Written to
bench/results/scale.json: rows {n_products, stage, wall_s, peak_rss_mb}, per size the disk use of data/,
and the machine. docs/performance.md ("Scale") turns them into per-product costs and projections.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from _common import REPO_ROOT, machine_info, print_table, write_results

CATEGORY = "Amazon_Fashion"
STAGES = (
    ("ingest", [CATEGORY]),
    ("summarize", [CATEGORY]),
    ("images", [CATEGORY]),
    ("train", [CATEGORY]),
    ("embed", [CATEGORY, "lora"]),
    ("index", [CATEGORY, "lora"]),
    ("evaluate", [CATEGORY, "lora"]),
)
PROJECT = ("cliprec", "stages", "models", "catalog", "params.yaml")
MAX_RSS = re.compile(r"Maximum resident set size \(kbytes\): (\d+)")


def make_project(root: Path, n: int, args: argparse.Namespace) -> None:
    """A project at root with a synthetic catalog of n products as its own JSONL, params for the run."""
    from cliprec_worlds.demo.synthetic import generate_catalog

    for name in PROJECT:
        src = REPO_ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, root / name)
    raw = root / "catalog" / "raw"
    jsonl = generate_catalog(CATEGORY, n, args.seed, raw, image_size=args.image_side)
    jsonl.rename(root / "catalog" / jsonl.name)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params.update(categories=[CATEGORY], epochs=args.epochs, seed=args.seed)
    params["images"]["side"] = args.image_side
    params["setups"]["demo"]["ingest"].update(
        source="jsonl", path="catalog/meta_{category}.jsonl", n_products=None, data_seed=args.seed
    )
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(root: Path, stage: str, argv: list[str]) -> dict[str, float]:
    """One stage script in its own process under /usr/bin/time -v: wall seconds and peak RSS."""
    cmd = ["/usr/bin/time", "-v", sys.executable, str(root / "stages" / f"{stage}.py"), *argv]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{stage} failed:\n{done.stderr[-3000:]}")
    rss = MAX_RSS.search(done.stderr)
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(int(rss.group(1)) / 1024, 1) if rss else None}


def disk_mb(path: Path) -> float:
    """Bytes under path, in MB."""
    return round(sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20, 1)


def main(argv: list[str] | None = None) -> None:
    """Run the sizes, print the table, write bench/results/<out>.json."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20_000, 200_000])
    p.add_argument("--image-side", type=int, default=64)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="scale")
    p.add_argument("--keep", type=Path, help="keep the projects under this directory")
    p.add_argument("--quick", action="store_true", help="default sizes 500 and 5000, results to scale.quick")
    p.add_argument("--stages", nargs="+", choices=[s for s, _ in STAGES], help="run only these stages")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="run on the projects kept under --keep (their code refreshed from this checkout) and replace "
        "those rows of the existing results",
    )
    args = p.parse_args(argv)
    if args.reuse and not args.keep:
        p.error("--reuse needs --keep DIR, the projects of an earlier run")
    if args.stages and not args.reuse:
        p.error("--stages needs --reuse: a stage reads what the stages before it wrote")
    if args.quick and args.sizes == p.get_default("sizes"):
        args.sizes = [500, 5000]
    if args.quick and args.out == "scale":
        args.out = "scale.quick"
    rows: list[dict[str, Any]] = []
    disk: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="cliprec-scale-") as tmp:
        base = args.keep or Path(tmp)
        for n in args.sizes:
            root = base / f"n{n}"
            if args.reuse:
                print(f"\n== {n} products: the kept project, this checkout's code", flush=True)
                for name in ("cliprec", "stages"):
                    shutil.rmtree(root / name)
                    shutil.copytree(REPO_ROOT / name, root / name)
            else:
                print(f"\n== {n} products: drawing the catalog ...", flush=True)
                started = time.perf_counter()
                make_project(root, n, args)
                print(f"   drawn in {time.perf_counter() - started:.0f} s", flush=True)
            for stage, stage_argv in STAGES:
                if args.stages and stage not in args.stages:
                    continue
                row = {"n_products": n, "stage": stage, **run_stage(root, stage, stage_argv)}
                print(f"   {stage}: {row['wall_s']} s, {row['peak_rss_mb']} MB", flush=True)
                rows.append(row)
            products = json.loads((root / "data" / "ingest" / CATEGORY / "report.json").read_text())
            disk[str(n)] = {
                "products_kept": products["n_products"],
                **{d.name: disk_mb(d) for d in sorted((root / "data").iterdir()) if d.is_dir()},
                "catalog_photos": disk_mb(root / "catalog"),
            }
    earlier: dict[str, Any] = {}
    rerun_machine = machine_info()
    if args.reuse:  # the other rows (and the disk use) stay as the earlier run measured them
        earlier = json.loads((REPO_ROOT / "bench" / "results" / f"{args.out}.json").read_text())
        rerun = {(r["n_products"], r["stage"]): r for r in rows}
        rows = [rerun.pop((r["n_products"], r["stage"]), r) for r in earlier["rows"]] + list(rerun.values())
        disk = {**earlier["disk_mb"], **disk}
    print_table(rows, ["n_products", "stage", "wall_s", "peak_rss_mb"], title="Stages by catalog size")
    print(json.dumps(disk, indent=2))
    out = write_results(
        args.out,
        {
            "rows": rows,
            "disk_mb": disk,
            "image_side": args.image_side,
            "epochs": args.epochs,
            "seed": args.seed,
            # "machine" is the run that measured every stage; each --reuse run that replaced some of its
            # rows is listed under "reruns", oldest first, with its own machine (and commit)
            **(
                {
                    "machine": earlier["machine"],
                    "reruns": [*earlier.get("reruns", []), {"stages": args.stages, "machine": rerun_machine}],
                }
                if args.reuse
                else {}
            ),
        },
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
