"""cliprec.evaluate on synthetic embeddings whose answers are known."""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cliprec import paths
from cliprec.artifacts import ArtifactError, catalog_identity, manifest_sha256, write_manifest
from cliprec.errors import CliprecError
from cliprec.evaluate import (
    MODES,
    EvalSettings,
    evaluate,
    exact_topk,
    gallery_digest,
    headline,
    write_outputs,
)
from cliprec.graded import GRADED_METRICS, mode_values
from cliprec.index import IndexIntegrityError, build_from_embeddings
from cliprec.metrics import metrics_from_ranks
from cliprec.vectors import fuse

REPO = Path(__file__).resolve().parents[1]
D = 16


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def make_fixture(
    root: Path,
    n: int = 120,
    seed: int = 0,
    shuffle_images: bool = False,
    alt_noise: float = 0.0,
    factory: str = "Flat",
    model: str = "tiny",
    category: str = "Cat",
) -> dict:
    """products.parquet + an embed dir + its index. Every 3rd product is test; product 2 (test) has no
    embedding; every other product has an alt image."""
    rng = np.random.default_rng(seed)
    ids = [f"P{i:04d}" for i in range(n)]
    split = ["test" if i % 3 == 2 else "train" for i in range(n)]
    pd.DataFrame({"id": ids, "title": [f"thing {i}" for i in range(n)], "split": split}).to_parquet(
        root / "products.parquet"
    )
    write_manifest(root, ["products.parquet"], {"category": category})  # as ingest does
    text = unit(rng.standard_normal((n, D)))
    image = text[rng.permutation(n)] if shuffle_images else text.copy()
    emb_ids = [pid for i, pid in enumerate(ids) if i != 2]  # product 2 failed its image download
    keep = [i for i in range(n) if i != 2]
    text, image = text[keep], image[keep]
    alt_ids = emb_ids[::2]
    alt_image = unit(image[::2] + alt_noise * rng.standard_normal((len(alt_ids), D)))
    e = root / "embed"
    e.mkdir()
    (e / "ids.txt").write_text("".join(f"{i}\n" for i in emb_ids))
    (e / "alt_ids.txt").write_text("".join(f"{i}\n" for i in alt_ids))
    np.save(e / "text.npy", text)
    np.save(e / "image.npy", image)
    np.save(e / "fused.npy", fuse(text, image, 0.5))
    np.save(e / "alt_image.npy", alt_image)
    files = ["ids.txt", "alt_ids.txt", "text.npy", "image.npy", "fused.npy", "alt_image.npy"]
    lineage = catalog_identity(root / "products.parquet")
    write_manifest(e, files, {"model": model, "variant": "lora", "d": D, "n": len(emb_ids), **lineage})
    build_from_embeddings(e, root / "index", factory=factory, memory_budget_mb=64, variant="lora")
    return {"products": root / "products.parquet", "embed": e, "index": root / "index", "ids": emb_ids}


def run(fx, category=None, variant=None, **settings):
    return evaluate(
        fx["products"], fx["embed"], fx["index"], EvalSettings(**settings), category=category, variant=variant
    )


def test_identical_queries_and_gallery_are_perfect(tmp_path):
    fx = make_fixture(tmp_path)
    metrics, curve, _ = run(fx)
    n_test = len([i for i in range(120) if i % 3 == 2])  # 40
    for mode in MODES:
        m = metrics[mode]
        assert m["recall_at_1"] == m["recall_at_10"] == m["mrr"] == m["ndcg_at_10"] == 1.0, mode
        assert m["gallery_size"] == n_test - 1  # product 2 has no embedding
    assert metrics["text_to_image"]["queries"] == n_test - 1
    with_alt = sum(1 for i in range(120) if i % 3 == 2 and i != 2 and (i - (i > 2)) % 2 == 0)
    for mode in ("multimodal", "image_to_image"):
        assert metrics[mode]["queries"] == with_alt
        assert metrics[mode]["skipped_no_alt"] == n_test - 1 - with_alt
    assert metrics["catalog"] == {
        "products": 119, "test_products": n_test, "test_without_embedding": 1, "gallery_photo_ties": 0
    }  # fmt: skip
    assert metrics["ann_recall_at_10"] == 1.0
    assert [row["k"] for row in curve] == list(range(1, 11))
    assert all(row[mode] == 1.0 for row in curve for mode in MODES)
    assert metrics["text_to_image"]["ci95"]["recall_at_5"] == {"low": 1.0, "high": 1.0}


