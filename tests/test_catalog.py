from __future__ import annotations

import hashlib
import json
import logging
import random
import shutil
from pathlib import Path

import datasets
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cliprec import catalog
from cliprec.catalog import (
    FEATURES,
    PRODUCTS_SCHEMA,
    CatalogSource,
    amazon_data_files,
    assign_split,
    build_catalog,
    choose_images,
    load_meta,
    parse_price,
    photo_groups,
    sample_ids,
)
from cliprec.errors import CliprecError

FIXTURE = Path("tests/fixtures/meta_Amazon_Fashion.jsonl")
KEPT = ["B0FASH0001", "B0FASH0002", "B0FASH0006", "B0FASH0008", "B0FASH0011", "B0FASH0012"]
IMG = "https://m.media-amazon.com/images/I/"
SPLIT = {"train": 0.8, "val": 0.1, "test": 0.1}


def sizes(stem: str, hi_res: bool = True) -> list[str]:
    """One fixture photo's candidate URLs in preference order (hi_res, large, thumb)."""
    return [IMG + f"{stem}._AC_UL1500_.jpg"] * hi_res + [IMG + f"{stem}._AC_.jpg", IMG + f"{stem}._SS40_.jpg"]


def nested(value) -> list[list[str]]:
    """A list<list<string>> cell as read back by pandas (arrays of arrays) -> plain lists."""
    return [list(v) for v in value]


def _valid_lines() -> list[str]:
    """The fixture without its malformed JSON line (what a well-formed hub file looks like)."""
    out = []
    for line in FIXTURE.read_text(encoding="utf-8").splitlines():
        try:
            json.loads(line)
        except ValueError:
            continue
        out.append(line)
    return out


@pytest.fixture(scope="module")
def jsonl_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ingest")
    report = build_catalog(
        "Amazon_Fashion",
        CatalogSource("jsonl", path="tests/fixtures/meta_{category}.jsonl", n_products=None),
        out,
        seed=0,
    )
    return report, pd.read_parquet(out / "products.parquet"), out


def test_jsonl_report_counts(jsonl_run):
    report, df, out = jsonl_run
    assert report == json.loads((out / "report.json").read_text())
    assert report["source"] == "jsonl"
    assert report["category"] == "Amazon_Fashion"
    assert report["rows_read"] == 14
    assert report["dropped"] == {
        "no_title": 3,
        "no_image": 2,
        "duplicate_id": 1,
        "malformed_line": 2,
        "invalid_id": 0,
    }
    assert [skip["line"] for skip in report["malformed_lines"]] == [5, 14]
    assert report["invalid_text"] == {
        "lines": 0,
        "bytes_replaced": 0,
        "lone_surrogates_replaced": 0,
        "first_lines": [],
    }
    assert report["prices_unread"] == {"negative": 0, "ambiguous": 0, "not_a_price": 0}
    assert report["kept"] == 6
    assert report["rows_read"] == report["kept"] + sum(report["dropped"].values())
    assert report["n_products"] == 6
    assert sum(report["splits"].values()) == 6
    assert (
        report["splits"]
        == df["split"].value_counts().reindex(["train", "val", "test"], fill_value=0).to_dict()
    )


