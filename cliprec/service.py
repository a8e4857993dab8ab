"""The recommender service behind `cliprec serve`: every category's recommenders, loaded once, searched
the way `cliprec recommend` searches.

A search is a `cliprec.query.Query` (checked when it is made, as the CLI's) plus the category, the
variants and the upload. Every search goes through `Recommender.query_vector` and `Recommender.search`,
as `cliprec recommend` does; an uploaded image is checked and prepared by the images stage's
`process_image` (bomb, truncation and format checks; resize like the catalog's photos) and handed to
`query_vector` decoded. With the default weight the answers equal the CLI's on the same file
(tests/test_serve.py checks both paths).

Every problem a client can fix raises ServiceError with the HTTP status that names it and a one-line
message.
"""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from cliprec import paths
from cliprec.codec import ImageFailure, decode_jpeg, pillow_limits, process_image
from cliprec.errors import one_line
from cliprec.git import head_commit
from cliprec.params import load_params
from cliprec.photos import PhotoStore
from cliprec.query import Query
from cliprec.recommend import Hit, Recommender, RecommendError, UnknownProduct
from cliprec.results import read_json, read_metrics

log = logging.getLogger(__name__)

VARIANT_CHOICES = ("zeroshot", "lora", "both")
DETAIL_COLUMNS = (
    "id",
    "title",
    "main_category",
    "store",
    "features",
    "description",
    "price",
    "average_rating",
    "rating_number",
    "split",
)
# ImageFailure status of an upload -> HTTP status
IMAGE_STATUS = {"not_image": 415, "too_large": 413, "decode_error": 422}


class ServiceError(Exception):
    """A request the service cannot answer; `status` is the HTTP status that says why."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(one_line(message))
        self.status = status


def configured_categories(root: str | Path) -> list[str]:
    """The categories params.yaml lists (serve them all unless told otherwise)."""
    params_path = Path(root) / "params.yaml"
    if not params_path.is_file():
        raise RecommendError(
            f"no params.yaml in {Path(root).resolve()}: run from the project root or pass --root"
        )
    return [str(c) for c in load_params(params_path).categories]


def _plain(value: Any) -> Any:
    """A products.parquet cell as JSON: arrays to lists, NaN to None, numpy scalars to Python."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


@dataclass
class SearchRequest:
    """One search as the API receives it: the query, where to search, and the uploaded image's bytes."""

    category: str | None
    query: Query
    variant: str = "both"
    upload: bytes | None = None  # the image of `query.image`, as uploaded
    # the upload as serve's decoder processes prepared it (the images stage's side x side JPEG); when
    # None, `upload` is decoded in this process
    prepared: bytes | None = None

    @property
    def kind(self) -> str:
        """text | image | text+image | product."""
        return self.query.kind


def request_error(req: SearchRequest, e: Exception) -> ServiceError:
    """A request's failure as its own answer: ServiceError as is, anything else a 500 logged in one line."""
    if isinstance(e, ServiceError):
        return e
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    at = f" at {Path(where.filename).name}:{where.lineno} in {where.name}" if where else ""
    # one line, not a traceback: a request that trips a bug may be repeated by its client many times
    log.error("serve: %s search failed: %s: %s%s", req.kind, type(e).__name__, one_line(e), at)
    return ServiceError(500, "internal error (see the server log)")


