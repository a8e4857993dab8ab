"""cliprec.index: `auto` rules, build -> save -> load round trips, integrity errors."""

from __future__ import annotations

import json
import logging

import faiss
import numpy as np
import pytest

from cliprec.artifacts import ArtifactError, sha256_file, write_manifest
from cliprec.errors import CliprecError
from cliprec.index import (
    FLAT_MAX_VECTORS,
    IndexIntegrityError,
    IndexNotFoundError,
    apply_search_params,
    build_from_embeddings,
    build_index,
    choose_factory,
    load_index,
    save_index,
    training_size,
)

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def clustered(n: int, d: int = 16, seed: int = 0, clusters: int = 50) -> np.ndarray:
    """Unit vectors around centres (uniform random vectors make every ANN index look broken)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d))
    x = x.astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def ids_for(n: int) -> list[str]:
    return [f"B{i:06d}" for i in range(n)]


def exact_top(x: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    return np.argsort(-(q @ x.T), axis=1, kind="stable")[:, :k]


# --- auto -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "d", "budget_mb", "want"),
    [
        (500, 512, 4096, "Flat"),
        (FLAT_MAX_VECTORS - 1, 512, 4096, "Flat"),
        (FLAT_MAX_VECTORS, 512, 4096, "IVF256,PQ64x4fs,RFlat"),  # the raw vectors fit: exact re-rank
        (100_000, 512, 4096, "IVF512,PQ64x4fs,RFlat"),
        (1_000_000, 512, 4096, "IVF2048,PQ64x4fs,RFlat"),
        (100_000, 768, 4096, "IVF512,PQ96x4fs,RFlat"),
        (100_000, 128, 4096, "IVF512,PQ16x4fs,RFlat"),
        (100_000, 64, 4096, "IVF512,Flat"),  # PQ8x4 = 32 bits would shortlist badly
        (100_000, 512, 150, "IVF1024,PQ256x8"),  # raw vectors over budget: product quantisation only
        (200_000, 512, 100, "IVF2048,PQ256x8"),
        (20_000_000, 512, 4096, "IVF65536_HNSW32,PQ128x8"),
        (5_000, 512, 1, "IVF128,PQ128x7"),  # small but over budget: few PQ bits for few points
    ],
)
def test_auto_choice(n, d, budget_mb, want):
    choice = choose_factory(n, d, budget_mb)
    assert choice.factory == want
    assert str(n) in choice.reason and "budget" in choice.reason or "exact" in choice.reason


def test_auto_ivf_flat_for_small_vectors_finds_the_neighbours():
    x, q = clustered(FLAT_MAX_VECTORS, seed=8), clustered(100, seed=9)
    index, info = build_index(x, "auto", 4096)
    assert info.resolved == "IVF256,Flat" and info.train_size > 0
    apply_search_params(index, nprobe=16)
    found = index.search(q, 10)[1]
    assert np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, exact_top(x, q, 10))]) > 0.9


def test_auto_refuses_an_impossible_budget():
    with pytest.raises(CliprecError, match="memory_budget_mb"):
        choose_factory(1_000_000, 512, 1)


def test_training_size_caps():
    assert training_size(10_000_000, "IVF1024,PQ64x8", 512) == 102_400  # 100 per list
    assert training_size(3_000, "IVF16,PQ8x8", 16) == 3_000  # never more than n
    # the budget shrinks the sample, but not below 39 points per list
    assert training_size(10_000_000, "IVF1024,PQ64x8", 512, memory_budget_mb=10) == 39 * 1024


# --- round trips ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "budget", "n", "resolved", "min_recall"),
    [
        ("Flat", 4096, 600, "Flat", 1.0),
        ("HNSW16", 4096, 600, "HNSW16", 0.95),
        ("IVF8,PQ8x4", 4096, 800, "IVF8,PQ8x4", 0.4),  # 32-bit codes of 16-d vectors: coarse
        ("auto", 4096, 600, "Flat", 1.0),
        ("auto", 0.05, 1000, "IVF16,PQ8x4", 0.4),  # 64 KB of vectors > 50 KB budget
    ],
)
def test_build_save_load_round_trip(tmp_path, factory, budget, n, resolved, min_recall):
    x = clustered(n)
    ids = ids_for(n)
    index, info = build_index(x, factory=factory, memory_budget_mb=budget, seed=0)
    assert info.resolved == resolved and info.requested == factory and info.reason
    assert (info.train_size > 0) == ("IVF" in resolved)
    manifest = save_index(index, ids, tmp_path, model="tiny-clip", variant="lora", info=info)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids.txt", "index.faiss", "manifest.json"]
    assert manifest["files"]["index.faiss"]["sha256"] == sha256_file(tmp_path / "index.faiss")
    assert manifest["files"]["ids.txt"]["bytes"] == (tmp_path / "ids.txt").stat().st_size
    assert manifest["ntotal"] == n and manifest["d"] == 16
    assert manifest["factory"] == {"requested": factory, "resolved": resolved, "reason": info.reason}
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest

    loaded = load_index(tmp_path, expect_model="tiny-clip", expect_variant="lora", expect_d=16, nprobe=4)
    assert loaded.ids == ids and loaded.index.ntotal == n
    if "IVF" in resolved:
        faiss.extract_index_ivf(index).nprobe = 4
    after = loaded.index.search(x[:50], 5)
    np.testing.assert_array_equal(index.search(x[:50], 5)[1], after[1])  # the same index came back
    got_ids, got_scores = loaded.search(x[:50], 10)
    exact = exact_top(x, x[:50], 10)
    recall = np.mean([len(set(row) & {ids[j] for j in want}) / 10 for row, want in zip(got_ids, exact)])
    assert recall >= min_recall
    assert all(a >= b for row in got_scores for a, b in zip(row, row[1:]))  # best first


def test_flat_search_is_exact(tmp_path):
    x = clustered(300, seed=1)
    q = clustered(20, seed=2)
    index, info = build_index(x, "Flat")
    save_index(index, ids_for(300), tmp_path, "m", "zeroshot", info)
    positions, scores = load_index(tmp_path).search_positions(q, 7)
    np.testing.assert_array_equal(positions, exact_top(x, q, 7))
    np.testing.assert_allclose(scores, np.sort(q @ x.T, axis=1)[:, ::-1][:, :7], rtol=1e-5)


def test_search_params_applied_on_load(tmp_path):
    x = clustered(800)
    index, info = build_index(x, "IVF8,PQ4x4", seed=0)
    save_index(index, ids_for(800), tmp_path / "ivf", "m", "lora", info)
    loaded = load_index(tmp_path / "ivf", nprobe=5)
    assert faiss.extract_index_ivf(loaded.index).nprobe == 5
    loaded = load_index(tmp_path / "ivf", nprobe=999)  # capped at nlist
    assert faiss.extract_index_ivf(loaded.index).nprobe == 8

    index, info = build_index(x, "HNSW8")
    save_index(index, ids_for(800), tmp_path / "hnsw", "m", "lora", info)
    loaded = load_index(tmp_path / "hnsw", ef_search=77)
    assert faiss.downcast_index(loaded.index).hnsw.efSearch == 77
    apply_search_params(faiss.IndexFlatIP(4), nprobe=3, ef_search=3)  # Flat: nothing to set, no error


def test_refine_index_k_factor_and_no_polysemous_training(tmp_path):
    x, q = clustered(2000, seed=4), clustered(50, seed=5)
    index, info = build_index(x, "IVF8,PQ4,RFlat", seed=0)
    assert faiss.downcast_index(faiss.downcast_index(index).base_index).do_polysemous_training is False
    save_index(index, ids_for(2000), tmp_path, "m", "lora", info)
    truth = exact_top(x, q, 10)

    def recall(loaded) -> float:
        found = loaded.search_positions(q, 10)[0]
        return np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth, strict=True)])

    plain = load_index(tmp_path, nprobe=8)  # FAISS's k_factor 1: the re-rank sees only k candidates
    refined = load_index(tmp_path, nprobe=8, k_factor=16)
    assert faiss.downcast_index(refined.index).k_factor == 16
    assert recall(refined) > max(0.95, recall(plain) + 0.1)
    assert faiss.extract_index_ivf(refined.index).nprobe == 8


def test_builds_are_reproducible(tmp_path):
    x = clustered(800, seed=3)
    for run in ("a", "b"):
        index, info = build_index(x, "IVF8,PQ4x4", seed=7)
        save_index(index, ids_for(800), tmp_path / run, "m", "lora", info)
    assert sha256_file(tmp_path / "a" / "index.faiss") == sha256_file(tmp_path / "b" / "index.faiss")


def test_gpu_request_without_gpu_falls_back_to_cpu(caplog):
    x = clustered(800)
    with caplog.at_level(logging.WARNING, logger="cliprec.index"):
        index, info = build_index(x, "IVF8,Flat", seed=0, use_gpu=True)
    assert index.is_trained and index.ntotal == 800 and info.gpu is False
    assert "GPU k-means unavailable" in caplog.text


def test_factory_typo_is_a_clear_error():
    with pytest.raises(ValueError, match="factory 'HNSWx'"):
        build_index(clustered(50), "HNSWx")
    with pytest.raises(ValueError, match="no vectors"):
        build_index(np.zeros((0, 16), np.float32), "Flat")


@pytest.mark.parametrize(
    ("factory", "what"),
    [
        (
            "IVF1024,PQ4",
            "its 1024 inverted lists need at least 1024",
        ),  # a study-sized factory, a tiny catalog
        ("PQ8", "its PQ's 256 centroids per sub-quantizer need at least 256"),
        ("IVF16,PQ8x4fs,RFlat", None),  # 16 lists and 16 centroids: 100 vectors do
    ],
)
def test_a_factory_that_needs_more_vectors_than_there_are(factory, what):
    if what is None:
        assert build_index(clustered(100), factory)[0].ntotal == 100
        return
    with pytest.raises(CliprecError) as e:  # before FAISS's own error, which does not name the setting
        build_index(clustered(100), factory)
    assert str(e.value) == (
        f"index.factory = {factory!r}: {what} vectors to train, but there are only 100 to index; use `auto` "
        "or a factory with fewer IVF lists or PQ bits"
    )


# --- integrity ------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    x = clustered(200)
    index, info = build_index(x, "Flat")
    save_index(index, ids_for(200), tmp_path, model="models/demo-clip", variant="lora", info=info)
    return tmp_path


def _edit_manifest(path, **changes):
    manifest = json.loads((path / "manifest.json").read_text())
    manifest.update(changes)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _record(path, name, **fields):
    """Make the manifest's record of `name` say what `fields` (default: the file as it is now) say."""
    manifest = json.loads((path / "manifest.json").read_text())
    now = {"bytes": (path / name).stat().st_size, "sha256": sha256_file(path / name)}
    manifest["files"][name] = {**now, **fields}
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_missing_index_is_not_found(tmp_path):
    with pytest.raises(IndexNotFoundError, match="no index"):
        load_index(tmp_path / "nothing")


