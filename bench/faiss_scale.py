"""FAISS at catalog scale: build time, memory, QPS and recall@10 of Flat, HNSW32, IVF-PQ and `auto`.

Data: clustered synthetic 512-d unit vectors, like real embeddings and unlike uniform noise (on which every
ANN index looks broken). `--clusters` centres on the sphere, grouped around `--groups` directions (related
products), with log-normal cluster sizes; a point is its centre plus a low-rank offset (each cluster
varies along `--intrinsic-dim` directions) plus a little isotropic noise, normalised. Queries are
held-out points of the same distribution, never in the base. Ground truth: exact inner-product top-k
(IndexFlatIP, queries in chunks), once per size.

Indexes are built with the library (`cliprec.index.build_index`; `apply_search_params` with params.yaml's
`index.nprobe` / `index.ef_search`); `auto` is `choose_factory(n, d, index.memory_budget_mb)`, printed
with its reason. Per index: build seconds, memory (len(faiss.serialize_index)) and RSS growth, QPS of
`--queries` queries at k (one batch, faiss.omp_set_num_threads(cores), median of --repeats), recall@k vs
exact, and sweeps of nprobe / efSearch / k_factor (recall-QPS pairs).
Goal: at 1M, an index with >= 20x the QPS of exact search (Flat) at recall@10 >= 0.95.

IVF-PQ setting (`--ivf-pq`): IVF{nlist},PQ64x4fs,RFlat -- IVF lists (nlist = the power of two nearest
2 sqrt(n): 512 at 100k, 2048 at 1M), 4-bit fast-scan PQ64 (32 B/vector) to shortlist k_factor x k
candidates, re-ranked exactly on the raw vectors (RFlat). Picked by trying at 20k-50k: plain 8-bit PQ64
(64 B/vector) reached recall@10 0.82 at 20k and builds ~4x slower; fast-scan + RFlat reaches ~0.96-0.98
at k_factor 8 and ~0.99 at 16, at 13-20x Flat's QPS already at 20k (params.yaml `index.k_factor`, 16; at
FAISS's default of 1 RFlat adds nothing: 0.70 at 20k). The price: RFlat keeps
the raw vectors, so it needs Flat's memory (Refine(SQ8) needs a quarter, at about half the QPS).
nlist ~ 2 sqrt(n) rather than the usual 4 sqrt(n) halves the k-means time (by arithmetic, IVF4096 over
1M would train for ~5-10 min on these 2 cores).

Cost on 2 cores (AMD EPYC, AVX2), measured with the machine otherwise idle: --quick ~15-30 s; 100k
35 s; 1M 213 s (IVF-PQ build 101 s); ~4 min for the defaults. --hnsw-1m adds ~16-17 min (HNSW32 at 1M).
`auto` (cliprec.index.choose_factory) picks the IVF-PQ setting above from 20k vectors on, because of
what this script measured; the script marks it "(= auto)" and builds it once.

Run (from the repo root):
    python bench/faiss_scale.py --quick          # 20k only, 1 repeat
    python bench/faiss_scale.py                  # 100k and 1M, ~4 min
    python bench/faiss_scale.py --hnsw-1m        # adds HNSW32 at 1M, ~20 min in all
Writes bench/results/faiss_scale.json (with --quick: bench/results/faiss_scale.quick.json).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from _common import REPO_ROOT, print_table, write_results

from cliprec.index import apply_search_params, build_index, choose_factory, ivf_nlist, training_size
from cliprec.params import load_params

D = 512
GOAL_SPEEDUP = 20.0
GOAL_RECALL = 0.95
GROUP_SPREAD = 0.8  # cluster centres of one group: cosine ~0.6 to each other
HNSW_1M_NOTE = "HNSW32 over 1M x 512 builds in ~16 min on 2 cores: only with --hnsw-1m"
AUTO_SIZES = (5_000, 19_999, 20_000, 100_000, 1_000_000, 1_000_001, 10_000_000)


# --- data -----------------------------------------------------------------------------------------------


@dataclass
class ClusterModel:
    """Cluster centres, their sampling weights and the low-rank directions each cluster varies along."""

    centres: np.ndarray  # clusters x d, unit rows
    weights: np.ndarray  # clusters, sums to 1
    bases: np.ndarray  # n_bases x r x d
    basis_of: np.ndarray  # clusters -> basis index
    spread: float  # norm of the low-rank offset
    noise: float  # norm of the isotropic noise


def unit_rows(x: np.ndarray) -> np.ndarray:
    """x with every row scaled to unit L2 norm (in place)."""
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def make_model(d: int, clusters: int, groups: int, intrinsic_dim: int, seed: int) -> ClusterModel:
    """A seeded cluster model: centres grouped around `groups` unit directions, log-normal sizes."""
    rng = np.random.default_rng(seed)
    group_centres = unit_rows(rng.standard_normal((groups, d), dtype=np.float32))
    offsets = unit_rows(rng.standard_normal((clusters, d), dtype=np.float32)) * GROUP_SPREAD
    centres = unit_rows(group_centres[rng.integers(0, groups, clusters)] + offsets)
    weights = rng.lognormal(0.0, 1.0, clusters)
    n_bases = 32
    return ClusterModel(
        centres=centres,
        weights=weights / weights.sum(),
        bases=rng.standard_normal((n_bases, intrinsic_dim, d), dtype=np.float32) / np.sqrt(d),
        basis_of=rng.integers(0, n_bases, clusters),
        spread=0.7,
        noise=0.2,
    )


def sample(model: ClusterModel, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    """n unit vectors from the model (float32, n x d), generated in chunks to bound temporary memory."""
    rng = np.random.default_rng(seed)
    d, r = model.centres.shape[1], model.bases.shape[1]
    out = np.empty((n, d), np.float32)
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        cluster = rng.choice(len(model.weights), size=m, p=model.weights)
        x = model.centres[cluster]
        z = rng.standard_normal((m, r), dtype=np.float32) * (model.spread / np.sqrt(r))
        basis = model.basis_of[cluster]
        for b in np.unique(basis):
            rows = basis == b
            x[rows] += z[rows] @ model.bases[b]
        x += rng.standard_normal((m, d), dtype=np.float32) * (model.noise / np.sqrt(d))
        out[start : start + m] = unit_rows(x)
    return out


# --- measurement ----------------------------------------------------------------------------------------


def rss_bytes() -> int:
    """Resident set size of this process."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def exact_topk(base: np.ndarray, queries: np.ndarray, k: int, chunk: int = 250) -> tuple[np.ndarray, float]:
    """Exact inner-product top-k ids via IndexFlatIP, queries in chunks; returns (ids, search seconds)."""
    index = faiss.IndexFlatIP(base.shape[1])
    index.add(base)
    t0 = time.perf_counter()
    ids = np.vstack([index.search(queries[i : i + chunk], k)[1] for i in range(0, len(queries), chunk)])
    return ids, time.perf_counter() - t0


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the exact top-k that the index returned in its top-k."""
    k = truth.shape[1]
    return float(np.mean([len(np.intersect1d(f[f >= 0], t)) / k for f, t in zip(found, truth)]))


def timed_search(index: faiss.Index, queries: np.ndarray, k: int, repeats: int) -> tuple[float, np.ndarray]:
    """Median seconds of searching all queries in one batch, and the ids of the last search."""
    times, ids = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, ids = index.search(queries, k)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), ids


def refine_of(index: faiss.Index) -> faiss.IndexRefine | None:
    """The IndexRefine (RFlat / Refine(...)) an index is, or None."""
    inner = faiss.downcast_index(index)
    return inner if isinstance(inner, faiss.IndexRefine) else None


def sweep(
    index: faiss.Index,
    queries: np.ndarray,
    truth: np.ndarray,
    args: argparse.Namespace,
    search: dict[str, Any],
) -> list[dict[str, Any]]:
    """recall/QPS over nprobe (IVF) or efSearch (HNSW), and over k_factor for a refine index."""
    knobs: list[tuple[str, list[int]]] = []
    if faiss.try_extract_index_ivf(index) is not None:
        knobs.append(("nprobe", args.nprobe_sweep))
    elif isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        knobs.append(("ef_search", args.ef_sweep))
    refine = refine_of(index)
    if refine is not None:
        knobs.append(("k_factor", args.k_factor_sweep))
    points = []
    for knob, values in knobs:
        for v in values:
            apply_search_params(index, **{knob: v})
            seconds, ids = timed_search(index, queries, args.k, args.repeats)
            qps, recall = len(queries) / seconds, recall_at_k(ids, truth)
            points.append({"knob": knob, "value": v, "qps": round(qps, 1), "recall": round(recall, 4)})
        apply_search_params(index, **search, k_factor=args.k_factor)  # back to params
    return points


def search_knobs(index: faiss.Index, search: dict[str, Any], k_factor: float) -> dict[str, Any]:
    """The search settings that apply to this index: nprobe (IVF), efSearch (HNSW), k_factor (refine)."""
    knobs: dict[str, Any] = {}
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        knobs["nprobe"] = min(search["nprobe"], ivf.nlist)
        if isinstance(faiss.downcast_index(ivf.quantizer), faiss.IndexHNSW):
            knobs["ef_search"] = search["ef_search"]
    elif isinstance(faiss.downcast_index(index), faiss.IndexHNSW):
        knobs["ef_search"] = search["ef_search"]
    if refine_of(index) is not None:
        knobs["k_factor"] = k_factor
    return knobs


def measure_index(
    name: str,
    factory: str,
    base: np.ndarray,
    queries: np.ndarray,
    truth: np.ndarray,
    args: argparse.Namespace,
    search: dict[str, Any],
) -> dict[str, Any]:
    """Build one index with the library, then measure memory, QPS, recall and the knob sweeps."""
    rss0 = rss_bytes()
    t0 = time.perf_counter()
    index, info = build_index(base, factory=factory, memory_budget_mb=args.memory_budget_mb, seed=args.seed)
    build_s = time.perf_counter() - t0
    rss_mb = (rss_bytes() - rss0) / 2**20
    serialized_mb = len(faiss.serialize_index(index)) / 2**20
    apply_search_params(index, **search, k_factor=args.k_factor)
    seconds, ids = timed_search(index, queries, args.k, args.repeats)
    row = {
        "n": len(base),
        "index": name,
        "factory": info.resolved,
        "build_s": round(build_s, 1),
        "train_size": info.train_size,
        "memory_mb": round(serialized_mb, 1),
        "rss_delta_mb": round(rss_mb, 1),
        "qps": round(len(queries) / seconds, 1),
        "recall": round(recall_at_k(ids, truth), 4),
        "search": search_knobs(index, search, args.k_factor),
        "reason": info.reason,
    }
    row["sweep"] = sweep(index, queries, truth, args, search)
    return row


def plan(n: int, args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[dict[str, Any]]]:
    """The (name, factory) pairs to build at size n, and the indexes skipped there (with why)."""
    todo = [("Flat", "Flat")]
    skipped = []
    if n < 1_000_000 or args.hnsw_1m:
        todo.append(("HNSW32", "HNSW32"))
    else:
        skipped.append({"index": "HNSW32", "factory": "HNSW32", "reason": HNSW_1M_NOTE})
    todo.append(("IVF-PQ", args.ivf_pq.format(nlist=ivf_nlist(n, 2))))  # the lists of auto's rule 2
    choice = choose_factory(n, D, args.memory_budget_mb)
    if choice.factory.startswith("HNSW") and n >= 1_000_000 and not args.hnsw_1m:
        skipped.append({"index": "auto", "factory": choice.factory, "reason": HNSW_1M_NOTE})
    elif choice.factory not in [f for _, f in todo]:
        todo.append(("auto", "auto"))
    return todo, skipped


def run_size(n: int, model: ClusterModel, args: argparse.Namespace, search: dict[str, Any]) -> dict[str, Any]:
    """Everything at one base size: data, ground truth, each index; returns rows, skips and costs."""
    t0 = time.perf_counter()
    base = sample(model, n, seed=args.seed + 1)
    queries = sample(model, args.queries, seed=args.seed + 2)  # held out: another stream, same clusters
    data_s = time.perf_counter() - t0
    truth, truth_s = exact_topk(base, queries, args.k)
    print(f"\nn={n:,}: data {data_s:.1f} s, exact ground truth {truth_s:.1f} s", flush=True)
    todo, skipped = plan(n, args)
    choice = choose_factory(n, D, args.memory_budget_mb)
    rows = []
    for name, factory in todo:
        t1 = time.perf_counter()
        row = measure_index(name, factory, base, queries, truth, args, search)
        if row["factory"] == choice.factory and name != "auto":
            row["index"] = f"{name} (= auto)"
        rows.append(row)
        print(
            f"  {row['index']:15s} {row['factory']:22s} build {row['build_s']:6.1f} s "
            f"{row['memory_mb']:8.1f} MB {row['qps']:9.1f} QPS  recall@{args.k} {row['recall']:.4f}  "
            f"(with sweeps {time.perf_counter() - t1:.0f} s)",
            flush=True,
        )
    flat_qps = rows[0]["qps"]
    for row in rows:
        row["speedup_vs_flat"] = round(row["qps"] / flat_qps, 1)
        row["meets_goal"] = row["speedup_vs_flat"] >= GOAL_SPEEDUP and row["recall"] >= GOAL_RECALL
        for p in row["sweep"]:
            p["speedup_vs_flat"] = round(p["qps"] / flat_qps, 1)
    return {
        "n": n,
        "data_s": round(data_s, 1),
        "exact_s": round(truth_s, 1),
        "auto": {"factory": choice.factory, "reason": choice.reason},
        "rows": rows,
        "skipped": skipped,
        "best": best_meeting_goal(rows),
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def best_meeting_goal(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The fastest setting (rows and sweep points) with recall >= the goal; None if there is none."""
    points = [{"index": r["index"], "factory": r["factory"], **r["search"], **r} for r in rows]
    for r in rows:
        for p in r["sweep"]:
            points.append(
                {"index": r["index"], "factory": r["factory"], **r["search"], p["knob"]: p["value"], **p}
            )
    ok = [p for p in points if p["recall"] >= GOAL_RECALL]
    if not ok:
        return None
    best = max(ok, key=lambda p: p["qps"])
    keys = ("index", "factory", "nprobe", "ef_search", "k_factor", "qps", "recall", "speedup_vs_flat")
    return {k: best[k] for k in keys if k in best}


