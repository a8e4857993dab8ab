"""params.yaml as one validated schema, checked before any work.

`load_params()` reads the file and validates all of it, both setups included: every key must be known
(a typo is an error, not a silently ignored setting), present, of its YAML type (booleans are YAML
booleans, integers integers: nothing is cast) and in range. A problem is a `ParamsError` whose one line
names the key, the value and what is allowed. The result is a frozen `Params`; `p.active` is the block
of the selected setup (`setups.<setup>`), so the shared keys mean the same in both worlds.

PyYAML reads YAML 1.1, where `2e-5` is a string: write `2.0e-5` (the error says so).
Never name a param `size` or `nfiles`: DVC's run-cache leaves such keys out of its key (treeverse/dvc
#10296), so changing one would restore an old output (tests/test_params.py walks the file for them).
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cliprec.errors import CliprecError

PARAMS_FILE = Path("params.yaml")
CATALOG_DIR = Path("catalog")  # where a jsonl catalog lives: a dependency of the ingest stage in dvc.yaml
DVC_BLIND_KEYS = frozenset({"size", "nfiles"})  # DVC's run-cache ignores params with these names
DEFAULT_EMBED_DIM = 512  # OpenAI CLIP ViT-B/32; used to try index.factory when the model is not local
CATEGORY = re.compile(r"^[A-Za-z0-9_]+$")  # a category names directories and DVC stages (ingest@<cat>)


class ParamsError(CliprecError):
    """params.yaml is missing, unreadable or invalid."""


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, data: Any) -> Any:
        # pydantic's own "extra inputs" error does not say what IS allowed
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(cls.model_fields))
            if unknown:
                raise ValueError(
                    f"unknown key {unknown[0]!r} (a typo?); allowed: {', '.join(cls.model_fields)}"
                )
        return data


# --- shared blocks ----------------------------------------------------------------------------------------


class Train(_Block):
    """`train:` optimiser and early stopping."""

    optimizer: Literal["adamw"]
    weight_decay: float = Field(ge=0)
    warmup_frac: float = Field(ge=0, lt=1)
    grad_clip: float = Field(gt=0)
    patience: int = Field(ge=1)
    train_logit_scale: bool


class Lora(_Block):
    """`lora:` the adapter's shape."""

    r: int = Field(ge=1)
    alpha: int = Field(ge=1)
    dropout: float = Field(ge=0, lt=1)
    target_modules: list[str] = Field(min_length=1)


class Split(_Block):
    """`setups.<s>.split:` fractions of products per split (assigned by hashing the product id)."""

    train: float = Field(gt=0, le=1)
    val: float = Field(gt=0, le=1)
    test: float = Field(gt=0, le=1)

    @model_validator(mode="after")
    def _sums_to_one(self) -> Split:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"train + val + test = {total:g}; the fractions must sum to 1")
        return self


class Images(_Block):
    """`images:` fetching, checking and storing the product photos."""

    side: int = Field(ge=16)  # pixels of the stored square
    resize: Literal["center_crop", "pad"]
    max_images: int = Field(ge=1)
    workers: int = Field(ge=1)
    timeout_s: float = Field(gt=0)
    retries: int = Field(ge=0)
    backoff_s: float = Field(ge=0)
    max_bytes: int = Field(ge=1)
    max_pixels: int = Field(ge=1)
    max_jpeg_scans: int = Field(ge=1)
    jpeg_quality: int = Field(ge=1, le=95)
    shard_size: int = Field(ge=1)


class Embed(_Block):
    """`embed:` batch size, the text share of the fused product vector, and how a query longer than the
    text tower reads is embedded (cliprec.query_embed: `truncate` or `windows`)."""

    batch_size: int = Field(ge=1)
    text_weight: float = Field(ge=0, le=1)
    long_text: Literal["truncate", "windows"]


class Index(_Block):
    """`index:` the FAISS index and its search settings."""

    factory: str = Field(min_length=1)
    memory_budget_mb: float = Field(gt=0)
    nprobe: int = Field(ge=1)
    ef_search: int = Field(ge=1)
    k_factor: float = Field(ge=1)