def test_corrupted_index_file(saved):
    data = bytearray((saved / "index.faiss").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (saved / "index.faiss").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="index.faiss does not match its manifest.*corrupted"):
        load_index(saved)


def test_wrong_sha_in_manifest(saved):
    _record(saved, "index.faiss", sha256="0" * 64)
    with pytest.raises(ArtifactError, match="sha256 differs"):
        load_index(saved)


def test_truncated_index(saved):
    path = saved / "index.faiss"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ArtifactError, match=r"index.faiss has 100 bytes, its manifest says \d+ \(truncated"):
        load_index(saved)
    _record(saved, "index.faiss")  # a manifest that agrees with the truncated file
    with pytest.raises(IndexIntegrityError, match="faiss cannot read"):
        load_index(saved)


def test_wrong_dimension(saved):
    with pytest.raises(IndexIntegrityError, match="dimension 16, expected 512"):
        load_index(saved, expect_d=512)
    _edit_manifest(saved, d=32)
    with pytest.raises(IndexIntegrityError, match="dimension 16, ids.txt 200, manifest says 200 x 32"):
        load_index(saved)


def test_wrong_model_and_variant(saved):
    with pytest.raises(IndexIntegrityError, match="model 'models/demo-clip', expected 'openai/clip"):
        load_index(saved, expect_model="openai/clip-vit-base-patch32")
    with pytest.raises(ArtifactError, match="manifest.json was built for variant lora, not zeroshot"):
        load_index(saved, expect_variant="zeroshot")