def test_jsonl_rows_are_normalised(jsonl_run):
    _, df, out = jsonl_run
    assert list(df["id"]) == KEPT  # sorted by id, duplicate keeps the first record
    assert [f.name for f in _parquet_schema(out / "products.parquet")] == PRODUCTS_SCHEMA.names
    rows = {r["id"]: r for r in df.to_dict("records")}

    fleece = rows["B0FASH0001"]
    assert fleece["title"] == "Men's Fleece Zip Jacket"  # not the duplicate's title
    assert list(fleece["features"])[0] == "Warm fleece lining & stand-up collar"
    assert list(fleece["description"]) == [
        "Stay warm on cold mornings. This jacket is made from 100% recycled polyester.",
        "Relaxed fit",
    ]
    assert fleece["price"] == 24.99
    assert json.loads(fleece["details"])["Item model number"] == "NT-100"
    assert nested(fleece["image_urls"]) == [sizes("71FleeceMain"), sizes("81FleeceBack", hi_res=False)]
    assert list(fleece["image_variants"]) == ["MAIN", "PT01"]
    assert fleece["store"] == "NorthTrail"
    assert fleece["rating_number"] == 120 and fleece["average_rating"] == 4.3
    assert "Jackets & Coats" in list(fleece["categories"])

    sneakers = rows["B0FASH0002"]  # MAIN listed second and without hi_res
    assert nested(sneakers["image_urls"]) == [sizes("71SneakerMain", hi_res=False), sizes("61SneakerSide")]
    assert list(sneakers["image_variants"]) == ["MAIN", "PT01"]
    assert sneakers["price"] == 12.99  # "$12.99"
    assert json.loads(sneakers["details"]) == {
        "Department": "womens",
        "Date First Available": "March 3, 2021",
    }
    assert list(sneakers["description"]) == []

    cardigan = rows["B0FASH0006"]
    assert cardigan["title"] == "Café Crème Strickjacke für Damen – 日本製"
    assert list(cardigan["features"]) == ["Größe: M – weiche Merinowolle", "Handwäsche empfohlen"]
    assert list(cardigan["description"]) == ["Élégante et chaude."]
    assert cardigan["store"] == "Maison Ébène"
    assert pd.isna(cardigan["price"])  # "None"
    assert cardigan["details"] == "{}"

    socks = rows["B0FASH0008"]
    assert nested(socks["image_urls"]) == [[IMG + "51Socks._SS40_.jpg"]]  # thumb only
    assert pd.isna(socks["price"]) and pd.isna(socks["average_rating"]) and pd.isna(socks["rating_number"])
    assert socks["store"] == "" and socks["details"] == "{}"

    scarf = rows["B0FASH0011"]
    assert scarf["price"] == 12.99  # "12.99"
    assert list(scarf["image_variants"]) == ["MAIN", "PT02"]  # PT01 repeats the MAIN url
    assert nested(scarf["image_urls"]) == [sizes("71Scarf"), sizes("81ScarfWorn")]
    assert json.loads(scarf["details"]) == {"Material": "Silk", "Care": {"wash": "hand"}}


def _parquet_schema(path):

    return pq.read_schema(path)


def test_load_meta_reads_raw_schema_variants(tmp_path):
    """The exact datasets call of the amazon source on a raw file: mixed price types, details both ways."""
    raw = tmp_path / "meta_Amazon_Fashion.jsonl"
    raw.write_text("\n".join(_valid_lines()) + "\n", encoding="utf-8")
    ds = load_meta(str(raw), cache_dir=tmp_path / "cache")
    assert len(ds) == 13
    assert ds.features == FEATURES
    by_id = {}
    for rec in ds:
        by_id.setdefault(rec["parent_asin"], rec)
    assert by_id["B0FASH0001"]["price"] == 24.99
    assert by_id["B0FASH0002"]["price"] == "$12.99"
    assert by_id["B0FASH0006"]["price"] == "None"
    assert by_id["B0FASH0008"]["price"] is None
    assert by_id["B0FASH0001"]["details"]["Department"] == "mens"  # object in the file
    assert by_id["B0FASH0002"]["details"]["Department"] == "womens"  # JSON string in the file
    assert by_id["B0FASH0001"]["images"][1]["hi_res"] is None
    assert by_id["B0FASH0008"]["author"] == {"name": "Sock Co", "about": ["Socks since 1999"]}
    assert by_id["B0FASH0003"]["images"] == []