def test_per_query_ranks_and_cis(tmp_path):
    fx = make_fixture(tmp_path, shuffle_images=True)
    metrics, _, ranks = run(fx)
    products = pd.read_parquet(fx["products"])
    test_ids = sorted(set(products.loc[products["split"] == "test", "id"]) & set(fx["ids"]))
    assert ranks["ids"] == test_ids and ranks["test_set"]["gallery_size"] == len(test_ids)
    assert ranks["test_set"]["ids_sha256"] == gallery_digest(test_ids) and ranks["ks"] == [1, 5, 10]
    for mode in MODES:
        queried = [r for r in ranks["ranks"][mode] if r is not None]
        assert len(queried) == metrics[mode]["queries"] and all(r >= 1 for r in queried)
        assert metrics_from_ranks(queried)["mrr"] == pytest.approx(metrics[mode]["mrr"], abs=1e-6)
        for name, ci in metrics[mode]["ci95"].items():
            assert ci["low"] <= metrics[mode][name] <= ci["high"], (mode, name)
    assert ranks["ranks"]["image_to_image"][1] is None  # every other product has no second photo


def test_shuffled_images_score_near_chance(tmp_path):
    fx = make_fixture(tmp_path, shuffle_images=True)
    metrics, curve, _ = run(fx)
    t2i = metrics["text_to_image"]
    assert t2i["recall_at_1"] <= 0.1 and t2i["recall_at_10"] < 0.6
    assert metrics["image_to_text"]["mrr"] < 0.3
    # recall@k can only grow with k
    for mode in MODES:
        values = [row[mode] for row in curve]
        assert values == sorted(values)
    assert (
        curve[0]["text_to_image"] == t2i["recall_at_1"] and curve[9]["text_to_image"] == t2i["recall_at_10"]
    )


def test_alt_image_noise_lowers_image_to_image_only(tmp_path):
    fx = make_fixture(tmp_path, alt_noise=2.0)
    metrics, _, _ = run(fx)
    assert metrics["text_to_image"]["recall_at_1"] == 1.0
    assert metrics["image_to_image"]["recall_at_1"] < 0.9
    # the text half of the multimodal query is exact, so it beats image-only retrieval
    assert metrics["multimodal"]["mrr"] > metrics["image_to_image"]["mrr"]


def test_seed_metric_matches_brute_force(tmp_path):
    fx = make_fixture(tmp_path, shuffle_images=True)
    metrics, _, _ = run(fx)
    fused = np.load(fx["embed"] / "fused.npy")
    products = pd.read_parquet(fx["products"])
    test = set(products.loc[products["split"] == "test", "id"])
    want, with_self = [], []
    for i, pid in enumerate(fx["ids"]):
        if pid in test:
            others = sorted((float(fused[i] @ fused[j]) for j in range(len(fused)) if j != i), reverse=True)
            want.append(sum(others[:5]) / 5)
            with_self.append((1.0 + sum(others[:4])) / 5)  # the seed's: the product itself first
    assert metrics["avg_mean_similarity_at_5"] == pytest.approx(sum(want) / len(want), abs=1e-5)
    assert metrics["avg_mean_similarity_at_5_with_self"] == pytest.approx(
        sum(with_self) / len(want), abs=1e-5
    )
    ci = metrics["avg_mean_similarity_at_5_ci95"]
    assert ci["low"] < metrics["avg_mean_similarity_at_5"] < ci["high"]


