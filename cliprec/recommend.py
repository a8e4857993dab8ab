"""Recommendations from the built index: by text, by image, by text + image, or "more like this product".

Text and image queries are embedded with the same model (and LoRA adapter for the `lora` variant) that
embedded the catalog; text + image is fused with `embed.text_weight` like the product vectors. A query
image goes through the images stage's fetch/decode/resize path, so it is prepared exactly like the
catalog's pictures. Item -> item uses the product's stored fused vector and leaves the product out.

Every problem the user can fix raises a one-line CliprecError (the CLI exits 2): RecommendError, or
QueryError for a query that cannot be asked (cliprec.query, shared with `cliprec serve`).
"""

from __future__ import annotations

import json
import logging
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cliprec import paths
from cliprec.artifacts import catalog_identity, check_built, manifest_sha256, verify_artifact
from cliprec.errors import CliprecError
from cliprec.index import IndexNotFoundError, LoadedIndex, load_index, read_ids
from cliprec.params import Images, load_params
from cliprec.query import Query

log = logging.getLogger(__name__)


class RecommendError(CliprecError):
    """A user-facing problem: unknown category/product, unreadable image, pipeline not run."""


class UnknownProduct(RecommendError):
    """The product is not in the catalog, or has no vector in the index (its photo never arrived)."""


@dataclass
class Hit:
    """One recommended product."""

    rank: int
    id: str
    score: float
    title: str