def test_amazon_source_same_call_offline(tmp_path, monkeypatch, jsonl_run):
    """source=amazon end to end: the hub path is redirected to a local copy inside datasets' own call."""
    raw = tmp_path / "meta_Amazon_Fashion.jsonl"
    raw.write_text("\n".join(_valid_lines()) + "\n", encoding="utf-8")
    real_load = datasets.load_dataset
    calls = []

    def fake_load(path, **kwargs):
        calls.append((path, dict(kwargs)))
        assert kwargs["data_files"] == amazon_data_files("Amazon_Fashion")
        kwargs["data_files"] = str(raw)
        kwargs["cache_dir"] = str(tmp_path / "cache")
        return real_load(path, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    out = tmp_path / "out"
    report = build_catalog("Amazon_Fashion", CatalogSource("amazon", n_products=None), out, seed=0)

    assert len(calls) == 1
    path, kwargs = calls[0]
    assert path == "json"
    assert kwargs["data_files"] == (
        "hf://datasets/McAuley-Lab/Amazon-Reviews-2023/raw/meta_categories/meta_Amazon_Fashion.jsonl"
    )
    assert kwargs["split"] == "train"
    assert kwargs["features"] == FEATURES
    assert kwargs["cache_dir"] is None

    assert report["source"] == "amazon"
    assert report["rows_read"] == 13
    assert report["dropped"] == {
        "no_title": 3,
        "no_image": 2,
        "duplicate_id": 1,
        "malformed_line": 1,
        "invalid_id": 0,
    }
    # Same rows as the jsonl source: both go through the same call and normalisation.
    pd.testing.assert_frame_equal(pd.read_parquet(out / "products.parquet"), jsonl_run[1])


def test_jsonl_schema_problems_are_malformed(tmp_path):
    good = json.loads(_valid_lines()[0])
    lines = [
        json.dumps({**good, "extra_field": {"a": 1}}),  # unknown key: ignored, record kept
        json.dumps([1, 2, 3]),
        json.dumps({**good, "parent_asin": "X2", "features": "not a list"}),
        json.dumps({**good, "parent_asin": "X3", "title": 123}),
        json.dumps({**good, "parent_asin": "X4", "images": [{"large": 5}]}),
        "",
        "not json at all",
    ]
    src = tmp_path / "meta_X.jsonl"
    src.write_text("\n".join(lines) + "\n")
    report = build_catalog("X", CatalogSource("jsonl", path=str(src)), tmp_path / "out", seed=0)
    assert report["rows_read"] == 6  # the blank line is not a record
    assert report["dropped"]["malformed_line"] == 5
    assert report["kept"] == 1


def test_no_usable_product_writes_report_then_fails(tmp_path):
    src = tmp_path / "meta_X.jsonl"
    src.write_text("{broken\n")
    with pytest.raises(CliprecError, match="no usable product"):
        build_catalog("X", CatalogSource("jsonl", path=str(src)), tmp_path / "out")
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["rows_read"] == 1 and report["dropped"]["malformed_line"] == 1 and report["kept"] == 0


def test_bad_configuration_errors(tmp_path):
    with pytest.raises(ValueError, match="ingest.source"):
        build_catalog("X", CatalogSource("csv"), tmp_path)
    with pytest.raises(ValueError, match="ingest.path"):
        build_catalog("X", CatalogSource("jsonl"), tmp_path)
    with pytest.raises(CliprecError, match="does not exist"):
        build_catalog("X", CatalogSource("jsonl", path=str(tmp_path / "missing_{category}.jsonl")), tmp_path)


@pytest.mark.parametrize(
    ("value", "price", "problem"),
    [
        (12.99, 12.99, None),
        (5, 5.0, None),
        (0, 0.0, None),
        ("$12.99", 12.99, None),
        ("12.99", 12.99, None),
        ("$ 12.99", 12.99, None),
        ("US$12", 12.0, None),
        ("£3.50", 3.5, None),
        ("5 USD", 5.0, None),
        ("$1,299.00", 1299.0, None),
        ("$1,299", 1299.0, None),  # a dollar price groups thousands with a comma
        ("1,299,000", 1299000.0, None),
        ("€12,50", 12.5, None),  # decimal comma
        ("12,50 €", 12.5, None),
        ("1.299,99", 1299.99, None),  # dot groups thousands, comma is the decimal mark
        ("EUR 1.299,99", 1299.99, None),
        ("1.299.000 €", 1299000.0, None),
        ("1 299,99 €", 1299.99, None),
        ("1\u00a0299,99 €", 1299.99, None),
        ("$1'299.50", 1299.5, None),
        ("from $9.99 - $19.99", 9.99, None),  # a range: its lower end
        ("$9.99-$19.99", 9.99, None),
        ("9.99 to 19.99", 9.99, None),
        ("$-5.00", None, "negative"),
        ("-$5.00", None, "negative"),
        ("-5", None, "negative"),
        (-3, None, "negative"),
        ("1,299", None, "ambiguous"),  # 1299 or 1.299: no currency says which
        ("1.299", None, "ambiguous"),
        ("€1,299", None, "ambiguous"),
        ("1.299.99", None, "not_a_price"),  # separators that do not group thousands
        ("1,2,3", None, "not_a_price"),
        ("2 for $10", None, "not_a_price"),
        ("$12.99/count", None, "not_a_price"),
        ("Free", None, "not_a_price"),
        (float("nan"), None, "not_a_price"),
        (float("inf"), None, "not_a_price"),
        (True, None, "not_a_price"),
        ({"amount": 5}, None, "not_a_price"),
        ("None", None, None),  # no price stated
        ("", None, None),
        (None, None, None),
    ],
)
def test_read_price(value, price, problem):
    assert catalog.read_price(value) == (price, problem)
    assert parse_price(value) == price


def test_unread_prices_are_null_and_counted(tmp_path):
    good = json.loads(_valid_lines()[0])
    prices = ["€12,50", "$-5.00", "1.299,99", "1,299", "call us", 7]
    lines = [{**good, "parent_asin": f"P{i}", "price": v} for i, v in enumerate(prices)]
    src = tmp_path / "meta_X.jsonl"
    src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in lines))
    report = build_catalog("X", CatalogSource("jsonl", path=str(src)), tmp_path / "out", seed=0)
    assert report["prices_unread"] == {"negative": 1, "ambiguous": 1, "not_a_price": 1}
    df = pd.read_parquet(tmp_path / "out" / "products.parquet")
    read = {pid: None if pd.isna(v) else v for pid, v in zip(df["id"], df["price"])}
    assert read == {"P0": 12.5, "P1": None, "P2": 1299.99, "P3": None, "P4": None, "P5": 7.0}


