"""Study dress rehearsal: `setup=study` end to end, at the real model shapes, through DVC, on local stand-ins.

The study (Amazon-2023 from the hub, openai/clip-vit-base-patch32, facebook/bart-large-cnn) cannot reach
the hub here, so the rehearsal points its three hub resources at the stand-ins that
`scripts/build_study_standins.py` builds (same architectures, random weights; a catalog in the hub's
layout whose image URLs are local files) and changes nothing else: BART with beams, 224-px images, batch
size, lr and every other value are the study's. Allowed, and recorded: fewer products
(`setups.study.ingest.n_products`), fewer epochs and fewer categories.

How: this checkout's project files go into a temporary git + DVC repository, the stand-in catalog into
its catalog/amazon-2023 (a DVC dependency of ingest, like any local copy of the hub repo), the stand-in
Amazon-C4 queries into catalog/amazon-c4 (the study's query set), and there

    dvc exp run -S setup=study -S setups.study.ingest.hub_root=catalog/amazon-2023 \
        -S setups.study.queries.hub_root=catalog/amazon-c4 \
        -S setups.study.model.name=<standins>/clip-vit-base-patch32 \
        -S setups.study.summarize.model=<standins>/bart-large-cnn \
        -S setups.study.ingest.n_products=N -S epochs=E [-S 'categories=[...]']

runs every stage as DVC runs it (one process per stage). While it runs, a monitor polls the process tree
every 0.1 s: each stage process's peak RSS (the kernel's high-water mark, VmHWM, of the process and its
children) and CPU seconds, and on a GPU its memory (nvidia-smi). A stage's wall time runs from DVC's
"Running stage" line to the next one (DVC's hashing and dvc.lock included); its work time is what its
progress bar (tqdm) reports for the work itself: summarising, fetching, training steps, embedding; the
rest of its process time is start-up (imports, model loading, data preparation). With CUDA available
(`torch.cuda.is_available()`: nothing to pass), the pipeline runs on the GPU as it is, then again with
`-S amp=true` (train and the stages after it rerun).

The study's batch of 128 needs 160+ products to fill, more than a CPU rehearsal can summarise, so one
LoRA step at that batch (both towers, 224-px photos, 77-token texts) also runs in a process of its own:
its time and peak memory (`--step-check-only` adds it to an existing results file).

The results (bench/results/study_rehearsal.json): per stage wall time, work time, peak RSS, CPU use, GPU
memory, throughput; the machine; and a projection of the study's 20,000 products per category from the
measured rates (BART by a FLOP model of batched beam search over the stand-in catalog's input lengths;
the other stages linearly), next to the seed project's 9 h 41 min for BART on 112k items.

Run (from the repo root; ~15 min at the defaults on 2 busy cores):
    python scripts/build_study_standins.py                 # once: ~3 min, ~2.4 GB under standins/
    python bench/study_rehearsal.py --categories Appliances --n-products 16 --epochs 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, RESULTS_DIR, group_watchdog, print_table, write_results

RESULTS_NAME = "study_rehearsal"
PROJECT_FILES = (
    "cliprec/",
    "cliprec_worlds/",  # ingest depends on cliprec_worlds/${setup}
    "stages/",
    "catalog/",
    "models/",
    "dvc.yaml",
    "params.yaml",
    ".dvcignore",
)
TABLE_COLUMNS = (
    "stage",
    "wall_s",
    "work_s",
    "startup_s",
    "peak_rss_mb",
    "cpu_s",
    "gpu_mb",
    "items",
    "unit",
    "per_s",
)
HUB_ROOT = "catalog/amazon-2023"  # where the stand-in catalog goes in the temporary project
C4_ROOT = "catalog/amazon-c4"  # and the stand-in C4 queries (test.csv)
STAGE_LINE = re.compile(r"Running stage '([^']+)'")
# a tqdm bar: "<desc>:  42%|####      | 5/12 [00:03<00:04, 1.6it/s]"
BAR = re.compile(
    r"(?P<desc>[^|\r\n]*?): *(?P<pct>\d+)%\|[^|]*\| *(?P<n>\d+)/(?P<total>\d+) "
    r"\[(?P<elapsed>[\d:]+)<[^,\]]*(?:, *(?P<rate>[\d.]+)(?P<unit>[^,\]]*))?"
)
STUDY_PRODUCTS = 20_000  # setups.study.ingest.n_products, per category
STUDY_EPOCHS = 10
SEED_BART = {"items": 112_000, "seconds": 9 * 3600 + 41 * 60}  # the seed project's BART run
# Public reference (NVIDIA DeepLearningExamples, PyTorch/LanguageModeling/BART/README.md, "Inference
# performance: NVIDIA DGX A100 (1x A100 80GB)"): BF16, XSum test set, source length 1024, target 60,
# beam 6, batch 16: 16.3 sequences/s.
A100_BART_REFERENCE = {"sequences_per_s": 16.3, "conditions": "BF16, src 1024, tgt 60, beam 6, batch 16"}
# Explicit ESTIMATES (no A100 measured here): sustained throughput of dense fp32 / bf16 matmul-heavy work
# on an A100 in PyTorch eager, ~40% of the 19.5 TFLOPS fp32 (no TF32: PyTorch's default) and of the
# 312 TFLOPS bf16 tensor-core peaks; CLIP ViT-B/32 FLOPs from bench/embed_throughput.py's counter.
A100_EST_TFLOPS = {"fp32": 0.4 * 19.5, "bf16": 0.4 * 312.0}
CLIP_GFLOP = {"image": 8.82, "text77": 5.96}
TRAIN_FLOP_FACTOR = 3.0  # forward + backward ~ 3x forward (LoRA still backpropagates through the towers)


# --- running the pipeline --------------------------------------------------------------------------------


def sh(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    """Run a set-up command; raise with its output when it fails."""
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    return done.stdout


def make_project(root: Path, standins: Path, categories: list[str], env: dict[str, str]) -> None:
    """This checkout's pipeline + the stand-in catalog in a new git + DVC repo, committed."""
    listed = ["git", "ls-files", "--cached", "--others", "--exclude-standard"]
    for name in sh(listed, REPO_ROOT, env).splitlines():
        if name.startswith(PROJECT_FILES) and (REPO_ROOT / name).is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, root / name)
    for category in categories:
        rel = f"raw/meta_categories/meta_{category}.jsonl"
        (root / HUB_ROOT / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(standins / "amazon-2023" / rel, root / HUB_ROOT / rel)
    (root / C4_ROOT).mkdir(parents=True, exist_ok=True)
    shutil.copy2(standins / "amazon-c4" / "test.csv", root / C4_ROOT / "test.csv")
    for cmd in (
        ["git", "init", "-q"],
        ["dvc", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "commit", "-qm", "study rehearsal"],
    ):
        sh(cmd, root, env)


def stage_of(cmdline: list[str]) -> str | None:
    """The DVC stage name of a stage process ("python stages/embed.py Appliances lora" -> embed_lora@...)."""
    for i, arg in enumerate(cmdline):
        if arg.startswith("stages/") and arg.endswith(".py"):
            kind, args = Path(arg).stem, cmdline[i + 1 :]
            if kind == "embed" and len(args) >= 2:
                return f"embed_{args[1]}@{args[0]}"
            if kind in ("index", "evaluate", "embed_queries") and len(args) >= 2:
                return f"{kind}@{args[0]}-{args[1]}"
            return f"{kind}@{args[0]}" if args else kind
    return None


def _hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class Monitor(threading.Thread):
    """Polls the process tree under `pid`: per stage process peak RSS, CPU seconds, GPU memory, lifetime."""

    def __init__(self, pid: int, t0: float, interval: float = 0.1) -> None:
        super().__init__(daemon=True)
        self.pid, self.t0, self.interval = pid, t0, interval
        self.stages: dict[str, dict[str, Any]] = {}
        self.load: list[float] = []
        self.stop = threading.Event()
        self.nvidia_smi = shutil.which("nvidia-smi")

    def _gpu_mb(self) -> dict[int, float]:
        """{pid: MiB} of the GPU's compute processes, and under -1 the GPU's whole used memory.

        In a container nvidia-smi may not see the processes' pids: the whole-GPU figure still counts.
        """
        used: dict[int, float] = {}
        for query, key in (("--query-compute-apps=pid,used_memory", None), ("--query-gpu=memory.used", -1)):
            try:
                cmd = [str(self.nvidia_smi), query, "--format=csv,noheader,nounits"]
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=5).stdout
            except (OSError, subprocess.SubprocessError):
                continue
            for line in out.splitlines():
                parts = [p.strip() for p in line.split(",")]
                try:
                    pid, mb = (int(parts[0]), float(parts[1])) if key is None else (key, float(parts[0]))
                except (ValueError, IndexError):
                    continue
                used[pid] = max(used.get(pid, 0.0), mb)
        return used

    def run(self) -> None:
        """Poll until stopped."""
        import psutil

        root = psutil.Process(self.pid)
        last_gpu = 0.0
        while not self.stop.is_set():
            now = time.perf_counter() - self.t0
            try:
                procs = root.children(recursive=True)
            except psutil.Error:
                break
            gpu = {}
            if self.nvidia_smi and now - last_gpu >= 1.0:
                gpu, last_gpu = self._gpu_mb(), now
            for proc in procs:
                try:
                    name = stage_of(proc.cmdline())
                    if name is None:
                        continue
                    tree = [proc, *proc.children(recursive=True)]
                    rss = sum(p.memory_info().rss for p in tree)
                    cpu = sum(sum(p.cpu_times()[:2]) for p in tree)
                except psutil.Error:
                    continue
                s = self.stages.setdefault(
                    name, {"first_s": now, "peak_rss_b": 0, "peak_hwm_kb": 0, "cpu_s": 0.0, "gpu_mb": 0.0}
                )
                s["last_s"] = now
                s["peak_rss_b"] = max(s["peak_rss_b"], rss)
                s["peak_hwm_kb"] = max(s["peak_hwm_kb"], sum(_hwm_kb(p.pid) for p in tree))
                s["cpu_s"] = max(s["cpu_s"], cpu)
                s["gpu_mb"] = max(s["gpu_mb"], *(gpu.get(p.pid, 0.0) for p in tree))
                s["gpu_total_mb"] = max(s.get("gpu_total_mb", 0.0), gpu.get(-1, 0.0))
            if not self.load or now - len(self.load) * 10 >= 0:
                self.load.append(os.getloadavg()[0])  # one sample per 10 s
            self.stop.wait(self.interval)


