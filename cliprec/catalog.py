"""Amazon Reviews 2023 item metadata -> the normalised products table (products.parquet + report.json).

Every source ends in the same `datasets` call (`load_meta`, only `data_files` differs) and the same
record normalisation (`drop_reason`, `normalize_record`):
- `amazon`: the hub's raw JSONL (`hf://datasets/McAuley-Lab/Amazon-Reviews-2023/raw/meta_categories/...`),
  read with an explicit `FEATURES` schema because type inference breaks on it (price is a float in one
  block and "None" in the next; `details` is an object in the raw files and a JSON string elsewhere).
- `jsonl`: a local file in the same schema. A pre-pass (`validate_jsonl`) parses each line with
  json.loads and checks it against the schema; lines that are not JSON objects, don't fit the schema or
  nest deeper than MAX_NESTING are counted as `malformed_line` (report.json lists the first ones by line
  number) and the rest go to `load_meta` (one bad line would otherwise abort the whole `datasets` build).
  Bytes that are not UTF-8 become U+FFFD, counted in `invalid_text`: clean_text drops it from text
  fields, and an id holding it is `invalid_id`.
- `synthetic`: `cliprec_worlds.demo.synthetic.generate_catalog` writes a raw JSONL + images, then as `jsonl`.

Row selection, in this order: malformed (bad line, or no parent_asin) -> invalid_id (not intact text)
-> malformed (details nested deeper than MAX_NESTING, from the amazon source) -> no_title (empty after
clean_text) -> no_image (no product photo with a hi_res/large/thumb URL; video stills don't count, see
`choose_images`) -> duplicate_id (an earlier record with the same parent_asin was kept; the first kept
record wins). `rows_read == kept + sum(dropped)`. Prices: `read_price` reads numbers and strict price
text; any other stated price is null, counted in `prices_unread` (never a guessed number).
Images: `image_urls` holds one entry per product photo (MAIN first), each the list of that photo's URLs
in preference order hi_res -> large -> thumb; the images stage tries them in that order for the same
photo. `image_variants` is parallel to the outer list.
Sampling: the `n_products` kept ids with the smallest sha1("<seed>:<id>"), a uniform random subset
that does not depend on the input order and grows by nesting when n grows. Output rows are sorted by
id, so the table does not depend on the input order either (only the choice among duplicate ids does).
Groups: products whose MAIN photos share a URL (relistings: Amazon shows the same photo under several
parent_asins) form one `group`, named by its smallest id (`photo_groups`); a single product is its own
group. Split: sha1(group) mapped to [0, 1) against the `split` ratios, without the seed, so copies share
a split, and a product keeps its split whatever the sample, seed or catalog size (unless a copy joins
its group). The images stage catches copies under different URLs by their stored bytes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Json, List, Value
from tqdm import tqdm

from cliprec.artifacts import write_manifest
from cliprec.errors import CliprecError, one_line
from cliprec.hub import CATALOG_SETTING, hub_errors
from cliprec.sources import AMAZON_META_PATH
from cliprec.text import clean_text

logger = logging.getLogger(__name__)

SOURCES = ("amazon", "jsonl", "synthetic")
AMAZON_META_FILES = "hf://datasets/McAuley-Lab/Amazon-Reviews-2023/" + AMAZON_META_PATH
DROP_REASONS = ("no_title", "no_image", "duplicate_id", "malformed_line", "invalid_id")
SPLITS = ("train", "val", "test")
IMAGE_KEYS = ("thumb", "large", "hi_res", "variant")
# Preference among the sizes of one image: the largest first; the smaller ones are its fallbacks.
IMAGE_SIZES = ("hi_res", "large", "thumb")
# Amazon-2023 lists the stills of a product's videos among its images: variant VIDEO, or (in older
# records) a thumbnail with a play button drawn on it, whose URL carries Amazon's overlay marker.
VIDEO_VARIANTS = ("VIDEO",)
PLAY_ICON_MARKER = "play-icon-overlay"

_STRING_FIELDS = ("main_category", "title", "store", "parent_asin", "subtitle")
_LIST_FIELDS = ("features", "description", "categories")
# The Json() fields vary in type across records (or are free-form): `datasets` stores them as JSON text and
# decodes them back to Python objects; a JSON-string `details` decodes to the same dict as an object.
FEATURES = Features(
    {
        "main_category": Value("string"),
        "title": Value("string"),
        "average_rating": Value("float64"),
        "rating_number": Value("int64"),
        "features": List(Value("string")),
        "description": List(Value("string")),
        "price": Json(),
        "images": List({key: Value("string") for key in IMAGE_KEYS}),
        "videos": Json(),
        "store": Value("string"),
        "categories": List(Value("string")),
        "details": Json(),
        "parent_asin": Value("string"),
        "bought_together": Json(),
        "subtitle": Value("string"),
        "author": Json(),
    }
)

ROWS_PER_CHUNK = 8192  # records normalised and written at a time: ingest's memory stays flat
PRODUCTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("title", pa.string()),
        ("main_category", pa.string()),
        ("store", pa.string()),
        ("features", pa.list_(pa.string())),
        ("description", pa.list_(pa.string())),
        ("categories", pa.list_(pa.string())),
        ("details", pa.string()),
        ("price", pa.float64()),
        ("average_rating", pa.float64()),
        ("rating_number", pa.int64()),
        ("image_urls", pa.list_(pa.list_(pa.string()))),  # per photo: its URLs, hi_res -> large -> thumb
        ("image_variants", pa.list_(pa.string())),
        ("group", pa.string()),  # products whose MAIN photos share a URL: named by the smallest id
        ("split", pa.string()),
    ]
)

CATALOG_HINT = "a directory under catalog/ laid out like the hub repo: " + AMAZON_META_PATH.format(
    category="<Category>"
)

MAX_NESTING = 64  # Amazon-2023 records nest a few levels; JSON deeper than this is no record of it
MAX_LISTED_SKIPS = 100  # report.json lists the first skipped lines; its counts cover all of them
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")  # surrogateescape's stand-ins for undecodable bytes
_SURROGATE = re.compile("[\ud800-\udfff]")

# Prices written as text: [from] one amount [- or to another], each [sign] [currency] [sign] number
# [currency]; anything else is not read (a wrong number would be worse than none).
_CURRENCY = r"(?:[$€£¥₹]|[A-Za-z]{1,2}\$|[A-Za-z]{3})"
_NUMBER = r"\d(?:[\d.,' \u00a0\u202f]*\d)?"


def _amount_pattern(end: str) -> str:
    return (
        rf"(?P<{end}_sign>[-−])?\s?(?P<{end}_cur>{_CURRENCY})?\s?(?P<{end}_sign2>[-−])?"
        rf"(?P<{end}_num>{_NUMBER})\s?(?P<{end}_cur2>{_CURRENCY})?"
    )


_PRICE_TEXT = re.compile(
    rf"(?:from\s)?{_amount_pattern('lo')}(?:\s?(?:-|–|to)\s?{_amount_pattern('hi')})?", re.IGNORECASE
)
_PRICE_MARK = re.compile("[.,' \u00a0\u202f]")
PRICE_PROBLEMS = ("negative", "ambiguous", "not_a_price")
_NO_PRICE = frozenset({"", "none", "null", "n/a", "na", "-"})
# currencies whose prices are written 1,299.99: there a lone comma before three digits groups thousands
_DOT_DECIMAL_CURRENCIES = frozenset(
    {"$", "US$", "USD", "£", "GBP", "C$", "CAD", "A$", "AUD", "¥", "JPY", "₹", "INR"}
)


def amazon_data_files(category: str, hub_root: str | Path | None = None) -> str:
    """One category's raw item-metadata JSONL: its hub path, or its path in a local copy of the hub repo."""
    if hub_root is None:
        return AMAZON_META_FILES.format(category=category)
    return (Path(hub_root) / AMAZON_META_PATH.format(category=category)).as_posix()