class Evaluate(_Block):
    """`evaluate:` the K of Recall@K, and the bootstrap behind every confidence interval."""

    ks: list[int] = Field(min_length=1)
    resamples: int = Field(ge=1000)
    confidence: float = Field(gt=0, lt=1)
    seed: int = Field(ge=0)  # bootstrap and sign-flip draws

    @field_validator("ks")
    @classmethod
    def _positive_unique(cls, ks: list[int]) -> list[int]:
        if min(ks) < 1 or len(set(ks)) != len(ks):
            raise ValueError(f"{ks}: each K must be an integer >= 1, and each K listed once")
        return ks


class Gate(_Block):
    """`gate:` when a drop fails CI: significant (one-sided paired p < alpha) AND larger than tolerance."""

    tolerance: float = Field(ge=0)
    alpha: float = Field(gt=0, lt=1)


# --- per-setup blocks --------------------------------------------------------------------------------------


class Ingest(_Block):
    """`setups.<s>.ingest:` where the catalog comes from."""

    source: Literal["synthetic", "jsonl", "amazon"]
    path: str | None
    n_products: int | None = Field(ge=1)
    data_seed: int = Field(ge=0)  # catalog generation, sampling, index training sample (not training)
    # amazon only: null reads the hub; a directory under catalog/ laid out like the hub repo
    # (<hub_root>/raw/meta_categories/meta_<Category>.jsonl) is read through the same `datasets` call
    hub_root: str | None

    @model_validator(mode="after")
    def _source_needs(self) -> Ingest:
        if self.source == "synthetic" and self.n_products is None:
            raise ValueError("source 'synthetic' needs n_products (how many products to draw)")
        if self.source == "jsonl":
            if not self.path:
                raise ValueError("source 'jsonl' needs path (a file under catalog/; {category} is replaced)")
            if not _under_catalog(self.path):
                raise ValueError(
                    f"path {self.path!r} must be a file under {CATALOG_DIR}/ (the ingest stage's "
                    "dependency, so DVC sees the catalog change; see docs/pipeline.md 'Your own catalog')"
                )
        elif self.path is not None:
            raise ValueError(f"path is only read by source 'jsonl', not {self.source!r}: set it to null")
        if self.hub_root is not None:
            if self.source != "amazon":
                raise ValueError(
                    f"hub_root is only read by source 'amazon', not {self.source!r}: set it to null"
                )
            if not _under_catalog(self.hub_root) or len(Path(self.hub_root).parts) < 2:
                raise ValueError(
                    f"hub_root {self.hub_root!r} must be a directory under {CATALOG_DIR}/ (e.g. "
                    f"{CATALOG_DIR}/amazon-2023, holding raw/meta_categories/meta_<Category>.jsonl), so DVC "
                    "sees the local copy change; or null for the hub"
                )
        return self


def _under_catalog(path: str) -> bool:
    """A relative path inside catalog/ (the ingest stage's DVC dependency), without `..`."""
    parts = Path(path).parts
    return not Path(path).is_absolute() and ".." not in parts and parts[:1] == (CATALOG_DIR.name,)


class Queries(_Block):
    """`setups.<s>.queries:` the shopper queries: where they come from (cliprec.queries reads them)."""

    source: Literal["synthetic", "c4", "jsonl"]
    path: str | None  # jsonl only: a file under catalog/, `{category}` replaced
    # c4 only: null reads the hub dataset McAuley-Lab/Amazon-C4; or a directory under catalog/ laid out like
    # the hub repo (<hub_root>/test.csv)
    hub_root: str | None
    # per category: synthetic writes this many; c4 and jsonl keep at most this many (null: all of them)
    n_queries: int | None = Field(ge=1)
    val_fraction: float = Field(gt=0, lt=1)  # sha1(query_id) below it: val, else test

    @model_validator(mode="after")
    def _source_needs(self) -> Queries:
        if self.source == "synthetic" and self.n_queries is None:
            raise ValueError("source 'synthetic' needs n_queries (how many queries to write per category)")
        if self.source == "jsonl":
            if not self.path or not _under_catalog(self.path):
                raise ValueError(
                    f"source 'jsonl' needs path, a file under {CATALOG_DIR}/ ({{category}} is replaced), "
                    f"not {self.path!r}; see docs/pipeline.md 'Your own queries'"
                )
        elif self.path is not None:
            raise ValueError(f"path is only read by source 'jsonl', not {self.source!r}: set it to null")
        if self.hub_root is not None:
            if self.source != "c4":
                raise ValueError(f"hub_root is only read by source 'c4', not {self.source!r}: set it to null")
            if not _under_catalog(self.hub_root) or len(Path(self.hub_root).parts) < 2:
                raise ValueError(
                    f"hub_root {self.hub_root!r} must be a directory under {CATALOG_DIR}/ (e.g. "
                    f"{CATALOG_DIR}/amazon-c4, holding test.csv), so DVC sees the local copy change; or "
                    "null for the hub"
                )
        return self