def run_pipeline(root: Path, args: list[str], env: dict[str, str], timeout_s: float, log: Path) -> dict:
    """`dvc exp run <args>` in root: timestamped output segments, stage starts, per-stage monitor data."""
    proc = subprocess.Popen(
        ["dvc", "exp", "run", *args],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: a timeout stops dvc and the stage it runs
    )
    t0 = time.perf_counter()
    monitor = Monitor(proc.pid, t0)
    monitor.start()
    watchdog, timed_out = group_watchdog(proc, timeout_s)
    segments: list[tuple[float, str, str | None]] = []  # (time, text, stage running then)
    stage, starts, buf = None, [], b""
    assert proc.stdout is not None
    with open(log, "ab") as out:
        try:
            while chunk := os.read(proc.stdout.fileno(), 65536):
                now = time.perf_counter() - t0
                out.write(chunk)
                buf += chunk
                *done, buf = re.split(rb"[\r\n]", buf)
                for raw in done:
                    text = raw.decode("utf-8", "replace")
                    if m := STAGE_LINE.search(text):
                        stage = m.group(1)
                        starts.append((stage, now))
                    if text.strip():
                        segments.append((now, text, stage))
            code = proc.wait()
        finally:
            watchdog.cancel()
            monitor.stop.set()
            monitor.join()
    end = time.perf_counter() - t0
    return {
        "returncode": code,
        "timed_out": timed_out.is_set(),
        "end_s": end,
        "starts": starts,
        "segments": segments,
        "monitor": monitor.stages,
        "load": monitor.load,
    }


