"""Fill the figure blocks of README.md and docs/*.md from bench/results/*.json and the committed metrics.

A block is the text between `<!-- figures:NAME -->` and `<!-- /figures -->`; NAME picks a renderer below.
Everything between the markers is generated, so a figure quoted there cannot drift from its results file.
Each block ends with the line that says what it was measured on (commit as the file records it, CPU,
cores, date) and which file it came from.

    python scripts/render_docs.py            # rewrite the blocks in place
    python scripts/render_docs.py --check    # exit 1 and name each stale block (tests/test_docs.py)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
BLOCK = re.compile(r"(<!-- figures:([a-z_]+) -->\n)(.*?)(<!-- /figures -->)", re.S)


def _load(name: str) -> dict[str, Any]:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def _num(x: float | None, digits: int = 1) -> str:
    """A figure as the docs print it: thousands separated, `digits` decimals below 100, '—' for None."""
    if x is None:
        return "—"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:,.{digits}f}"


def measured_on(machine: dict[str, Any], source: str) -> str:
    """The provenance line of a block: commit as recorded (+dirty kept), CPU, cores, date, file."""
    commit = machine.get("git_commit") or "unknown commit"
    short = commit[:7] + ("+dirty" if commit.endswith("+dirty") else "")
    date = str(machine.get("date", "?"))[:10]
    cpu = machine.get("cpu", "?")
    cores = machine.get("cores", "?")
    return f"*Measured at commit `{short}` on {cores} vCPUs of an {cpu}, {date}; `{source}`.*"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def serve_load() -> list[str]:
    """Text, image and product queries over HTTP against the in-process loop, plus soak and saturation."""
    d = _load("serve_load")
    rows = [
        [r["kind"], r["clients"], _num(r["qps"]), _num(d["in_process"][r["kind"]]["qps"]),
         f"{r['vs_in_process']:.2f}", _num(r["p50_ms"], 0), _num(r["p95_ms"], 0), _num(r["p99_ms"], 0),
         r["errors"], _num(r["peak_rss_mb"], 0)]
        for r in d["runs"]
    ]  # fmt: skip
    header = [
        "queries",
        "clients",
        "QPS",
        "in process",
        "ratio",
        "p50 ms",
        "p95 ms",
        "p99 ms",
        "errors",
        "RSS MiB",
    ]
    s, sat = d["soak"], d["saturation"]
    out = _table(header, rows)
    out += [
        "",
        f"- Soak, {s['seconds'] / 60:.0f} min of mixed queries from {s['clients']} clients: "
        f"{s['requests']:,} requests, {_num(s['qps'])} QPS, p99 {_num(s['p99_ms'], 0)} ms, "
        f"{s['errors']} errors; server RSS "
        f"{s['rss_start_mb']} → {s['rss_end_mb']} MiB (growth {s['rss_growth']:.1%}).",
        f"- Saturation, {sat['clients']} clients against `--max-inflight {d['settings']['max_inflight']}`: "
        f"{sat['statuses'].get('503', 0):,} immediate 503s and {sat['statuses'].get('200', 0):,} answers in "
        f"{sat['seconds']:.0f} s; peak RSS {_num(sat['peak_rss_mb'], 0)} MiB.",
        "",
        measured_on(d["machine"], "bench/results/serve_load.json"),
    ]
    return out + _under_attack(d["under_attack"])


def _under_attack(a: dict[str, Any]) -> list[str]:
    c, t, x = a["clean"], a["attack"], a["attackers"]
    return [
        "",
        f"Under attack ({a['settings']['seconds']:.0f}-s runs, {c['clients']} text clients; "
        f"{x['slow_connections_each']} slow-body and {x['slow_connections_each']} slow-header connections, "
        f"a {a['settings']['bomb_side']}² {a['settings']['bomb_scans']:,}-scan JPEG bomb a second): "
        f"{_num(c['qps'])} → {_num(t['qps'])} QPS ({a['qps_ratio']:.2f}×), p99 {_num(c['p99_ms'], 0)} → "
        f"{_num(t['p99_ms'], 0)} ms, {t['errors']} errors; bombs {x['bomb_statuses']} within "
        f"{x['bomb_answer_s_max']} s; slow bodies {x['slow_body_outcomes']}; "
        f"slow heads {x['slow_header_outcomes']}.",
        "",
        measured_on(a["machine"], "bench/results/serve_load.json, section under_attack")
        + (f" {a['settings']['note']}." if a["settings"].get("note") else ""),
    ]


def serve_hostile() -> list[str]:
    """The never-ending header and the idle-connection flood against a real `cliprec serve`."""
    d = _load("serve_hostile")
    h, f = d["header_stream"], d["idle_flood"]
    return [
        f"- A never-ending header ({h['attempted_mib']} MiB attempted): `{h['answer']}` after "
        f"{h['sent_mib']} MiB had left the client; server RSS +{h['rss_growth_mib']} MiB.",
        f"- {f['connections']:,} idle connections: {f['refused_by_server']:,} refused by the server "
        f"(and logged), {f['connect_failed']} failed to connect; server RSS +{f['rss_growth_mib']} MiB.",
        "",
        measured_on(d["machine"], "bench/results/serve_hostile.json"),
    ]


def scale() -> list[str]:
    """Wall seconds and peak RSS per stage at 1k, 10k and 100k products."""
    d = _load("scale")
    sizes = sorted({r["n_products"] for r in d["rows"]})
    by = {(r["stage"], r["n_products"]): r for r in d["rows"]}
    stages = list(dict.fromkeys(r["stage"] for r in d["rows"]))
    header = ["stage", *(f"{n:,}: s / MB" for n in sizes), "RSS largest / smallest"]
    rows = []
    for st in stages:
        cells = [f"{by[st, n]['wall_s']:.1f} / {by[st, n]['peak_rss_mb']:.0f}" for n in sizes]
        ratio = by[st, sizes[-1]]["peak_rss_mb"] / by[st, sizes[0]]["peak_rss_mb"]
        rows.append([st, *cells, f"{ratio:.2f}×"])
    reruns = ", ".join(
        f"{'/'.join(r['stages'])} at `{r['machine']['git_commit'][:7]}`" for r in d.get("reruns", [])
    )
    out = _table(header, rows) + ["", measured_on(d["machine"], "bench/results/scale.json")]
    return out + ([f"*Rerun on the kept projects: {reruns}.*"] if reruns else [])


def repro() -> list[str]:
    """The fresh-clone `dvc repro` and the no-op one."""
    d = _load("repro")
    f, n = d["full"], d["noop"]
    kinds = ", ".join(f"{k['kind']} {k['seconds']:.0f} s" for k in f["per_kind"])
    return [
        f"- Full demo `dvc repro` from a fresh clone: **{f['total_s']:.0f} s** ({kinds}); "
        f"goal ≤ {f['goal_s']:.0f} s.",
        "  " + measured_on(f["machine"], "bench/results/repro.json, full"),
        f"- No-op `dvc repro`: {n['median_s']:.1f} s (median of {n['repeats']}); goal ≤ {n['goal_s']:.0f} s.",
        "  " + measured_on(n["machine"], "bench/results/repro.json, noop"),
    ]


def embed_throughput() -> list[str]:
    """The embedding path against a bare forward pass, demo CLIP and ViT-B/32 shape."""
    out = _table(["model", "input", "path /s", "bare /s", "path / bare"], [])
    lines = []
    for name in ("embed_throughput.demo", "embed_throughput.vitb32"):
        d = _load(name)
        for r in d["rows"]:
            out.append(f"| {r['model']} | {r['input']} | {_num(r['path items/s'], 2)} | "
                       f"{_num(r['bare items/s'], 2)} | {r['path/bare']:.2f} |")  # fmt: skip
        lines.append(measured_on(d["machine"], f"bench/results/{name}.json"))
    return [*out, "", *lines]


def fetch_images() -> list[str]:
    """The image fetcher over loopback: threads against serial, at 0 and 50 ms server latency."""
    d = _load("fetch_images")
    rows = [
        [r["latency_ms"], r["workers"], _num(r["images_per_s"]), _num(r["per_core"]), f"{r['speed_up']:.1f}×",
         r["cpu_ms_per_image"]]
        for r in d["rows"]
    ]  # fmt: skip
    p = d["process_image_only"]
    return _table(["latency ms", "threads", "images/s", "per core", "speed-up", "CPU ms/image"], rows) + [
        "",
        f"`process_image` alone (decode + resize + encode): {p['images_per_s_one_core']} images/s "
        "on one core.",
        "",
        measured_on(d["machine"], "bench/results/fetch_images.json"),
    ]


def faiss_scale() -> list[str]:
    """FAISS indexes on clustered 512-d vectors at 100k and 1M."""
    d = _load("faiss_scale")
    rows = []
    for s in d["sizes"]:
        for r in s["rows"]:
            rows.append([f"{s['n']:,}", f"`{r['factory']}`", f"{r['build_s']:.1f}", _num(r["memory_mb"], 0),
                         _num(r["qps"]), f"{r['recall']:.3f}", f"{r['speedup_vs_flat']:.1f}×"])  # fmt: skip
    best = [
        f"at {s['n']:,}: `{b['factory']}` at nprobe {b['nprobe']}, k_factor {b['k_factor']:g}: "
        f"{_num(b['qps'])} QPS, "
        f"recall {b['recall']:.3f} ({b['speedup_vs_flat']:.0f}× exact)"
        for s in d["sizes"]
        for b in [s["best"]]
    ]
    return _table(["vectors", "index", "build s", "MB", "QPS", "recall@10", "vs exact"], rows) + [
        "",
        "Fastest setting at recall@10 ≥ 0.95 in the sweep: " + "; ".join(best) + ".",
        "",
        measured_on(d["machine"], "bench/results/faiss_scale.json"),
    ]


def train_step() -> list[str]:
    """One LoRA step at batch 32, fp32 against bf16 autocast."""
    rows, lines = [], []
    for name in ("train_step.demo", "train_step.vitb32"):
        d = _load(name)
        for r in d["rows"]:
            rows.append(
                [r["model"], r["precision"], r["batch"], _num(r["ms/step"], 0), f"{r['time / fp32']:.1f}×"]
            )
        lines.append(measured_on(d["machine"], f"bench/results/{name}.json"))
    return _table(["model", "precision", "batch", "ms/step", "time / fp32"], rows) + ["", *lines]


def _stage_rate(s: dict[str, Any]) -> str:
    """A stage's rate where a progress bar timed it, else what it counted (the query stages time nothing)."""
    if s.get("per_s") is not None:
        return f"{_num(s['per_s'], 3)} {s['unit']}/s"
    return "" if s.get("items") is None else f"{s['items']:,} {s['unit']}"