def load_meta(data_files: str, cache_dir: str | Path | None = None) -> datasets.Dataset:
    """Load an item-metadata JSONL (hub or local) with the explicit schema; the one `datasets` call."""
    return datasets.load_dataset(
        "json",
        data_files=data_files,
        split="train",
        features=FEATURES,
        cache_dir=str(cache_dir) if cache_dir is not None else None,
    )


# --------------------------------------------------------------------------------------------------
# local JSONL pre-pass


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def record_problem(rec: Any) -> str | None:
    """Why a parsed JSON line can't be read with FEATURES (None if it can)."""
    if not isinstance(rec, dict):
        return "not a JSON object"
    pid = rec.get("parent_asin")
    if not isinstance(pid, str) or not pid.strip():
        return "no parent_asin"  # drop_reason says the same for every source; here the line is known
    for key in _STRING_FIELDS:
        if rec.get(key) is not None and not isinstance(rec[key], str):
            return f"{key} is not a string"
    for key in _LIST_FIELDS:
        v = rec.get(key)
        if v is not None and not (isinstance(v, list) and all(x is None or isinstance(x, str) for x in v)):
            return f"{key} is not a list of strings"
    if rec.get("average_rating") is not None and not _is_number(rec["average_rating"]):
        return "average_rating is not a number"
    n = rec.get("rating_number")
    if n is not None and not (_is_number(n) and float(n).is_integer()):
        return "rating_number is not an integer"
    images = rec.get("images")
    if images is not None:
        if not isinstance(images, list):
            return "images is not a list"
        for img in images:
            if img is not None and not (
                isinstance(img, dict)
                and all(img.get(k) is None or isinstance(img[k], str) for k in IMAGE_KEYS)
            ):
                return "images holds an entry that is not an object of strings"
    return None


