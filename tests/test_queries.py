"""Shopper query sets: the loader of each source (cliprec.queries), each bad-row reason, the queries stage
(cliprec.query_set) against a catalog, the query fingerprint, the targets ingest samples, and the one-line
offline error."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers import make_catalog, photo_file
from PIL import Image

from cliprec.artifacts import ArtifactError
from cliprec.catalog import sample_ids
from cliprec.errors import CliprecError
from cliprec.hub import HubError
from cliprec.params import ParamsError, Queries, load_params
from cliprec.queries import QuerySource, c4_file, query_targets, read_c4, read_jsonl
from cliprec.query_set import QuerySetSpec, build_query_set, photo_name, query_split, read_query_set
from cliprec.sources import query_fingerprint

REPO = Path(__file__).resolve().parents[1]
C4_FIXTURE = REPO / "tests" / "fixtures" / "amazon-c4"
RAW = yaml.safe_load((REPO / "params.yaml").read_text())
CAT = "Tiny"


def _jsonl(path: Path, lines: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# --- the c4 source ------------------------------------------------------------------------------------------


def test_c4_rows_are_read_in_its_exact_schema_and_bad_rows_are_counted():
    found = read_c4(C4_FIXTURE / "test.csv")
    by_id = {r["query_id"]: r for r in found.rows}
    assert sorted(by_id) == ["1", "2", "3", "7"]  # 3's product is checked against a catalog later
    assert by_id["1"] == {
        "query_id": "1",
        "text": "I need a red shirt for the office that doesn't wrinkle.",
        "image": None,
        "relevant": {"P0000": 1},
    }
    assert by_id["2"]["text"].startswith("Looking for a dress")  # the first row with qid 2 wins
    assert found.read == 8 and found.read == len(found.rows) + sum(found.dropped.values())
    assert found.dropped == {
        "malformed_line": 1,  # the row cut short
        "empty_query": 1,
        "no_relevant": 1,
        "duplicate_id": 1,
        "unknown_product": 0,
        "unreadable_photo": 0,
    }
    assert {s["reason"]: s["at"] for s in found.skipped}["malformed_line"] == 9  # its line in the file
    # the review (and rating, user) is never read into a query: the query was rewritten from it
    assert not any("REVIEW-ONLY-WORDS" in json.dumps(r) for r in found.rows)


def test_a_file_without_c4s_columns_is_one_line(tmp_path):
    bad = tmp_path / "test.csv"
    bad.write_text("qid,query,item\n1,a,b\n")
    with pytest.raises(CliprecError, match=r"is not Amazon-C4's test.csv: its header lacks item_id, user_id"):
        read_c4(bad)


def test_a_c4_hub_root_without_test_csv_is_one_line(tmp_path):
    src = QuerySource("c4", hub_root=str(tmp_path / "nothing"), setup="demo")
    with pytest.raises(CliprecError, match=r"setups\.demo\.queries\.hub_root = .* must hold a copy"):
        c4_file(CAT, src)


# --- the jsonl source ---------------------------------------------------------------------------------------


def test_jsonl_rows_and_each_bad_row_reason(tmp_path):
    path = _jsonl(
        tmp_path / "q.jsonl",
        [
            {"query_id": "a", "text": " warm <b>winter</b> coat ", "relevant": {"P1": 3, "P2": 0, "P3": 1}},
            {
                "query_id": 7,
                "image": "photos/x.jpg",
                "relevant": {"P1": 2},
                "clicks": 4,
            },  # other keys ignored
            "not json at all",
            '["a list"]',
            {"text": "no id", "relevant": {"P1": 1}},
            {"query_id": "b", "text": "bad grade", "relevant": {"P1": "high"}},
            {"query_id": "c", "text": "negative grade", "relevant": {"P1": -1}},
            {"query_id": "d", "text": 5, "relevant": {"P1": 1}},
            {"query_id": "e", "text": "   ", "image": None, "relevant": {"P1": 1}},
            {"query_id": "f", "text": "only irrelevant", "relevant": {"P1": 0}},
            {"query_id": "a", "text": "again", "relevant": {"P1": 1}},
            "[" * 100000,  # a nesting bomb
        ],
    )
    found = read_jsonl(path)
    assert [r["query_id"] for r in found.rows] == ["a", "7"]
    assert found.rows[0] == {
        "query_id": "a",
        "text": "warm winter coat",
        "image": None,
        "relevant": {"P1": 3, "P3": 1},
    }
    assert found.rows[1]["image"] == "photos/x.jpg" and found.rows[1]["text"] is None
    assert found.dropped == {
        "malformed_line": 7,
        "empty_query": 1,
        "no_relevant": 1,
        "duplicate_id": 1,
        "unknown_product": 0,
        "unreadable_photo": 0,
    }
    assert found.read == 12 and [s["at"] for s in found.skipped][:3] == [3, 4, 5]


# --- the stage: catalog, photos, splits ---------------------------------------------------------------------


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project root with a tiny catalog (P0000..P0063) and an empty catalog/ folder; cwd is the root."""
    monkeypatch.chdir(tmp_path)
    make_catalog(tmp_path / "data", CAT, n=64)
    (tmp_path / "catalog").mkdir()
    return tmp_path