def study_rehearsal() -> list[str]:
    """Per stage of the rehearsal, and the projection to the study's size."""
    d = _load("study_rehearsal")
    run = d["runs"][0]
    rows = [
        [s["stage"], s["wall_s"], _num(s.get("work_s"), 2), _num(s["peak_rss_mb"], 0), _stage_rate(s)]
        for s in run["stages"]
    ]  # fmt: skip
    step = d["train_step_at_study_batch"][0]
    proj = d["projection"][0]
    hours = ", ".join(f"{k} {v:.1f} h" for k, v in proj["cpu_hours"].items() if v >= 0.05)
    return _table(["stage", "wall s", "work s", "peak RSS MB", "throughput"], rows) + [
        "",
        f"Whole `dvc exp run` ({run['run']}): **{run['total_s']:.0f} s**. One LoRA step at batch "
        f"{step['batch']} (both towers, 224 px, fp32): "
        f"**{step['seconds']:.0f} s, {step['peak_rss_mb']:,} MB peak RSS**.",
        f"Projection to {proj['products']:,} products ({proj['category']}, {proj['epochs']} epochs), "
        f"this CPU: {hours}; **~{proj['cpu_hours_total']:.0f} h** in all.",
        "",
        measured_on(d["machine"], "bench/results/study_rehearsal.json"),
    ]