def _project(rec: dict) -> dict:
    """Keep only the schema's fields (an unknown key would fail the cast of the whole file)."""
    out = {k: rec[k] for k in FEATURES if k in rec}
    if isinstance(out.get("images"), list):
        out["images"] = [
            None if img is None else {k: img[k] for k in IMAGE_KEYS if k in img} for img in out["images"]
        ]
    return out


@dataclass
class LineScan:
    """What the jsonl pre-pass found: records read, lines skipped and why, text it had to repair."""

    read: int = 0
    malformed: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)  # the first MAX_LISTED_SKIPS
    invalid_text: dict[str, Any] = field(
        default_factory=lambda: {
            "lines": 0,
            "bytes_replaced": 0,
            "lone_surrogates_replaced": 0,
            "first_lines": [],
        }
    )

    def skip(self, src: Path, lineno: int, reason: str) -> None:
        """Count a malformed line; its detail goes to report.json and the debug log."""
        self.malformed += 1
        if len(self.skipped) < MAX_LISTED_SKIPS:
            self.skipped.append({"line": lineno, "reason": reason})
        logger.debug("%s:%d: line skipped: %s", src, lineno, reason)


def nesting_depth(value: Any) -> int:
    """How deep lists and objects nest in a parsed JSON value (0 for a scalar); iterative, any depth."""
    depth, level = 0, [value]
    while level := [v for v in level if isinstance(v, (dict, list))]:
        depth += 1
        level = [c for v in level for c in (v.values() if isinstance(v, dict) else v)]
    return depth


def _decode(raw: bytes, lineno: int, scan: LineScan) -> str:
    """One line as text: undecodable bytes become U+FFFD (clean_text drops it; an id with it is dropped)."""
    text, n = _ESCAPED_BYTE.subn("\ufffd", raw.decode("utf-8", "surrogateescape"))
    if n:
        bad = scan.invalid_text
        bad["lines"] += 1
        bad["bytes_replaced"] += n
        if len(bad["first_lines"]) < MAX_LISTED_SKIPS:
            bad["first_lines"].append(lineno)
    return text


def _parse_line(text: str) -> tuple[Any, str | None]:
    """(record, None), or (None, why the line is not a record of the schema)."""
    try:
        rec = json.loads(text)
    except ValueError as e:
        return None, f"malformed JSON ({e})"
    except RecursionError:  # json's C decoder recurses once per level
        return None, f"JSON nests deeper than {MAX_NESTING} levels"
    if nesting_depth(rec) > MAX_NESTING:
        return None, f"JSON nests deeper than {MAX_NESTING} levels"
    return rec, record_problem(rec)


