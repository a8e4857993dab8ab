"""The `images` stage: fetch product images, decode them safely, resize, re-encode, store in parquet shards.

Every image ends in exactly one status (that of the URL used, or of the last one tried); a bad item
never stops the stage and is never replaced by a placeholder image. The statuses are cliprec.fetch's
(http_<code>, timeout, connection_error, not_found, read_error, bad_url, too_large, error) and
cliprec.codec's (not_image, too_large, decode_error), plus:
    ok                stored (or usable: see `view`)
    duplicate_photo   fetched, but the same MAIN photo as a product of another split: not stored

Shards hold rows in product order, then view order, whatever order the threads finish in, so two runs
over the same answers give identical bytes (cliprec.shards has the layout and the readers).
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.parquet as pq
from PIL import ImageFile
from tqdm import tqdm

from cliprec.artifacts import MANIFEST_FILE, catalog_identity, write_json, write_manifest
from cliprec.codec import pillow_limits
from cliprec.errors import CliprecError
from cliprec.fetch import Fetcher, ImageResult
from cliprec.params import Images
from cliprec.shards import REPORT_FILE, SHARD_GLOB, STATUS_FILE, TRY_TYPE, VIEWS, ShardWriter, StatusWriter

log = logging.getLogger(__name__)

STATUSES = (
    "ok",
    "timeout",
    "connection_error",
    "not_found",
    "read_error",
    "bad_url",
    "not_image",
    "too_large",
    "decode_error",
    "error",
    "duplicate_photo",  # fetched, but the same MAIN photo as a product of another split: not stored
)  # plus http_<code>, one per code seen
PRODUCT_BATCH_ROWS = 4096  # products.parquet rows read at once by the stage


def _as_list(value: Any) -> list:
    """A list cell as a list: None and NaN (a missing cell) are empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return list(value)


def image_candidates(image: Any) -> list[str]:
    """One image's candidate URLs from an `image_urls` entry: a list of URLs, or a single URL string."""
    # A plain string is the one-URL-per-image layout of older products tables (and of hand-made frames).
    if isinstance(image, str):
        return [image]
    return [str(u) if u is not None else "" for u in _as_list(image)]


def _product_rows(products: pd.DataFrame | Iterable[pd.DataFrame]) -> Iterator[tuple[str, list, list, str]]:
    """(id, image_urls, image_variants, split) per product, frame by frame."""
    for frame in [products] if isinstance(products, pd.DataFrame) else products:
        missing = {"id", "image_urls"} - set(frame.columns)
        if missing:
            raise ValueError(f"images: products table lacks columns {sorted(missing)}")
        n = len(frame)
        variants = frame["image_variants"] if "image_variants" in frame.columns else [None] * n
        splits = frame["split"] if "split" in frame.columns else [None] * n
        yield from zip(frame["id"].astype(str), frame["image_urls"], variants, splits, strict=True)


@dataclass
class _Tally:
    """What the report counts, over the products collected so far."""

    counts: Counter[str] = field(default_factory=Counter)  # one final status per image
    fallen_back_from: Counter[str] = field(default_factory=Counter)  # candidates a later one replaced
    copies: dict[str, int] = field(
        default_factory=lambda: {"dropped_other_split": 0, "same_photo_same_split": 0}
    )
    products: int = 0
    urls: int = 0
    with_image: int = 0
    with_alt: int = 0
    urls_tried: int = 0
    via_fallback: int = 0


