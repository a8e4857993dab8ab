"""Shopper query sets: one schema, and the one loader that reads every source into it.

The schema, one query per row:
    {"query_id": str, "text": str | null, "image": str | null, "relevant": {product_id: grade}}
`image` is a query photo: a path relative to catalog/ (or, for the synthetic source, to the directory its
queries were written to) or an http(s) URL. `grade` is an integer >= 1, higher is more relevant; graded
judgements in Amazon's Shopping Queries (ESCI) terms map Exact = 3, Substitute = 2, Complement = 1,
Irrelevant = 0, and a 0 is no relevance: it is left out (a query left with none is `no_relevant`).

Sources (`setups.<setup>.queries.source`):
- `c4`: Amazon-C4 (McAuley-Lab/Amazon-C4), its `test.csv` with the columns C4_COLUMNS (found by name in
  the header; a row must have the header's width): query_id = qid,
  text = query, relevant = {item_id: 1} (item_id is the product's parent_asin). user_id, ori_rating and
  ori_review are never read into a query: the query was rewritten from that review. `hub_root` null reads
  the hub's file (huggingface_hub's download: one file, cached, offline from the cache), else
  `<hub_root>/test.csv` under catalog/. The file is read with the csv module row by row, so a bad row is
  counted instead of failing the whole file.
- `jsonl`: the shop's own file under catalog/ (`path`, `{category}` replaced), one JSON object per line
  in the schema above (other keys are ignored; an integer query_id is read as its decimal text).
- `synthetic`: the demo world's shoppers (cliprec_worlds.demo_queries.shoppers) write a jsonl in the
  schema after ingest, read here like any jsonl (cliprec.query_set runs them).

Rows are checked in this order, the first failing check counting the row under its reason:
malformed_line (not a CSV row of the header's width / not a JSON object, no query_id, a field of
another type, a grade that is not an integer >= 0) -> empty_query (no text and no image) -> no_relevant
-> duplicate_id (the first kept row with an id wins). cliprec.query_set adds unknown_product (no
relevant product is in the category's catalog) and unreadable_photo. `read == kept + sum(dropped)`.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cliprec.errors import CliprecError
from cliprec.hub import HubError, hub_errors, message, unreachable
from cliprec.sources import C4_PATH
from cliprec.text import clean_text

log = logging.getLogger(__name__)

SOURCES = ("synthetic", "c4", "jsonl")
C4_REPO = "McAuley-Lab/Amazon-C4"
C4_FILE = C4_PATH
C4_COLUMNS = ("qid", "query", "item_id", "user_id", "ori_rating", "ori_review")
C4_HUB_NAME = f"hf://datasets/{C4_REPO}/{C4_FILE}"
C4_HINT = f"a directory under catalog/ holding a copy of the hub repo's {C4_FILE}"
# why a row is not kept; the first four here, the last two by cliprec.query_set
DROP_REASONS = (
    "malformed_line",
    "empty_query",
    "no_relevant",
    "duplicate_id",
    "unknown_product",
    "unreadable_photo",
)
MAX_LISTED_SKIPS = 100  # report.json lists the first bad rows; its counts cover all of them


@dataclass(frozen=True)
class QuerySource:
    """Where a category's queries come from: `setups.<setup>.queries` (cliprec.params.Queries)."""

    source: str
    path: str | None = None
    hub_root: str | None = None
    setup: str = "study"  # names the param a one-line error points at


