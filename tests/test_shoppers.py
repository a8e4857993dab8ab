"""The demo's shopper queries (cliprec_worlds.demo_queries.shoppers): deterministic, graded by the documented
rule from the world's truth, enough test queries at the demo's size, photos, brands, negations, typos."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cliprec.queries import read_jsonl
from cliprec.query_set import query_split
from cliprec_worlds.demo.synthetic import category_vocab, generate_catalog, read_truth
from cliprec_worlds.demo_queries.shoppers import Wants, generate_queries, grade

REPO = Path(__file__).resolve().parents[1]
DEMO = yaml.safe_load((REPO / "params.yaml").read_text())
CATEGORIES = DEMO["categories"]
QUERIES = DEMO["setups"]["demo"]["queries"]
N_PRODUCTS = 150  # queries are written per query, not per product: a small catalog shows the same shares


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, dict]:
    """Per demo category: its raw dir (catalog + truth), catalog ids and the demo's queries from them."""
    root = tmp_path_factory.mktemp("shoppers")
    out = {}
    for cat in CATEGORIES:
        raw = root / cat / "raw"
        generate_catalog(cat, N_PRODUCTS, 0, raw, workers=1)
        ids = sorted(read_truth(raw, cat))[:N_PRODUCTS]
        path, traits = generate_queries(cat, ids, raw, QUERIES["n_queries"], 0, root / cat / "queries")
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        out[cat] = {"raw": raw, "ids": ids, "path": path, "rows": rows, "traits": traits}
    return out


def test_same_seed_same_queries_and_photos_byte_for_byte(world, tmp_path):
    cat = CATEGORIES[0]
    w = world[cat]
    again, _ = generate_queries(cat, w["ids"], w["raw"], 60, 0, tmp_path / "a")
    first = w["path"].read_text().splitlines()[:60]
    assert again.read_text().splitlines() == first
    for row in map(json.loads, first):
        if row["image"]:
            assert (tmp_path / "a" / row["image"]).read_bytes() == (
                w["path"].parent / row["image"]
            ).read_bytes()
    other, _ = generate_queries(cat, w["ids"], w["raw"], 60, 1, tmp_path / "b")
    assert other.read_text().splitlines() != first


def _truth(**kw) -> dict:
    base = {"parent_asin": "X", "type": "hoodie", "colour": "navy", "secondary": "white",
            "pattern": "stripes", "material": "cotton", "brand": "Orrin"}  # fmt: skip
    return {**base, **kw}


def test_the_grading_rule():
    wants = Wants("hoodie", colour="navy", pattern="stripes", not_material="wool")
    assert grade(wants, _truth(parent_asin="SRC"), "SRC") == 3  # the product it was written from
    assert grade(wants, _truth(), "SRC") == 2  # same type, every stated attribute
    assert grade(wants, _truth(pattern="dots"), "SRC") == 1  # same type and colour, another pattern
    assert grade(wants, _truth(material="wool"), "SRC") == 0  # what the query says it does not want
    assert grade(wants, _truth(colour="red"), "SRC") == 0
    assert grade(wants, _truth(type="scarf"), "SRC") == 0
    assert grade(Wants("hoodie", colour="navy", brand="Vexa"), _truth(), "SRC") == 1  # brand stated, not it
    assert grade(Wants("hoodie", pattern="dots"), _truth(), "SRC") == 0  # no colour stated: no grade 1
    assert grade(Wants("hoodie", pattern="stripes"), _truth(colour="red"), "SRC") == 2


def test_each_query_holds_its_product_at_3_and_judges_catalog_products_only(world):
    for w in world.values():
        for row in w["rows"]:
            grades = row["relevant"]
            assert list(grades.values()).count(3) == 1  # the product it was written from, and only it
            assert set(grades) <= set(w["ids"]) and set(grades.values()) <= {1, 2, 3}


def test_the_judgements_follow_the_truth(world):
    for cat, w in world.items():
        truth = read_truth(w["raw"], cat)
        for row in w["rows"]:
            source = next(pid for pid, g in row["relevant"].items() if g == 3)
            for pid, g in row["relevant"].items():
                assert truth[pid]["type"] == truth[source]["type"]  # relevance never crosses the type
                if g == 1 or row["image"]:  # the colour was stated (a photo shows it)
                    assert truth[pid]["colour"] == truth[source]["colour"]
            keys = ("type", "colour", "pattern", "brand", "material")
            same_look = [p for p in w["ids"] if all(truth[p][k] == truth[source][k] for k in keys)]
            assert all(row["relevant"].get(p, 0) >= 1 for p in same_look)  # a twin is never left out


def test_at_the_demo_size_each_category_has_200_test_queries(world):
    for cat, w in world.items():
        found = read_jsonl(w["path"])  # through the loader: none is dropped
        assert len(found.rows) == QUERIES["n_queries"] and not any(found.dropped.values())
        test = [r for r in found.rows if query_split(r["query_id"], QUERIES["val_fraction"]) == "test"]
        assert len(test) >= 200, cat


def test_photos_brands_negations_and_typos(world):
    for cat, w in world.items():
        rows, traits = w["rows"], w["traits"]
        n = len(rows)
        photos = [r for r in rows if r["image"]]
        assert 0.25 * n <= len(photos) <= 0.5 * n and any(r["text"] for r in photos)  # alone and with words
        count = {
            t: sum(t in v for v in traits.values()) for t in ("brand", "negation", "misspelling", "need")
        }
        assert all(c >= 0.05 * n for c in count.values()), (cat, count)
        brands = category_vocab(cat).brands
        for r in rows:
            t = traits[r["query_id"]]
            if r["text"] and "brand" in t:
                assert any(b in r["text"] for b in brands)
            if "negation" in t and "misspelling" not in t:
                assert re.search(r"\bnot\b|\bno\b|without|-free|anything but", r["text"])
            if r["text"] and "brand" not in t:
                assert not any(b in r["text"] for b in brands)  # brand-less


def test_needs_use_words_the_listings_do_not(world):
    for cat, w in world.items():
        names = [n.lower() for t in category_vocab(cat).types for n in t.names]
        needs = [r["text"] for r in w["rows"] if "need" in w["traits"][r["query_id"]]]
        said = [(n, text) for text in needs for n in names if re.search(rf"\b{re.escape(n)}\b", text)]
        assert needs and not said, (cat, said[:3])


def test_a_query_photo_is_another_shot_than_the_catalogs(world):
    w = world[CATEGORIES[0]]
    catalog = {p.read_bytes() for p in (w["raw"] / "images").iterdir()}
    shots = [w["path"].parent / r["image"] for r in w["rows"] if r["image"]][:20]
    assert shots and not any(s.read_bytes() in catalog for s in shots)
    assert {Image.open(s).size for s in shots} == {(224, 224)}
