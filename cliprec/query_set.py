"""The `queries` stage's work: one category's query set against its catalog -> data/queries/<category>/.

Reads the source through cliprec.queries (the synthetic one first writes the demo world's shoppers from
the ingested catalog), then per query, in this order: relevant products outside the category's catalog
are left out (`relevant_pruned` counts them) and a query left with none is `unknown_product`; its photo
is read with the images stage's own code (cliprec.fetch / cliprec.codec: the same limits, decoded and
re-encoded at `images.side`), and a photo that cannot be read drops the query (`unreadable_photo`).
A jsonl query's photo path is relative to catalog/ and must stay inside it. For c4 and jsonl,
`queries.n_queries` keeps at most that many of the usable queries (by a hash of the id; the rest are
`beyond_n_queries`, no bad rows): `rows_read == kept + sum(dropped) + beyond_n_queries`.

Outputs (the interface of the stages that embed and evaluate the queries):
- queries.jsonl, sorted by query_id, one kept query a line: {"query_id", "text" (or null), "image"
  ("photos/<file>.jpg", relative to this directory, or null), "relevant" {product_id: grade >= 1},
  "split" (val | test: sha1(query_id) against `val_fraction`, like the catalog's split independent of
  any seed), "target_split" (the catalog split of the highest-graded relevant product, ties: the
  smallest id), "kind" (text | image | text+image)}
- photos/: the query photos, JPEG; report.json: counts; manifest.json (written last): files + lineage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from cliprec.artifacts import MANIFEST_FILE, catalog_identity, verify_artifact, write_json, write_manifest
from cliprec.codec import ImageFailure, pillow_limits
from cliprec.errors import CliprecError
from cliprec.fetch import Fetcher, ImageResult
from cliprec.params import CATALOG_DIR, Images
from cliprec.queries import QueryRows, QuerySource, read_jsonl, read_queries

log = logging.getLogger(__name__)

QUERIES_FILE = "queries.jsonl"
REPORT_FILE = "report.json"
PHOTOS_DIR = "photos"
SPLITS = ("val", "test")
TARGET_SPLITS = ("train", "val", "test")
KINDS = ("text", "image", "text+image")


@dataclass(frozen=True)
class QuerySetSpec:
    """What the stage needs besides the category: source, val share, the world's draw, photo limits."""

    source: QuerySource
    val_fraction: float
    images: Images
    n_queries: int | None = None  # synthetic: how many to write; else at most this many (None: all)
    seed: int = 0  # synthetic only: the data seed the world draws its shoppers with


def query_split(query_id: str, val_fraction: float) -> str:
    """val or test from sha1(query_id) (as the catalog's split hashes product ids): no seed moves it."""
    unit = int.from_bytes(hashlib.sha1(query_id.encode("utf-8")).digest()[:8], "big") / 2.0**64
    return "val" if unit < val_fraction else "test"


def kind_of(row: Mapping[str, Any]) -> str:
    """text, image or text+image: what the query gives to search with."""
    return "text+image" if row["text"] and row["image"] else ("image" if row["image"] else "text")


def target_product(relevant: Mapping[str, int]) -> str:
    """The highest-graded relevant product (ties: the smallest id)."""
    return min(relevant.items(), key=lambda kv: (-kv[1], kv[0]))[0]


def photo_name(query_id: str) -> str:
    """The stored photo's file name: from the id's hash (an id may hold any character)."""
    return hashlib.sha1(query_id.encode("utf-8")).hexdigest()[:20] + ".jpg"


def photo_url(image: str, root: Path) -> str:
    """An http(s) URL as it is; a relative path resolved under root (catalog/), never outside it."""
    if image.lower().startswith(("http://", "https://")):
        return image
    rel = Path(image)
    if rel.is_absolute() or ".." in rel.parts or "://" in image:
        raise ImageFailure("bad_url", f"{image!r} is neither an http(s) URL nor a path inside {root}/")
    return (root / rel).as_posix()