# --- reading what happened --------------------------------------------------------------------------------


def _clock(text: str) -> float:
    """tqdm's elapsed field ("05:03", "1:02:03") in seconds."""
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def bar_spans(segments: list[tuple[float, str, str | None]]) -> dict[tuple[str, str], dict[str, float]]:
    """{(stage, bar desc): its seconds and items at the end} from the timestamped output.

    The seconds are tqdm's own: its elapsed field when it is 10 s or more (whole seconds), else items / its
    rate. Arrival times of the output are not used: DVC passes a stage's output on in bursts.
    """
    spans: dict[tuple[str, str], dict[str, float]] = {}
    for _, text, stage in segments:
        for m in BAR.finditer(text):
            key = (stage or "", m.group("desc").strip())
            n, total = int(m.group("n")), int(m.group("total"))
            span = spans.setdefault(key, {"n": 0, "total": total, "seconds": 0.0})
            if n < span["n"]:
                continue
            seconds = _clock(m.group("elapsed"))
            if seconds < 10 and m.group("rate") and n:
                rate, unit = float(m.group("rate")), m.group("unit") or ""
                if rate > 0:
                    seconds = n * rate if unit.startswith("s/") else n / rate
            span.update(n=n, seconds=seconds)
    return spans


def work_seconds(spans: dict, stage: str, desc_prefix: str) -> tuple[float | None, int]:
    """Summed seconds and items of the stage's bars whose desc starts with desc_prefix."""
    found = [v for (s, d), v in spans.items() if s == stage and d.startswith(desc_prefix)]
    if not found:
        return None, 0
    return sum(v["seconds"] for v in found), sum(v["n"] for v in found)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file, or {} when it is missing (a stage that did not run)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def stage_rows(result: dict, root: Path) -> list[dict[str, Any]]:
    """One row per stage: wall, process, work time, peak RSS, CPU use, GPU memory, items, throughput."""
    starts, end = result["starts"], result["end_s"]
    spans = bar_spans(result["segments"])
    rows = []
    for i, (stage, start) in enumerate(starts):
        stop = starts[i + 1][1] if i + 1 < len(starts) else end
        mon = result["monitor"].get(stage, {})
        kind, category = stage.split("@")[0], _category(stage)
        row: dict[str, Any] = {
            "stage": stage,
            "wall_s": round(stop - start, 1),
            "process_s": round(mon["last_s"] - mon["first_s"], 1) if mon else None,
            "peak_rss_mb": round(max(mon.get("peak_hwm_kb", 0) / 1024, mon.get("peak_rss_b", 0) / 2**20))
            if mon
            else None,
            "cpu_s": round(mon.get("cpu_s", 0.0), 1) if mon else None,
            "gpu_mb": mon.get("gpu_mb") or None,
            "gpu_total_mb": mon.get("gpu_total_mb") or None,  # the whole GPU while the stage ran
        }
        row.update(_throughput(kind, category, spans, stage, root))
        if row.get("work_s") is not None and row["process_s"] is not None:
            row["startup_s"] = round(max(0.0, row["process_s"] - row["work_s"]), 1)
        rows.append(row)
    return rows


