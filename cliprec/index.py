"""FAISS index over the fused product vectors: choice of index type, build, verified save/load, search.

Cosine similarity is the inner product of the L2-normalised vectors (`METRIC_INNER_PRODUCT`).

`factory: auto` picks the index from the catalog size n, the dimension d and `index.memory_budget_mb`
(autofaiss' `get_optimal_index_keys_v2` is the model; the rules and thresholds follow what
bench/faiss_scale.py measured: the figures, machine and query set are in bench/results/faiss_scale.json):

1. n < FLAT_MAX_VECTORS and the raw vectors (4 n d bytes) fit the budget -> `Flat`: exact; a scan of
   that many vectors is cheap enough per query that an approximate index would only lose recall
   (autofaiss switches to approximate indexes far earlier).
2. The raw vectors still fit -> `IVF{nlist},PQ{m}x4fs,RFlat`, m = the largest even divisor of d up
   to d / 8: an IVF shortlist of 4-bit fast-scan PQ codes, re-ranked exactly on the raw vectors
   (`index.k_factor` x k candidates; FAISS's default of 1 would make the re-rank useless).
   nlist = the power of two nearest 2 sqrt(n). Against HNSW32 it answered more queries per second at a
   higher recall@10 and built faster in the same memory; at 1M vectors it is still far faster than exact
   search, where HNSW32's build is too slow to measure by default (bench/results/faiss_scale.json). HNSW
   is therefore no longer an `auto` choice (name it in `index.factory` if you want it). For d < 128
   (m < 16: too few code bits to shortlist well) it is `IVF{nlist},Flat` instead.
3. Otherwise IVF-PQ: `IVF{nlist},PQ{m}x{nbits}`. nlist = the power of two nearest 4 sqrt(n) for
   n < 1M (at most n / 39: FAISS wants >= 39 training points per list), 16 384 up to 10M and 65 536
   beyond, with an HNSW32 coarse quantizer from 1M on (`IVF{nlist}_HNSW32`), as autofaiss does.
   m = the largest of 256, 128, 64, 48, 32, 24, 16, 8, 4 that divides d, is < d, and whose codes
   (m + 8 id bytes per vector) plus the coarse centroids fit the budget; nbits = 8 (fewer only for tiny
   catalogs, which cannot train 256 centroids per sub-quantizer).

IVF/PQ indexes are trained on a seeded sample of at most 100 points per list (autofaiss' cap), at
least 39 per list and 39 per PQ centroid, and never more rows than the budget holds as float32. With a
GPU (faiss-gpu, `faiss.get_num_gpus() > 0`) the k-means runs on it; the index itself stays on the CPU,
which is what gets saved. HNSW construction (only when named in `index.factory`) is
multi-threaded and therefore not byte-reproducible; Flat and IVF-PQ builds are.
"""

from __future__ import annotations

import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from tqdm import tqdm

from cliprec.artifacts import (
    MANIFEST_FILE,
    ArtifactError,
    atomic_write_bytes,
    check_built,
    manifest_sha256,
    verify_artifact,
    verify_files,
    write_manifest,
)
from cliprec.errors import CliprecError, one_line
from cliprec.params import min_train_vectors
from cliprec.paths import rebuild_hint

log = logging.getLogger(__name__)

INDEX_FILE = "index.faiss"
IDS_FILE = "ids.txt"
FORMAT_VERSION = 1

FLAT_MAX_VECTORS = 20_000
MIN_FASTSCAN_M = 16  # 4-bit PQ codes of at least 64 bits, else rule 2 uses IVF-Flat
PQ_CANDIDATES = (256, 128, 64, 48, 32, 24, 16, 8, 4)
IVF_ID_BYTES = 8  # an inverted list stores a 64-bit id next to every code
MIN_POINTS_PER_CENTROID = 39  # below this FAISS warns that k-means is under-trained
MAX_POINTS_PER_LIST = 100  # autofaiss' training cap: more points barely move the centroids
ADD_BATCH = 65_536  # rows copied out of the memmap at a time while adding
LINEAGE_KEYS = ("category", "catalog_sha256", "adapter_sha256")  # copied from the embeddings' manifest


class IndexIntegrityError(ArtifactError):
    """The saved index does not match its manifest, its ids or what the caller expects."""