def _read(
    category: str, spec: QuerySetSpec, ingest_dir: Path, ids: list[str], tmp: Path
) -> tuple[QueryRows, Path, dict[str, list[str]]]:
    """(rows, where photo paths are relative to, traits per query): synthetic queries are written first."""
    if spec.source.source != "synthetic":
        return read_queries(category, spec.source), CATALOG_DIR, {}
    from cliprec_worlds.demo_queries.shoppers import TRUTH_FILE, generate_queries  # only this source

    if spec.n_queries is None:
        raise ValueError("queries.source 'synthetic' needs queries.n_queries (how many to write)")
    if not (ingest_dir / "raw" / TRUTH_FILE.format(category=category)).is_file():
        raise CliprecError(
            f"queries {category}: source 'synthetic' writes the demo world's shoppers from its products' "
            f"hidden attributes, and {ingest_dir} is no synthetic catalog: give your own catalog a query set "
            f"(setups.{spec.source.setup}.queries.source jsonl or c4; docs/pipeline.md 'Your own queries')"
        )
    path, traits = generate_queries(category, ids, ingest_dir / "raw", spec.n_queries, spec.seed, tmp)
    return read_jsonl(path), tmp, traits


def _sample(rows: list[dict[str, Any]], n: int | None) -> list[dict[str, Any]]:
    """At most n rows: those with the smallest sha1("sample:<query_id>") (not the split's hash: val and test
    keep their shares), so a bigger n keeps every query a smaller one kept."""
    if n is None or len(rows) <= n:
        return rows
    return sorted(rows, key=lambda r: hashlib.sha1(f"sample:{r['query_id']}".encode()).digest())[:n]


def _in_catalog(found: QueryRows, splits: Mapping[str, str]) -> tuple[list[dict[str, Any]], int]:
    """The rows with their relevant products pruned to the catalog's; (rows, judgements pruned)."""
    kept, pruned = [], 0
    for row in found.rows:
        relevant = {pid: g for pid, g in row["relevant"].items() if pid in splits}
        if relevant:
            pruned += len(row["relevant"]) - len(relevant)
            kept.append({**row, "relevant": relevant})
        else:
            found.drop(
                "unknown_product", row["query_id"], f"none of {sorted(row['relevant'])[:5]} is in the catalog"
            )
    return kept, pruned


def _fetch(fetcher: Fetcher, image: str, root: Path) -> ImageResult:
    try:
        return fetcher.fetch(photo_url(image, root))
    except ImageFailure as f:
        return ImageResult(image, f.status, str(f))


def _photos(rows: list[dict[str, Any]], found: QueryRows, root: Path, cfg: Images, out: Path) -> list[dict]:
    """Read each query's photo (as the images stage reads product photos), store it; drop unreadable ones."""
    out.mkdir(parents=True, exist_ok=True)
    with_photo = [r for r in rows if r["image"]]
    with pillow_limits(cfg.max_pixels), Fetcher(cfg) as fetcher, ThreadPoolExecutor(cfg.workers) as pool:
        results = list(pool.map(lambda r: _fetch(fetcher, r["image"], root), with_photo))
    stored: dict[str, str] = {}
    for row, res in zip(with_photo, results, strict=True):
        if res.status != "ok" or res.jpeg is None:
            found.drop("unreadable_photo", row["query_id"], f"{row['image']}: {res.status}: {res.error}")
            continue
        name = photo_name(row["query_id"])
        (out / name).write_bytes(res.jpeg)
        stored[row["query_id"]] = f"{PHOTOS_DIR}/{name}"
    kept = []
    for row in rows:
        if not row["image"]:
            kept.append(row)
        elif row["query_id"] in stored:
            kept.append({**row, "image": stored[row["query_id"]]})
    return kept


def _final(row: Mapping[str, Any], splits: Mapping[str, str], val_fraction: float) -> dict[str, Any]:
    """A kept query as queries.jsonl holds it."""
    return {
        "query_id": row["query_id"],
        "text": row["text"],
        "image": row["image"],
        "relevant": row["relevant"],
        "split": query_split(row["query_id"], val_fraction),
        "target_split": splits[target_product(row["relevant"])],
        "kind": kind_of(row),
    }