def _throughput(kind: str, category: str, spans: dict, stage: str, root: Path) -> dict[str, Any]:
    data = root / "data"
    out: dict[str, Any] = {}
    if kind == "ingest":
        report = read_json(data / "ingest" / category / "report.json")
        work, _ = work_seconds(spans, stage, "screen records")
        out.update(items=report.get("rows_read"), unit="records read", work_s=work)
        out["products"] = report.get("n_products")
    elif kind == "summarize":
        report = read_json(data / "summaries" / category / "report.json")
        work, _ = work_seconds(spans, stage, "summarize")
        out.update(items=report.get("n"), unit="summaries", work_s=work, mean_words=report.get("mean_words"))
    elif kind == "images":
        report = read_json(data / "images" / category / "report.json")
        work, _ = work_seconds(spans, stage, "images")
        out.update(items=report.get("images"), unit="images", work_s=work, urls=report.get("urls"))
    elif kind == "train":
        summary = read_json(data / "train" / category / "summary.json")
        work, _ = work_seconds(spans, stage, "epoch ")
        steps = (summary.get("steps_per_epoch") or 0) * (summary.get("epochs_run") or 0)
        out.update(
            items=steps,
            unit="train steps",
            work_s=work,
            batch_size=summary.get("batch_size"),
            n_train=summary.get("n_train"),
            n_val=summary.get("n_val"),
            dtype=summary.get("dtype"),
            device=summary.get("device"),
        )
    elif kind == "queries":
        report = read_json(data / "queries" / category / "report.json")
        out.update(items=report.get("kept"), unit="queries kept", rows_read=report.get("rows_read"))
        out.update(splits=report.get("splits"), dropped=report.get("dropped"))
    elif kind == "embed_queries":
        variant = stage.split("-")[-1]
        report = read_json(data / "embed_queries" / category / variant / "report.json")
        out.update(items=report.get("queries"), unit="queries", over_77=report.get("texts_over_max_length"))
    elif kind.startswith("embed_"):
        manifest = read_json(data / "embed" / category / kind.removeprefix("embed_") / "manifest.json")
        work, _ = work_seconds(spans, stage, "embed")
        images = (manifest.get("n") or 0) + (manifest.get("n_alt") or 0)
        out.update(
            items=images,
            unit="images (+ a text per main image)",
            work_s=work,
            texts=manifest.get("n"),
            device=manifest.get("device"),
        )
    if out.get("work_s") is not None:
        out["work_s"] = round(out["work_s"], 2)
        if out["work_s"] > 0 and out.get("items"):
            out["per_s"] = round(out["items"] / out["work_s"], 4)
    return out


# --- BART cost model ----------------------------------------------------------------------------------


def bart_batches(lengths: list[int], batch_size: int) -> list[tuple[int, int]]:
    """(inputs, padded length) of each batch, as cliprec.summarize batches them (longest first)."""
    order = sorted(lengths, reverse=True)
    return [(len(order[i : i + batch_size]), order[i]) for i in range(0, len(order), batch_size)]


def bart_generate_flops(batch: int, src: int, beams: int, steps: int, cfg: dict[str, int]) -> float:
    """Approximate FLOPs of `generate` for one batch: encoder, cross-attention K/V, `steps` decoder steps.

    Matmul FLOPs only (2 per multiply-add); beams share nothing but the encoder pass, as in transformers.
    """
    d, ffn, layers, vocab = cfg["d_model"], cfg["ffn"], cfg["layers"], cfg["vocab"]
    enc = batch * src * layers * (2 * (4 * d * d + 2 * d * ffn) + 4 * src * d)
    seqs = batch * beams
    cross_kv = seqs * src * layers * 2 * (2 * d * d)
    per_token = layers * 2 * (4 * d * d + 2 * d * d + 2 * d * ffn) + 2 * d * vocab
    attn = sum(layers * 4 * d * (t + src) for t in range(1, steps + 1))
    dec = seqs * (steps * per_token + attn)
    return float(enc + cross_kv + dec)