def _hours(h: float) -> str:
    return f"{h * 60:.0f} min" if h < 1 else f"{h:.1f} h" if h < 2 else f"{h:.0f} h"


def study_projection() -> list[str]:
    """The rehearsal's projection to the study's size: this CPU from measured rates, a GPU from estimates."""
    d = _load("study_rehearsal")
    p = d["projection"][0]
    cpu, gpu, basis = p["cpu_hours"], p["a100_estimate_minutes"], p["a100_basis"]
    ref, flops = basis["bart_reference"], basis["clip_gflop"]
    mix = d["bart"][p["category"]]
    images_min = cpu["images"] * 60
    total_fp32 = gpu["summarize_bf16_reference"] + gpu["train_fp32"] + gpu["embed_fp32"] + images_min
    total_amp = gpu["summarize_bf16_reference"] + gpu["train_bf16"] + gpu["embed_bf16"] + images_min
    steps = p["train_steps"] // p["epochs"]
    tflops = basis["sustained_tflops_estimate"]
    bart_basis = (
        f"CPU: the measured {p['bart_cpu_gflop_per_s']} GFLOP/s × a FLOP model of the study's batches "
        f"(stand-in mix: {mix['study_mix_mean_tokens']:.0f} input tokens on average, "
        f"{mix['study_mix_share_at_limit']:.1%} at {mix['max_input_tokens']:,}). GPU: NVIDIA "
        f"DeepLearningExamples' BART README, 1× A100 80 GB, {ref['conditions']}: {ref['sequences_per_s']} "
        "sequences/s; our summarize runs in fp32 with transformers' generate: expect it slower"
    )
    train_basis = (
        f"CPU: the batch-128 step ({p['train_cpu_s_per_example']} s per example) + photo decoding + "
        f"validation passes. GPU: ({flops['image']} + {flops['text77']}) GFLOP × "
        f"{basis['train_flop_factor']:g} per example at {tflops['fp32']:.1f} / {tflops['bf16']:.0f} "
        "sustained TFLOPS fp32 / bf16"
    )
    embed_basis = (
        f"CPU: {p['embed_cpu_s_per_product']} s per product (two photos and a summary). GPU: as above"
    )
    rows = [
        ["summarize (BART)", f"**{_hours(cpu['summarize'])}**",
         f"~{gpu['summarize_bf16_reference']:.0f} min (bf16)", bart_basis],
        [f"train ({p['epochs']} epochs × {steps} steps of 128)", _hours(cpu["train"]),
         f"~{gpu['train_fp32']:.0f} min fp32, ~{gpu['train_bf16']:.0f} min bf16 (**estimate**)", train_basis],
        ["embed, zero-shot + LoRA", _hours(cpu["embed"]), f"~{gpu['embed_fp32']:.0f} min fp32 (**estimate**)",
         embed_basis],
        ["images", f"{images_min:.0f} min", "the same (CPU)",
         "local files here; over the network see [the fetcher](performance.md#image-fetcher)"],
        ["ingest, index, evaluate, compare", "seconds each", "seconds",
         "the hub download of the category file is not included"],
        ["**total**", f"**~{p['cpu_hours_total']:.0f} h**",
         f"**~{total_fp32:.0f} min** (fp32 train and embed), ~{total_amp:.0f} min with `amp: true`", ""],
    ]  # fmt: skip
    return _table(["stage", "this CPU (2 vCPUs)", "A100-class GPU", "basis"], rows) + [
        "",
        measured_on(d["machine"], "bench/results/study_rehearsal.json, projection"),
    ]