def auto_table(budget_mb: float) -> list[dict[str, Any]]:
    """What `auto` picks at a range of catalog sizes (nothing built), and the rows it would train on."""
    rows = []
    for n in AUTO_SIZES:
        choice = choose_factory(n, D, budget_mb)
        trained = "IVF" in choice.factory or "PQ" in choice.factory
        rows.append(
            {
                "n": n,
                "auto": choice.factory,
                "train_size": training_size(n, choice.factory, D, budget_mb) if trained else None,
                "reason": choice.reason,
            }
        )
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; the index defaults come from params.yaml's `index:` block."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog=f"Cost on 2 cores: --quick ~15-30 s; default sizes ~8 min. {HNSW_1M_NOTE} (~25 min in all).",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="base sizes")
    p.add_argument("--quick", action="store_true", help="20k only, 1 repeat (~15-30 s)")
    p.add_argument("--hnsw-1m", action="store_true", help="also build HNSW32 at >= 1M (~16 min on 2 cores)")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="timed searches per setting (median)")
    p.add_argument(
        "--ivf-pq", default="IVF{nlist},PQ64x4fs,RFlat", help="IVF-PQ factory, {nlist} ~ 2 sqrt(n)"
    )
    p.add_argument(
        "--k-factor", type=float, default=None, help="RFlat re-ranks k_factor x k (default: params.yaml)"
    )
    p.add_argument("--nprobe-sweep", type=int, nargs="*", default=[4, 8, 16, 32, 64])
    p.add_argument("--ef-sweep", type=int, nargs="*", default=[16, 32, 64, 128])
    p.add_argument("--k-factor-sweep", type=int, nargs="*", default=[4, 8, 32])
    p.add_argument("--clusters", type=int, default=2000, help="cluster centres on the sphere")
    p.add_argument("--groups", type=int, default=64, help="directions the cluster centres gather around")
    p.add_argument("--intrinsic-dim", type=int, default=24, help="directions each cluster varies along")
    p.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="FAISS threads (default: usable cores)")
    p.add_argument("--no-save", action="store_true", help="print only, write no results file")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats = [20_000], 1
    if min(args.sizes) < 1000 or args.queries < 1 or args.k < 1 or args.repeats < 1:
        p.error("sizes must be >= 1000; --queries, --k and --repeats >= 1")
    index = load_params(args.params).index
    args.memory_budget_mb, args.nprobe, args.ef_search = index.memory_budget_mb, index.nprobe, index.ef_search
    if args.k_factor is None:
        args.k_factor = index.k_factor
    return args