class _Collector:
    """Takes each product's results in product order: shards, status rows, the tally, cross-split copies."""

    def __init__(self, out_dir: Path, cfg: Images, bar: tqdm) -> None:
        self.shards = ShardWriter(out_dir, cfg.shard_size)
        self.status = StatusWriter(out_dir / STATUS_FILE)
        self.tally = _Tally()
        self.bar = bar
        self._first_with: dict[bytes, tuple[str, str | None]] = {}  # MAIN photo digest -> (product, split)

    def _copy_of(
        self, pid: str, split: str | None, main: ImageResult | None
    ) -> tuple[str, str | None] | None:
        """The earlier product of another split with this MAIN photo byte for byte, if any; counts copies."""
        if main is None:
            return None
        first = self._first_with.setdefault(hashlib.sha256(main.jpeg).digest(), (pid, split))
        if first[0] == pid:
            return None
        if first[1] != split:
            self.tally.copies["dropped_other_split"] += 1
            return first
        self.tally.copies["same_photo_same_split"] += 1
        return None

    def collect(self, pid: str, variants: list[str], split: str | None, futures: list[Future]) -> None:
        """Store one product's images (main, then alt) and record every image's status."""
        results: list[ImageResult] = [f.result() for f in futures]
        tally = self.tally
        tally.products += 1
        tally.urls += len(results)
        copy_of = self._copy_of(pid, split, next((r for r in results if r.status == "ok"), None))
        stored = 0
        for pos, res in enumerate(results):
            tally.urls_tried += len(res.tried)
            tally.fallen_back_from.update(t[1] for t in res.tried[:-1])
            tally.via_fallback += res.status == "ok" and res.candidate > 0
            status, error = res.status, res.error
            if copy_of is not None and status == "ok":
                status, error = "duplicate_photo", f"same photo as {copy_of[0]} (split {copy_of[1]})"
            tally.counts[status] += 1
            view = None
            if status == "ok" and stored < len(VIEWS):
                view = VIEWS[stored]
                stored += 1
                self.shards.add(pid, view, variants[pos] if pos < len(variants) else "", res.url, res.jpeg)
            tried = [dict(zip(TRY_TYPE.names, t)) for t in res.tried]
            self.status.add((pid, res.url, view, status, error, pos, res.attempts, res.candidate, tried))
        tally.with_image += stored > 0
        tally.with_alt += stored > 1
        self.bar.update(1)

    def close(self) -> None:
        """Write the last shard and finish status.parquet."""
        self.shards.flush()
        self.status.close()


def _fetch_all(products: pd.DataFrame | Iterable[pd.DataFrame], cfg: Images, collector: _Collector) -> None:
    """Fetch every product's first max_images images on cfg.workers threads, collected in product order."""
    # Products in flight: enough to keep every worker busy past a slow head-of-line product, few enough
    # that the encoded JPEGs waiting to be written in order stay small.
    window = max(64, cfg.workers * 64)
    pool = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="images")
    try:
        with pillow_limits(cfg.max_pixels), Fetcher(cfg) as fetcher:
            pending: deque[tuple[str, list[str], str | None, list[Future]]] = deque()
            for pid, urls, variants, split in _product_rows(products):
                images = [image_candidates(img) for img in _as_list(urls)][: cfg.max_images]
                variants = [str(x) for x in _as_list(variants)]
                pending.append((pid, variants, split, [pool.submit(fetcher.fetch_first, c) for c in images]))
                while len(pending) > window:
                    collector.collect(*pending.popleft())
            while pending:
                collector.collect(*pending.popleft())
        pool.shutdown(wait=True)
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise


def _report(tally: _Tally, shards: ShardWriter, cfg: Images) -> dict[str, Any]:
    """report.json: counts only (this directory is a DVC output: its hash must follow from the inputs)."""
    counts = tally.counts
    all_counts = {s: counts.get(s, 0) for s in STATUSES} | {
        s: c for s, c in sorted(counts.items()) if s not in STATUSES
    }
    return {
        "products": tally.products,
        "products_with_image": tally.with_image,
        "products_without_image": tally.products - tally.with_image,
        "products_with_alt": tally.with_alt,
        "urls": tally.urls,
        "urls_tried": tally.urls_tried,
        "ok_via_fallback": tally.via_fallback,
        "fallen_back_from": dict(sorted(tally.fallen_back_from.items())),
        "images": shards.n_rows,
        "counts": all_counts,
        "photo_copies": tally.copies,
        "success_rate": round(counts.get("ok", 0) / tally.urls, 6) if tally.urls else 0.0,
        "shards": len(shards.paths),
        "side": cfg.side,
        "resize": cfg.resize,
    }


def _log_summary(report: dict[str, Any], seconds: float, status_path: Path) -> dict[str, int]:
    """Log the run's outcome; return the failure counts (status -> images)."""
    n_ok, n_urls, n_products = report["counts"]["ok"], report["urls"], report["products"]
    failed = {s: c for s, c in report["counts"].items() if c and s != "ok"}
    log.info(
        "images: %d/%d ok (%.1f%%, %d through a fallback URL) in %.1f s (%.1f img/s); products: %d with "
        "image, %d without, %d with alt; photo copies %s%s",
        n_ok,
        n_urls,
        100 * report["success_rate"],
        report["ok_via_fallback"],
        seconds,
        n_ok / seconds if seconds > 0 else 0.0,
        report["products_with_image"],
        n_products - report["products_with_image"],
        report["products_with_alt"],
        report["photo_copies"],
        f"; failures {failed} (see {status_path})" if failed else "",
    )
    return failed