def _deep(depth: int) -> dict:
    value: dict = {"leaf": 1}
    for _ in range(depth - 1):
        value = {"a": value}
    return value


def test_deeply_nested_records_are_malformed_lines_not_a_crash(tmp_path):
    good = json.loads(_valid_lines()[0])
    shallow = {**good, "parent_asin": "OK1", "details": {"Care": {"wash": ["hand", {"temp": "30"}]}}}
    src = tmp_path / "meta_X.jsonl"
    with open(src, "w") as f:
        f.write(json.dumps(shallow) + "\n")
        f.write(json.dumps({**good, "parent_asin": "D70", "details": _deep(70)}) + "\n")
        for depth in (1_000, 100_000):  # json.dumps cannot write these: build the text
            opened, closed = '{"a":' * depth, "}" * depth
            f.write(f'{{"parent_asin": "D{depth}", "details": {opened}1{closed}}}\n')
        lists = "[" * 5000 + "]" * 5000
        f.write(f'{{"parent_asin": "L", "features": [{lists}]}}\n')
    report = build_catalog("X", CatalogSource("jsonl", path=str(src)), tmp_path / "out", seed=0)
    assert report["rows_read"] == 5 and report["kept"] == 1
    assert report["dropped"]["malformed_line"] == 4
    assert [s["line"] for s in report["malformed_lines"]] == [2, 3, 4, 5]
    assert all("nests deeper than 64 levels" in s["reason"] for s in report["malformed_lines"])
    assert catalog.nesting_depth(_deep(100_000)) == 100_000  # measured without recursion


def test_deeply_nested_details_from_the_amazon_source_are_malformed_lines(tmp_path):
    good = json.loads(_valid_lines()[0])
    raw = tmp_path / "catalog" / "hub" / catalog.AMAZON_META_PATH.format(category="X")
    raw.parent.mkdir(parents=True)
    shallow = json.dumps({k: v for k, v in good.items() if k != "details"} | {"parent_asin": "DEEP"})
    opened, closed = '{"a":' * 1_000, "}" * 1_000
    deep = shallow[:-1] + f', "details": {opened}1{closed}}}'  # datasets reads it, json.dumps would recurse
    raw.write_text(json.dumps(good) + "\n" + deep + "\n")
    report = build_catalog(
        "X", CatalogSource("amazon", hub_root=str(tmp_path / "catalog" / "hub")), tmp_path / "out"
    )
    assert report["rows_read"] == 2 and report["kept"] == 1 and report["dropped"]["malformed_line"] == 1


def test_invalid_utf8_drops_ids_keeps_decodable_text_and_is_counted(tmp_path):
    good = json.loads(_valid_lines()[0])

    def line(**fields) -> bytes:
        return json.dumps({**good, **fields}, ensure_ascii=False).encode("utf-8")

    src = tmp_path / "meta_X.jsonl"
    src.write_bytes(
        b"\n".join(
            [
                line(parent_asin="EUTF8@2").replace(
                    b"@", b"\xff"
                ),  # not valid text: dropped, not "EUTF8\ufffd2"
                line(parent_asin="OK1", title="caf\u00e9 @cr\u00e8me").replace(b"@", b"\xe9\x80"),
                line(parent_asin="OK2", title="Plain"),
                json.dumps({**good, "parent_asin": "SUR\ud800"}).encode(),  # a lone surrogate escape
                json.dumps({**good, "parent_asin": "OK3", "title": "half \udc80 pair"}).encode(),
            ]
        )
        + b"\n"
    )
    report = build_catalog("X", CatalogSource("jsonl", path=str(src)), tmp_path / "out", seed=0)
    assert report["dropped"]["invalid_id"] == 2 and report["kept"] == 3
    assert report["invalid_text"] == {
        "lines": 2,
        "bytes_replaced": 3,
        "lone_surrogates_replaced": 2,
        "first_lines": [1, 2],
    }
    df = pd.read_parquet(tmp_path / "out" / "products.parquet").set_index("id")
    assert sorted(df.index) == ["OK1", "OK2", "OK3"]
    assert df.loc["OK1", "title"] == "café crème"  # what was decodable, the bad bytes left out
    assert df.loc["OK3", "title"] == "half pair"