def fanout() -> list[str]:
    """How many modules a one-line edit reruns how many stages of, before and after cliprec_worlds/."""
    out = _table(
        ["layout", "setup", "modules", "rerun nothing", "rerun ≤ 2 stages", "median stages rerun"], []
    )
    lines = []
    for label, name in (("before", "fanout.before"), ("after", "fanout")):
        d = _load(name)
        for setup, table in d["measured"].items():
            counts = sorted(len(v) for v in table.values())
            out.append(f"| {label} (`{d['commit'][:7]}`) | {setup} | {len(counts)} | "
                       f"{sum(c == 0 for c in counts)} | {sum(c <= 2 for c in counts)} | "
                       f"{counts[len(counts) // 2]} |")  # fmt: skip
        lines.append(measured_on(d["machine"], f"bench/results/{name}.json"))
    return [*out, "", "Per module: [docs/layout.md](layout.md).", "", *lines]


def cue_ablation() -> list[str]:
    """The LoRA - zero-shot T->I gain with brands, then catalog-only words, removed from the test queries."""
    d = _load("cue_ablation")
    names = {"as_is": "as built", "no_brands": "brands removed",
             "random_words_as_brands": "as many random words removed (control)",
             "no_brands_no_catalog_words": "brands + catalog-only words removed",
             "no_brands_random_words": "brands + as many random words removed (control)"}  # fmt: skip
    cats = list(d["categories"])
    header = ["test queries", *(f"{c}: words removed" for c in cats), *(f"{c}: R@5 gain, kept" for c in cats)]
    rows = []
    for cond, label in names.items():
        cells = [d["categories"][c]["conditions"][cond] for c in cats]
        removed = [f"{x['words_removed_share']:.0%}" for x in cells]
        rows.append([label, *removed, *(_kept(x["metrics"]["recall_at_5"]) for x in cells)])
    shares = [d["categories"][c]["word_shares"] for c in cats]
    words = ", ".join(
        f"{c} {s['brand_share_of_query_words']:.1%} / {s['catalog_only_share_of_query_words']:.0%}"
        for c, s in zip(cats, shares)
    )
    caption = max(s["catalog_only_share_of_pretraining_words"] for s in shares)
    vs = "; ".join(
        f"{c}, {names[cond]}: {_plain(r['conditions'][cond]['gain_vs_control']['recall_at_5'])}"
        for c, r in d["categories"].items()
        for cond in ("no_brands", "no_brands_no_catalog_words")
    )
    return _table(header, rows) + [
        "",
        f"R@5 gain with the cue words removed minus the gain of its control (paired): {vs}.",
        "",
        f"Brand / catalog-only words in the test queries: {words}; in the demo CLIP's pre-training captions: "
        f"0 / ≤ {caption:.1%} of the words.",
        "",
        measured_on(d["machine"], "bench/results/cue_ablation.json"),
    ]