class Service:
    """Recommenders (both variants) of the served categories, their product details and photos."""

    def __init__(
        self,
        root: str | Path = ".",
        categories: Sequence[str] | None = None,
        thumb_side: int = 128,
        max_upload_bytes: int | None = None,
    ) -> None:
        self.root = Path(root)
        self.categories = list(categories) if categories else configured_categories(self.root)
        if not self.categories:
            raise RecommendError("no categories to serve (params.yaml lists none)")
        self.recommenders: dict[str, dict[str, Recommender]] = {}
        self.photos: dict[str, PhotoStore] = {}
        self.details: dict[str, pd.DataFrame] = {}
        for cat in self.categories:
            # the Recommender verifies each index against its manifest (sha256, ids, model, variant)
            self.recommenders[cat] = {v: Recommender(cat, v, root=self.root) for v in paths.VARIANTS}
            self.photos[cat] = PhotoStore(self.root / paths.images_dir(cat), thumb_side=thumb_side)
            products_path = self.root / paths.products_path(cat)
            columns = [c for c in DETAIL_COLUMNS if c in pq.read_schema(products_path).names]
            self.details[cat] = pd.read_parquet(products_path, columns=columns).set_index("id", drop=False)
        first = self.recommenders[self.categories[0]]["lora"]
        self.model_name = first.model_name
        self.text_weight = first.text_weight
        self.image_config = first.params.images  # what `process_image` checks uploads with
        self.max_upload_bytes = min(
            int(max_upload_bytes or self.image_config.max_bytes), int(self.image_config.max_bytes)
        )
        self.commit = head_commit(self.root)

    def warm_up(self) -> None:
        """Load every model now (Recommender loads lazily), so the first query is not the slow one."""
        from PIL import Image

        t0 = time.perf_counter()
        blank = Image.new("RGB", (64, 64), "white")  # any size: the processor resizes it
        for cat in self.categories:
            for rec in self.recommenders[cat].values():
                rec.text_vector("warm up")
                rec.image_vector(blank)
        log.info("serve: models loaded in %.1f s", time.perf_counter() - t0)

    # --- validation -----------------------------------------------------------------------------------

    def _category(self, category: str | None) -> str:
        if category is None or category == "":
            return self.categories[0]
        if category not in self.recommenders:
            raise ServiceError(422, f"unknown category {category!r} (served: {', '.join(self.categories)})")
        return category

    def check_product(self, category: str, pid: str) -> str:
        """The id if the category's catalog has it (404 otherwise); ids come from the index manifest."""
        category = self._category(category)
        if pid not in self.details[category].index:
            raise ServiceError(404, f"unknown product {pid!r} in category {category}")
        return pid

    def check_upload(self, data: bytes) -> None:
        """ServiceError for an upload refused before any decoding: empty, or over max_upload_bytes."""
        if len(data) > self.max_upload_bytes:
            raise ServiceError(413, f"image upload of {len(data)} B > {self.max_upload_bytes} B")
        if not data:
            raise ServiceError(422, "image upload is empty")

    def decode_upload(self, data: bytes) -> Any:
        """An uploaded image, checked and prepared like the catalog's photos (PIL RGB); ServiceError if bad.

        Decodes in this process, with no time limit: `cliprec serve` decodes in its decoder processes
        (cliprec.decode_pool) instead. Call from one thread at a time: Pillow's bomb limit is
        process-global (`pillow_limits`).
        """
        cfg = self.image_config
        self.check_upload(data)
        try:
            with pillow_limits(cfg.max_pixels):
                jpeg = process_image(data, cfg)
        except ImageFailure as f:
            raise ServiceError(IMAGE_STATUS.get(f.status, 422), f"image upload: {f.status}: {f}") from f
        return decode_jpeg(jpeg)

    # --- search ---------------------------------------------------------------------------------------

    def validate(self, req: SearchRequest) -> tuple[str, list[str]]:
        """(category, variants) of a request; ServiceError for what the client must change."""
        category = self._category(req.category)
        if req.variant not in VARIANT_CHOICES:
            raise ServiceError(422, f"unknown variant {req.variant!r} (one of {', '.join(VARIANT_CHOICES)})")
        variants = list(paths.VARIANTS) if req.variant == "both" else [req.variant]
        if (req.upload is None) != (req.query.image is None):
            raise ValueError("a SearchRequest has an upload exactly when its query names an image")
        product = req.query.product
        if product is not None:
            self.check_product(category, product)
            for v in variants:
                try:
                    self.recommenders[category][v].check_product(product)
                except UnknownProduct as e:
                    raise ServiceError(404, str(e)) from e
        return category, variants

    def search(self, req: SearchRequest) -> dict[str, Any]:
        """Ranked results per variant (+ the ids both variants found), like `cliprec recommend`."""
        t0 = time.perf_counter()
        category, variants = self.validate(req)
        image = None
        if req.prepared is not None:
            image = decode_jpeg(req.prepared)  # our own side x side JPEG: no limits needed
        elif req.upload is not None:
            image = self.decode_upload(req.upload)
        results = {v: self._search_one(self.recommenders[category][v], req.query, image) for v in variants}
        return self._answer(category, req, results, t0)

    def search_many(self, reqs: Sequence[SearchRequest]) -> list[dict[str, Any] | ServiceError]:
        """Answers (or errors) of several searches; the text-only ones share one text-encoder batch.

        Each request gets its own answer or error: a request that fails (a bad upload, or a bug: 500 and
        one log line) never fails the others. When a shared text batch fails, its texts are answered one
        by one, so only the request at fault fails.

        A lone text query takes `search`, i.e. the path of `Recommender.recommend`, exactly. In a batch
        the texts are padded to the longest, which changes the float summation order: vectors move in
        their last digits, so a score can move in its 6th decimal.
        """
        out: list[dict[str, Any] | ServiceError | None] = [None] * len(reqs)
        texts: dict[tuple[str, tuple[str, ...]], list[int]] = {}
        for i, req in enumerate(reqs):
            try:
                category, variants = self.validate(req)
            except Exception as e:
                out[i] = request_error(req, e)
                continue
            if req.kind == "text":
                texts.setdefault((category, tuple(variants)), []).append(i)
            else:
                out[i] = self._answer_or_error(req)
        for (category, variants), rows in texts.items():
            if len(rows) == 1:
                out[rows[0]] = self._answer_or_error(reqs[rows[0]])
                continue
            try:
                answers = self._text_batch(category, list(variants), [reqs[i] for i in rows])
            except Exception as e:  # one text may be at fault: answer each alone
                log.warning(
                    "serve: a batch of %d texts failed (%s); answering them one by one",
                    len(rows),
                    one_line(e),
                )
                answers = [self._answer_or_error(reqs[i]) for i in rows]
            for i, answer in zip(rows, answers, strict=True):
                out[i] = answer
        return out  # every slot is filled above

    def _text_batch(self, category: str, variants: list[str], reqs: list[SearchRequest]) -> list[dict]:
        """Answers of text-only searches of one category, their texts encoded in one batch."""
        t0 = time.perf_counter()
        recs = self.recommenders[category]
        vectors = {v: recs[v].text_vectors([r.query.text for r in reqs]) for v in variants}
        answers = []
        for row, req in enumerate(reqs):
            results = {
                v: self._hits(recs[v], recs[v].search(vectors[v][row : row + 1], req.query.k))
                for v in variants
            }
            answers.append(self._answer(category, req, results, t0))
        return answers

    def _answer_or_error(self, req: SearchRequest) -> dict[str, Any] | ServiceError:
        try:
            return self.search(req)
        except Exception as e:
            return request_error(req, e)

    def _answer(
        self, category: str, req: SearchRequest, results: dict[str, list[dict]], t0: float
    ) -> dict[str, Any]:
        q = req.query
        ranked = [[h["id"] for h in hits] for hits in results.values()]
        shared = [pid for pid in ranked[0] if all(pid in r for r in ranked[1:])] if len(ranked) > 1 else []
        weight = (
            (self.text_weight if q.weight is None else float(q.weight)) if q.kind == "text+image" else None
        )
        return {
            "category": category,
            "query": {
                "kind": q.kind,
                "text": q.text,
                "image": q.image,
                "product": q.product,
                "weight": weight,
            },
            "k": q.k,
            "results": results,
            "shared": shared,
            "took_ms": round(1000 * (time.perf_counter() - t0), 2),
        }

    def _search_one(self, rec: Recommender, query: Query, image: Any) -> list[dict]:
        try:
            hits = rec.search(rec.query_vector(query, image), query.k, exclude=query.product)
        except RecommendError as e:  # the request was validated: what is left is a server-side problem
            log.error("serve: %s/%s: %s", rec.category, rec.variant, e)
            raise ServiceError(500, f"{rec.category}/{rec.variant}: {e}") from e
        return self._hits(rec, hits)

    def _hits(self, rec: Recommender, hits: list[Hit]) -> list[dict]:
        return [self._hit(rec.category, h) for h in hits]

    def _hit(self, category: str, hit: Hit) -> dict[str, Any]:
        base = f"/api/products/{quote(category, safe='')}/{quote(hit.id, safe='')}"
        return {
            "rank": hit.rank,
            "id": hit.id,
            "score": hit.score,
            "title": hit.title,
            "image": f"{base}/thumb",
            "photo": f"{base}/photo",
        }

    # --- products, info -------------------------------------------------------------------------------

    def product(self, category: str, pid: str) -> dict[str, Any]:
        """Catalog fields of one product, its stored photos and whether each variant has it indexed."""
        category = self._category_path(category)
        self.check_product(category, pid)
        row = self.details[category].loc[pid]
        base = f"/api/products/{quote(category, safe='')}/{quote(pid, safe='')}"
        detail = {c: _plain(row[c]) for c in self.details[category].columns}
        detail["category"] = category
        detail["photos"] = {v: f"{base}/photo?view={v}" for v in self.photos[category].views(pid)}
        # null when there is no stored main photo: its thumb URL would only answer 404
        detail["thumb"] = f"{base}/thumb" if "main" in detail["photos"] else None
        detail["indexed"] = {v: r.has_vector(pid) for v, r in self.recommenders[category].items()}
        return detail

    def _category_path(self, category: str) -> str:
        """A category named in a URL path: unknown is 404 there."""
        if category not in self.recommenders:
            raise ServiceError(404, f"unknown category {category!r} (served: {', '.join(self.categories)})")
        return category

    def photo(self, category: str, pid: str, view: str = "main", thumb: bool = False) -> bytes:
        """The stored JPEG (or its thumbnail) of a product's view; 404 when there is none."""
        category = self._category_path(category)
        self.check_product(category, pid)
        store = self.photos[category]
        data = store.thumbnail(pid, view) if thumb else store.photo(pid, view)
        if data is None:
            raise ServiceError(404, f"product {pid!r} has no {view!r} photo")
        return data

    def info(self) -> dict[str, Any]:
        """Model, variants, index type and size, commit, and the committed metrics (CIs where present)."""
        cats: dict[str, Any] = {}
        for cat in self.categories:
            variants = {}
            for v, rec in self.recommenders[cat].items():
                # every metric with its ci95 (cliprec.results.read_metrics)
                variants[v] = {**rec.index_info(), "metrics": read_metrics(self.root, cat, v)}
            cats[cat] = {
                "products": len(self.details[cat]),
                "photos": len(self.photos[cat].locations),
                "variants": variants,
                "train": read_json(self.root / paths.live_dir(cat) / "metrics.json"),
            }
        return {
            "model": self.model_name,
            "text_weight": self.text_weight,
            "variants": list(paths.VARIANTS),
            "commit": self.commit,
            "categories": cats,
        }