def test_one_warning_per_stage_details_in_the_report_and_the_debug_log(tmp_path, caplog):
    src = tmp_path / "meta_X.jsonl"
    src.write_text("\n".join([_valid_lines()[0], "{broken", "[1]", "{also broken"]) + "\n")
    with caplog.at_level(logging.DEBUG, logger="cliprec.catalog"):
        report = build_catalog("X", CatalogSource("jsonl", path=str(src)), tmp_path / "out", seed=0)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"ingest X: skipped 3 malformed lines: see {tmp_path / 'out' / 'report.json'}"]
    debug = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.DEBUG and ": line skipped" in r.getMessage()
    ]
    assert len(debug) == 3 and debug[1].startswith(f"{src}:3: line skipped: not a JSON object")
    assert [(s["line"], s["reason"][:16]) for s in report["malformed_lines"]] == [
        (2, "malformed JSON ("),
        (3, "not a JSON objec"),
        (4, "malformed JSON ("),
    ]


def test_choose_images():
    images = [
        {"thumb": "t1", "large": "l1", "hi_res": None, "variant": "PT01"},
        {"thumb": "t2", "large": None, "hi_res": None, "variant": "MAIN"},
        {"thumb": None, "large": None, "hi_res": None, "variant": "PT02"},
        {"thumb": "t3", "large": "l3", "hi_res": "h3", "variant": None},
        {"thumb": "t1b", "large": "l1", "hi_res": "None", "variant": "PT03"},  # repeats l1
        {"thumb": "t4", "large": "t4", "hi_res": "h4", "variant": "PT04"},  # large == thumb: one candidate
        "not an image",
    ]
    # every size of each photo, hi_res -> large -> thumb, so the images stage can fall back on the same photo
    assert choose_images(images) == (
        [["t2"], ["l1", "t1"], ["h3", "l3", "t3"], ["h4", "t4"]],
        ["MAIN", "PT01", "", "PT04"],
    )
    assert choose_images(None) == ([], [])


def test_choose_images_keeps_main_when_an_earlier_view_repeats_it():
    images = [
        {"thumb": "ts", "large": "ls", "hi_res": "hs", "variant": "PT01"},
        {"thumb": "ts", "large": "ls", "hi_res": "hs", "variant": "MAIN"},  # the same photo, as MAIN
        {"thumb": "tb", "large": "lb", "hi_res": None, "variant": "PT02"},
    ]
    assert choose_images(images) == ([["hs", "ls", "ts"], ["lb", "tb"]], ["MAIN", "PT02"])


PLAY = IMG + "A1vid._SX38_SY50_CR,0,0,38,50_BG85,85,85_BR-120_PKdp-play-icon-overlay__.jpg"


def test_choose_images_skips_video_stills():
    images = [
        {"thumb": IMG + "v._SS40_.jpg", "large": IMG + "v._AC_.jpg", "hi_res": None, "variant": "VIDEO"},
        {"thumb": PLAY, "large": IMG + "A1vid._AC_.jpg", "hi_res": None, "variant": "PT01"},
        {"thumb": "t", "large": "l", "hi_res": "h", "variant": "MAIN"},
        {"thumb": "t2", "large": "l2", "hi_res": None, "variant": "video"},
    ]
    assert choose_images(images) == ([["h", "l", "t"]], ["MAIN"])
    assert catalog.is_video_still({"thumb": PLAY.upper(), "variant": "PT02"})
    assert not catalog.is_video_still({"thumb": "t", "variant": "MAIN"})