def test_ann_recall_of_an_approximate_index(tmp_path):
    fx = make_fixture(tmp_path, n=600, factory="IVF8,PQ4x4")
    metrics, _, _ = run(fx, nprobe=1)
    assert 0.0 < metrics["ann_recall_at_10"] < 1.0
    # relevance metrics come from exact search: the same as with a Flat index
    (tmp_path / "flat").mkdir()
    flat = make_fixture(tmp_path / "flat", n=600, factory="Flat")
    flat_metrics, _, _ = run(flat)
    assert flat_metrics["ann_recall_at_10"] == 1.0
    for mode in MODES:
        assert metrics[mode] == flat_metrics[mode]


def test_exact_topk_is_tie_aware_and_blockwise():
    base = np.repeat(unit(np.random.default_rng(1).standard_normal((5, D))), 4, axis=0)  # 4 copies each
    q = base[::4]
    positions, scores = exact_topk(q, base, 6, q_chunk=2, b_chunk=3)
    assert positions[:, :4].tolist() == [[4 * i + j for j in range(4)] for i in range(5)]  # lowest first
    assert np.allclose(scores[:, :4], 1.0, atol=1e-6)


def test_exact_topk_equals_a_stable_full_sort_on_tied_scores():
    # the reference: sort every score of a row (stable, so the lower position wins a tie), cut at k
    rng = np.random.default_rng(2)
    for trial in range(40):
        base = rng.integers(-2, 3, size=(int(rng.integers(8, 50)), 4)).astype(np.float32)  # many ties
        q = rng.integers(-2, 3, size=(int(rng.integers(1, 9)), 4)).astype(np.float32)
        k = int(rng.integers(1, 8))
        want = np.argsort(-(q @ base.T), axis=1, kind="stable")[:, :k]
        positions, scores = exact_topk(q, base, k, q_chunk=3, b_chunk=int(rng.integers(k, 20)))
        assert positions.tolist() == want.tolist(), trial
        assert np.array_equal(scores, np.take_along_axis(q @ base.T, want, 1))