class Extractive(_Block):
    """`summarize:` title + the catalog-wise most informative sentences."""

    method: Literal["extractive"]
    max_words: int = Field(ge=1)
    chunk_size: int = Field(ge=1)


class Bart(_Block):
    """`summarize:` a seq2seq model (BART) with beam search."""

    method: Literal["bart"]
    model: str = Field(min_length=1)
    max_input_tokens: int = Field(ge=1)
    max_length: int = Field(ge=1)
    min_length: int = Field(ge=0)
    num_beams: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    max_words: int = Field(ge=1)
    chunk_size: int = Field(ge=1)

    @model_validator(mode="after")
    def _lengths(self) -> Bart:
        if self.min_length > self.max_length:
            raise ValueError(f"min_length {self.min_length} exceeds max_length {self.max_length}")
        return self


Summarize = Annotated[Extractive | Bart, Field(discriminator="method")]


class Model(_Block):
    """`setups.<s>.model:` the CLIP (hub id or local directory)."""

    name: str = Field(min_length=1)


class SetupTrain(_Block):
    """`setups.<s>.train:` what training needs per world."""

    lr_scale: float = Field(gt=0)


class Setup(_Block):
    """One world: demo or study."""

    ingest: Ingest
    queries: Queries
    split: Split
    summarize: Summarize
    model: Model
    train: SetupTrain


class Params(_Block):
    """The whole of params.yaml, validated."""

    setup: str
    categories: list[str] = Field(min_length=1)
    seed: int = Field(ge=0)  # the training seed only: data has setups.<s>.ingest.data_seed
    batch_size: int = Field(ge=2)
    lr: float = Field(gt=0)
    epochs: int = Field(ge=1)
    amp: bool
    train: Train
    lora: Lora
    images: Images
    embed: Embed
    index: Index
    evaluate: Evaluate
    gate: Gate
    setups: dict[str, Setup] = Field(min_length=1)

    @field_validator("categories")
    @classmethod
    def _categories(cls, cats: list[str]) -> list[str]:
        for cat in cats:
            if not CATEGORY.match(cat):
                raise ValueError(f"{cat!r}: a category name has only letters, digits and _")
        if len(set(cats)) != len(cats):
            raise ValueError(f"{cats}: each category listed once")
        return cats

    @model_validator(mode="after")
    def _setup_exists(self) -> Params:
        if self.setup not in self.setups:
            raise ValueError(f"setup = {self.setup!r}: not one of the setups: {', '.join(self.setups)}")
        return self

    @property
    def active(self) -> Setup:
        """The selected setup's block."""
        return self.setups[self.setup]

    @property
    def effective_lr(self) -> float:
        """The peak learning rate training uses: lr x setups.<setup>.train.lr_scale."""
        return self.lr * self.active.train.lr_scale


# --- loading ------------------------------------------------------------------------------------------------