BART_LARGE = {"d_model": 1024, "ffn": 4096, "layers": 12, "vocab": 50264}


def bart_input_lengths(products: Path, tokenizer_dir: Path, limit: int) -> tuple[list[int], int]:
    """Token counts (truncated at `limit`) of the BART inputs of products.parquet; products without a body."""
    import pandas as pd
    from transformers import AutoTokenizer

    from cliprec.summarize import body_text, source_text

    frame = pd.read_parquet(products, columns=["title", "features", "description"])
    texts = [source_text(t, f, d) for t, f, d in zip(frame["title"], frame["features"], frame["description"])]
    body = [bool(body_text(f, d)) for f, d in zip(frame["features"], frame["description"])]
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tokenizer([t for t, b in zip(texts, body) if b], truncation=True, max_length=limit)["input_ids"]
    return [len(x) for x in ids], body.count(False)


def catalog_input_lengths(standins: Path, tokenizer_dir: Path, limit: int) -> list[int]:
    """Token counts of the BART inputs of every usable record of the stand-in catalogs (for projection)."""
    from transformers import AutoTokenizer

    from cliprec.catalog import drop_reason
    from cliprec.summarize import body_text, source_text

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    texts = []
    for path in sorted((standins / "amazon-2023" / "raw" / "meta_categories").glob("meta_*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            if drop_reason(rec) is None and body_text(rec.get("features"), rec.get("description")):
                texts.append(source_text(rec["title"], rec.get("features"), rec.get("description")))
    return [len(x) for x in tokenizer(texts, truncation=True, max_length=limit)["input_ids"]]


# --- projection -------------------------------------------------------------------------------------------

# items per category as listed on the Amazon-Reviews-2023 dataset page (ingest reads the whole file)
CATEGORY_ITEMS = {"Amazon_Fashion": 826_108, "Appliances": 94_327, "All_Beauty": 112_590}


def _sums(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per stage kind: the sum of every numeric column over categories, and how many stages."""
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        agg = out.setdefault(r["stage"].split("@")[0], {"count": 0})
        agg["count"] += 1
        for k, v in r.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                agg[k] = agg.get(k, 0.0) + v
    return out


def project(
    rows: list[dict], params: dict[str, Any], bart: dict[str, Any], category: str, step: dict | None = None
) -> dict:
    """Hours for one category of STUDY_PRODUCTS products on this CPU from the measured rates; A100 estimates.

    summarize: measured FLOP rate of BART's batched beam search x FLOPs of the study's batches (input
    lengths of the stand-in catalog). images, embed: per image. train: per example for the steps, per
    product for the rest (decoding the photos, validation), the start-up once. ingest: its screening pass
    per record, for the category's size on the hub (the download and datasets' JSON -> Arrow conversion of
    the hub file are not included). index/evaluate/compare: start-up bound, as measured.
    """
    agg = _sums(rows)
    n, batch = STUDY_PRODUCTS, params["batch_size"]
    n_train, n_val = 0.8 * n, 0.1 * n
    steps = STUDY_EPOCHS * math.floor(n_train / batch)
    cpu: dict[str, float] = {}
    out: dict[str, Any] = {"category": category, "products": n, "epochs": STUDY_EPOCHS, "train_steps": steps}

    def per(kind: str, key: str) -> float:
        a = agg.get(kind, {})
        return a.get(key, 0.0) / max(1, a.get("count", 1))

    if bart.get("flops_rehearsal") and agg.get("summarize", {}).get("work_s"):
        rate = bart["flops_rehearsal"] / agg["summarize"]["work_s"]
        cpu["summarize"] = bart["flops_study"] / rate + per("summarize", "startup_s")
        out["bart_cpu_gflop_per_s"] = round(rate / 1e9, 2)
    if agg.get("images", {}).get("work_s") and agg.get("ingest", {}).get("products"):
        images_per_product = agg["images"]["items"] / agg["ingest"]["products"]
        s_per_image = agg["images"]["work_s"] / agg["images"]["items"]
        cpu["images"] = n * images_per_product * s_per_image + per("images", "startup_s")
    e = agg.get("embed_zeroshot", {})
    embed_per_product = 0.0
    if e.get("work_s") and e.get("texts"):
        embed_per_product = e["work_s"] / e["texts"]  # its main photo + summary + alt photo
        cpu["embed"] = 2 * (n * embed_per_product + per("embed_zeroshot", "startup_s"))  # zero-shot, LoRA
        out["embed_cpu_s_per_product"] = round(embed_per_product, 3)
    t = agg.get("train", {})
    if t.get("work_s") and t.get("items"):
        examples = sum(
            (r.get("batch_size") or 0) * (r.get("items") or 0)
            for r in rows
            if r["stage"].startswith("train@")
        )
        per_example = t["work_s"] / examples
        if step and step.get("seconds") and not step.get("amp"):
            # the step at the study's batch with 77-token texts: the pipeline's few-example step is mostly
            # the first step's set-up, and its summaries are short
            per_example = step["seconds"] / step["batch"]
        startup = per("embed_zeroshot", "startup_s")  # the same imports and CLIP
        measured = t.get("n_train", 0) + t.get("n_val", 0)
        val_passes = 2 * t.get("n_val", 0) * embed_per_product  # zero-shot + one epoch, upper bound
        other = t.get("process_s", 0.0) - t["work_s"] - startup * t.get("count", 1) - val_passes
        decode_per_product = max(0.0, other) / max(1, measured)
        cpu["train"] = (
            startup
            + steps * batch * per_example
            + (n_train + n_val) * decode_per_product
            + (STUDY_EPOCHS + 1) * n_val * embed_per_product
        )
        out["train_cpu_s_per_example"] = round(per_example, 3)
    if agg.get("ingest", {}).get("work_s") and category in CATEGORY_ITEMS:
        s_per_record = agg["ingest"]["work_s"] / agg["ingest"]["items"]
        cpu["ingest"] = CATEGORY_ITEMS[category] * s_per_record + per("ingest", "startup_s")
    for kind in ("index", "evaluate", "compare"):
        if kind in agg:
            cpu[kind] = agg[kind]["wall_s"] / agg[kind]["count"] * (2 if kind != "compare" else 1)
    out["cpu_hours"] = {k: round(v / 3600, 2) for k, v in cpu.items()}
    out["cpu_hours_total"] = round(sum(cpu.values()) / 3600, 1)
    # A100: BART from the public reference, CLIP from FLOPs at the ESTIMATED sustained rates
    a100: dict[str, float] = {"summarize_bf16_reference": n / A100_BART_REFERENCE["sequences_per_s"]}
    embed_flops = 2 * n * (2 * CLIP_GFLOP["image"] + CLIP_GFLOP["text77"]) * 1e9  # 2 photos; 2 variants
    train_flops = steps * batch * TRAIN_FLOP_FACTOR * (CLIP_GFLOP["image"] + CLIP_GFLOP["text77"]) * 1e9
    for prec, tflops in A100_EST_TFLOPS.items():
        a100[f"embed_{prec}"] = embed_flops / (tflops * 1e12)
        a100[f"train_{prec}"] = train_flops / (tflops * 1e12)
    out["a100_estimate_minutes"] = {k: round(v / 60, 1) for k, v in a100.items()}
    out["a100_basis"] = {
        "bart_reference": A100_BART_REFERENCE,
        "sustained_tflops_estimate": A100_EST_TFLOPS,
        "clip_gflop": CLIP_GFLOP,
        "train_flop_factor": TRAIN_FLOP_FACTOR,
    }
    seed_h = SEED_BART["seconds"] * n / SEED_BART["items"] / 3600
    out["seed_bart"] = {**SEED_BART, "hours_at_seed_rate": round(seed_h, 2)}
    return out


# --- one training step at the study's batch size -----------------------------------------------------------


def step_check(clip: Path, batch: int, amp: bool) -> dict[str, Any]:
    """One LoRA step (both towers, 224-px images, 77-token texts: the longest) at `batch`: time, peak memory.

    Runs in its own process (see main), so its peak RSS is this step's: the rehearsal's few products cannot
    fill the study's batch of 128, and activation memory grows with the batch.
    """
    import resource

    import torch

    from cliprec.loss import clip_loss
    from cliprec.model import add_lora, load_clip, normalize_pixels
    from cliprec.params import load_params
    from cliprec.precision import autocast, pick_device
    from cliprec.train import _Towers

    device = pick_device()
    model, processor = load_clip(clip, device=device)
    model = add_lora(model, load_params(REPO_ROOT / "params.yaml").lora.model_dump())
    model.train()
    towers = _Towers(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2.0e-5)
    torch.manual_seed(0)
    side = processor.image_processor.crop_size.height
    pixels = torch.randint(0, 256, (batch, 3, side, side), dtype=torch.uint8)
    eos = model.config.text_config.eos_token_id
    ids = torch.randint(3, len(processor.tokenizer) - 2, (batch, 77))
    ids[:, -1] = eos
    mask = torch.ones_like(ids)
    before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with autocast(device, amp):
        image, text, scale = towers(
            ids.to(device), mask.to(device), normalize_pixels(pixels.to(device), processor)
        )
    loss = clip_loss(image.float(), text.float(), scale)
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    after_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "batch": batch,
        "amp": amp,
        "device": device.type,
        "seconds": round(seconds, 2),
        "peak_rss_mb": round(after_kb / 1024),
        "rss_before_step_mb": round(before_kb / 1024),
        "gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
    }


def run_step_check(clip: Path, batch: int, amp: bool, env: dict[str, str]) -> dict[str, Any]:
    """step_check in a fresh process; {"error": ...} when it fails (e.g. out of memory)."""
    cmd = [sys.executable, __file__, "--step-only", str(clip), str(batch), "1" if amp else "0"]
    done = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        return {"batch": batch, "amp": amp, "error": (done.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- main -------------------------------------------------------------------------------------------------


def lscpu_summary() -> dict[str, Any]:
    """Model, cores and the SIMD / bf16 flags that explain a timing."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return {}
    info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = set(info.get("Flags", "").split())
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "avx_vnni")
    return {
        "model": info.get("Model name", "").strip(),
        "cpus": info.get("CPU(s)", "").strip(),
        "flags": {f: f in flags for f in wanted},
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def versions() -> dict[str, str]:
    """Versions of the libraries the stages use."""
    from cliprec.provenance import library_versions

    return library_versions(
        "torch",
        "transformers",
        "tokenizers",
        "datasets",
        "peft",
        "accelerate",
        "dvc",
        "faiss-cpu",
        "pillow",
        "numpy",
    )


def _category(stage: str) -> str:
    return stage.partition("@")[2].split("-")[0]


def bart_figures(root: Path, standins: Path, categories: list[str], params: dict[str, Any]) -> dict[str, Any]:
    """Per category: the rehearsal's BART inputs and batches, their FLOPs, and the study's FLOPs."""
    cfg = params["setups"]["study"]["summarize"]
    limit, beams, batch = cfg["max_input_tokens"], cfg["num_beams"], cfg["batch_size"]
    steps = cfg["max_length"] - 1  # random weights never emit EOS: every beam decodes to max_length

    def flops(lengths: list[int]) -> float:
        return sum(
            bart_generate_flops(b, s, beams, steps, BART_LARGE) for b, s in bart_batches(lengths, batch)
        )

    bart = standins / "bart-large-cnn"
    study = catalog_input_lengths(standins, bart, limit)  # both stand-in catalogs: the input-length mix
    reps = math.ceil(STUDY_PRODUCTS / len(study))  # the mix, replicated to >= the study's size, then scaled
    study_flops = flops([x for x in study for _ in range(reps)]) * STUDY_PRODUCTS / (reps * len(study))
    out = {}
    for category in categories:
        lengths, title_only = bart_input_lengths(
            root / "data/ingest" / category / "products.parquet", bart, limit
        )
        out[category] = {
            "inputs": len(lengths),
            "title_only_products": title_only,
            "mean_input_tokens": round(sum(lengths) / max(1, len(lengths)), 1),
            "max_input_tokens": max(lengths, default=0),
            "inputs_at_limit": sum(x >= limit for x in lengths),
            "batches_inputs_x_padded_tokens": bart_batches(lengths, batch),
            "decode_steps": steps,
            "beams": beams,
            "flops_rehearsal": flops(lengths),
            "study_mix_mean_tokens": round(sum(study) / len(study), 1),
            "study_mix_share_at_limit": round(sum(x >= limit for x in study) / len(study), 3),
            "flops_study": study_flops,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    """Build the temporary project, run the study on the stand-ins, measure, project, write the results."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--step-only"]:  # the child of run_step_check
        print(json.dumps(step_check(Path(argv[1]), int(argv[2]), argv[3] == "1")))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--standins", type=Path, default=REPO_ROOT / "standins")
    ap.add_argument("--categories", nargs="+", default=None, help="default: params.yaml's")
    ap.add_argument("--n-products", type=int, default=16, help="setups.study.ingest.n_products")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--no-amp", action="store_true", help="on CUDA, skip the second run with amp=true")
    ap.add_argument("--timeout-min", type=float, default=60.0)
    ap.add_argument("--keep", action="store_true", help="keep the temporary project")
    ap.add_argument("--no-step-check", action="store_true", help="skip the batch-size LoRA step")
    ap.add_argument(
        "--step-check-only",
        action="store_true",
        help="only run the batch-size LoRA step and add it to the existing results file",
    )
    ap.add_argument("--out", default=RESULTS_NAME)
    args = ap.parse_args(argv)

    import torch
    import yaml

    standins = args.standins.resolve()
    clip, bart = standins / "clip-vit-base-patch32", standins / "bart-large-cnn"
    base = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    categories = args.categories or base["categories"]
    needed = [clip / "config.json", bart / "config.json", standins / "amazon-c4" / "test.csv"] + [
        standins / "amazon-2023" / "raw" / "meta_categories" / f"meta_{c}.jsonl" for c in categories
    ]
    missing = [p for p in needed if not p.is_file()]
    if missing:
        sys.exit(f"missing stand-ins ({missing[0]}): run python scripts/build_study_standins.py first")
    if args.step_check_only:
        payload = read_json(RESULTS_DIR / f"{args.out}.json")
        if not payload:
            sys.exit(f"no {RESULTS_DIR / args.out}.json to add the step check to: run the rehearsal first")
        batch = int(base["batch_size"])
        amps = [False] + ([True] if torch.cuda.is_available() and not args.no_amp else [])
        payload["train_step_at_study_batch"] = [
            run_step_check(clip, batch, amp, dict(os.environ)) for amp in amps
        ]
        print(json.dumps(payload["train_step_at_study_batch"]))
        print(f"wrote {write_results(args.out, payload)}")
        return

    overrides = {
        "setup": "study",
        "setups.study.ingest.hub_root": HUB_ROOT,
        "setups.study.queries.hub_root": C4_ROOT,
        "setups.study.model.name": str(clip),
        "setups.study.summarize.model": str(bart),
        "setups.study.ingest.n_products": str(args.n_products),
        "epochs": str(args.epochs),
    }
    if categories != base["categories"]:
        overrides["categories"] = "[" + ",".join(categories) + "]"
    cuda = torch.cuda.is_available()
    runs = [("fp32", {})] + ([("amp", {"amp": "true"})] if cuda and not args.no_amp else [])

    env = {
        **os.environ,
        "DVC_NO_ANALYTICS": "1",
        "PYTHONUNBUFFERED": "1",
        "GIT_AUTHOR_NAME": "rehearsal",
        "GIT_AUTHOR_EMAIL": "r@r",
        "GIT_COMMITTER_NAME": "rehearsal",
        "GIT_COMMITTER_EMAIL": "r@r",
    }
    env.pop("PYTHONPATH", None)  # the stages import the temporary project's cliprec (the cwd)
    scratch = REPO_ROOT / "bench" / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="study-rehearsal-"))
    root = tmp / "project"
    root.mkdir()
    results = []
    load_before = os.getloadavg()
    try:
        make_project(root, standins, categories, env)
        for name, extra in runs:
            sets = [x for k, v in {**overrides, **extra}.items() for x in ("-S", f"{k}={v}")]
            log_path = scratch / f"{args.out}.{name}.log"
            log_path.unlink(missing_ok=True)
            print(f"[{name}] dvc exp run -n rehearsal-{name} {' '.join(sets)}", flush=True)
            result = run_pipeline(
                root, ["-n", f"rehearsal-{name}", *sets], env, args.timeout_min * 60, log_path
            )
            rows = stage_rows(result, root)
            params = yaml.safe_load((root / "params.yaml").read_text())
            results.append(
                {
                    "run": name,
                    "overrides": {**overrides, **extra},
                    "returncode": result["returncode"],
                    "timed_out": result["timed_out"],
                    "total_s": round(result["end_s"], 1),
                    "load_avg_1min": [round(x, 2) for x in result["load"]],
                    "stages": rows,
                    "log_tail": [s for _, s, _ in result["segments"][-15:]],
                    "params": params,
                }
            )
            print_table(rows, TABLE_COLUMNS, title=f"[{name}] per stage")
            if result["returncode"] != 0:
                print(
                    f"[{name}] dvc exp run failed (exit {result['returncode']}); see {log_path}", flush=True
                )
                break
        first = results[0]
        steps = []
        if not args.no_step_check:
            batch = int(first["params"]["batch_size"])
            for name, _ in runs:
                steps.append(run_step_check(clip, batch, name == "amp", env))
                print(f"[step check] {steps[-1]}", flush=True)
        bart_info, projection = {}, []
        if first["returncode"] == 0:
            bart_info = bart_figures(root, standins, categories, first["params"])
            for c in categories:
                rows = [r for r in first["stages"] if _category(r["stage"]) == c]
                projection.append(project(rows, first["params"], bart_info[c], c, (steps or [None])[0]))
    finally:
        if args.keep:
            print(f"kept the temporary project: {root}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    for r in results:
        r.pop("params")
    payload = {
        "what": "setup=study end to end on offline stand-ins at the real model shapes",
        "cpu": lscpu_summary(),
        "versions": versions(),
        "cuda": cuda,
        "load_avg_before": [round(x, 2) for x in load_before],
        "standins": read_json(standins / "standins.json"),
        "categories": categories,
        "n_products": args.n_products,
        "epochs": args.epochs,
        "runs": results,
        "train_step_at_study_batch": steps,
        "bart": bart_info,
        "projection": projection,
    }
    payload["standins"].pop("catalog", None)
    path = write_results(args.out, payload)
    print(json.dumps(projection, indent=2))
    print(f"wrote {path}")
    if any(r["returncode"] != 0 for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