def test_stale_or_foreign_index_is_refused(tmp_path):
    fx = make_fixture(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    fx2 = make_fixture(other, n=90)
    with pytest.raises(
        ArtifactError, match="other/index/manifest.json was not built from the current catalog"
    ):
        evaluate(fx["products"], fx["embed"], fx2["index"])
    fx3_dir = tmp_path / "m"
    fx3_dir.mkdir()
    fx3 = make_fixture(fx3_dir, model="another-model")
    with pytest.raises(IndexIntegrityError, match="another-model"):
        evaluate(fx["products"], fx["embed"], fx3["index"])


def test_another_category_or_variant_is_refused(tmp_path):
    fx = make_fixture(tmp_path)
    with pytest.raises(
        ArtifactError, match=f"{tmp_path}/manifest.json was built for category Cat, not Other"
    ):
        run(fx, category="Other")
    with pytest.raises(ArtifactError, match="embed/manifest.json was built for variant lora, not zeroshot"):
        run(fx, category="Cat", variant="zeroshot")
    # re-embedded since the index was built (same catalog, same ids): the index holds other vectors
    embed = json.loads((fx["embed"] / "manifest.json").read_text())
    write_manifest(fx["embed"], embed["files"], {**embed, "text_weight": 0.7})
    with pytest.raises(ArtifactError, match="index/manifest.json was not built from the current embeddings"):
        run(fx)


def test_no_test_products_is_a_clear_error(tmp_path):
    fx = make_fixture(tmp_path)
    pd.DataFrame({"id": ["P0000"], "split": ["train"]}).to_parquet(fx["products"])
    write_manifest(tmp_path, ["products.parquet"], {"category": "Cat"})
    embed = json.loads((fx["embed"] / "manifest.json").read_text())
    restamped = {**embed, **catalog_identity(fx["products"])}  # as if embedded from this catalog
    write_manifest(fx["embed"], embed["files"], restamped)
    with pytest.raises(CliprecError, match="no test product"):
        run(fx)


def test_outputs_are_dvc_friendly(tmp_path):
    fx = make_fixture(tmp_path)
    metrics, curve, ranks = run(fx)
    cat = "Amazon_Fashion"
    write_outputs(metrics, curve, ranks, cat, "lora", root=tmp_path)
    assert json.loads((tmp_path / paths.ranks_path(cat, "lora")).read_text()) == ranks
    saved = json.loads((tmp_path / paths.metrics_detail_path(cat, "lora")).read_text())
    assert saved == metrics
    # the DVC metrics file: one headline column for `dvc exp show`, under a key no other metrics file has
    # (DVC heads it with the key alone), the same value, no CI
    shown = json.loads((tmp_path / paths.metrics_path(cat, "lora")).read_text())
    assert shown == {cat: {"lora_t2i_r5": metrics["text_to_image"]["recall_at_5"]}}

    def leaves(d, prefix=""):
        for k, v in d.items():
            assert "." not in k
            if isinstance(v, dict):
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    assert all(isinstance(v, int | float) and not isinstance(v, bool) for _, v in leaves(saved))
    plot = json.loads((tmp_path / paths.recall_plot_path(cat, "lora")).read_text())
    assert plot == curve and set(plot[0]) == {"k", *MODES}
    with pytest.raises(ValueError, match="dot"):
        write_outputs({"a.b": 1}, [], {}, cat, "lora", root=tmp_path / "dotted")


def make_query_vectors(fx: dict, out: Path, n: int = 40, noise: float = 0.0, seed: int = 1) -> list[dict]:
    """An embed_queries directory for the fixture's embeddings: query i is product 3i's fused vector (plus
    noise), relevant: that product (grade 3) and the next one (grade 1); even queries test, odd val."""
    rng = np.random.default_rng(seed)
    fused = np.load(fx["embed"] / "fused.npy")
    split_of = dict(pd.read_parquet(fx["products"], columns=["id", "split"]).itertuples(index=False))
    ids = fx["ids"]
    meta = []
    for i in range(n):
        pid, other = ids[3 * i], ids[3 * i + 1]
        meta.append({"query_id": f"q{i:03d}", "split": "test" if i % 2 == 0 else "val",
                     "target_split": split_of[pid], "kind": "text", "relevant": {pid: 3, other: 1},
                     "tokens": 5, "windows": 1})  # fmt: skip
    vectors = unit(fused[[3 * i for i in range(n)]] + noise * rng.standard_normal((n, D)))
    out.mkdir(parents=True)
    np.save(out / "vectors.npy", vectors)
    (out / "queries.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    (out / "report.json").write_text("{}\n")
    lineage = {**catalog_identity(fx["products"]), "variant": "lora", "model": "tiny"}
    info = {**lineage, "embeddings_sha256": manifest_sha256(fx["embed"])}
    write_manifest(out, ["vectors.npy", "queries.jsonl", "report.json"], info)
    return meta


def test_shopper_queries_search_the_whole_catalog_through_the_index(tmp_path):
    fx = make_fixture(tmp_path, factory="Flat")
    meta = make_query_vectors(fx, tmp_path / "q")
    metrics, _, ranks = evaluate(fx["products"], fx["embed"], fx["index"], queries_dir=tmp_path / "q")
    q = metrics["queries"]
    test = [m for m in meta if m["split"] == "test"]
    assert q["queries"] == len(test) == 20 and q["gallery_size"] == len(fx["ids"]) == 119
    # each query is its target's own vector: the target first; the grade-1 neighbour somewhere, maybe
    assert q["mrr"] == 1.0 and q["recall_at_10"] == 1.0 and 0 < q["ndcg_at_10"] <= 1
    assert set(q["ci95"]) == set(GRADED_METRICS) and q["exact"]["ndcg_at_10"] == q["ndcg_at_10"]
    assert q["ann_loss"] == {name: 0.0 for name in GRADED_METRICS}  # a Flat index is exact
    by_split = {s: b["queries"] for s, b in q["by_target_split"].items()}
    assert sum(by_split.values()) == 20 and by_split == {
        s: sum(m["target_split"] == s for m in test) for s in by_split
    }
    entries = ranks["ranks"]["queries"]
    assert [e[0] for e in entries] == [[1, 3]] * 20  # [rank, grade], the grade-3 product first
    assert ranks["query_sets"]["queries"]["ids"] == [m["query_id"] for m in test]
    for name, values in mode_values(entries).items():  # the ranks file recomputes every metric exactly
        assert round(float(np.mean(values)), 6) == q[name]
    for name, values in mode_values(ranks["exact"]["queries"]).items():
        assert round(float(np.mean(values)), 6) == q["exact"][name]


def test_the_queries_mode_leaves_the_self_retrieval_modes_as_they_were(tmp_path):
    fx = make_fixture(tmp_path)
    make_query_vectors(fx, tmp_path / "q")
    before = evaluate(fx["products"], fx["embed"], fx["index"])
    metrics, curve, ranks = evaluate(fx["products"], fx["embed"], fx["index"], queries_dir=tmp_path / "q")
    assert {k: v for k, v in metrics.items() if k != "queries"} == before[0] and curve == before[1]
    kept = {k: v for k, v in ranks.items() if k not in ("query_sets", "exact")}
    kept["ranks"] = {m: r for m, r in ranks["ranks"].items() if m != "queries"}
    assert json.dumps(kept) == json.dumps(before[2])


def test_an_approximate_index_loses_against_exact_search(tmp_path):
    fx = make_fixture(tmp_path, n=600, factory="IVF16,PQ4")
    make_query_vectors(fx, tmp_path / "q", n=150, noise=0.4)
    s = EvalSettings(nprobe=1)
    q = evaluate(fx["products"], fx["embed"], fx["index"], s, queries_dir=tmp_path / "q")[0]["queries"]
    assert q["exact"]["recall_at_100"] > q["recall_at_100"]
    assert q["ann_loss"]["recall_at_100"] == pytest.approx(
        q["exact"]["recall_at_100"] - q["recall_at_100"], abs=2e-6
    )


def test_query_vectors_of_other_embeddings_are_refused(tmp_path):
    fx = make_fixture(tmp_path)
    make_query_vectors(fx, tmp_path / "q")
    (tmp_path / "other").mkdir()
    other = make_fixture(tmp_path / "other", seed=5)
    with pytest.raises(ArtifactError, match="not built from the current embeddings"):
        evaluate(other["products"], other["embed"], other["index"], queries_dir=tmp_path / "q")
    with pytest.raises(ArtifactError, match="missing"):
        evaluate(fx["products"], fx["embed"], fx["index"], queries_dir=tmp_path / "nowhere")


def test_the_headline_carries_the_queries_block_with_list_cis(tmp_path):
    fx = make_fixture(tmp_path)
    make_query_vectors(fx, tmp_path / "q")
    metrics = evaluate(fx["products"], fx["embed"], fx["index"], queries_dir=tmp_path / "q")[0]
    block = headline(metrics, "Cat", "lora")["Cat"]["queries"]
    assert set(block) == {*GRADED_METRICS, "queries", "gallery_size", "ci95"}
    assert block["gallery_size"] == 119 and block["queries"] == 20
    assert all(isinstance(v, list) and len(v) == 2 for v in block["ci95"].values())


def test_stages_write_the_paths_dvc_expects(tmp_path, monkeypatch):
    """stages/index.py + stages/evaluate.py in a fake project (cwd = project root, as under dvc repro)."""
    cat = "Amazon_Fashion"
    fx = make_fixture(tmp_path, category=cat)
    monkeypatch.chdir(tmp_path)
    shutil.copy(REPO / "params.yaml", "params.yaml")
    paths.products_path(cat).parent.mkdir(parents=True)
    shutil.copy(fx["products"], paths.products_path(cat))
    shutil.copy(tmp_path / "manifest.json", paths.ingest_dir(cat) / "manifest.json")
    paths.embed_dir(cat, "lora").parent.mkdir(parents=True)
    shutil.copytree(fx["embed"], paths.embed_dir(cat, "lora"))
    runpy.run_path(str(REPO / "stages" / "index.py"))["main"]([cat, "lora"])
    make_query_vectors(
        {**fx, "embed": paths.embed_dir(cat, "lora"), "products": paths.products_path(cat)},
        paths.embed_queries_dir(cat, "lora"),
    )
    runpy.run_path(str(REPO / "stages" / "evaluate.py"))["main"]([cat, "lora"])
    metrics = json.loads(paths.metrics_detail_path(cat, "lora").read_text())
    assert metrics["queries"]["queries"] == 20 and metrics["queries"]["mrr"] == 1.0
    assert metrics["text_to_image"]["recall_at_1"] == 1.0 and "ci95" in metrics["text_to_image"]
    assert json.loads(paths.metrics_path(cat, "lora").read_text()) == headline(metrics, cat, "lora")
    assert len(json.loads(paths.recall_plot_path(cat, "lora").read_text())) == 10
    manifest = json.loads((paths.index_dir(cat, "lora") / "manifest.json").read_text())
    assert manifest["factory"]["requested"] == "auto" and manifest["factory"]["resolved"] == "Flat"
    with pytest.raises(CliprecError, match="usage"):
        runpy.run_path(str(REPO / "stages" / "evaluate.py"))["main"]([cat])


def test_a_swapped_embedding_file_is_refused(tmp_path):
    fx = make_fixture(tmp_path, shuffle_images=True)  # so that text.npy and image.npy differ
    shutil.copy(fx["embed"] / "text.npy", fx["embed"] / "image.npy")
    with pytest.raises(ArtifactError, match="image.npy does not match its manifest"):
        run(fx)


def test_other_ks(tmp_path):
    fx = make_fixture(tmp_path)
    metrics, curve, _ = evaluate(fx["products"], fx["embed"], fx["index"], EvalSettings(ks=(1, 3)))
    assert {k for k in metrics["image_to_text"] if k.startswith("recall")} == {"recall_at_1", "recall_at_3"}
    assert headline(metrics, "Appliances", "zeroshot") == {}  # no R@5 to show
    assert len(curve) == 10  # the plot always covers k = 1..10


def test_gallery_photo_ties_are_counted(tmp_path):
    fx = make_fixture(tmp_path)
    image = np.load(fx["embed"] / "image.npy")
    gallery = [i for i, pid in enumerate(fx["ids"]) if int(pid[1:]) % 3 == 2]
    image[gallery[1]] = image[gallery[0]]  # two test products with one photo
    image[gallery[3]] = image[gallery[0]]
    np.save(fx["embed"] / "image.npy", image)
    files = ["ids.txt", "alt_ids.txt", "text.npy", "image.npy", "fused.npy", "alt_image.npy"]
    write_manifest(fx["embed"], files, json.loads((fx["embed"] / "manifest.json").read_text()))
    build_from_embeddings(fx["embed"], fx["index"], factory="Flat", variant="lora")  # as the stages would
    metrics, _, _ = run(fx)
    assert metrics["catalog"]["gallery_photo_ties"] == 3
    assert metrics["image_to_text"]["recall_at_1"] < 1.0  # the tie costs them their first place