def validate_jsonl(src: str | Path, dst: str | Path) -> LineScan:
    """Copy the records of `src` that fit FEATURES to `dst`; return what was read, skipped and repaired.

    Blank lines are not records and are not counted.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise CliprecError(
            f"ingest: catalog file {src} does not exist (see docs/pipeline.md 'Your own catalog')"
        )
    scan, unknown_keys = LineScan(), 0
    with open(src, "rb") as fin, open(dst, "w", encoding="utf-8") as fout:
        for lineno, raw in enumerate(fin, 1):
            if not raw.strip():
                continue
            scan.read += 1
            rec, problem = _parse_line(_decode(raw, lineno, scan))
            if problem:
                scan.skip(src, lineno, problem)
                continue
            projected = _project(rec)
            unknown_keys += len(projected) != len(rec)
            # a \udXXX escape of half a surrogate pair is no text either (and utf-8 cannot write it)
            line, n = _SURROGATE.subn("\ufffd", json.dumps(projected, ensure_ascii=False))
            scan.invalid_text["lone_surrogates_replaced"] += n
            fout.write(line + "\n")
    if unknown_keys:
        logger.info("%s: ignored fields outside the Amazon-2023 schema in %d records", src, unknown_keys)
    return scan


# --------------------------------------------------------------------------------------------------
# record normalisation (shared by all sources)


class _Unreadable(ValueError):
    """A price text that cannot be read as one number without guessing; args[0] is the reason."""


def _amount(number: str, dot_decimal: bool) -> float:
    """ "1.299,99" -> 1299.99, "1,299.99" -> 1299.99, "12,50" -> 12.5; raises _Unreadable when unsure.

    With both "." and "," the last one is the decimal mark. A lone mark followed by exactly three digits
    ("1,299", "1.299") is a thousands separator in one convention and a decimal mark in the other: read
    only when the currency fixes the convention (`dot_decimal`: "$1,299" is 1299), else ambiguous.
    """
    marks = _PRICE_MARK.findall(number)
    groups = _PRICE_MARK.split(number)
    decimal = None
    if len(set(marks)) == 2:
        decimal = marks[-1]
        if decimal not in ".," or decimal in marks[:-1]:
            raise _Unreadable("not_a_price")
    elif len(marks) == 1 and marks[0] in ".,":
        if len(groups[-1]) != 3:
            decimal = marks[0]
        elif not (marks[0] == "," and dot_decimal):
            raise _Unreadable("ambiguous")
    whole = groups[:-1] if decimal else groups
    if len(whole) > 1 and (len(whole[0]) > 3 or any(len(g) != 3 for g in whole[1:])):
        raise _Unreadable("not_a_price")  # separators that do not group thousands
    return float("".join(whole) + ("." + groups[-1] if decimal else ""))


def _price_text(text: str) -> float | None:
    """A price written as text, or None when it says there is none; raises _Unreadable."""
    text = " ".join(text.split())
    if text.casefold() in _NO_PRICE:
        return None
    m = _PRICE_TEXT.fullmatch(text)
    if not m:
        raise _Unreadable("not_a_price")
    ends = []
    for end in ("lo", "hi"):
        if m[f"{end}_num"] is None:
            continue
        if m[f"{end}_sign"] or m[f"{end}_sign2"]:
            raise _Unreadable("negative")
        currency = (m[f"{end}_cur"] or m[f"{end}_cur2"] or "").upper()
        ends.append(_amount(m[f"{end}_num"], currency in _DOT_DECIMAL_CURRENCIES))
    return min(ends)  # a range: its lower end


def read_price(value: Any) -> tuple[float | None, str | None]:
    """(price, None), or (None, why a stated price was not read: negative, ambiguous or not_a_price).

    Numbers are taken as they are; text is read strictly ("€12,50" -> 12.5, "1.299,99" -> 1299.99,
    "$1,299.00" -> 1299.0, "from $9.99 - $19.99" -> 9.99): a negative amount is no price, and text that
    could mean two numbers or holds anything else is not read. None, "", "None" state no price.
    """
    if value is None:
        return None, None
    if _is_number(value):
        v = float(value)
        if not math.isfinite(v):
            return None, "not_a_price"
        return (v, None) if v >= 0 else (None, "negative")
    if isinstance(value, str):
        try:
            return _price_text(value), None
        except _Unreadable as e:
            return None, e.args[0]
    return None, "not_a_price"


def parse_price(value: Any) -> float | None:
    """A price as float, or None (no price stated, or one that `read_price` does not read)."""
    return read_price(value)[0]


def _image_url(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    url = value.strip()
    return url if url and url.lower() not in ("none", "null") else None


def is_video_still(img: Mapping[str, Any]) -> bool:
    """Whether an Amazon-2023 image entry is a video's still (VIDEO variant or play-icon thumbnail)."""
    if str(img.get("variant") or "").strip().upper() in VIDEO_VARIANTS:
        return True
    return any(PLAY_ICON_MARKER in (_image_url(img.get(size)) or "").lower() for size in IMAGE_SIZES)


