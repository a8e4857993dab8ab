from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cliprec_worlds.demo import synthetic
from cliprec_worlds.demo.synthetic import (
    DEFECT_KINDS,
    Look,
    Pose,
    category_vocab,
    defect_counts,
    generate_catalog,
    n_valid_products,
    render,
)

# the Amazon Reviews 2023 item-metadata fields, in the order of the raw files
SCHEMA = [
    "main_category",
    "title",
    "average_rating",
    "rating_number",
    "features",
    "description",
    "price",
    "images",
    "videos",
    "store",
    "categories",
    "details",
    "parent_asin",
    "bought_together",
    "subtitle",
    "author",
]
N = 60


def _read(jsonl: Path) -> tuple[list[dict], int]:
    records, malformed = [], 0
    for line in jsonl.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            malformed += 1
    return records, malformed


def _generate(root: Path, category: str, n: int = N, monkeypatch=None, **kw) -> Path:
    """Generate under `root` with the repo-relative raw dir the ingest stage uses."""
    root.mkdir(parents=True, exist_ok=True)
    monkeypatch.chdir(root)
    return generate_catalog(category, n, 0, Path("data/ingest") / category / "raw", **kw)


@pytest.fixture(scope="module")
def fashion(tmp_path_factory):
    root = tmp_path_factory.mktemp("fashion")
    mp = pytest.MonkeyPatch()
    try:
        jsonl = _generate(root, "Amazon_Fashion", monkeypatch=mp, workers=1)
    finally:
        mp.undo()
    return root, root / jsonl


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_bytes_in_and_out_of_worker_processes(fashion, tmp_path, monkeypatch):
    root, _ = fashion
    # worker processes draw in whatever order they finish: bytes must not depend on it
    monkeypatch.setattr(synthetic, "POOL_MIN_JOBS", 0)
    _generate(tmp_path / "again", "Amazon_Fashion", monkeypatch=monkeypatch, workers=2)
    first, second = _files(root), _files(tmp_path / "again")
    assert len(first) > 2 * N
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)


def test_other_seed_gives_other_catalog(fashion, tmp_path):
    _, jsonl = fashion
    other = generate_catalog("Amazon_Fashion", N, 1, tmp_path / "raw", workers=1)
    assert other.read_bytes() != jsonl.read_bytes()


def test_schema_is_amazon_2023(fashion):
    _, jsonl = fashion
    records, _ = _read(jsonl)
    assert records
    for rec in records:
        assert list(rec) == SCHEMA
        assert rec["main_category"] is None or isinstance(rec["main_category"], str)
        assert rec["title"] is None or isinstance(rec["title"], str)
        assert isinstance(rec["average_rating"], float) and 1.0 <= rec["average_rating"] <= 5.0
        assert isinstance(rec["rating_number"], int) and rec["rating_number"] >= 1
        for key in ("features", "description", "categories"):
            assert isinstance(rec[key], list) and all(isinstance(x, str) for x in rec[key])
        assert rec["price"] is None or isinstance(rec["price"], float)
        assert isinstance(rec["videos"], list)
        for video in rec["videos"]:
            assert set(video) == {"title", "url", "user_id"}
        assert rec["store"] is None or isinstance(rec["store"], str)
        assert isinstance(rec["details"], dict) and rec["details"]
        assert isinstance(rec["parent_asin"], str) and len(rec["parent_asin"]) == 10
        assert rec["parent_asin"].startswith("B0")
        assert rec["bought_together"] is None and rec["subtitle"] is None and rec["author"] is None
        for img in rec["images"]:
            assert list(img) == ["thumb", "large", "variant", "hi_res"]
            assert isinstance(img["large"], str) and isinstance(img["thumb"], str)
            assert img["hi_res"] is None or isinstance(img["hi_res"], str)


