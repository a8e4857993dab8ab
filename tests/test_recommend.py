"""cliprec.recommend on a tiny fake pipeline output (tiny CLIP, 64 products) built in a temp dir."""

from __future__ import annotations

import http.server
import io
import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from helpers import CAT, COLORS, build_category, photo_file, shared_project
from PIL import Image

from cliprec import paths
from cliprec.artifacts import ArtifactError, catalog_identity, write_manifest
from cliprec.embed import encode_images, encode_texts
from cliprec.model import load_clip
from cliprec.params import load_params
from cliprec.query import Query
from cliprec.recommend import (
    Recommender,
    RecommendError,
    as_json,
    as_table,
    load_query_image,
    render_grid,
    thumbnails,
)
from cliprec.vectors import fuse


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return shared_project(tmp_path_factory)


@pytest.fixture(scope="module")
def rec(project):
    return Recommender(CAT, "lora", root=project)


def brute_force(project: Path, variant: str, vector: np.ndarray, k: int, exclude: str | None = None) -> list:
    ids = (project / paths.embed_dir(CAT, variant) / "ids.txt").read_text().split()
    fused = np.load(project / paths.embed_dir(CAT, variant) / "fused.npy")
    scores = fused @ vector.ravel()
    order = [i for i in np.argsort(-scores, kind="stable") if ids[i] != exclude][:k]
    return [(ids[i], float(scores[i])) for i in order]


@pytest.fixture(scope="module")
def lora(project):
    """The lora variant's model, loaded independently of the Recommender."""
    return load_clip(project / "models/demo-clip", adapter=project / paths.train_dir(CAT) / paths.ADAPTER_DIR)


def assert_same_ranking(hits, want):
    assert [h.id for h in hits] == [pid for pid, _ in want]
    assert [h.score for h in hits] == pytest.approx([s for _, s in want], abs=1e-5)
    assert [h.rank for h in hits] == list(range(1, len(want) + 1))


def test_text_query_matches_brute_force(project, rec, lora):
    hits = rec.recommend(Query(text="a red shirt", k=5))
    model, processor = lora
    want = brute_force(project, "lora", encode_texts(model, processor, ["a red shirt"]), 5)
    assert_same_ranking(hits, want)
    products = pd.read_parquet(project / paths.products_path(CAT))
    titles = dict(zip(products["id"], products["title"]))
    assert [h.title for h in hits] == [titles[h.id] for h in hits]


def test_image_and_text_image_queries(project, rec, lora, tmp_path):
    path = photo_file(tmp_path / "q.jpg")
    model, processor = lora
    image = load_query_image(str(path), load_params(project / "params.yaml").images)
    assert image.size == (224, 224)  # prepared like the catalog's photos
    image_vec = encode_images(model, processor, [image])
    assert_same_ranking(
        rec.recommend(Query(image=str(path), k=4)), brute_force(project, "lora", image_vec, 4)
    )
    both = fuse(encode_texts(model, processor, ["a red shirt"]), image_vec, 0.5)
    hits = rec.recommend(Query(text="a red shirt", image=str(path), k=4))
    assert_same_ranking(hits, brute_force(project, "lora", both, 4))


def test_item_to_item_excludes_the_product(project, rec):
    hits = rec.recommend(Query(product="P0000", k=6))
    fused = np.load(project / paths.embed_dir(CAT, "lora") / "fused.npy")
    assert "P0000" not in [h.id for h in hits] and len(hits) == 6
    assert_same_ranking(hits, brute_force(project, "lora", fused[0], 6, exclude="P0000"))


def test_variants_differ(project, rec):
    zero = Recommender(CAT, "zeroshot", root=project)
    a = zero.query_vector(Query(text="a blue hat"))
    b = rec.query_vector(Query(text="a blue hat"))
    assert a.shape == b.shape and not np.allclose(a, b)


def test_image_from_a_loopback_url(project, rec, tmp_path):
    path = photo_file(tmp_path / "blue.jpg", "blue")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *a):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        from_url = rec.recommend(Query(image=f"{url}/blue.jpg", k=3))
        assert [h.id for h in from_url] == [h.id for h in rec.recommend(Query(image=str(path), k=3))]
        with pytest.raises(RecommendError, match="unreadable image .*http_404"):
            rec.recommend(Query(image=f"{url}/missing.jpg"))
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("query", "message"),
    [
        (Query(product="NOPE"), "unknown product 'NOPE'"),
        (Query(product="P0005"), "no embedding"),  # in the catalog, but its photo never arrived
        (Query(image="/no/such/file.jpg"), "unreadable image '/no/such/file.jpg': no such file"),
    ],
)
def test_query_errors(rec, query, message):
    with pytest.raises(RecommendError, match=message):
        rec.recommend(query)