def print_report(results: list[dict[str, Any]], args: argparse.Namespace, total: float) -> None:
    """The results table, the sweeps, what was skipped, what auto picks and the verdict per size."""
    rows = [r for s in results for r in s["rows"]]
    columns = [
        "n",
        "index",
        "factory",
        "build_s",
        "memory_mb",
        "qps",
        "speedup_vs_flat",
        "recall",
        "meets_goal",
    ]
    print_table(rows, columns, title=f"FAISS at scale: {args.queries} queries, recall@{args.k} vs exact")
    sweeps = [{"n": r["n"], "index": r["index"], **p} for r in rows for p in r["sweep"]]
    print_table(sweeps, ["n", "index", "knob", "value", "qps", "speedup_vs_flat", "recall"], title="Sweeps")
    for s in results:
        for skip in s["skipped"]:
            print(f"skipped at n={s['n']:,}: {skip['index']} ({skip['factory']}): {skip['reason']}")
    print_table(
        auto_table(args.memory_budget_mb), title=f"What auto picks (budget {args.memory_budget_mb:g} MB)"
    )
    print()
    for s in results:
        best = s["best"]
        if best is None:
            verdict = f"no setting reached recall@{args.k} {GOAL_RECALL}"
        else:
            knobs = ", ".join(f"{k}={best[k]:g}" for k in ("nprobe", "ef_search", "k_factor") if k in best)
            met = "meets" if best["speedup_vs_flat"] >= GOAL_SPEEDUP else "misses"
            verdict = (
                f"fastest at recall >= {GOAL_RECALL}: {best['factory']} ({knobs}) {best['qps']:,.0f} QPS, "
                f"recall {best['recall']}, {best['speedup_vs_flat']}x Flat: {met} the {GOAL_SPEEDUP:g}x goal"
                + ("" if s["n"] >= 1_000_000 else " (set for 1M, where exact search is 10x+ slower)")
            )
        print(
            f"n={s['n']:,} ({s['wall_s']:.0f} s): auto -> {s['auto']['factory']}, because "
            f"{s['auto']['reason']}"
        )
        print(f"  {verdict}")
    print(f"total {total:.0f} s")


