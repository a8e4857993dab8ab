"""Helpers shared by the bench/ scripts: timing, machine description, results files, Markdown tables."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SCRATCH_DIR = BENCH_DIR / "scratch"  # git-ignored: results of a dirty tree
ALLOW_DIRTY = "CLIPREC_BENCH_ALLOW_DIRTY"
REPO_ROOT = BENCH_DIR.parent
DEMO_CLIP = REPO_ROOT / "models" / "demo-clip"


def median_time(fn: Callable[[], Any], repeats: int = 3, warmup: int = 0) -> float:
    """Median wall time in seconds of `repeats` calls of fn, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def fill_defaults(args: Any, defaults: Mapping[str, Any]) -> Any:
    """Set every attribute of argparse `args` that is still None from `defaults`; return args."""
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]], repeats: int = 3, warmup: int = 0
) -> dict[str, list[float]]:
    """Wall times of each fn over `repeats` rounds that run them all in turn (after `warmup` rounds).

    Round-robin, so that load drifting on a shared machine affects every fn alike, not just the last one.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def _cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (platform.processor() as a fallback)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    """A module's __version__, or None when it is not installed."""
    try:
        return str(__import__(module).__version__)
    except Exception:
        return None


def _gpu_name() -> str | None:
    """The first CUDA GPU's name, or None."""
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:
        return None


def _torch_threads() -> int | None:
    """torch.get_num_threads(), or None without torch."""
    try:
        import torch

        return torch.get_num_threads()
    except Exception:
        return None