def test_not_an_image(rec, tmp_path):
    (tmp_path / "notes.jpg").write_text("<html>not a picture</html>")
    with pytest.raises(RecommendError, match="unreadable image .*not_image"):
        rec.recommend(Query(image=str(tmp_path / "notes.jpg")))


def test_setup_errors(project, tmp_path):
    with pytest.raises(RecommendError, match="unknown category 'Nope'"):
        Recommender("Nope", root=project)
    empty = tmp_path / "empty"
    empty.mkdir()
    shutil.copy(project / "params.yaml", empty / "params.yaml")
    with pytest.raises(RecommendError, match=f"pipeline not run yet.*dvc repro index@{CAT}-lora"):
        Recommender(CAT, root=empty)
    with pytest.raises(RecommendError, match="no params.yaml"):
        Recommender(CAT, root=tmp_path / "nowhere")


def test_outputs(project, rec, tmp_path):
    query = Query(text="a green dress", k=3)
    hits = rec.recommend(query)
    table = as_table(hits).splitlines()
    assert table[0].split() == ["rank", "id", "score", "title"] and len(table) == 4
    assert table[1].split()[:2] == ["1", hits[0].id]
    payload = json.loads(as_json(CAT, "lora", query, hits))
    assert payload["query"]["kind"] == "text" and payload["results"][0]["id"] == hits[0].id
    assert set(payload["results"][0]) == {"rank", "id", "score", "title"}

    images = thumbnails(project / paths.images_dir(CAT), [h.id for h in hits])
    assert set(images) == {h.id for h in hits}
    out = render_grid(query, hits, images, tmp_path / "grid.png", thumb=100)
    grid = Image.open(out)
    assert grid.size == (10 + 4 * 110, 20 + 100 + 58)
    # each hit's cell shows that product's photo (its dominant colour), not an empty box
    for i, h in enumerate(hits, start=1):
        cell = np.asarray(grid.crop((10 + i * 110 + 5, 15, 10 + i * 110 + 95, 105)), dtype=float)
        main = np.asarray(images[h.id].resize((100, 100)).crop((5, 5, 95, 95)), dtype=float)
        assert np.abs(cell.mean(axis=(0, 1)) - main.mean(axis=(0, 1))).max() < 12


def test_grid_with_image_query_and_missing_thumbnail(rec, tmp_path):
    path = photo_file(tmp_path / "q.jpg", "yellow")
    query = Query(image=str(path), k=2)
    hits = rec.recommend(query)
    out = render_grid(query, hits, {}, tmp_path / "g.png", thumb=64)  # no thumbnails found
    grid = np.asarray(Image.open(out))
    query_cell = grid[10 + 8 : 10 + 56, 10 + 8 : 10 + 56].reshape(-1, 3).mean(axis=0)
    assert np.abs(query_cell - COLORS["yellow"]).max() < 25  # the query photo is drawn
    buf = io.BytesIO()
    Image.open(out).save(buf, "PNG")
    assert buf.tell() > 0


def test_broken_adapter_is_a_clear_error(project, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(project, partial, ignore=shutil.ignore_patterns("adapter_config.json"))
    rec = Recommender(CAT, "lora", root=partial)
    want = r"adapter/adapter_config.json is missing: rebuild it with `dvc repro train@Amazon_Fashion`"
    with pytest.raises(ArtifactError, match=want):
        rec.recommend(Query(text="a red shirt"))


def test_swapped_or_truncated_artefacts_are_refused(project, tmp_path):
    # `cp text.npy fused.npy` once made --product return another product at score 1.0000
    copy = tmp_path / "copy"
    shutil.copytree(project, copy)
    embed = copy / paths.embed_dir(CAT, "lora")
    shutil.copy(embed / "text.npy", embed / "fused.npy")
    with pytest.raises(
        ArtifactError, match=r"fused.npy does not match its manifest.*embed_lora@Amazon_Fashion"
    ):
        Recommender(CAT, "lora", root=copy).recommend(Query(product="P0001"))
    fused = (project / paths.embed_dir(CAT, "lora") / "fused.npy").read_bytes()
    (embed / "fused.npy").write_bytes(fused[:-64])
    with pytest.raises(ArtifactError, match="fused.npy has .* bytes, its manifest says"):
        Recommender(CAT, "lora", root=copy).recommend(Query(product="P0001"))
    weights = copy / paths.train_dir(CAT) / paths.ADAPTER_DIR / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ArtifactError, match="adapter_model.safetensors has 100 bytes"):
        Recommender(CAT, "lora", root=copy).recommend(Query(text="a red shirt"))


# --- an artefact of another category or variant (manifest and bytes intact) is refused, in one line -----


OTHER = "Appliances"


@pytest.fixture(scope="module")
def two_categories(project, tmp_path_factory):
    """The project with a second category, whose artefacts are whole and valid, but not CAT's."""
    root = tmp_path_factory.mktemp("two") / "project"
    shutil.copytree(project, root)
    build_category(root, OTHER, n=40, seed=1)
    return root