def main(argv: list[str] | None = None) -> None:
    """Run every size, print the tables (auto's choice and reason included) and save the results."""
    args = parse_args(argv)
    cores = args.threads or len(os.sched_getaffinity(0))
    faiss.omp_set_num_threads(cores)
    search = {"nprobe": args.nprobe, "ef_search": args.ef_search}
    print(
        f"d={D}, {args.queries} queries, k={args.k}, {cores} threads; {args.clusters} clusters in "
        f"{args.groups} groups, intrinsic dim {args.intrinsic_dim}; params.yaml: {search}, "
        f"memory budget {args.memory_budget_mb:g} MB; IVF-PQ k_factor {args.k_factor:g}"
    )
    if any(n >= 1_000_000 for n in args.sizes) and not args.hnsw_1m:
        print(f"note: {HNSW_1M_NOTE}", file=sys.stderr)
    model = make_model(D, args.clusters, args.groups, args.intrinsic_dim, args.seed)
    t0 = time.perf_counter()
    results = [run_size(n, model, args, search) for n in args.sizes]
    total = time.perf_counter() - t0
    print_report(results, args, total)
    if not args.no_save:
        payload = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "threads": cores,
            "goal": {"speedup_vs_flat": GOAL_SPEEDUP, "recall": GOAL_RECALL, "at_n": 1_000_000},
            "sizes": results,
            "auto_table": auto_table(args.memory_budget_mb),
            "wall_s": round(total, 1),
        }
        print(f"wrote {write_results('faiss_scale.quick' if args.quick else 'faiss_scale', payload)}")


if __name__ == "__main__":
    main()