class IndexNotFoundError(ArtifactError):
    """No saved index in the directory (the `index` stage has not run)."""


@dataclass(frozen=True)
class FactoryChoice:
    """A resolved factory string and why it was chosen."""

    factory: str
    reason: str


def choose_factory(n: int, d: int, memory_budget_mb: float) -> FactoryChoice:
    """Pick an index for n vectors of dimension d within the memory budget (rules in the module doc)."""
    if n <= 0 or d <= 0:
        raise ValueError(f"index: cannot index {n} vectors of dimension {d}")
    budget = memory_budget_mb * 2**20
    flat_bytes = 4.0 * n * d
    if n < FLAT_MAX_VECTORS and flat_bytes <= budget:
        return FactoryChoice(
            "Flat",
            f"n={n} < {FLAT_MAX_VECTORS}: exact search is cheap; {_mb(flat_bytes)} of {_mb(budget)} budget",
        )
    factory, size = _refine_factory(n, d)
    if size <= budget:
        return FactoryChoice(
            factory, f"n={n} >= {FLAT_MAX_VECTORS}: {factory} fits ({_mb(size)} of {_mb(budget)} budget)"
        )
    why = f"n={n}, d={d}: the raw vectors ({_mb(flat_bytes)}) do not fit the {_mb(budget)} budget"
    nlist, coarse = _ivf_lists(n)
    # PQ trains 2**nbits centroids per sub-quantizer: tiny catalogs get fewer bits
    nbits = max(1, min(8, int(math.log2(max(n, 2) / MIN_POINTS_PER_CENTROID))))
    centroid_bytes = 4.0 * nlist * d
    for m in PQ_CANDIDATES:
        if m >= d or d % m:
            continue
        size = n * (math.ceil(m * nbits / 8) + IVF_ID_BYTES) + centroid_bytes
        if size <= budget:
            factory = f"IVF{nlist}{coarse},PQ{m}x{nbits}"
            return FactoryChoice(factory, f"{why}: {factory} fits ({_mb(size)} of {_mb(budget)} budget)")
    raise CliprecError(
        f"index: no index for n={n}, d={d} fits index.memory_budget_mb={memory_budget_mb}; raise it "
        f"(the smallest IVF-PQ needs about {_mb(n * (1 + IVF_ID_BYTES) + centroid_bytes)})"
    )