def load_params(path: str | Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml (both setups, index.factory tried in FAISS); raise ParamsError."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as e:
        raise ParamsError(f"{path}: not found (run from the project root, or pass --root)") from e
    except (OSError, yaml.YAMLError) as e:
        raise ParamsError(f"{path}: cannot read it: {' '.join(str(e).split())}") from e
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of settings, got {type(raw).__name__}")
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        errors = e.errors()
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ParamsError(f"{path}: {describe(errors[0], raw)}{more}") from None
    check_index_factory(params, path)
    return params


def describe(err: dict[str, Any], raw: Any = None) -> str:
    """One pydantic error as `key = value: what is allowed`."""
    loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and x in ("extractive", "bart"))]
    key = ".".join(loc) or "(top level)"
    kind, msg = err["type"], err["msg"].removeprefix("Value error, ")
    if kind == "missing":
        return f"{key}: missing (every setting must be in the file)"
    value = err.get("input")
    if not loc:
        return msg
    if kind == "value_error" or isinstance(value, dict):
        return f"{key}: {msg}"
    allowed = {
        "bool_type": "must be true or false (a YAML boolean, not quoted)",
        "int_type": "must be an integer",
        "float_type": "must be a number",
        "string_type": "must be text",
        "list_type": "must be a list",
        "too_short": "must not be empty",
    }.get(kind, msg[0].lower() + msg[1:])
    if kind == "float_type" and isinstance(value, str) and _looks_numeric(value):
        allowed += f" (PyYAML reads {value} as text: write it with a dot, e.g. 2.0e-5)"
    return f"{key} = {value!r}: {allowed}"


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_index_factory(params: Params, path: str | Path = PARAMS_FILE) -> None:
    """`index.factory` is `auto` or a string FAISS builds for every setup's embedding dimension and can train
    on the setup's products (`ingest.n_products`, where set)."""
    factory = params.index.factory
    if factory == "auto":
        return
    import faiss  # slow to import; only when a factory is named

    for name, setup in params.setups.items():
        d = embedding_dim(setup.model.name)
        try:
            index = faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
        except RuntimeError as e:
            # FAISS says "Error in <C++ signature> at <file>: Error: '<check>' failed: <reason>"
            text = re.sub(r"^Error in .*? at \S+:\d+: ", "", " ".join(str(e).split()))
            reason = text.rsplit("failed: ", 1)[-1]
            raise ParamsError(
                f"{path}: index.factory = {factory!r}: FAISS cannot build it for the {d}-d vectors of "
                f"setup {name!r} ({reason[:200]}); use `auto` or a valid index_factory string"
            ) from None
        need, what = min_train_vectors(index)
        n = setup.ingest.n_products  # at most this many products, so at most this many vectors
        if n is not None and n < need:
            raise ParamsError(
                f"{path}: index.factory = {factory!r}: {what} need at least {need} vectors to train, but "
                f"setup {name!r} indexes at most {n} (setups.{name}.ingest.n_products); use `auto` or a "
                "factory with fewer IVF lists or PQ bits"
            )


def min_train_vectors(index: Any) -> tuple[int, str]:
    """The fewest vectors FAISS trains an (untrained) index on, and what needs them; (0, "") if none."""
    import faiss

    needs = [(0, "")]
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:  # k-means needs at least one point per list
        needs.append((int(ivf.nlist), f"its {ivf.nlist} inverted lists"))
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexPreTransform):
        inner = faiss.downcast_index(inner.index)
    if isinstance(inner, faiss.IndexRefine):
        inner = faiss.downcast_index(inner.base_index)
    pq = getattr(inner, "pq", None)
    if pq is not None:  # each sub-quantizer's k-means: 2**nbits centroids
        needs.append((int(pq.ksub), f"its PQ's {pq.ksub} centroids per sub-quantizer"))
    return max(needs)


@cache
def embedding_dim(model_name: str) -> int:
    """projection_dim from a local model directory's config.json, else DEFAULT_EMBED_DIM."""
    config = Path(model_name) / "config.json"
    try:
        return int(json.loads(config.read_text())["projection_dim"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_EMBED_DIM


def stage_params(argv: list[str], usage: str, variants: tuple[str, ...] = ()) -> tuple[Params, list[str]]:
    """Validated params and the stage's arguments (a category, then a variant when `variants`)."""
    if len(argv) != (2 if variants else 1) or (variants and argv[1] not in variants):
        raise CliprecError(f"usage: {usage}")
    params = load_params()
    if argv[0] not in params.categories:
        raise CliprecError(
            f"category {argv[0]!r} is not in params.yaml categories: {', '.join(params.categories)}"
        )
    return params, argv