class Recommender:
    """Index, product titles and (lazily) the model of one category and variant."""

    def __init__(self, category: str, variant: str = "lora", root: str | Path = ".") -> None:
        self.root = Path(root)
        self.category, self.variant = category, variant
        params_path = self.root / "params.yaml"
        if not params_path.is_file():
            raise RecommendError(
                f"no params.yaml in {self.root.resolve()}: run from the project root or pass --root"
            )
        self.params = load_params(params_path)
        known = self.params.categories
        if category not in known:
            raise RecommendError(
                f"unknown category {category!r} (params.yaml categories: {', '.join(known)})"
            )
        if variant not in paths.VARIANTS:
            raise RecommendError(f"unknown variant {variant!r} (one of {', '.join(paths.VARIANTS)})")
        self.model_name = self.params.active.model.name
        self.text_weight = self.params.embed.text_weight
        self.embed_dir = self.root / paths.embed_dir(category, variant)
        self.index_dir = self.root / paths.index_dir(category, variant)
        target = f"index@{category}-{variant}"
        try:
            self.index: LoadedIndex = load_index(
                self.index_dir,
                expect_model=self.model_name,
                expect_variant=variant,
                nprobe=self.params.index.nprobe,
                ef_search=self.params.index.ef_search,
                k_factor=self.params.index.k_factor,
                expect={"category": category},
            )
        except IndexNotFoundError as e:
            raise RecommendError(
                f"pipeline not run yet: no index in {self.index_dir}; run `dvc repro {target}`"
            ) from e
        self.position = {pid: i for i, pid in enumerate(self.index.ids)}
        products_path = self.root / paths.products_path(category)
        if not products_path.is_file():
            raise RecommendError(
                f"pipeline not run yet: no {products_path}; run `dvc repro ingest@{category}`"
            )
        # the titles must be of the catalog the index was built from
        self.catalog = catalog_identity(products_path, category)
        check_built(self.index_dir, self.index.manifest, self.catalog)
        products = pd.read_parquet(products_path, columns=["id", "title"])
        self.titles: dict[str, str] = dict(zip(products["id"].astype(str), products["title"].astype(str)))
        self._model: Any = None

    # --- query vectors --------------------------------------------------------------------------------

    def _load_model(self) -> tuple[Any, Any]:
        if self._model is None:
            from cliprec.model import load_clip  # torch is only needed for text/image queries

            name = self.model_name
            if (self.root / name).exists():
                name = str(self.root / name)
            adapter = None
            if self.variant == "lora":
                train_dir = self.root / paths.train_dir(self.category)
                if not train_dir.is_dir():
                    raise RecommendError(
                        f"pipeline not run yet: no LoRA adapter in {train_dir}; "
                        f"run `dvc repro train@{self.category}` (or use --variant zeroshot)"
                    )
                # this category's adapter, and the one the index's vectors were embedded with
                verify_artifact(train_dir, self.catalog)
                check_built(
                    self.index_dir, self.index.manifest, {"adapter_sha256": manifest_sha256(train_dir)}
                )
                adapter = str(train_dir / paths.ADAPTER_DIR)
            log.info("recommend: loading %s%s", name, f" + {adapter}" if adapter else "")
            try:
                self._model = load_clip(name, adapter=adapter)
            except OSError as e:  # missing/partial model or adapter dir (FileNotFoundError included)
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise RecommendError(
                    f"cannot load model {name}{' + ' + adapter if adapter else ''}: {first}"
                ) from e
        return self._model

    def _check_dim(self, vec: np.ndarray) -> np.ndarray:
        if vec.shape[-1] != self.index.d:
            raise RecommendError(
                f"model {self.model_name} gives {vec.shape[-1]}-d vectors, the index {self.index.d}-d: "
                f"run `dvc repro index@{self.category}-{self.variant}`"
            )
        return vec

    def text_vector(self, text: str) -> np.ndarray:
        """Embedding of a query text."""
        from cliprec.embed import encode_texts

        model, processor = self._load_model()
        return self._check_dim(np.asarray(encode_texts(model, processor, [text]), dtype=np.float32))

    def text_vectors(self, texts: list[str]) -> np.ndarray:
        """Embeddings of several texts in one batch (n x d); row i is text_vector(texts[i]) up to rounding."""
        from cliprec.embed import encode_texts

        model, processor = self._load_model()
        return self._check_dim(np.asarray(encode_texts(model, processor, list(texts)), dtype=np.float32))

    def image_vector(self, image: Any) -> np.ndarray:
        """Embedding of a query image (PIL)."""
        from cliprec.embed import encode_images

        model, processor = self._load_model()
        return self._check_dim(np.asarray(encode_images(model, processor, [image]), dtype=np.float32))

    def has_vector(self, product: str) -> bool:
        """True when the index holds the product (a catalog product whose photo never arrived has none)."""
        return product in self.position

    def check_product(self, product: str) -> None:
        """UnknownProduct unless the index holds the product."""
        if product in self.position:
            return
        if product in self.titles:
            raise UnknownProduct(
                f"product {product!r} is in the catalog but has no embedding (no image could be fetched)"
            )
        raise UnknownProduct(f"unknown product {product!r} in category {self.category}")

    def product_vector(self, product: str) -> np.ndarray:
        """The stored fused vector of a catalog product."""
        self.check_product(product)
        fused_path = self.embed_dir / "fused.npy"
        if not self.embed_dir.is_dir():
            raise RecommendError(
                f"pipeline not run yet: no embeddings in {self.embed_dir}; "
                f"run `dvc repro embed_{self.variant}@{self.category}`"
            )
        # the vectors the index holds: this category's and variant's, the very embeddings it was built from
        expect = {"category": self.category, "variant": self.variant}
        verify_artifact(self.embed_dir, expect, ["fused.npy", "ids.txt"])
        check_built(
            self.index_dir, self.index.manifest, {"embeddings_sha256": manifest_sha256(self.embed_dir)}
        )
        ids = read_ids(self.embed_dir / "ids.txt")
        try:
            row = ids.index(product)
        except ValueError as e:
            raise RecommendError(
                f"{self.embed_dir} and the index disagree about {product!r}: "
                f"run `dvc repro index@{self.category}-{self.variant}`"
            ) from e
        fused = np.load(fused_path, mmap_mode="r")
        return np.asarray(fused[row : row + 1], dtype=np.float32)

    def query_vector(self, query: Query, image: Any = None) -> np.ndarray:
        """The vector to search with (1 x d, unit length); `image`: the query's picture decoded already
        (an upload), else `query.image` is fetched or read and prepared like the catalog's."""
        if query.product is not None:
            return self.product_vector(query.product)
        if query.image is not None and image is None:  # before the model loads: a bad image fails fast
            image = query.image_obj = load_query_image(query.image, self.params.images)
        vectors = []
        if query.text is not None:
            vectors.append(self.text_vector(query.text))
        if query.image is not None:
            vectors.append(self.image_vector(image))
        if len(vectors) == 1:
            return vectors[0]
        from cliprec.vectors import fuse

        weight = self.text_weight if query.weight is None else query.weight
        return np.asarray(fuse(vectors[0], vectors[1], weight), dtype=np.float32)

    # --- search ---------------------------------------------------------------------------------------

    def recommend(self, query: Query) -> list[Hit]:
        """The top-k products for the query (the queried product itself excluded)."""
        return self.search(self.query_vector(query), query.k, exclude=query.product)

    def search(self, vector: np.ndarray, k: int, exclude: str | None = None) -> list[Hit]:
        """The top-k products for a query vector (1 x d), leaving out the product `exclude`."""
        ids, scores = self.index.search(vector, k + (exclude is not None))
        hits = [(pid, s) for pid, s in zip(ids[0], scores[0]) if pid != exclude][:k]
        return [
            Hit(rank=i + 1, id=pid, score=round(float(s), 6), title=self.titles.get(pid, ""))
            for i, (pid, s) in enumerate(hits)
        ]

    def index_info(self) -> dict[str, Any]:
        """The index's type, size, dimension, metric and adapter, as its manifest records them."""
        manifest = self.index.manifest
        return {
            "index": (manifest.get("factory") or {}).get("resolved"),
            "ntotal": int(manifest.get("ntotal", self.index.index.ntotal)),
            "d": self.index.d,
            "metric": manifest.get("metric"),
            "adapter": manifest.get("adapter"),
        }