def _spec(src: QuerySource, **kw) -> QuerySetSpec:
    return QuerySetSpec(src, 0.5, load_params(REPO / "params.yaml").images, **kw)


def _photo_bytes(color: str = "red", size: tuple[int, int] = (300, 200)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def test_the_stage_checks_queries_against_the_catalog_and_stores_their_photos(project):
    (project / "catalog" / "shop").mkdir()
    (project / "catalog" / "shop" / "kettle.png").write_bytes(_photo_bytes())
    (project / "catalog" / "shop" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    _jsonl(
        project / "catalog" / "queries_Tiny.jsonl",
        [
            {"query_id": "q-text", "text": "red shirt", "relevant": {"P0000": 1, "P0001": 3, "B0GONE": 3}},
            {"query_id": "q-photo", "image": "shop/kettle.png", "relevant": {"P0002": 2}},
            {"query_id": "q-both", "text": "like this", "image": "shop/kettle.png", "relevant": {"P0003": 1}},
            {"query_id": "q-gone", "text": "not here", "relevant": {"B0GONE": 3}},
            {"query_id": "q-broken", "image": "shop/broken.jpg", "relevant": {"P0002": 1}},
            {"query_id": "q-missing", "image": "shop/none.jpg", "relevant": {"P0002": 1}},
            {"query_id": "q-outside", "image": "../params.yaml", "relevant": {"P0002": 1}},
            {"query_id": "q-abs", "image": "/etc/hostname", "relevant": {"P0002": 1}},
        ],
    )
    src = QuerySource("jsonl", path="catalog/queries_{category}.jsonl", setup="demo")
    report = build_query_set(CAT, _spec(src), "data/ingest/Tiny", "data/queries/Tiny")
    out = project / "data" / "queries" / CAT
    rows = read_query_set(out, CAT)
    assert [r["query_id"] for r in rows] == ["q-both", "q-photo", "q-text"]  # sorted by id
    text = rows[2]
    # P0001 (grade 3) is val in the tiny catalog; B0GONE is not in it: pruned and counted
    assert text["relevant"] == {"P0000": 1, "P0001": 3} and text["target_split"] == "val"
    assert [r["kind"] for r in rows] == ["text+image", "image", "text"]
    assert all(r["split"] == query_split(r["query_id"], 0.5) for r in rows)
    photo = rows[1]["image"]
    assert photo == f"photos/{photo_name('q-photo')}"
    assert Image.open(out / photo).format == "JPEG" and Image.open(out / photo).size == (224, 224)
    assert report["dropped"]["unknown_product"] == 1 and report["relevant_pruned"] == 1
    assert report["dropped"]["unreadable_photo"] == 4  # not an image, missing, outside catalog/, absolute
    assert report["rows_read"] == 8 == report["kept"] + sum(report["dropped"].values())
    assert report["kinds"] == {"text": 1, "image": 1, "text+image": 1}
    (out / photo).write_bytes(b"swapped")
    with pytest.raises(
        ArtifactError, match=r"\(truncated or replaced\): rebuild it with `dvc repro queries@Tiny`"
    ):
        read_query_set(out, CAT)


def test_c4_through_hub_root_loads_through_the_same_loader_and_unknown_items_are_counted(project):
    shutil.copytree(C4_FIXTURE, project / "catalog" / "c4copy")
    src = QuerySource("c4", hub_root="catalog/c4copy", setup="demo")
    report = build_query_set(CAT, _spec(src), "data/ingest/Tiny", "data/queries/Tiny")
    rows = read_query_set(project / "data" / "queries" / CAT, CAT)
    assert [r["query_id"] for r in rows] == ["1", "2", "7"]
    assert report["source"] == "c4" and report["dropped"]["unknown_product"] == 1  # B0NOTHERE1
    assert {r["target_split"] for r in rows} <= {"train", "val", "test"}


def test_a_query_set_with_nothing_usable_is_empty_and_said_so(project, caplog):
    _jsonl(project / "catalog" / "q.jsonl", [{"query_id": "x", "text": "t", "relevant": {"B0GONE": 1}}])
    build_query_set(CAT, _spec(QuerySource("jsonl", path="catalog/q.jsonl")), "data/ingest/Tiny", "out")
    assert json.loads((project / "out" / "report.json").read_text())["dropped"]["unknown_product"] == 1
    assert read_query_set(project / "out", CAT) == []
    assert "queries Tiny: no usable query: queries.jsonl is empty" in caplog.text


def test_the_synthetic_source_needs_the_synthetic_world(project):
    with pytest.raises(CliprecError, match=r"no synthetic catalog: give your own catalog a query set"):
        build_query_set(CAT, _spec(QuerySource("synthetic"), n_queries=5), "data/ingest/Tiny", "out")


def test_query_split_is_a_hash_of_the_id_alone():
    ids = [f"q{i}" for i in range(2000)]
    val = sum(query_split(i, 0.5) == "val" for i in ids)
    assert 900 < val < 1100 and [query_split(i, 0.5) for i in ids] == [query_split(i, 0.5) for i in ids]
    assert all(query_split(i, 0.3) == "val" for i in ids if query_split(i, 0.2) == "val")  # nests


# --- what ingest samples, and the fingerprint ---------------------------------------------------------------


def test_the_sample_holds_the_query_sets_targets():
    ids = [f"B{i:04d}" for i in range(500)]
    plain = sample_ids(ids, 50, seed=0)
    targets = {"B0007", "B0100", "B0499", "NOT-IN-CATALOG"} - set(plain)
    chosen = sample_ids(ids, 50, seed=0, include=targets)
    assert len(chosen) == 50 and targets - {"NOT-IN-CATALOG"} <= set(chosen)
    assert len(set(chosen) & set(plain)) == 47  # the rest is the same hash order
    assert sample_ids(ids, 2, seed=0, include=targets) == sorted(sample_ids(sorted(targets)[:3], 2, 0))


def test_query_targets_read_every_relevant_product(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(C4_FIXTURE, tmp_path / "catalog" / "c4")
    assert query_targets(CAT, QuerySource("c4", hub_root="catalog/c4")) == {
        "P0000",
        "P0001",
        "B0NOTHERE1",
        "P0006",
    }
    assert query_targets(CAT, QuerySource("synthetic")) == set()


def test_the_query_fingerprint_follows_each_categorys_file_and_its_photos(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "catalog" / "p").mkdir(parents=True)
    photo_file(tmp_path / "catalog" / "p" / "a.jpg")
    for cat in ("A", "B"):
        _jsonl(
            tmp_path / "catalog" / f"q_{cat}.jsonl",
            [{"query_id": "1", "image": "p/a.jpg", "relevant": {"x": 1}}],
        )
    settings = Queries(
        source="jsonl", path="catalog/q_{category}.jsonl", hub_root=None, n_queries=None, val_fraction=0.5
    )
    before = {cat: query_fingerprint(cat, settings) for cat in ("A", "B")}
    assert before["A"]["file"] == "catalog/q_A.jsonl" and before["A"]["photos_sha256"]
    with open(tmp_path / "catalog" / "q_B.jsonl", "a") as f:
        f.write('{"query_id": "2", "text": "more", "relevant": {"x": 1}}\n')
    assert query_fingerprint("A", settings) == before["A"] and query_fingerprint("B", settings) != before["B"]
    photo_file(tmp_path / "catalog" / "p" / "a.jpg", color="blue")  # a photo the queries name
    assert query_fingerprint("A", settings)["photos_sha256"] != before["A"]["photos_sha256"]
    synthetic = Queries(source="synthetic", path=None, hub_root=None, n_queries=5, val_fraction=0.5)
    assert query_fingerprint("A", synthetic) == {
        "source": "synthetic",
        "file": None,
        "sha256": None,
        "photos_sha256": None,
    }
    with pytest.raises(CliprecError, match=r"queries C: query file catalog/q_C.jsonl does not exist"):
        query_fingerprint("C", settings)


# --- params -------------------------------------------------------------------------------------------------


def _params(tmp_path: Path, change) -> Path:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    change(raw["setups"]["demo"]["queries"])
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "params.yaml"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda q: q.update(source="jsonl", n_queries=None),
            "source 'jsonl' needs path, a file under catalog/",
        ),
        (lambda q: q.update(source="jsonl", path="/tmp/q.jsonl", n_queries=None), "needs path, a file under"),
        (lambda q: q.update(n_queries=None), "source 'synthetic' needs n_queries"),
        (
            lambda q: q.update(source="c4", n_queries=None, hub_root="elsewhere/c4"),
            "must be a directory under",
        ),
        (lambda q: q.update(hub_root="catalog/c4"), "hub_root is only read by source 'c4'"),
        (lambda q: q.update(val_fraction=1.0), "val_fraction = 1.0: input should be less than 1"),
    ],
)
def test_bad_query_params_are_one_line(tmp_path, change, message):
    with pytest.raises(ParamsError) as e:
        load_params(_params(tmp_path, change))
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_c4_in_the_demo_takes_two_overrides(tmp_path):
    """`-S setups.demo.queries.source=c4 -S setups.demo.queries.hub_root=catalog/<dir>`, nothing else."""
    q = load_params(_params(tmp_path, lambda q: q.update(source="c4", hub_root="catalog/c4"))).active.queries
    assert (q.source, q.hub_root, q.n_queries) == ("c4", "catalog/c4", 500)  # at most 500 of them