@dataclass
class QueryRows:
    """What a read found: the kept rows, the rows read, the drops by reason and the first bad rows."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    read: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))
    skipped: list[dict[str, Any]] = field(default_factory=list)
    _ids: set[str] = field(default_factory=set, repr=False)

    def drop(self, reason: str, where: int | str, detail: str) -> None:
        """Count a row under `reason`; the first MAX_LISTED_SKIPS go to report.json with where they were."""
        self.dropped[reason] += 1
        if len(self.skipped) < MAX_LISTED_SKIPS:
            self.skipped.append({"at": where, "reason": reason, "detail": detail[:200]})
        log.debug("queries: %s at %s: %s", reason, where, detail)

    def offer(self, row: dict[str, Any], where: int | str) -> None:
        """Keep a well-formed row unless it is empty, judges nothing or repeats a kept id."""
        if row["text"] is None and row["image"] is None:
            self.drop("empty_query", where, f"query {row['query_id']!r} has no text and no image")
        elif not row["relevant"]:
            self.drop("no_relevant", where, f"query {row['query_id']!r} names no relevant product")
        elif row["query_id"] in self._ids:
            self.drop("duplicate_id", where, f"query {row['query_id']!r} was kept from an earlier row")
        else:
            self._ids.add(row["query_id"])
            self.rows.append(row)


class _Malformed(ValueError):
    """A row that does not fit the schema (its message says how)."""


def _query_id(value: Any) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str) or not value.strip():
        raise _Malformed("no query_id")
    if "\ufffd" in value:  # undecodable bytes: a repaired id could name another query
        raise _Malformed("query_id is not valid UTF-8 text")
    return value.strip()


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Malformed("text is not a string")
    return clean_text(value) or None


def _image(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _Malformed("image is not a string")
    return value.strip() or None


def _relevant(value: Any) -> dict[str, int]:
    """{product_id: grade >= 1}, sorted by id; grade 0 (ESCI Irrelevant) left out."""
    if not isinstance(value, dict):
        raise _Malformed("relevant is not an object of product_id: grade")
    out = {}
    for pid, grade in value.items():
        if not isinstance(grade, int) or isinstance(grade, bool) or grade < 0:
            raise _Malformed(f"grade {grade!r} of {pid!r} is not an integer >= 0")
        if pid.strip() and grade > 0:
            out[pid.strip()] = grade
    return dict(sorted(out.items()))


def schema_row(record: Any) -> dict[str, Any]:
    """One parsed JSON object as a schema row; raises _Malformed."""
    if not isinstance(record, dict):
        raise _Malformed("not a JSON object")
    return {
        "query_id": _query_id(record.get("query_id")),
        "text": _text(record.get("text")),
        "image": _image(record.get("image")),
        "relevant": _relevant(record.get("relevant", {})),
    }


def read_jsonl(path: str | Path) -> QueryRows:
    """Read a query file in the schema, counting every bad line (by line number)."""
    found = QueryRows()
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            found.read += 1
            try:
                row = schema_row(json.loads(raw.decode("utf-8", errors="replace")))
            except (ValueError, RecursionError) as e:  # _Malformed, JSONDecodeError, nesting bombs
                found.drop("malformed_line", lineno, str(e) or type(e).__name__)
                continue
            found.offer(row, lineno)
    return found


def _c4_rows(path: Path) -> Iterator[tuple[int, list[str] | csv.Error]]:
    """(line, row) of a CSV file, or (line, the csv error) for a row the csv module cannot parse."""
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        reader = csv.reader(f)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:  # a field over the csv field limit, a NUL byte: the row only
                yield reader.line_num, e
                continue
            yield reader.line_num, row


def read_c4(path: str | Path, what: str = "queries") -> QueryRows:
    """Read Amazon-C4's test.csv: query_id = qid, text = query, relevant = {item_id: 1}; reviews unread."""
    path = Path(path)
    rows = _c4_rows(path)
    header = next(rows, (0, []))[1]
    names = [] if isinstance(header, csv.Error) else [h.strip() for h in header]
    if missing := [c for c in C4_COLUMNS if c not in names]:
        raise CliprecError(
            f"{what}: {path} is not Amazon-C4's {C4_FILE}: its header lacks {', '.join(missing)} (it needs "
            f"the columns {', '.join(C4_COLUMNS)})"
        )
    col = {name: names.index(name) for name in C4_COLUMNS}
    found = QueryRows()
    for lineno, row in rows:
        if not isinstance(row, csv.Error) and not row:
            continue  # a blank line
        found.read += 1
        try:
            if isinstance(row, csv.Error):
                raise _Malformed(f"not a CSV row: {row}")
            if len(row) != len(names):
                raise _Malformed(f"{len(row)} fields, not the header's {len(names)}")
            item = row[col["item_id"]].strip()
            query = {"query_id": _query_id(row[col["qid"]]), "text": _text(row[col["query"]])}
        except _Malformed as e:
            found.drop("malformed_line", lineno, str(e))
            continue
        found.offer({**query, "image": None, "relevant": {item: 1} if item else {}}, lineno)
    return found


def c4_file(category: str, src: QuerySource) -> Path:
    """The c4 source's local test.csv: the copy under hub_root, or the hub's file (downloaded, cached)."""
    setting = f"setups.{src.setup}.queries.hub_root"
    if src.hub_root is not None:
        path = Path(src.hub_root) / C4_FILE
        if not path.is_file():
            raise CliprecError(
                f"queries {category}: {path} does not exist: {setting} = {src.hub_root!r} must hold a copy "
                f"of the hub repo's {C4_FILE} ({C4_REPO})"
            )
        return path
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    what = f"queries {category}"
    why = unreachable()
    if why is not None:  # no retries against a hub that is not there: the cache, or one line at once
        cached = try_to_load_from_cache(C4_REPO, C4_FILE, repo_type="dataset")
        if not isinstance(cached, str):
            raise HubError(message(what, C4_HUB_NAME, setting, why, C4_HINT))
        log.warning(
            "%s: the hub is unreachable (%s); reading %s from the local HF cache", what, why, C4_HUB_NAME
        )
        return Path(cached)
    with hub_errors(C4_HUB_NAME, what, setting, how=C4_HINT):
        return Path(hf_hub_download(C4_REPO, C4_FILE, repo_type="dataset"))


def jsonl_file(category: str, src: QuerySource) -> Path:
    """The jsonl source's file for `category` ({category} replaced); one line when it is missing."""
    if not src.path:
        raise ValueError("queries.source 'jsonl' needs queries.path (a file; {category} is replaced)")
    path = Path(src.path.replace("{category}", category))
    if not path.is_file():
        raise CliprecError(
            f"queries {category}: query file {path} does not exist (setups.{src.setup}.queries.path = "
            f"{src.path!r}; see docs/pipeline.md 'Your own queries')"
        )
    return path


def read_queries(category: str, src: QuerySource) -> QueryRows:
    """The c4 or jsonl source's rows for `category` (synthetic queries are written after ingest)."""
    if src.source == "c4":
        return read_c4(c4_file(category, src), f"queries {category}")
    if src.source == "jsonl":
        return read_jsonl(jsonl_file(category, src))
    raise ValueError(f"read_queries reads the c4 and jsonl sources, not {src.source!r}")


def query_targets(category: str, src: QuerySource) -> set[str]:
    """Every product a query set judges relevant (before any catalog is known): what ingest must sample."""
    if src.source == "synthetic":  # written from the sampled catalog: its targets are in it already
        return set()
    found = read_queries(category, src)
    targets = {pid for row in found.rows for pid in row["relevant"]}
    log.debug(
        "queries %s (%s): %d queries name %d products", category, src.source, len(found.rows), len(targets)
    )
    return targets