def test_ids_mismatch(saved):
    ids = (saved / "ids.txt").read_text().splitlines()
    (saved / "ids.txt").write_text("".join(f"{i}\n" for i in ids[:-1]))
    with pytest.raises(ArtifactError, match="ids.txt has .* bytes, its manifest says"):
        load_index(saved)
    _record(saved, "ids.txt")
    with pytest.raises(IndexIntegrityError, match="200 vectors of dimension 16, ids.txt 199"):
        load_index(saved)


def test_unreadable_or_incomplete_manifest(saved):
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="manifest.json is unreadable"):
        load_index(saved)
    (saved / "manifest.json").write_text(json.dumps({"index_file": "index.faiss"}))
    with pytest.raises(ArtifactError, match="lists no files"):
        load_index(saved)


def test_save_rejects_ids_count_mismatch(tmp_path):
    index, info = build_index(clustered(10), "Flat")
    with pytest.raises(ValueError, match="10 vectors but 9 ids"):
        save_index(index, ids_for(9), tmp_path, "m", "lora", info)
    assert not list(tmp_path.iterdir())


# --- the stage function ---------------------------------------------------------------------------------


def write_embed_dir(path, x, ids, model="models/demo-clip", **lineage):
    path.mkdir(parents=True)
    np.save(path / "fused.npy", x)
    (path / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
    info = {"model": model, "variant": "lora", "adapter": "a", "d": 16, **lineage}
    write_manifest(path, ["fused.npy", "ids.txt"], info)


def test_build_from_embeddings(tmp_path):
    x = clustered(300)
    write_embed_dir(tmp_path / "embed", x, ids_for(300))
    manifest = build_from_embeddings(
        tmp_path / "embed",
        tmp_path / "index",
        factory="auto",
        memory_budget_mb=64,
        seed=0,
        variant="lora",
    )
    assert manifest["model"] == "models/demo-clip" and manifest["factory"]["resolved"] == "Flat"
    assert manifest["adapter"] == "a"
    loaded = load_index(tmp_path / "index", expect_model="models/demo-clip", expect_variant="lora")
    assert loaded.search(x[:1], 1)[0] == [[ids_for(300)[0]]]


def test_build_from_embeddings_rejects_bad_input(tmp_path):
    with pytest.raises(ArtifactError, match="none/manifest.json is missing"):
        build_from_embeddings(tmp_path / "none", tmp_path / "index")
    x = clustered(5)
    write_embed_dir(tmp_path / "dup", x, ["a", "b", "c", "d", "a"])
    with pytest.raises(ArtifactError, match="duplicate"):
        build_from_embeddings(tmp_path / "dup", tmp_path / "index")
    write_embed_dir(tmp_path / "zs", x, ["a", "b", "c", "d", "e"])
    with pytest.raises(ArtifactError, match="zs/manifest.json was built for variant lora, not zeroshot"):
        build_from_embeddings(tmp_path / "zs", tmp_path / "index", variant="zeroshot")
    write_embed_dir(tmp_path / "short", x, ["a", "b"])
    with pytest.raises(ArtifactError, match="2 ids but 5"):
        build_from_embeddings(tmp_path / "short", tmp_path / "index")


def test_the_index_records_and_checks_what_it_was_built_from(tmp_path):
    lineage = {"category": "Appliances", "catalog_sha256": "c" * 64, "adapter_sha256": "a" * 64}
    embed = tmp_path / "data" / "embed" / "Amazon_Fashion" / "lora"
    write_embed_dir(embed, clustered(50), ids_for(50), **lineage)  # copied from the other category
    with pytest.raises(ArtifactError) as e:
        build_from_embeddings(embed, tmp_path / "index", variant="lora", category="Amazon_Fashion")
    assert str(e.value) == (
        f"{embed}/manifest.json was built for category Appliances, not Amazon_Fashion: rebuild it with "
        "`dvc repro embed_lora@Amazon_Fashion`"
    )
    manifest = build_from_embeddings(embed, tmp_path / "index", variant="lora", category="Appliances")
    assert {k: manifest[k] for k in lineage} == lineage
    assert manifest["embeddings_sha256"] == sha256_file(embed / "manifest.json")
    load_index(tmp_path / "index", expect={"category": "Appliances", "catalog_sha256": "c" * 64})
    with pytest.raises(ArtifactError, match="index/manifest.json was built for category Appliances, not Bo"):
        load_index(tmp_path / "index", expect={"category": "Bo"})
    with pytest.raises(ArtifactError, match=r"was not built from the current catalog \(products.parquet\)"):
        load_index(tmp_path / "index", expect={"catalog_sha256": "d" * 64})