def test_product_whose_only_image_is_a_video_is_dropped_as_no_image(tmp_path):
    good = json.loads(_valid_lines()[0])
    video = {"thumb": IMG + "v._SS40_.jpg", "large": IMG + "v._AC_.jpg", "hi_res": None, "variant": "VIDEO"}
    photo = {"thumb": IMG + "p._SS40_.jpg", "large": IMG + "p._AC_.jpg", "hi_res": None, "variant": "MAIN"}
    play = {"thumb": PLAY, "large": None, "hi_res": None, "variant": "MAIN"}
    lines = [
        {**good, "parent_asin": "V1", "images": [video]},
        {**good, "parent_asin": "V2", "images": [play]},
        {**good, "parent_asin": "V3", "images": [video, photo]},
    ]
    src = tmp_path / "meta_X.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = build_catalog("X", CatalogSource("jsonl", path=str(src)), tmp_path / "out", seed=0)
    assert report["dropped"]["no_image"] == 2 and report["kept"] == 1
    df = pd.read_parquet(tmp_path / "out" / "products.parquet")
    assert list(df["id"]) == ["V3"]
    assert nested(df["image_urls"].iloc[0]) == [[IMG + "p._AC_.jpg", IMG + "p._SS40_.jpg"]]
    assert list(df["image_variants"].iloc[0]) == ["MAIN"]


def test_photo_groups_join_products_that_share_a_main_photo_url():
    ids = ["A", "B", "C", "D", "E"]
    urls = [["u1", "u1-small"], ["u2"], ["u3", "u1-small"], ["u2"], ["u5"]]  # A~C via a smaller size
    assert photo_groups(ids, urls) == ["A", "B", "A", "B", "E"]
    assert photo_groups(["Z", "Y"], [["x"], ["x"]]) == ["Y", "Y"]  # named by the smallest id


def test_relisted_copies_share_a_group_and_a_split(tmp_path):
    good = json.loads(_valid_lines()[0])
    photo = {"thumb": None, "large": IMG + "shared._AC_.jpg", "hi_res": IMG + "shared._SL1500_.jpg",
             "variant": "MAIN"}  # fmt: skip
    other = {**photo, "large": IMG + "own._AC_.jpg", "hi_res": None}
    ids = [f"R{i:02d}" for i in range(40)]
    lines = [{**good, "parent_asin": pid, "images": [photo if i % 8 == 0 else {**other,
              "large": IMG + f"own{i}._AC_.jpg"}]} for i, pid in enumerate(ids)]  # fmt: skip
    src = tmp_path / "meta_X.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    report = build_catalog("X", CatalogSource("jsonl", path=str(src)), tmp_path / "out", seed=0)
    df = pd.read_parquet(tmp_path / "out" / "products.parquet").set_index("id")
    copies = [pid for i, pid in enumerate(ids) if i % 8 == 0]
    assert set(df.loc[copies, "group"]) == {"R00"} and df.loc[copies, "split"].nunique() == 1
    assert df.loc[copies, "split"].iloc[0] == assign_split("R00", SPLIT)
    assert (df.loc["R01", "group"], df.loc["R01", "split"]) == ("R01", assign_split("R01", SPLIT))
    assert report["photo_groups"] == {"groups_with_copies": 1, "products_in_them": 5}


def test_rows_stream_to_parquet_in_chunks_with_the_same_content(tmp_path, monkeypatch):
    # a big catalog is normalised and written a chunk at a time (memory flat); chunking changes nothing
    good = json.loads(_valid_lines()[0])
    photo = {"thumb": None, "large": IMG + "shared._AC_.jpg", "hi_res": None, "variant": "MAIN"}
    lines = [{**good, "parent_asin": f"S{i:02d}", "title": f"thing {i}",
              "images": [photo if i % 5 == 0 else {**photo, "large": IMG + f"own{i}._AC_.jpg"}]}
             for i in range(23)]  # fmt: skip
    src = tmp_path / "meta_X.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    whole = build_catalog("X", CatalogSource("jsonl", path=str(src)), tmp_path / "whole", seed=0)
    monkeypatch.setattr(catalog, "ROWS_PER_CHUNK", 4)
    chunked = build_catalog("X", CatalogSource("jsonl", path=str(src)), tmp_path / "chunked", seed=0)
    assert chunked == whole and whole["photo_groups"] == {"groups_with_copies": 1, "products_in_them": 5}
    assert pq.ParquetFile(tmp_path / "chunked" / "products.parquet").metadata.num_row_groups == 6
    one, many = (pd.read_parquet(tmp_path / d / "products.parquet") for d in ("whole", "chunked"))
    pd.testing.assert_frame_equal(one, many)
    assert set(many.loc[[i % 5 == 0 for i in range(23)], "group"]) == {"S00"}