def choose_images(images: Iterable[Any] | None) -> tuple[list[list[str]], list[str]]:
    """(candidates, variants) of a record's product photos: MAIN first, then the others in file order.

    Each photo's candidates are its distinct URLs in preference order (hi_res, large, thumb). Left out:
    entries without any URL, video stills (`is_video_still`), and photos sharing a URL with one kept
    earlier (the same photo listed twice).
    """
    entries = [img for img in images or () if isinstance(img, Mapping) and not is_video_still(img)]
    # MAIN first before deduplicating, so a MAIN photo repeated by an earlier view stays MAIN.
    entries.sort(key=lambda img: str(img.get("variant") or "").strip().upper() != "MAIN")
    candidates: list[list[str]] = []
    variants: list[str] = []
    seen: set[str] = set()
    for img in entries:
        urls = list(dict.fromkeys(u for u in (_image_url(img.get(size)) for size in IMAGE_SIZES) if u))
        if not urls or seen.intersection(urls):
            continue
        seen.update(urls)
        candidates.append(urls)
        variants.append(str(img.get("variant") or "").strip())
    return candidates, variants


def is_text(s: str) -> bool:
    """Whether s is intact text: no U+FFFD (the mark of undecodable bytes) and no lone surrogate."""
    return "\ufffd" not in s and not _SURROGATE.search(s)


def drop_reason(rec: Mapping[str, Any]) -> str | None:
    """The first reason (malformed_line, invalid_id, no_title, no_image) a record is unusable, else None.

    invalid_id: an id that is not intact text (`is_text`): a repaired id could name another product.
    """
    pid = rec.get("parent_asin")
    if not isinstance(pid, str) or not pid.strip():
        return "malformed_line"
    if not is_text(pid):
        return "invalid_id"
    if nesting_depth(rec.get("details")) > MAX_NESTING:  # the jsonl pre-pass skips these already
        return "malformed_line"
    if not clean_text(rec.get("title")):
        return "no_title"
    if not choose_images(rec.get("images"))[0]:
        return "no_image"
    return None


def _clean_list(values: Any) -> list[str]:
    if values is None:
        return []
    if isinstance(values, str):
        values = [values]
    return [c for c in (clean_text(v) for v in values) if c]


def _details_text(details: Any) -> str:
    if isinstance(details, str):
        try:
            details = json.loads(details)
        except ValueError:
            return "{}"
    return json.dumps(details, ensure_ascii=False) if isinstance(details, Mapping) else "{}"


def _float_or_none(v: Any) -> float | None:
    if not _is_number(v) or not math.isfinite(float(v)):
        return None
    return float(v)


def normalize_record(rec: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str | None]:
    """(product row without `split`, None) for a usable record, else (None, drop reason)."""
    reason = drop_reason(rec)
    if reason:
        return None, reason
    candidates, variants = choose_images(rec.get("images"))
    rating_number = rec.get("rating_number")
    row = {
        "id": rec["parent_asin"].strip(),
        "title": clean_text(rec.get("title")),
        "main_category": clean_text(rec.get("main_category")),
        "store": clean_text(rec.get("store")),
        "features": _clean_list(rec.get("features")),
        "description": _clean_list(rec.get("description")),
        "categories": _clean_list(rec.get("categories")),
        "details": _details_text(rec.get("details")),
        "price": parse_price(rec.get("price")),
        "average_rating": _float_or_none(rec.get("average_rating")),
        "rating_number": int(rating_number) if _float_or_none(rating_number) is not None else None,
        "image_urls": candidates,
        "image_variants": variants,
    }
    return row, None


# --------------------------------------------------------------------------------------------------
# split and sampling


def _unit_hash(text: str) -> float:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def assign_split(product_id: str, ratios: Mapping[str, float]) -> str:
    """train/val/test from sha1(product_id) against the (normalised) ratios; independent of any seed."""
    weights = [float(ratios.get(s, 0.0)) for s in SPLITS]
    total = sum(weights)
    if total <= 0 or min(weights) < 0:
        raise ValueError(f"split ratios must be >= 0 with a positive sum, got {dict(ratios)}")
    u = _unit_hash(product_id) * total
    acc = 0.0
    for name, w in zip(SPLITS, weights):
        acc += w
        if u < acc:
            return name
    return next(s for s, w in zip(reversed(SPLITS), reversed(weights)) if w > 0)