def test_images_are_relative_paths_to_jpegs_with_distinct_views(fashion):
    root, jsonl = fashion
    records, _ = _read(jsonl)
    valid = [r for r in records if r["title"] and r["images"]]
    assert any(img["hi_res"] is None for r in valid for img in r["images"])  # consumers fall back to large
    for rec in valid:
        images = rec["images"]
        assert len(images) >= 2
        assert images[0]["variant"] == "MAIN"
        assert len({img["variant"] for img in images}) == len(images)
        pixels = []
        for img in images:
            path = img["hi_res"] or img["large"]
            assert path == f"data/ingest/Amazon_Fashion/raw/images/{rec['parent_asin']}_{img['variant']}.jpg"
            with Image.open(root / path) as im:
                assert (
                    im.format == "JPEG"
                    and im.size == (synthetic.IMAGE_SIZE, synthetic.IMAGE_SIZE)
                    and im.mode == "RGB"
                )
                pixels.append(np.asarray(im, dtype=np.int16))
        # the other view is another shot of the product, not a copy
        assert np.abs(pixels[0] - pixels[1]).mean() > 5


def test_defects_of_every_kind_and_enough_valid_products(fashion):
    _, jsonl = fashion
    records, malformed = _read(jsonl)
    expected = defect_counts(N)
    assert set(expected) == set(DEFECT_KINDS) and all(v >= 1 for v in expected.values())
    assert malformed == expected["malformed_line"]
    assert sum(not r["title"] for r in records) == expected["no_title"]
    assert sum(bool(r["title"]) and not r["images"] for r in records) == expected["no_image"]
    ids = [r["parent_asin"] for r in records]
    assert len(ids) - len(set(ids)) == expected["duplicate_id"]
    valid_ids = {r["parent_asin"] for r in records if r["title"] and r["images"]}
    assert len(valid_ids) == n_valid_products(N) >= N
    # a duplicate repeats a listing seen earlier in the file
    first = {}
    for i, pid in enumerate(ids):
        first.setdefault(pid, i)
    assert all(first[pid] < i for i, pid in enumerate(ids) if first[pid] != i)


def test_text_describes_what_the_images_show(fashion):
    _, jsonl = fashion
    records, _ = _read(jsonl)
    vocab = category_vocab("Amazon_Fashion")
    type_names = {n.lower() for t in vocab.types for n in t.names}
    valid = [r for r in records if r["title"] and r["images"]]
    assert all(any(n in r["title"].lower() for n in type_names) for r in valid)
    text = " ".join(r["title"] + " " + " ".join(r["description"]) for r in valid)
    assert "&amp;" in text or "<b>" in text  # HTML noise, as sellers write
    assert any(ord(c) > 127 for c in text)  # non-ASCII (Crème, Solène, ™, —)
    assert sum(not r["description"] for r in valid) >= 1


def test_appliances_and_unknown_categories(tmp_path):
    appliances = generate_catalog("Appliances", 20, 0, tmp_path / "a", workers=1)
    records, _ = _read(appliances)
    assert {r["main_category"] for r in records} <= {"Appliances", "Tools & Home Improvement", "Amazon Home"}
    # any Amazon-2023 category name works, with a vocabulary fixed by the name
    assert category_vocab("Health_and_Household").brands == category_vocab("Health_and_Household").brands
    assert category_vocab("Health_and_Household").brands != category_vocab("Toys_and_Games").brands
    other = generate_catalog("Health_and_Household", 20, 0, tmp_path / "h", workers=1)
    records, _ = _read(other)
    assert {r["main_category"] for r in records} == {"Health & Household"}
    assert len({r["parent_asin"] for r in records if r["title"] and r["images"]}) >= 20


def test_render_follows_the_object_and_rejects_unknown_names():
    look = Look(primary=(200, 30, 30), secondary=(255, 255, 255), pattern="stripes", texture="flat")
    img = np.asarray(render("circle", look, Pose(scale=0.9), 64, (0, 0, 0), shadow=False))
    assert img[32, 32].tolist() in ([200, 30, 30], [255, 255, 255])  # object in the middle
    assert img[1, 1].tolist() == [0, 0, 0]  # background in the corner
    with pytest.raises(ValueError, match="pattern"):
        render("circle", Look(primary=(0, 0, 0), pattern="paisley"), Pose(), 32, (0, 0, 0))
    with pytest.raises(ValueError, match="shape"):
        render("teapot", look, Pose(), 32, (0, 0, 0))
    with pytest.raises(ValueError, match="n_products"):
        generate_catalog("Appliances", 0, 0, Path("unused"))