def test_products_schema_holds_candidates_per_image():
    assert PRODUCTS_SCHEMA.field("image_urls").type == pa.list_(pa.list_(pa.string()))
    assert PRODUCTS_SCHEMA.field("image_variants").type == pa.list_(pa.string())


def test_split_is_deterministic_and_follows_ratios():
    ratios = {"train": 0.8, "val": 0.1, "test": 0.1}
    ids = [f"B{i:09d}" for i in range(20000)]
    splits = [assign_split(i, ratios) for i in ids]
    assert splits == [assign_split(i, ratios) for i in ids]
    share = pd.Series(splits).value_counts(normalize=True)
    assert (
        abs(share["train"] - 0.8) < 0.015
        and abs(share["val"] - 0.1) < 0.01
        and abs(share["test"] - 0.1) < 0.01
    )
    # known value: the split is a pure function of the id, whatever the seed or catalog
    assert assign_split("B0FASH0002", ratios) == "test"
    assert assign_split("x", {"train": 0, "val": 0, "test": 1}) == "test"
    with pytest.raises(ValueError):
        assign_split("x", {"train": 0, "val": 0, "test": 0})


def test_sampling_is_reproducible_and_order_independent():
    ids = [f"B{i:06d}" for i in range(500)]
    a = sample_ids(ids, 50, seed=0)
    shuffled = ids[:]
    random.Random(1).shuffle(shuffled)
    assert a == sample_ids(shuffled, 50, seed=0) == sorted(a)
    assert len(set(a)) == 50
    assert sample_ids(ids, 50, seed=1) != a
    assert set(a) <= set(sample_ids(ids, 80, seed=0))  # growing n extends the sample
    assert sample_ids(ids, None, seed=0) == ids
    assert sample_ids(ids, 1000, seed=0) == ids


def test_sampled_catalog_is_byte_identical_and_input_order_free(tmp_path):
    lines = [ln for ln in _valid_lines() if '"Duplicate Of The Fleece Jacket"' not in ln]
    fwd, rev = tmp_path / "fwd.jsonl", tmp_path / "rev.jsonl"
    fwd.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rev.write_text("\n".join(reversed(lines)) + "\n", encoding="utf-8")
    r1 = build_catalog("C", CatalogSource("jsonl", path=str(fwd), n_products=3), tmp_path / "a", seed=7)
    build_catalog("C", CatalogSource("jsonl", path=str(fwd), n_products=3), tmp_path / "b", seed=7)
    r3 = build_catalog("C", CatalogSource("jsonl", path=str(rev), n_products=3), tmp_path / "c", seed=7)
    a = (tmp_path / "a" / "products.parquet").read_bytes()
    assert a == (tmp_path / "b" / "products.parquet").read_bytes()
    assert a == (tmp_path / "c" / "products.parquet").read_bytes()
    # the report names the skipped lines by their line numbers, which follow the input order
    assert [s["line"] for s in r1.pop("malformed_lines")] == [12]
    assert [s["line"] for s in r3.pop("malformed_lines")] == [1]
    assert r1 == r3 and r1["n_products"] == 3 and r1["kept"] == 6
    df = pd.read_parquet(tmp_path / "a" / "products.parquet")
    assert list(df["id"]) == sample_ids(KEPT, 3, seed=7)


def test_synthetic_source_parses_generated_jsonl(tmp_path, monkeypatch):
    """The synthetic source hands generate_catalog's JSONL to the jsonl path (generator stubbed here)."""
    import types

    seen = {}

    def fake_generate(category, n_products, seed, raw_dir):
        seen.update(category=category, n_products=n_products, seed=seed, raw_dir=Path(raw_dir))
        raw_dir.mkdir(parents=True, exist_ok=True)
        path = raw_dir / f"meta_{category}.jsonl"
        path.write_text(FIXTURE.read_text(encoding="utf-8"), encoding="utf-8")
        return path

    monkeypatch.setitem(
        __import__("sys").modules,
        "cliprec_worlds.demo.synthetic",
        types.SimpleNamespace(generate_catalog=fake_generate),
    )
    out = tmp_path / "ingest" / "Amazon_Fashion"
    report = build_catalog("Amazon_Fashion", CatalogSource("synthetic", n_products=4), out, seed=3)
    assert seen == {"category": "Amazon_Fashion", "n_products": 4, "seed": 3, "raw_dir": out / "raw"}
    assert report["source"] == "synthetic"
    assert report["dropped"]["malformed_line"] == 2 and report["n_products"] == 4
    assert pd.read_parquet(out / "products.parquet")["id"].tolist() == sample_ids(KEPT, 4, seed=3)