def sample_ids(ids: Iterable[str], n: int | None, seed: int, include: Iterable[str] = ()) -> list[str]:
    """The n ids with the smallest sha1("<seed>:<id>") (all if n is None), sorted by id.

    Those of `include` that are among ids come first (a query set's targets: the truth must be in the
    gallery), the rest fill up to n; more of them than n: the n with the smallest hashes.
    """
    ids = list(ids)
    if n is None or n >= len(ids):
        return sorted(ids)

    def by_hash(some: Iterable[str]) -> list[str]:
        return sorted(some, key=lambda i: (hashlib.sha1(f"{seed}:{i}".encode()).digest(), i))

    must = set(include).intersection(ids)
    chosen = by_hash(must)[:n]
    chosen += by_hash(i for i in ids if i not in must)[: n - len(chosen)]
    return sorted(chosen)


def photo_groups(ids: Sequence[str], main_urls: Sequence[Sequence[str]]) -> list[str]:
    """Each product's group: products whose MAIN photos share any URL are one group, named by its smallest id.

    Amazon lists the same photo under several parent_asins; grouped, the copies share a split.
    """
    parent = list(range(len(ids)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first_with: dict[str, int] = {}
    for i, urls in enumerate(main_urls):
        for url in urls:
            a, b = find(i), find(first_with.setdefault(url, i))
            if a != b:
                parent[max(a, b)] = min(a, b)
    smallest: dict[int, str] = {}
    for i, pid in enumerate(ids):
        root = find(i)
        smallest[root] = min(smallest.get(root, pid), pid)
    return [smallest[find(i)] for i in range(len(ids))]


# --------------------------------------------------------------------------------------------------
# the stage


def _screen(ds: datasets.Dataset, counts: dict[str, int]) -> dict[str, int]:
    """Pass over the light columns: {kept id: row index}; fills the drop counts."""
    kept: dict[str, int] = {}
    light = ds.select_columns(["parent_asin", "title", "images", "details"])
    with tqdm(total=len(ds), desc="screen records", unit="rec", mininterval=2.0) as bar:
        index = 0
        for batch in light.iter(batch_size=8192):
            for pid, title, images, details in zip(*(batch[c] for c in light.column_names)):
                reason = drop_reason(
                    {"parent_asin": pid, "title": title, "images": images, "details": details}
                )
                if reason is None and pid.strip() in kept:
                    reason = "duplicate_id"
                if reason:
                    counts[reason] += 1
                else:
                    kept[pid.strip()] = index
                index += 1
            bar.update(len(batch["parent_asin"]))
    return kept


def write_products(rows: list[dict[str, Any]], path: str | Path) -> None:
    """Write product rows with the fixed PRODUCTS_SCHEMA."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=PRODUCTS_SCHEMA), path)


def _main_urls(ds: datasets.Dataset) -> list[list[str]]:
    """Each record's MAIN photo URLs (all its sizes), from the `images` column alone."""
    urls: list[list[str]] = []
    for batch in ds.select_columns(["images"]).iter(batch_size=ROWS_PER_CHUNK):
        urls.extend(choose_images(images)[0][0] for images in batch["images"])
    return urls


def _write_rows(ds: datasets.Dataset, groups: list[str], splits: list[str], path: Path) -> None:
    """Normalise the records of ds and write them with their group and split, ROWS_PER_CHUNK at a time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(path, PRODUCTS_SCHEMA) as writer:
        rows: list[dict[str, Any]] = []
        for i, rec in enumerate(tqdm(ds, desc="normalise", unit="rec", mininterval=2.0)):
            row, reason = normalize_record(rec)
            if row is None:  # cannot happen: _screen applied the same drop_reason
                raise AssertionError(f"record {rec.get('parent_asin')!r} passed screening but not {reason}")
            rows.append({**row, "group": groups[i], "split": splits[i]})
            if len(rows) == ROWS_PER_CHUNK:
                writer.write_table(pa.Table.from_pylist(rows, schema=PRODUCTS_SCHEMA))
                rows = []
        if rows:
            writer.write_table(pa.Table.from_pylist(rows, schema=PRODUCTS_SCHEMA))


@dataclass(frozen=True)
class CatalogSource:
    """Where a category's products come from: `setups.<setup>.ingest` (cliprec.params.Ingest validates it).

    `hub_root` (source amazon): a local copy of the hub repo's layout to read instead of the hub.
    `include`: products sampled first (cliprec.queries.query_targets), whatever their hashes.
    """

    source: str
    path: str | None = None
    n_products: int | None = None
    hub_root: str | None = None
    include: frozenset[str] = frozenset()  # ids the sample must hold: the query set's targets


@dataclass
class _Picked:
    """What one read of the source chose: the sample, its photo groups and splits, and the counts."""

    rows_read: int
    kept: int
    targets: int  # of the query set's targets, those the catalog holds
    chosen: list[str]
    groups: list[str]
    splits: list[str]
    prices: Counter[str]
    scan: LineScan


def _read_and_write(
    category: str, src: CatalogSource, out_dir: Path, seed: int, split: Mapping[str, float], counts: dict
) -> _Picked:
    """Read, screen and sample the source, write out_dir/products.parquet; fills the drop counts."""
    with tempfile.TemporaryDirectory(prefix="cliprec-ingest-") as tmp:
        if src.source == "amazon":
            ds, scan = _load_amazon(category, src.hub_root, Path(tmp)), LineScan()
            rows_read = len(ds)
        else:
            ds, scan = _load_jsonl(category, src, out_dir, Path(tmp), seed)
            rows_read, counts["malformed_line"] = scan.read, scan.malformed

        kept = _screen(ds, counts) if ds is not None else {}
        chosen = sample_ids(kept, src.n_products, seed, src.include)
        picked = ds.select([kept[i] for i in chosen]) if chosen else None
        # the split follows the photo group, so a relisted product never lands in another split than its
        # copy; grouping needs only each product's MAIN photo URLs (a light pass), so the full rows
        # stream from the Arrow files to the parquet file a chunk at a time: memory does not hold the catalog
        groups = photo_groups(chosen, _main_urls(picked)) if picked is not None else []
        splits = [assign_split(group, split) for group in groups]
        prices = _price_problems(picked) if picked is not None else Counter()
        if picked is not None:
            _write_rows(picked, groups, splits, out_dir / "products.parquet")
        else:
            write_products([], out_dir / "products.parquet")
        del ds, picked  # release the Arrow files before the temporary cache goes away
    targets = len(src.include.intersection(kept))
    return _Picked(rows_read, len(kept), targets, chosen, groups, splits, prices, scan)


def _report(category: str, source: str, got: _Picked, counts: dict[str, int]) -> dict[str, Any]:
    """report.json's content."""
    sizes = Counter(got.groups)
    return {
        "source": source,
        "category": category,
        "rows_read": got.rows_read,
        "kept": got.kept,
        "dropped": counts,
        "n_products": len(got.chosen),
        "photo_groups": {  # MAIN photos shared by several products (relistings)
            "groups_with_copies": sum(n > 1 for n in sizes.values()),
            "products_in_them": sum(n for n in sizes.values() if n > 1),
        },
        "splits": {s: got.splits.count(s) for s in SPLITS},
        # of the sampled products: stated prices that were not read (their price is null)
        "prices_unread": {r: got.prices[r] for r in PRICE_PROBLEMS},
        "invalid_text": got.scan.invalid_text,  # jsonl and synthetic sources: repaired on reading
        "malformed_lines": got.scan.skipped,  # the first MAX_LISTED_SKIPS, by line number in the source
    }


def build_catalog(
    category: str,
    src: CatalogSource,
    out_dir: str | Path,
    *,
    seed: int = 0,
    split: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """Read one category from `src`, write out_dir/products.parquet + report.json; return the report."""
    if src.source not in SOURCES:
        raise ValueError(f"ingest.source must be one of {SOURCES}, got {src.source!r}")
    if src.n_products is not None and src.n_products <= 0:
        raise ValueError(f"ingest.n_products must be positive or null, got {src.n_products}")
    split = split or {"train": 0.8, "val": 0.1, "test": 0.1}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(DROP_REASONS, 0)
    got = _read_and_write(category, src, out_dir, seed, split, counts)
    report = _report(category, src.source, got, counts)
    with open(out_dir / "report.json", "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    # written last: what every loader of products.parquet verifies (bytes, and the category it is of)
    write_manifest(out_dir, ["products.parquet"], {"category": category})
    _log_summary(report, out_dir / "report.json", src.n_products)
    _log_targets(category, got.targets, len(got.chosen))
    if not got.chosen:
        raise CliprecError(f"ingest {category}: no usable product (report: {out_dir / 'report.json'})")
    return report


def _load_amazon(category: str, hub_root: str | None, tmp: Path) -> datasets.Dataset:
    """The amazon source: the hub's category file, or its copy under hub_root."""
    data_files = amazon_data_files(category, hub_root)
    if hub_root is not None and not Path(data_files).is_file():
        raise CliprecError(
            f"ingest: {data_files} does not exist: {CATALOG_SETTING} = {hub_root!r} must hold a copy "
            f"of the hub repo's {AMAZON_META_PATH.format(category='<Category>')} files"
        )
    try:
        # a local copy converts into the run's temporary cache, like a jsonl catalog; the hub's
        # download stays in the HF cache, where the next run finds it
        with hub_errors(data_files, f"ingest {category}", CATALOG_SETTING, how=CATALOG_HINT):
            return load_meta(data_files, cache_dir=None if hub_root is None else tmp / "cache")
    except datasets.exceptions.DatasetGenerationError as e:
        raise CliprecError(
            f"ingest: {data_files} does not fit cliprec.catalog.FEATURES (the Amazon-2023 item "
            "schema); a record has a field of another type or a field outside it: "
            f"{one_line(e.__cause__ or e)}"
        ) from e


def _load_jsonl(
    category: str, src: CatalogSource, out_dir: Path, tmp: Path, seed: int
) -> tuple[datasets.Dataset | None, LineScan]:
    """The jsonl and synthetic sources: the file (generated for synthetic), screened by validate_jsonl."""
    path, n_products = src.path, src.n_products
    if src.source == "synthetic":
        from cliprec_worlds.demo.synthetic import generate_catalog  # only this source needs it

        if n_products is None:
            raise ValueError("ingest.source 'synthetic' needs ingest.n_products (how many to draw)")
        jsonl = generate_catalog(category, n_products, seed, out_dir / "raw")
    else:
        if not path:
            raise ValueError("ingest.source 'jsonl' needs ingest.path (a file; {category} is replaced)")
        jsonl = Path(path.replace("{category}", category))
    valid = tmp / "valid.jsonl"
    scan = validate_jsonl(jsonl, valid)
    ds = load_meta(str(valid), cache_dir=tmp / "cache") if valid.stat().st_size else None
    return ds, scan


def _price_problems(ds: datasets.Dataset) -> Counter[str]:
    """How many records of ds state a price that `read_price` does not read, by reason."""
    problems: Counter[str] = Counter()
    for batch in ds.select_columns(["price"]).iter(batch_size=ROWS_PER_CHUNK):
        problems.update(p for p in (read_price(v)[1] for v in batch["price"]) if p)
    return problems


def _log_targets(category: str, targets: int, sampled: int) -> None:
    """How many of the query set's products the sample holds (a log line, not in report.json: a new query
    that names a product already sampled must not change ingest's output, and so rerun every later stage)."""
    if targets > sampled:
        logger.warning(
            "ingest %s: the query set names %d of its products, more than n_products=%d: queries whose "
            "products were not sampled are dropped as unknown_product",
            category,
            targets,
            sampled,
        )
    elif targets:
        logger.info("ingest %s: the sample holds the %d products the query set names", category, targets)


def _log_summary(report: dict[str, Any], report_path: Path, n_products: int | None) -> None:
    """One INFO line, and one WARNING per kind of trouble (the details are in report.json)."""
    category, counts = report["category"], report["dropped"]
    logger.info(
        "ingest %s (%s): read %d, kept %d, dropped %s, sampled %d, splits %s",
        category,
        report["source"],
        report["rows_read"],
        report["kept"],
        counts,
        report["n_products"],
        report["splits"],
    )
    if counts["malformed_line"]:
        logger.warning(
            "ingest %s: skipped %d malformed lines: see %s", category, counts["malformed_line"], report_path
        )
    bad = report["invalid_text"]
    if bad["bytes_replaced"] or bad["lone_surrogates_replaced"] or counts["invalid_id"]:
        logger.warning(
            "ingest %s: invalid UTF-8 in %d lines (%d bytes replaced, %d lone surrogates), %d records "
            "dropped for an id that is not valid text: see %s",
            category,
            bad["lines"],
            bad["bytes_replaced"],
            bad["lone_surrogates_replaced"],
            counts["invalid_id"],
            report_path,
        )
    if unread := sum(report["prices_unread"].values()):
        logger.warning("ingest %s: %d prices not read (null): see %s", category, unread, report_path)
    if n_products is not None and report["kept"] < n_products:
        logger.warning(
            "ingest %s: only %d usable products for n_products=%d", category, report["kept"], n_products
        )