def _kept(e: dict[str, Any]) -> str:
    """A gain cell: the paired difference with its CI and p, and the share of the as-built gain it keeps."""
    cell = _plain(e["difference"])
    g = e["gain_remaining"]
    if g is None:
        return cell
    return f"{cell}; {g['value']:.0%}" + ("" if g["low"] is None else f" [{g['low']:.0%}, {g['high']:.0%}]")


def _plain(d: dict[str, Any]) -> str:
    """A paired difference with its CI and p, never bold (these differences are not a tested family)."""
    return _diff({**d, "significant": False})


def _runs(d: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(section, machine) of every run a results file records: the file's own and each section's."""
    runs = [("", d["machine"])] if "machine" in d else []
    runs += [(k, v["machine"]) for k, v in d.items() if isinstance(v, dict) and "machine" in v]
    runs += [(f"reruns: {'/'.join(r['stages'])}", r["machine"]) for r in d.get("reruns", [])]
    return runs


def results_index() -> list[str]:
    """Every bench/results file with the commit (as recorded, `+dirty` kept) and machine of each run in it."""
    rows = []
    for path in sorted(RESULTS.glob("*.json")):
        d = json.loads(path.read_text(encoding="utf-8"))
        for section, m in _runs(d):
            commit = m.get("git_commit") or "not recorded"
            dirty = "yes" if commit.endswith("+dirty") else "no"
            short = commit.removesuffix("+dirty")[:10]
            where = [m.get("cpu", "?"), m.get("cores", "?"), str(m.get("date", "?"))[:10]]
            rows.append([f"`{path.name}`", section or "(whole file)", f"`{short}`", dirty, *where])
    return _table(["file", "section", "commit", "dirty tree", "CPU", "vCPUs", "date"], rows)


def results() -> list[str]:
    """The demo's results table, from the committed metrics and noise files through `cliprec report`."""
    sys.path.insert(0, str(REPO))
    from cliprec.report import MODES, SHORT, report_data

    report, notes = report_data(REPO, exp_show=lambda *_a, **_k: [])
    wanted = {"text_to_image": SHORT, "image_to_text": ("recall_at_5", "mrr"),
              "image_to_image": ("recall_at_5", "mrr"), "multimodal": ("recall_at_5", "mrr")}  # fmt: skip
    rows = []
    for cat, modes in report.items():
        for mode, metrics in wanted.items():
            for m in metrics:
                e = modes.get(mode, {}).get(m)
                if e:
                    d = e.get("lora_minus_zeroshot")
                    rows.append([cat, MODES[mode], SHORT[m], _ci(e.get("zeroshot")), _ci(e.get("lora")),
                                 _spread((e.get("lora") or {}).get("seeds")), _diff(d),
                                 _spread((d or {}).get("seeds"), signed=True)])  # fmt: skip
    for cat, src in notes["sources"].items():
        sims = [_seed(src.metrics.get(v)) for v in ("zeroshot", "lora")]
        rows.append(
            [cat, "seed", "sim@5 (w/o self)", *sims, "—", "(not paired: not a relevance metric)", "—"]
        )
    head = ["Category", "Mode", "Metric", "zero-shot", "LoRA (committed run)", "LoRA over seeds",
            "LoRA − zero-shot (paired)", "gain over seeds"]  # fmt: skip
    return _table(head, rows)


def shopper_results() -> list[str]:
    """The demo's shopper-query results: each metric per variant with its CI, and the paired difference."""
    sys.path.insert(0, str(REPO))
    from cliprec.report import SHORT, report_data
    from cliprec.results import read_json

    report, _ = report_data(REPO, exp_show=lambda *_a, **_k: [])
    rows = []
    for cat, modes in report.items():
        detail = read_json(REPO / "metrics" / cat / "lora.detail.json") or {}
        n = (detail.get("queries") or {}).get("queries", "—")
        for m in ("ndcg_at_10", "ndcg_at_100", "recall_at_10", "recall_at_100", "mrr"):
            e = modes.get("queries", {}).get(m)
            if e:
                d = e.get("lora_minus_zeroshot")
                rows.append([cat, n, SHORT[m], _ci(e.get("zeroshot")), _ci(e.get("lora")), _diff(d),
                             _spread((d or {}).get("seeds"), signed=True)])  # fmt: skip
    head = [
        "Category",
        "test queries",
        "Metric",
        "zero-shot",
        "LoRA",
        "LoRA − zero-shot (paired)",
        "gain over seeds",
    ]
    return _table(head, rows)


def gate_noise() -> list[str]:
    """bench/results/gate_noise.json: the gate on pure retraining noise and on real regressions."""
    d = _load("gate_noise")
    rows = []
    for case, c in d["cases"].items():
        verdicts = [
            ("PASS" if c[k]["passed"] else f"FAIL ({c[k]['failures']})") for k in ("with_noise", "strict")
        ]
        rows.append([case, " ".join(f"`-S {o}`" for o in c["overrides"]), *verdicts])
    table = _table(["case", "experiment", "gate (noise files)", "strict rule (no noise file)"], rows)
    seeds, n = next(iter(d["noise_seeds"].values())), d["seed_runs"]
    summary = (
        f"False failures on retraining noise: {d['false_failures']} of {n} with the noise files "
        f"(seeds {seeds}), {d['false_failures_strict']} of {n} by the strict rule. "
    )
    return [*table, "", summary + measured_on(d["machine"], "bench/results/gate_noise.json")]


def _spread(s: dict[str, Any] | None, signed: bool = False) -> str:
    """mean ± sd over training seeds (from the noise file), or '—'."""
    if not s or s.get("mean") is None:
        return "—"
    mean = f"{s['mean']:+.3f}" if signed else f"{s['mean']:.3f}"
    return f"{mean} ± {s['sd']:.3f}".replace("-", "−")


def _seed(metrics: dict[str, Any] | None) -> str:
    """The seed project's similarity metric with its CI, from one variant's metrics file."""
    if not metrics or "avg_mean_similarity_at_5" not in metrics:
        return "—"
    ci = metrics.get("avg_mean_similarity_at_5_ci95") or {}
    return _ci(
        {"value": metrics["avg_mean_similarity_at_5"], "ci_low": ci.get("low"), "ci_high": ci.get("high")}
    )


def _ci(v: dict[str, Any] | None) -> str:
    if not v:
        return "—"
    if v.get("ci_low") is None:
        return f"{v['value']:.3f}"
    return f"{v['value']:.3f} [{v['ci_low']:.3f}, {v['ci_high']:.3f}]"


def _diff(d: dict[str, Any] | None) -> str:
    if not d:
        return "—"
    p = "p < 0.001" if d["p_value"] < 0.001 else f"p {d['p_value']:.3f}"
    holm = d.get("p_holm")
    p += "" if holm is None else f" (Holm {holm:.3f})"
    cell = f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]".replace("-", "−")
    return (f"**{cell}**" if d["significant"] else cell) + f", {p}"