def test_n_queries_caps_a_query_log_by_a_hash_that_nests(project):
    lines = [{"query_id": f"q{i:03d}", "text": "t", "relevant": {f"P{i % 64:04d}": 1}} for i in range(120)]
    _jsonl(project / "catalog" / "log.jsonl", lines)
    src = QuerySource("jsonl", path="catalog/log.jsonl")
    kept = {}
    for n in (30, 60):
        report = build_query_set(CAT, _spec(src, n_queries=n), "data/ingest/Tiny", f"out{n}")
        kept[n] = {r["query_id"] for r in read_query_set(project / f"out{n}", CAT)}
        assert report["kept"] == n and report["beyond_n_queries"] == 120 - n
        assert (
            report["rows_read"]
            == report["kept"] + sum(report["dropped"].values()) + report["beyond_n_queries"]
        )
    assert kept[30] < kept[60]
    assert 5 < report["splits"]["val"] < 55  # the cap does not pick by the split's hash


def test_the_setups_read_synthetic_and_c4():
    study = load_params(REPO / "params.yaml").setups["study"].queries
    demo = load_params(REPO / "params.yaml").setups["demo"].queries
    assert (demo.source, study.source, study.hub_root) == ("synthetic", "c4", None)


# --- offline: one line --------------------------------------------------------------------------------------


def test_offline_the_c4_hub_file_fails_at_once_in_one_line(offline):
    with pytest.raises(HubError) as e:
        c4_file("Appliances", QuerySource("c4", setup="study"))
    text = str(e.value)
    assert "\n" not in text and text.startswith(
        "queries Appliances: cannot reach hf://datasets/McAuley-Lab/Amazon-C4/test.csv on the Hugging Face "
        "hub (offline mode: HF_HUB_OFFLINE is set); point setups.study.queries.hub_root at a local copy"
    )


def test_offline_the_study_ingest_stops_at_the_query_set_with_one_line(tmp_path):
    """The study's ingest reads C4 first (the targets its sample must hold): offline, one line."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({**RAW, "setup": "study"}))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, str(REPO / "stages" / "ingest.py"), "Appliances"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("error: queries Appliances: cannot reach hf://datasets/McAuley-Lab/Amazon-C4/")
    assert "python scripts/build_study_standins.py" in lines[0]