def load_query_image(source: str, cfg: Images) -> Any:
    """Fetch (URL) or read (path) a query image and prepare it like the catalog's images (PIL RGB)."""
    from cliprec.codec import decode_jpeg
    from cliprec.fetch import fetch_image

    if "://" not in source and not Path(source).exists():
        raise RecommendError(f"unreadable image {source!r}: no such file")
    result = fetch_image(source, cfg)
    if result.status != "ok" or result.jpeg is None:
        raise RecommendError(f"unreadable image {source!r}: {result.status} ({result.error})")
    return decode_jpeg(result.jpeg)


def as_json(category: str, variant: str, query: Query, hits: list[Hit]) -> str:
    """The --json output."""
    payload = {
        "category": category,
        "variant": variant,
        "query": {"kind": query.kind, "text": query.text, "image": query.image, "product": query.product},
        "results": [asdict(h) for h in hits],
    }
    return json.dumps(payload, indent=2, ensure_ascii=False)


def as_table(hits: list[Hit]) -> str:
    """Plain-text ranking: rank, id, score, title."""
    if not hits:
        return "no results"
    width = max(len(h.id) for h in hits)
    lines = [f"{'rank':>4}  {'id':<{width}}  {'score':>7}  title"]
    lines += [f"{h.rank:>4}  {h.id:<{width}}  {h.score:>7.4f}  {h.title}" for h in hits]
    return "\n".join(lines)


def thumbnails(images_dir: str | Path, ids: list[str]) -> dict[str, Any]:
    """Main-view images (PIL) of the given products from the image shards."""
    import pyarrow.parquet as pq

    from cliprec.codec import decode_jpeg
    from cliprec.shards import list_shards

    wanted, out = set(ids), {}
    for shard in list_shards(images_dir):
        table = pq.read_table(
            shard,
            columns=["id", "view", "jpeg"],
            filters=[("id", "in", list(wanted)), ("view", "==", "main")],
        )
        for pid, data in zip(table.column("id").to_pylist(), table.column("jpeg").to_pylist()):
            out.setdefault(pid, decode_jpeg(data))
    return out


def _font(image_font: Any) -> Any:
    """DejaVu Sans where installed (titles are full of accents), else Pillow's bundled font."""
    try:
        return image_font.truetype("DejaVuSans.ttf", 11)
    except OSError:
        pass
    try:
        return image_font.load_default(size=11)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType: the bitmap font
        return image_font.load_default()


def render_grid(
    query: Query, hits: list[Hit], images: dict[str, Any], out_path: str | Path, thumb: int = 160
) -> Path:
    """Write a PNG: the query (text and/or image, or the queried product) then the hits with scores."""
    from PIL import Image, ImageDraw, ImageFont

    font = _font(ImageFont)
    pad, caption = 10, 58
    cols = len(hits) + 1
    canvas = Image.new("RGB", (pad + cols * (thumb + pad), pad * 2 + thumb + caption), "white")
    draw = ImageDraw.Draw(canvas)

    def cell(col: int, image: Any, lines: list[str], outline: str = "#888888") -> None:
        x = pad + col * (thumb + pad)
        box = (x, pad, x + thumb - 1, pad + thumb - 1)
        if image is not None:
            canvas.paste(image.convert("RGB").resize((thumb, thumb)), (x, pad))
        else:
            draw.rectangle(box, fill="#eeeeee")
        draw.rectangle(box, outline=outline)
        for i, line in enumerate(lines[:4]):
            draw.text((x, pad + thumb + 3 + 13 * i), line, fill="black", font=font)

    q_image = query.image_obj if query.image else images.get(query.product) if query.product else None
    if q_image is None and query.text:
        # a text-only query: the text itself fills the picture cell
        x = pad
        draw.rectangle((x, pad, x + thumb - 1, pad + thumb - 1), fill="#f4f4ff", outline="#3344aa")
        for i, line in enumerate(textwrap.wrap(query.text, 24)[:10]):
            draw.text((x + 4, pad + 4 + 14 * i), line, fill="black", font=font)
        draw.text((x, pad + thumb + 3), "QUERY (text)", fill="black", font=font)
    else:
        q_lines = ["QUERY"] + ([f"more like {query.product}"] if query.product else [])
        q_lines += textwrap.wrap(query.text or "", 24)[:3]
        cell(0, q_image, q_lines, outline="#3344aa")
    for i, h in enumerate(hits, start=1):
        title = textwrap.shorten(h.title or "", 48, placeholder="…")
        lines = [f"#{h.rank}  {h.score:.3f}", h.id] + textwrap.wrap(title, 24)[:2]
        cell(i, images.get(h.id), lines if h.id in images else lines + ["(no image)"])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out_path)
    return out_path