def _clear(out_dir: Path) -> None:
    """Remove an earlier run's shards, status, report and manifest from out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in [
        *out_dir.glob(SHARD_GLOB),
        out_dir / STATUS_FILE,
        out_dir / REPORT_FILE,
        out_dir / MANIFEST_FILE,
    ]:
        stale.unlink(missing_ok=True)


def build_image_shards(
    products: pd.DataFrame | Iterable[pd.DataFrame],
    out_dir: str | Path,
    cfg: Images,
    progress: bool = True,
    total: int | None = None,
    lineage: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Fetch the first max_images images of every product into out_dir; return (and write) the report.

    `lineage` (category, catalog_sha256: what the images are of) goes into manifest.json.

    `products` (a DataFrame, or DataFrames streamed batch by batch) has columns id, image_urls (one entry
    per image, MAIN first; each entry the image's candidate URLs in preference order, or a single URL)
    and optionally image_variants and split. Each image's candidates are tried in order
    (`Fetcher.fetch_first`). Writes shard-NNNNN.parquet (the `url` used), status.parquet (one row per
    image) and report.json (stale shards of an earlier run are removed). At most two images per product
    are stored (main, alt); with max_images > 2 the later images are fallbacks, and a surplus success
    stays `ok` in status.parquet with a null view. In the report, `urls` and `counts` count images (one
    final status each), `urls_tried` the candidate URLs requested and `ok_via_fallback` the images got
    from a candidate after the first, `fallen_back_from` the statuses of the candidates given up for a
    later one.

    Copies across splits: a product whose stored MAIN photo is byte for byte one an earlier product of
    ANOTHER split already has (the same picture relisted under another id, which ingest's URL grouping
    missed) is not stored; its images get status `duplicate_photo` and the report counts them, so a
    photo never sits in two splits. Copies within a split are kept and counted (`same_photo_same_split`):
    in the test gallery they are ties. Raises CliprecError (after writing status and report) when
    products had URLs but none got an image.
    """
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("images: PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; truncated files would pass")
    out_dir = Path(out_dir)
    _clear(out_dir)
    if total is None and isinstance(products, pd.DataFrame):
        total = len(products)
    log.info(
        "images: %s products, %d workers -> %s", total if total is not None else "?", cfg.workers, out_dir
    )
    t0 = time.perf_counter()
    with tqdm(total=total, desc="images", unit="product", disable=not progress, mininterval=1.0) as bar:
        collector = _Collector(out_dir, cfg, bar)
        _fetch_all(products, cfg, collector)
    collector.close()
    report = _report(collector.tally, collector.shards, cfg)
    write_json(report, out_dir / REPORT_FILE)
    shard_names = [p.name for p in collector.shards.paths]
    write_manifest(out_dir, shard_names + [STATUS_FILE], {"side": cfg.side, **(lineage or {})})
    failed = _log_summary(report, time.perf_counter() - t0, out_dir / STATUS_FILE)
    if report["products"] and not report["products_with_image"]:
        raise CliprecError(
            f"images: no product got an image ({failed}); see {out_dir / STATUS_FILE} for each image's error"
        )
    return report


def build_images(
    products_path: str | Path,
    out_dir: str | Path,
    cfg: Images,
    progress: bool = True,
    category: str | None = None,
) -> dict[str, Any]:
    """The stage: stream the verified products.parquet through build_image_shards, return the report."""
    products_path = Path(products_path)
    lineage = catalog_identity(products_path, category)
    wanted = ("id", "image_urls", "image_variants", "split")
    with pq.ParquetFile(products_path) as pf:
        columns = [c for c in wanted if c in pf.schema_arrow.names]
        frames = (b.to_pandas() for b in pf.iter_batches(batch_size=PRODUCT_BATCH_ROWS, columns=columns))
        total = pf.metadata.num_rows
        return build_image_shards(frames, out_dir, cfg, progress=progress, total=total, lineage=lineage)