def _report(category: str, source: str, found: QueryRows, rows: list[dict], extra: dict) -> dict[str, Any]:
    """report.json's content: what was read, kept and dropped, and how the kept queries divide."""
    by = {
        split: {t: sum(r["split"] == split and r["target_split"] == t for r in rows) for t in TARGET_SPLITS}
        for split in SPLITS
    }
    grades = Counter(g for r in rows for g in r["relevant"].values())
    sizes = [len(r["relevant"]) for r in rows]
    return {
        "source": source,
        "category": category,
        "rows_read": found.read,
        "kept": len(rows),
        "dropped": found.dropped,
        "relevant_pruned": extra["pruned"],  # judgements of kept queries naming products outside the catalog
        "beyond_n_queries": extra["beyond_n"],  # usable, but past queries.n_queries (not a bad row)
        "splits": {s: sum(r["split"] == s for r in rows) for s in SPLITS},
        "kinds": {k: sum(r["kind"] == k for r in rows) for k in KINDS},
        "target_splits": {t: sum(r["target_split"] == t for r in rows) for t in TARGET_SPLITS},
        "split_by_target_split": by,
        "grades": {str(g): grades[g] for g in sorted(grades)},
        "relevant_per_query": {
            "mean": round(sum(sizes) / len(sizes), 3) if sizes else 0.0,
            "max": max(sizes, default=0),
        },
        "traits": extra["traits"],  # synthetic only: what the demo's shoppers did, over the kept queries
        "skipped": found.skipped,  # the first bad rows: line number (or query id) and why
    }


def _clear(out_dir: Path) -> None:
    """Remove an earlier run's outputs (a stage run by hand; DVC removes them itself)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / PHOTOS_DIR, ignore_errors=True)
    for name in (QUERIES_FILE, REPORT_FILE, MANIFEST_FILE):
        (out_dir / name).unlink(missing_ok=True)


def build_query_set(category: str, spec: QuerySetSpec, ingest_dir: str | Path, out_dir: str | Path) -> dict:
    """Read, check and store one category's queries against its ingested catalog; return the report."""
    ingest_dir, out_dir = Path(ingest_dir), Path(out_dir)
    products = ingest_dir / "products.parquet"
    lineage = catalog_identity(products, category)
    table = pq.read_table(products, columns=["id", "split"]).to_pydict()
    splits = dict(zip(table["id"], table["split"], strict=True))
    _clear(out_dir)
    with tempfile.TemporaryDirectory(prefix="cliprec-queries-") as tmp:
        found, root, traits = _read(category, spec, ingest_dir, sorted(splits), Path(tmp))
        kept, pruned = _in_catalog(found, splits)
        sampled = _sample(kept, spec.n_queries)
        beyond = len(kept) - len(sampled)
        kept = _photos(sampled, found, root, spec.images, out_dir / PHOTOS_DIR)
    rows = [_final(r, splits, spec.val_fraction) for r in sorted(kept, key=lambda r: r["query_id"])]
    kept_traits = Counter(t for r in rows for t in traits.get(r["query_id"], ()))
    extra = {"pruned": pruned, "traits": dict(sorted(kept_traits.items())), "beyond_n": beyond}
    report = _report(category, spec.source.source, found, rows, extra)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (out_dir / QUERIES_FILE).write_text(text, encoding="utf-8")
    write_json(report, out_dir / REPORT_FILE)
    photos = sorted(f"{PHOTOS_DIR}/{p.name}" for p in (out_dir / PHOTOS_DIR).iterdir())
    write_manifest(out_dir, [QUERIES_FILE, *photos], {**lineage, "source": spec.source.source})
    _log_summary(report, out_dir / REPORT_FILE)
    if not rows:  # the catalog's own evaluation still holds: an empty set, said loudly, fails nothing
        log.warning(
            "queries %s: no usable query: %s is empty (see %s)", category, QUERIES_FILE, out_dir / REPORT_FILE
        )
    return report


def _log_summary(report: Mapping[str, Any], path: Path) -> None:
    """One INFO line, and one WARNING per reason queries were dropped (the details are in report.json)."""
    log.info(
        "queries %s (%s): read %d, kept %d (%s; targets in %s; %s)",
        report["category"],
        report["source"],
        report["rows_read"],
        report["kept"],
        ", ".join(f"{s} {n}" for s, n in report["splits"].items()),
        ", ".join(f"{s} {n}" for s, n in report["target_splits"].items()),
        ", ".join(f"{k} {n}" for k, n in report["kinds"].items()),
    )
    for reason, n in report["dropped"].items():
        if n:
            log.warning("queries %s: dropped %d queries: %s (see %s)", report["category"], n, reason, path)


def read_query_set(directory: str | Path, category: str) -> list[dict[str, Any]]:
    """The kept queries of a verified data/queries/<category>/ (manifest: files intact, this category)."""
    directory = Path(directory)
    verify_artifact(directory, {"category": category})
    with open(directory / QUERIES_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f]