def swapped(root: Path, tmp_path: Path, *pairs: tuple[Path, Path]) -> Path:
    """A copy of `root` in which each pair's second directory holds a copy of the first's."""
    copy = tmp_path / "swapped"
    shutil.copytree(root, copy)
    for src, dst in pairs:
        shutil.rmtree(copy / dst)
        shutil.copytree(root / src, copy / dst)
    return copy


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_another_categorys_index_is_refused(two_categories, tmp_path):
    # it once answered with Appliances ids and blank titles, exit 0
    root = swapped(two_categories, tmp_path, (paths.index_dir(OTHER, "lora"), paths.index_dir(CAT, "lora")))
    with pytest.raises(ArtifactError) as e:
        Recommender(CAT, "lora", root=root)
    assert one_line(e) == (
        f"{root}/data/index/{CAT}/lora/manifest.json was built for category {OTHER}, not {CAT}: "
        f"rebuild it with `dvc repro index@{CAT}-lora`"
    )


def test_another_categorys_catalog_is_refused(two_categories, tmp_path):
    # it once gave blank titles (another catalog's ids)
    root = swapped(two_categories, tmp_path, (paths.ingest_dir(OTHER), paths.ingest_dir(CAT)))
    with pytest.raises(ArtifactError) as e:
        Recommender(CAT, "zeroshot", root=root)
    assert f"data/ingest/{CAT}/manifest.json was built for category {OTHER}, not {CAT}" in one_line(e)
    assert one_line(e).endswith(f"rebuild it with `dvc repro ingest@{CAT}`")
    # a products.parquet copied without its manifest: the bytes are not the manifest's
    root = tmp_path / "file"
    shutil.copytree(two_categories, root)
    shutil.copy(root / paths.products_path(OTHER), root / paths.products_path(CAT))
    with pytest.raises(ArtifactError, match=r"products.parquet (has \d+ bytes|does not match)"):
        Recommender(CAT, "zeroshot", root=root)


def test_a_newer_catalog_than_the_index_is_refused(two_categories, tmp_path):
    # both say CAT, but the index was built from another catalog than the one whose titles would be shown
    root = tmp_path / "newer"
    shutil.copytree(two_categories, root)
    products = pd.read_parquet(root / paths.products_path(CAT))
    products["title"] = products["title"] + " (new)"
    products.to_parquet(root / paths.products_path(CAT), index=False)
    write_manifest(root / paths.ingest_dir(CAT), ["products.parquet"], {"category": CAT})
    with pytest.raises(ArtifactError) as e:
        Recommender(CAT, "lora", root=root)
    assert f"data/index/{CAT}/lora/manifest.json was not built from the current catalog" in one_line(e)
    assert one_line(e).endswith(f"rebuild it with `dvc repro index@{CAT}-lora`")


def test_swapped_variant_embeddings_are_refused(two_categories, tmp_path):
    # --product once read the zero-shot vectors as the lora ones
    lora, zero = paths.embed_dir(CAT, "lora"), paths.embed_dir(CAT, "zeroshot")
    root = swapped(two_categories, tmp_path, (lora, zero), (zero, lora))
    rec = Recommender(CAT, "lora", root=root)
    with pytest.raises(ArtifactError) as e:
        rec.recommend(Query(product="P0001"))
    assert one_line(e) == (
        f"{root}/data/embed/{CAT}/lora/manifest.json was built for variant zeroshot, not lora: "
        f"rebuild it with `dvc repro embed_lora@{CAT}`"
    )


def test_another_categorys_adapter_is_refused(two_categories, tmp_path):
    # its scores were once silently shifted
    root = swapped(two_categories, tmp_path, (paths.train_dir(OTHER), paths.train_dir(CAT)))
    rec = Recommender(CAT, "lora", root=root)
    assert rec.recommend(Query(product="P0001", k=2))  # item -> item needs no adapter
    with pytest.raises(ArtifactError) as e:
        rec.recommend(Query(text="a red shirt"))
    assert one_line(e) == (
        f"{root}/data/train/{CAT}/manifest.json was built for category {OTHER}, not {CAT}: "
        f"rebuild it with `dvc repro train@{CAT}`"
    )
    # this category's adapter, but retrained since the index's vectors were embedded
    root = tmp_path / "retrained"
    shutil.copytree(two_categories, root)
    train_dir = root / paths.train_dir(CAT)
    files = json.loads((train_dir / "manifest.json").read_text())["files"]
    write_manifest(train_dir, files, {**catalog_identity(root / paths.products_path(CAT)), "epochs": 2})
    with pytest.raises(ArtifactError) as e:
        Recommender(CAT, "lora", root=root).recommend(Query(text="a red shirt"))
    assert f"data/index/{CAT}/lora/manifest.json was not built from the current LoRA adapter" in one_line(e)
    assert one_line(e).endswith(f"rebuild it with `dvc repro index@{CAT}-lora`")