def test_amazon_schema_mismatch_is_a_clear_error(tmp_path, monkeypatch):
    raw = tmp_path / "meta.jsonl"
    good = json.loads(_valid_lines()[0])
    raw.write_text(json.dumps({**good, "new_hub_field": 1}) + "\n")
    real_load = datasets.load_dataset
    monkeypatch.setattr(
        datasets,
        "load_dataset",
        lambda path, **kw: real_load(path, **{**kw, "data_files": str(raw), "cache_dir": str(tmp_path)}),
    )
    with pytest.raises(CliprecError, match="does not fit cliprec.catalog.FEATURES"):
        build_catalog("Amazon_Fashion", CatalogSource("amazon"), tmp_path / "out")


def test_catalog_and_ingest_stage_wiring(tmp_path, monkeypatch):
    """stages/catalog.py fingerprints the category's file; stages/ingest.py checks it, writes data/ingest/."""
    import runpy

    import yaml

    params = yaml.safe_load(Path("params.yaml").read_text())
    params["setup"] = "demo"
    params["setups"]["demo"]["ingest"] = {
        "source": "jsonl",
        "path": "catalog/meta_{category}.jsonl",
        "n_products": 5,
        "data_seed": 0,
        "hub_root": None,
    }
    catalog_stage, ingest_stage = (Path(f"stages/{s}.py").resolve() for s in ("catalog", "ingest"))
    (tmp_path / "catalog").mkdir()
    shutil.copy(FIXTURE, tmp_path / "catalog" / FIXTURE.name)
    digest, line = hashlib.sha256(FIXTURE.read_bytes()).hexdigest(), _valid_lines()[0]
    monkeypatch.chdir(tmp_path)
    Path("params.yaml").write_text(yaml.safe_dump(params))
    runpy.run_path(str(catalog_stage), run_name="stage")["main"](["Amazon_Fashion"])
    source = json.loads(Path("data/catalog/Amazon_Fashion/source.json").read_text())
    assert source == {
        "source": "jsonl",
        "file": "catalog/meta_Amazon_Fashion.jsonl",
        "sha256": digest,
    }
    ingest = runpy.run_path(str(ingest_stage), run_name="stage")["main"]
    ingest(["Amazon_Fashion"])
    report = json.loads(Path("data/ingest/Amazon_Fashion/report.json").read_text())
    assert report["n_products"] == 5 and report["kept"] == 6 and report["source"] == "jsonl"
    assert len(pd.read_parquet("data/ingest/Amazon_Fashion/products.parquet")) == 5

    with open("catalog/meta_Amazon_Fashion.jsonl", "a") as f:  # edited after the catalog stage ran
        f.write(line + "\n")
    with pytest.raises(
        CliprecError, match="the catalog changed since .* run `dvc repro ingest@Amazon_Fashion`"
    ):
        ingest(["Amazon_Fashion"])


def test_fingerprints_of_each_source(tmp_path, monkeypatch):
    from types import SimpleNamespace as Ingest

    from cliprec.sources import check_fingerprint, fingerprint

    monkeypatch.chdir(tmp_path)
    hub_file = Path("catalog/hub/raw/meta_categories/meta_Appliances.jsonl")
    hub_file.parent.mkdir(parents=True)
    hub_file.write_text("{}\n")
    assert fingerprint("Appliances", Ingest(source="synthetic", path=None, hub_root=None)) == {
        "source": "synthetic",
        "file": None,
        "sha256": None,
    }
    assert fingerprint("Appliances", Ingest(source="amazon", path=None, hub_root=None))["file"] is None
    found = fingerprint("Appliances", Ingest(source="amazon", path=None, hub_root="catalog/hub"))
    assert found["file"] == hub_file.as_posix() and found["sha256"] == hashlib.sha256(b"{}\n").hexdigest()
    jsonl = Ingest(source="jsonl", path="catalog/meta_{category}.jsonl", hub_root=None)
    check_fingerprint("Appliances", jsonl, Path("data/none.json"))  # run by hand, outside DVC: no check
    with pytest.raises(CliprecError, match="catalog file catalog/meta_Appliances.jsonl does not exist"):
        fingerprint("Appliances", Ingest(source="jsonl", path="catalog/meta_{category}.jsonl", hub_root=None))
