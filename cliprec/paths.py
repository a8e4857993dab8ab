"""Where each stage reads and writes, relative to the project root (the directory `dvc repro` runs in).

dvc.yaml spells the same paths out for DVC; tests/test_paths.py checks that the two agree.
"""

from __future__ import annotations

from pathlib import Path

DATA = Path("data")
METRICS = Path("metrics")
VARIANTS = ("zeroshot", "lora")
ADAPTER_DIR = "adapter"  # data/train/<cat>/adapter/: what the lora variant loads


def ingest_dir(category: str) -> Path:
    """products.parquet + report.json (+ raw/ for the synthetic source)."""
    return DATA / "ingest" / category


def products_path(category: str) -> Path:
    """The normalised product table of one category."""
    return ingest_dir(category) / "products.parquet"


def queries_dir(category: str) -> Path:
    """queries.jsonl (the kept shopper queries, val and test) + photos/ + report.json + manifest.json."""
    return DATA / "queries" / category


def catalog_queries_path(category: str) -> Path:
    """What the category's query set reads (source, local file, sha256): the catalog stage's output."""
    return DATA / "catalog" / category / "queries.json"


def summaries_dir(category: str) -> Path:
    """summaries.parquet (id, summary) + report.json."""
    return DATA / "summaries" / category


def summarize_progress_dir(category: str) -> Path:
    """Chunks of finished summaries, kept across runs (DVC `persist`) so a killed run resumes."""
    return DATA / "progress" / "summarize" / category


def images_dir(category: str) -> Path:
    """shard-*.parquet (id, view, variant, url, jpeg) + status.parquet + report.json."""
    return DATA / "images" / category


def train_dir(category: str) -> Path:
    """adapter/ (PEFT save_pretrained) + summary.json."""
    return DATA / "train" / category


def checkpoint_dir(category: str) -> Path:
    """Per-epoch training state, kept across runs (DVC `persist`) so a killed run resumes."""
    return DATA / "progress" / "train" / category


def run_log_path(stage: str, category: str) -> Path:
    """How each run of a resumable stage went (resumed from where, seconds): outside every DVC output.

    One JSON line per finished run; kept out of the outputs so that their hashes follow from the inputs only.
    """
    return DATA / "runs" / stage / f"{category}.jsonl"


def live_dir(category: str) -> Path:
    """DVCLive's per-epoch training metrics and plots (committed to git)."""
    return METRICS / "train" / category


def embed_dir(category: str, variant: str) -> Path:
    """ids + image/text/fused (+ alt image) embeddings as .npy, manifest.json."""
    return DATA / "embed" / category / variant


def embed_queries_dir(category: str, variant: str) -> Path:
    """The shopper queries' vectors.npy + queries.jsonl (ids, split, relevance) + report.json + manifest."""
    return DATA / "embed_queries" / category / variant


def index_dir(category: str, variant: str) -> Path:
    """index.faiss + manifest.json."""
    return DATA / "index" / category / variant


def metrics_path(category: str, variant: str) -> Path:
    """The headline evaluation metrics of one category and variant: a DVC metrics file (committed to git)."""
    return METRICS / category / f"{variant}.json"


def metrics_detail_path(category: str, variant: str) -> Path:
    """Every metric of one category and variant with its 95 % CI, and the counts (committed to git).

    Not a DVC metrics file: `metrics_path` holds the headline that `dvc exp show` shows.
    """
    return METRICS / category / f"{variant}.detail.json"


def ranks_path(category: str, variant: str) -> Path:
    """Per-query ranks of every mode and the test set's digest (committed to git): what comparisons pair."""
    return METRICS / category / f"{variant}.ranks.json"


def compare_path(category: str) -> Path:
    """The headline of LoRA minus zero-shot, paired: a DVC metrics file (committed to git)."""
    return METRICS / category / "compare.json"


def compare_detail_path(category: str) -> Path:
    """Every paired LoRA − zero-shot difference with CI, p-values and counts (committed; no DVC metric)."""
    return METRICS / category / "compare.detail.json"


def noise_path(category: str) -> Path:
    """The headline of the training-seed noise (`cliprec noise`): a DVC metrics file (committed to git)."""
    return METRICS / category / "noise.json"


def noise_detail_path(category: str) -> Path:
    """Every metric's spread over training seeds and between pairs of seeds (committed; `cliprec noise`)."""
    return METRICS / category / "noise.detail.json"


def recall_plot_path(category: str, variant: str) -> Path:
    """Recall@K for K=1..10 per query mode, for `dvc plots show` (committed to git)."""
    return METRICS / category / "plots" / f"recall_at_k_{variant}.json"


_STAGE_OF = {
    "ingest": "ingest",
    "queries": "queries",
    "summaries": "summarize",
    "images": "images",
    "train": "train",
}


def rebuild_hint(path: str | Path) -> str:
    """The command that rebuilds an artefact under data/, e.g. `dvc repro embed_lora@Amazon_Fashion`."""
    parts = Path(path).parts
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] != DATA.name:
            continue
        kind, rest = parts[i + 1], parts[i + 2 :]
        if kind in _STAGE_OF and rest:
            return f"dvc repro {_STAGE_OF[kind]}@{rest[0]}"
        if kind == "embed" and len(rest) >= 2:
            return f"dvc repro embed_{rest[1]}@{rest[0]}"
        if kind in ("index", "embed_queries") and len(rest) >= 2:
            return f"dvc repro {kind}@{rest[0]}-{rest[1]}"
    return "dvc repro"


def catalog_source_path(category: str) -> Path:
    """What the category's ingest reads (source, local file, sha256): the catalog stage's output."""
    return DATA / "catalog" / category / "source.json"