def _git_commit() -> str | None:
    """HEAD of the repository this file lives in, with '+dirty' when the tree has changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info() -> dict[str, Any]:
    """CPU model, usable cores, torch/faiss versions, GPU name if any, date and git commit."""
    return {
        "cpu": _cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "torch_threads": _torch_threads(),
        "faiss": _version("faiss"),
        "gpu": _gpu_name(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
    }


def write_results(name: str, payload: dict[str, Any]) -> Path:
    """Write payload (+ machine_info() as "machine" unless given) to bench/results/<name>.json; return it.

    Results from a tree with uncommitted changes name a commit that is not the code that ran, so they go to
    bench/scratch/ (git-ignored) instead, with a warning, unless CLIPREC_BENCH_ALLOW_DIRTY=1: then they are
    written to bench/results/ marked `"dirty": true` (bench/results/README.md lists every file's commit).
    """
    payload = {"machine": machine_info(), **payload}
    dirty = str(payload["machine"].get("git_commit") or "").endswith("+dirty")
    out_dir = RESULTS_DIR
    if dirty and os.environ.get(ALLOW_DIRTY) == "1":
        payload["dirty"] = True
    elif dirty:
        out_dir = SCRATCH_DIR
        print(
            f"warning: the working tree has uncommitted changes: results go to "
            f"{out_dir.relative_to(REPO_ROOT)}/, not bench/results/ "
            f"(commit first, or set {ALLOW_DIRTY}=1 to write them there marked dirty)",
            file=sys.stderr,
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def _cell(value: Any) -> str:
    """One table cell: floats to 3 significant digits (whole numbers from 1000 up), None as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of rows (dicts); columns default to the keys of the first row."""
    if not rows:
        return "(no rows)"
    cols = list(columns) if columns is not None else list(rows[0])
    cells = [[_cell(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths)) + " |" for row in cells]
    return "\n".join(lines)


def print_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, title: str = ""
) -> None:
    """Print a Markdown table of rows, with an optional title line above it."""
    if title:
        print(f"\n{title}\n")
    print(markdown_table(rows, columns))


def synthetic_products(
    n: int, out_dir: Path, seed: int = 0, category: str = "Amazon_Fashion"
) -> tuple[Path, Any]:
    """n demo-catalog products as the pipeline stores them: (image shard dir, DataFrame id/summary).

    The demo generator draws the photos (256 px JPEG), cliprec.images.build_image_shards turns them into
    shards exactly as the images stage does (params.yaml `images:`: 224 px center crop, JPEG q90, MAIN +
    alt), and the summaries are the extractive ones of the demo summarize stage (<= max_words words).
    """
    import pandas as pd

    from cliprec.catalog import normalize_record
    from cliprec.images import build_image_shards
    from cliprec.params import load_params
    from cliprec.summarize import cap_words, source_text
    from cliprec.text import clean_text, extractive_summary, idf_weights
    from cliprec_worlds.demo.synthetic import generate_catalog, n_valid_products

    params = load_params(REPO_ROOT / "params.yaml")
    n_request = n + 8
    while n_valid_products(n_request) < n + 4:  # a few valid records may still lack an image
        n_request += 8
    jsonl = generate_catalog(category, n_request, seed, out_dir / "raw")
    rows = []
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        try:
            row, _ = normalize_record(json.loads(line))
        except ValueError:  # the catalog's deliberately malformed line
            continue
        if row is not None:
            rows.append(row)
    products = pd.DataFrame(rows).drop_duplicates("id").head(n).reset_index(drop=True)
    if len(products) < n:
        raise RuntimeError(f"synthetic catalog gave {len(products)} products, wanted {n}")
    images_dir = out_dir / "images"
    build_image_shards(
        products[["id", "image_urls", "image_variants"]], images_dir, params.images, progress=False
    )
    max_words = params.active.summarize.max_words
    idf = idf_weights(source_text(r.title, r.features, r.description) for r in products.itertuples())
    summaries = [
        cap_words(
            clean_text(extractive_summary(r.title, r.features, r.description, max_words, idf)), max_words
        )
        for r in products.itertuples()
    ]
    return images_dir, pd.DataFrame({"id": products["id"], "summary": summaries})


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Swallow stderr for the duration (the library's tqdm bars); exceptions still propagate."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def vit_b32_clip(device: Any = "cpu", layers: int | None = None) -> tuple[Any, Any]:
    """(CLIPModel, CLIPProcessor) of ViT-B/32's shape, offline: default CLIPConfig, random fp32 weights.

    `layers` (for smoke tests) cuts both towers to that many transformer layers; widths stay ViT-B/32's.

    The processor is CLIPImageProcessorPil's defaults (224 px shortest edge + centre crop; the torchvision
    CLIPImageProcessor does not work here) with the demo CLIP's tokenizer (77 tokens, ids < CLIP's vocab).
    Only the special-token ids differ from the default config (CLIP pools a text at its first EOS token),
    so every shape, hence every FLOP, is openai/clip-vit-base-patch32's.
    """
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.models.clip import CLIPImageProcessorPil

    tokenizer = CLIPTokenizer.from_pretrained(str(DEMO_CLIP))
    ids = {k: getattr(tokenizer, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    torch.manual_seed(0)
    depth = {} if layers is None else {"num_hidden_layers": layers}
    config = CLIPConfig(text_config={**ids, **depth}, vision_config=depth)
    model = CLIPModel(config).to(device).eval()
    return model, CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer)


def bench_clip(name: str, device: Any, vitb32_layers: int | None = None) -> tuple[Any, Any]:
    """The demo CLIP as the pipeline loads it ("demo"), or the ViT-B/32-shaped one ("vitb32"), on device."""
    if name == "demo":
        from cliprec.model import load_clip

        return load_clip(DEMO_CLIP, device=device)
    return vit_b32_clip(device, layers=vitb32_layers)


def synchronize(device: Any) -> None:
    """Wait for queued GPU work (a no-op on the CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def group_watchdog(proc: subprocess.Popen, timeout_s: float) -> tuple[threading.Timer, threading.Event]:
    """Started timer that SIGTERMs proc's process group after timeout_s (proc has start_new_session=True);
    the event says whether it fired. Cancel the timer once proc is done."""
    fired = threading.Event()

    def kill() -> None:
        fired.set()
        os.killpg(proc.pid, signal.SIGTERM)

    timer = threading.Timer(timeout_s, kill)
    timer.start()
    return timer, fired