RENDERERS: dict[str, Callable[[], list[str]]] = {
    f.__name__: f
    for f in (serve_load, serve_hostile, scale, repro, embed_throughput, fetch_images, faiss_scale,
              train_step, study_rehearsal, study_projection, fanout, results, shopper_results, results_index,
              cue_ablation, gate_noise)
}  # fmt: skip


def doc_files() -> list[Path]:
    """README.md, every docs/*.md and bench/results/README.md."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), RESULTS / "README.md"]


def render(text: str, where: str) -> str:
    """text with every figure block regenerated; an unknown block name is an error naming the file."""

    def fill(m: re.Match[str]) -> str:
        name = m.group(2)
        if name not in RENDERERS:
            raise SystemExit(
                f"error: {where}: unknown figures block {name!r} (known: {', '.join(RENDERERS)})"
            )
        return m.group(1) + "\n".join(RENDERERS[name]()) + "\n" + m.group(4)

    return BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    """Rewrite the blocks, or with --check report the files whose blocks are stale (exit 1)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 when a block is stale")
    args = ap.parse_args(argv)
    stale = []
    for path in doc_files():
        rel = path.relative_to(REPO).as_posix()
        text = path.read_text(encoding="utf-8")
        new = render(text, rel)
        if new != text:
            stale.append(rel)
            if not args.check:
                path.write_text(new, encoding="utf-8")
    if args.check and stale:
        print(
            f"stale figure blocks in {', '.join(stale)}: run python scripts/render_docs.py", file=sys.stderr
        )
        return 1
    for rel in stale:
        print(f"rewrote {rel}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