def _refine_factory(n: int, d: int) -> tuple[str, float]:
    """Rule 2's factory and its size in bytes (IVF-Flat when d is too small for a useful PQ shortlist)."""
    nlist = ivf_nlist(n, 2)
    raw, centroids = 4.0 * n * d, 4.0 * nlist * d
    ms = [m for m in range(d // 8, MIN_FASTSCAN_M - 1, -1) if d % m == 0 and m % 2 == 0]
    if not ms:  # fewer than 64 code bits would shortlist badly; small vectors scan fast anyway
        return f"IVF{nlist},Flat", raw + n * IVF_ID_BYTES + centroids
    m = ms[0]
    return f"IVF{nlist},PQ{m}x4fs,RFlat", raw + n * (m / 2 + IVF_ID_BYTES) + centroids


def ivf_nlist(n: int, per_sqrt: float) -> int:
    """The power of two nearest per_sqrt * sqrt(n), halved until every list gets >= 39 training points."""
    nlist = 2 ** round(math.log2(per_sqrt * math.sqrt(n)))
    while nlist > 1 and nlist * MIN_POINTS_PER_CENTROID > n:
        nlist //= 2
    return nlist


def _ivf_lists(n: int) -> tuple[int, str]:
    """Number of inverted lists and coarse-quantizer suffix for n vectors (autofaiss' heuristic)."""
    if n >= 10_000_000:
        return 65_536, "_HNSW32"
    if n >= 1_000_000:
        return 16_384, "_HNSW32"
    return ivf_nlist(n, 4), ""


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:.1f} MB"


def training_size(n: int, factory: str, d: int, memory_budget_mb: float | None = None) -> int:
    """Rows to train an IVF/PQ index on: 39..100 per list, enough for the PQ, within the budget."""
    lists = re.search(r"IVF(\d+)", factory)
    nlist = int(lists.group(1)) if lists else 1
    pq = re.search(r"PQ\d+(?:x(\d+))?", factory)
    pq_centroids = 2 ** int(pq.group(1) or 8) if pq else 0
    want = max(MAX_POINTS_PER_LIST * nlist, MIN_POINTS_PER_CENTROID * pq_centroids)
    if memory_budget_mb is not None:
        floor_rows = max(MIN_POINTS_PER_CENTROID * nlist, pq_centroids)
        want = min(want, max(floor_rows, int(memory_budget_mb * 2**20 / (4 * d))))
    return int(min(n, want))


def gpu_available() -> bool:
    """True when FAISS was built with GPU support and sees a GPU."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


@dataclass
class BuildInfo:
    """What `build_index` did, for the manifest and for benchmarks."""

    requested: str
    resolved: str
    reason: str
    train_size: int = 0
    gpu: bool = False


def build_index(
    vectors: np.ndarray,
    factory: str = "auto",
    memory_budget_mb: float = 4096,
    seed: int = 0,
    use_gpu: bool | None = None,
) -> tuple[faiss.Index, BuildInfo]:
    """Build an inner-product index over `vectors` (N x d, may be a memmap); trains it when needed."""
    if vectors.ndim != 2:
        raise ValueError(f"index: expected an N x d matrix, got shape {vectors.shape}")
    n, d = vectors.shape
    if n == 0:
        raise ValueError("index: no vectors to index (is the embedding directory empty?)")
    if factory == "auto":
        choice = choose_factory(n, d, memory_budget_mb)
    else:
        choice = FactoryChoice(factory, "requested in params (index.factory)")
    log.info("index: %s for %d x %d vectors (%s)", choice.factory, n, d, choice.reason)
    try:
        index = faiss.index_factory(d, choice.factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise ValueError(f"index: faiss cannot build factory {choice.factory!r}: {one_line(e)}") from e
    info = BuildInfo(requested=factory, resolved=choice.factory, reason=choice.reason)
    need, what = min_train_vectors(index)
    if n < need:
        chosen = "" if factory == choice.factory else f" ({choice.factory})"
        raise CliprecError(
            f"index.factory = {factory!r}{chosen}: {what} need at least {need} vectors to train, but there "
            f"are only {n} to index; use `auto` or a factory with fewer IVF lists or PQ bits"
        )
    inner = faiss.downcast_index(index)
    base = faiss.downcast_index(inner.base_index) if isinstance(inner, faiss.IndexRefine) else None
    for part in (inner, base):
        if getattr(part, "do_polysemous_training", False):
            # the factory turns it on for PQ; it only serves Hamming-threshold search, which we never use,
            # and costs far more than the PQ training itself
            part.do_polysemous_training = False
    use_gpu = gpu_available() if use_gpu is None else use_gpu
    if not index.is_trained:
        size = training_size(n, choice.factory, d, memory_budget_mb)
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, size=size, replace=False)) if size < n else np.arange(n)
        sample = np.ascontiguousarray(vectors[rows], dtype=np.float32)
        info.train_size = size
        info.gpu = _train(index, sample, use_gpu)
    for start in tqdm(range(0, n, ADD_BATCH), desc="index add", unit="batch", disable=n <= ADD_BATCH):
        index.add(np.ascontiguousarray(vectors[start : start + ADD_BATCH], dtype=np.float32))
    return index, info


def _train(index: faiss.Index, sample: np.ndarray, use_gpu: bool) -> bool:
    """Train on the sample; the IVF k-means runs on the GPU when there is one. Returns whether it did."""
    ivf = faiss.try_extract_index_ivf(index)
    gpu_index = None
    if use_gpu and ivf is not None:
        try:
            # only the k-means assignment moves to the GPU: the index stays a CPU index of any type
            gpu_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlat(index.d, index.metric_type))
            ivf.clustering_index = gpu_index
        except Exception as e:  # faiss-cpu has the helper but no GPU classes: NameError, ...
            log.warning("index: GPU k-means unavailable (%s); training on the CPU", one_line(e))
            gpu_index = None
    log.info("index: training on %d vectors%s", len(sample), " (GPU k-means)" if gpu_index else "")
    try:
        index.train(sample)
    except RuntimeError as e:
        raise CliprecError(f"index: cannot train on {len(sample)} vectors: {one_line(e)}") from e
    finally:
        if ivf is not None:
            ivf.clustering_index = None
    return gpu_index is not None


def apply_search_params(
    index: faiss.Index, nprobe: int | None = None, ef_search: int | None = None, k_factor: float | None = None
) -> None:
    """Set IVF nprobe, HNSW efSearch and a refine stage's k_factor where the index has them."""
    refine = faiss.downcast_index(index)
    if isinstance(refine, faiss.IndexRefine):
        if k_factor is not None:
            # FAISS defaults to 1: the exact re-rank then sees only the k candidates it was meant to fix
            refine.k_factor = float(k_factor)
        index = faiss.downcast_index(refine.base_index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        if nprobe is not None:
            ivf.nprobe = int(min(nprobe, ivf.nlist))
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW) and ef_search is not None:
            quantizer.hnsw.efSearch = int(max(ef_search, ivf.nprobe))
        return
    inner = faiss.downcast_index(index)
    if isinstance(inner, faiss.IndexHNSW) and ef_search is not None:
        inner.hnsw.efSearch = int(ef_search)


def _atomic_write_index(index: faiss.Index, path: Path) -> None:
    # faiss writes the file itself (no second in-memory copy of a multi-GB index), to a temp name first
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o644)  # mkstemp makes 0600
    os.close(fd)
    try:
        faiss.write_index(index, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_index(
    index: faiss.Index,
    ids: list[str],
    out_dir: str | Path,
    model: str,
    variant: str,
    info: BuildInfo | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write index.faiss, ids.txt and manifest.json atomically (manifest last); returns the manifest."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if index.ntotal != len(ids):
        raise ValueError(f"index: {index.ntotal} vectors but {len(ids)} ids")
    if "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)  # the saved index must load on any machine
    _atomic_write_index(index, out_dir / INDEX_FILE)
    atomic_write_bytes(out_dir / IDS_FILE, "".join(f"{i}\n" for i in ids).encode())
    info: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "model": model,
        "variant": variant,
        "metric": "inner_product",
        "d": int(index.d),
        "ntotal": int(index.ntotal),
        "factory": {
            "requested": info.requested if info else None,
            "resolved": info.resolved if info else None,
            "reason": info.reason if info else None,
        },
        "train_size": info.train_size if info else 0,
        "gpu_train": info.gpu if info else False,
        **(extra or {}),
    }
    manifest = write_manifest(out_dir, [INDEX_FILE, IDS_FILE], info)
    log.info("index: saved %d vectors (%s) to %s", index.ntotal, manifest["factory"]["resolved"], out_dir)
    return manifest


@dataclass
class LoadedIndex:
    """A verified index with its product ids (row i of the index is ids[i])."""

    index: faiss.Index
    ids: list[str]
    manifest: dict[str, Any]

    @property
    def d(self) -> int:
        """Vector dimension."""
        return int(self.index.d)

    def search_positions(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(positions, scores), each nq x k; position -1 / score -inf where fewer than k were found."""
        queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
        if queries.shape[1] != self.d:
            raise ValueError(f"index: query dimension {queries.shape[1]} != index dimension {self.d}")
        k = int(min(k, self.index.ntotal))
        scores, positions = self.index.search(queries, k)
        scores = np.where(positions >= 0, scores, -np.inf).astype(np.float32)
        return positions, scores

    def search(self, queries: np.ndarray, k: int) -> tuple[list[list[str]], list[list[float]]]:
        """Top-k product ids and cosine scores per query, best first (missing hits dropped)."""
        positions, scores = self.search_positions(queries, k)
        out_ids, out_scores = [], []
        for prow, srow in zip(positions, scores):
            keep = prow >= 0
            out_ids.append([self.ids[p] for p in prow[keep]])
            out_scores.append([float(s) for s in srow[keep]])
        return out_ids, out_scores


def load_index(
    index_dir: str | Path,
    expect_model: str | None = None,
    expect_variant: str | None = None,
    expect_d: int | None = None,
    nprobe: int | None = None,
    ef_search: int | None = None,
    k_factor: float | None = None,
    expect: Mapping[str, Any] | None = None,
) -> LoadedIndex:
    """Load and verify a saved index (sizes + sha256, ids, ntotal, d, model, variant, and the lineage in
    `expect`, e.g. category and catalog_sha256: `check_built`); set search params."""
    index_dir = Path(index_dir)
    if not (index_dir / MANIFEST_FILE).is_file():
        raise IndexNotFoundError(f"no index in {index_dir} (missing {MANIFEST_FILE})")
    manifest = verify_files(index_dir, [INDEX_FILE, IDS_FILE])
    rebuild = _rebuild(index_dir)
    for key in ("ntotal", "d", "model", "variant"):
        if key not in manifest:
            raise IndexIntegrityError(f"{index_dir / MANIFEST_FILE} lacks {key!r}: {rebuild}")
    if expect_model is not None and manifest["model"] != expect_model:
        raise IndexIntegrityError(
            f"{index_dir}: index built with model {manifest['model']!r}, expected {expect_model!r}: {rebuild}"
        )
    if expect_d is not None and int(manifest["d"]) != int(expect_d):
        raise IndexIntegrityError(
            f"{index_dir}: index dimension {manifest['d']}, expected {expect_d}: {rebuild}"
        )
    wanted = dict(expect or {})
    if expect_variant is not None:
        wanted["variant"] = expect_variant
    check_built(index_dir, manifest, wanted)
    ids = read_ids(index_dir / IDS_FILE)
    try:
        index = faiss.read_index(str(index_dir / INDEX_FILE))
    except RuntimeError as e:
        raise IndexIntegrityError(f"{index_dir / INDEX_FILE}: faiss cannot read it ({one_line(e)})") from e
    if index.ntotal != len(ids) or index.ntotal != int(manifest["ntotal"]) or index.d != int(manifest["d"]):
        raise IndexIntegrityError(
            f"{index_dir}: index holds {index.ntotal} vectors of dimension {index.d}, ids.txt {len(ids)}, "
            f"manifest says {manifest['ntotal']} x {manifest['d']}: {rebuild}"
        )
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        raise IndexIntegrityError(f"{index_dir}: index does not use the inner product: {rebuild}")
    apply_search_params(index, nprobe=nprobe, ef_search=ef_search, k_factor=k_factor)
    return LoadedIndex(index=index, ids=ids, manifest=manifest)


def read_ids(path: str | Path) -> list[str]:
    """One id per line."""
    return Path(path).read_text().splitlines()


def build_from_embeddings(
    embed_dir: str | Path,
    out_dir: str | Path,
    factory: str = "auto",
    memory_budget_mb: float = 4096,
    seed: int = 0,
    variant: str | None = None,
    category: str | None = None,
) -> dict[str, Any]:
    """The `index` stage: index the verified `fused.npy` + `ids.txt` of an embedding directory.

    The embeddings must be of `variant` and `category` (when given); the index's manifest records their
    lineage (category, catalog_sha256, adapter_sha256) and their own sha256 (embeddings_sha256).
    """
    embed_dir = Path(embed_dir)
    expect = {k: v for k, v in (("category", category), ("variant", variant)) if v is not None}
    embed_manifest = verify_artifact(embed_dir, expect, ["fused.npy", "ids.txt"])
    fused = np.load(embed_dir / "fused.npy", mmap_mode="r")
    ids = read_ids(embed_dir / "ids.txt")
    if len(ids) != len(fused):
        raise ArtifactError(
            f"{embed_dir}: {len(ids)} ids but {len(fused)} fused vectors: {_rebuild(embed_dir)}"
        )
    if len(set(ids)) != len(ids):
        raise ArtifactError(f"{embed_dir}: ids.txt has duplicate product ids: {_rebuild(embed_dir)}")
    index, info = build_index(fused, factory=factory, memory_budget_mb=memory_budget_mb, seed=seed)
    lineage = {key: embed_manifest.get(key) for key in ("adapter", *LINEAGE_KEYS)}
    return save_index(
        index,
        ids,
        out_dir,
        model=str(embed_manifest.get("model")),
        variant=str(variant or embed_manifest.get("variant")),
        info=info,
        extra={**lineage, "embeddings_sha256": manifest_sha256(embed_dir)},
    )


def _rebuild(directory: Path) -> str:
    return f"rebuild it with `{rebuild_hint(directory)}`"
