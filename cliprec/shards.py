"""The images stage's parquet shards: their schema, the writers, and the readers every later stage uses.

An images directory holds shard-NNNNN.parquet (rows id, view, variant, url, jpeg in product order, then
view order), status.parquet (one row per image: the URL used, its status, every candidate tried),
report.json and manifest.json. Readers verify the files against the manifest before reading them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cliprec.artifacts import verify_files

SHARD_GLOB = "shard-*.parquet"
STATUS_FILE = "status.parquet"
REPORT_FILE = "report.json"
VIEWS = ("main", "alt")  # the views stored per product, in order
ROW_GROUP_ROWS = 256  # what a streaming reader holds at once

SHARD_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("view", pa.string()),
        ("variant", pa.string()),
        ("url", pa.string()),
        ("jpeg", pa.binary()),
    ]
)
TRY_TYPE = pa.struct(
    [("url", pa.string()), ("status", pa.string()), ("error", pa.string()), ("attempts", pa.int32())]
)
STATUS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("url", pa.string()),  # the URL used (status ok), else the last one tried
        ("view", pa.string()),  # view stored in the shards; null if not stored
        ("status", pa.string()),  # the image's final status: that of `url`
        ("error", pa.string()),
        ("position", pa.int32()),  # index of the image in the product's image_urls
        ("attempts", pa.int32()),  # requests over all candidates tried
        ("candidate", pa.int32()),  # index of `url` among the image's candidates (0: hi_res if any)
        ("tried", pa.list_(TRY_TYPE)),  # every candidate tried, in order; the last one is `url`
    ]
)


class ShardWriter:
    """shard-NNNNN.parquet files of `shard_size` rows, written in the order rows are added."""

    def __init__(self, out_dir: Path, shard_size: int) -> None:
        self.out_dir = out_dir
        self.shard_size = shard_size
        self.rows: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
        self.n_rows = 0
        self.paths: list[Path] = []

    def add(self, pid: str, view: str, variant: str, url: str, jpeg: bytes) -> None:
        """Add one stored image; a full shard is written out."""
        for name, value in zip(SHARD_SCHEMA.names, (pid, view, variant, url, jpeg)):
            self.rows[name].append(value)
        self.n_rows += 1
        if len(self.rows["id"]) >= self.shard_size:
            self.flush()

    def flush(self) -> None:
        """Write the rows added since the last shard as the next shard."""
        if not self.rows["id"]:
            return
        table = pa.table(self.rows, schema=SHARD_SCHEMA)
        path = self.out_dir / f"shard-{len(self.paths):05d}.parquet"
        pq.write_table(
            table,
            path,
            row_group_size=ROW_GROUP_ROWS,
            compression={"id": "zstd", "view": "zstd", "variant": "zstd", "url": "zstd", "jpeg": "none"},
            write_statistics=["id", "view", "variant"],  # min/max of JPEG bytes would bloat the footer
        )
        self.paths.append(path)
        self.rows = {name: [] for name in SHARD_SCHEMA.names}


class StatusWriter:
    """status.parquet written in row groups as products finish: memory stays flat for any catalog."""

    def __init__(self, path: Path, rows_per_group: int = 8192) -> None:
        self.path, self.rows_per_group = path, rows_per_group
        self.rows: dict[str, list] = {name: [] for name in STATUS_SCHEMA.names}
        self._writer: pq.ParquetWriter | None = None

    def add(self, row: Sequence[Any]) -> None:
        """Add one image's status row (STATUS_SCHEMA's columns, in order)."""
        for name, value in zip(STATUS_SCHEMA.names, row, strict=True):
            self.rows[name].append(value)
        if len(self.rows["id"]) >= self.rows_per_group:
            self.flush()

    def flush(self) -> None:
        """Write the rows added so far as a row group (the file is opened on the first call)."""
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, STATUS_SCHEMA, compression="zstd")
        if self.rows["id"]:
            self._writer.write_table(pa.table(self.rows, schema=STATUS_SCHEMA))
            self.rows = {name: [] for name in STATUS_SCHEMA.names}

    def close(self) -> None:
        """Write what is left and close the file."""
        self.flush()
        self._writer.close()


def list_shards(images_dir: str | Path) -> list[Path]:
    """The shard files of an images directory, in row order, verified against its manifest."""
    manifest = verify_files(images_dir)
    return [Path(images_dir) / name for name in sorted(manifest["files"]) if name.startswith("shard-")]


def _empty_frame(columns: Sequence[str] | None) -> pd.DataFrame:
    schema = SHARD_SCHEMA if columns is None else pa.schema([SHARD_SCHEMA.field(c) for c in columns])
    return schema.empty_table().to_pandas()


def read_image_table(images_dir: str | Path, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """All shards as one DataFrame (columns id, view, variant, url, jpeg or the ones asked for)."""
    shards = list_shards(images_dir)
    if not shards:
        return _empty_frame(columns)
    cols = list(columns) if columns is not None else None
    table = pa.concat_tables([pq.read_table(s, columns=cols) for s in shards])
    return table.to_pandas()


def iter_image_batches(
    images_dir: str | Path, batch_size: int, columns: Sequence[str] | None = None
) -> Iterator[pd.DataFrame]:
    """Stream the shards as DataFrames of exactly batch_size rows (the last may be shorter).

    Reads one row group (ROW_GROUP_ROWS rows) at a time: memory stays near batch_size + ROW_GROUP_ROWS rows.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    cols = list(columns) if columns is not None else None
    buf: list[pa.RecordBatch] = []
    n = 0
    for shard in list_shards(images_dir):
        with pq.ParquetFile(shard) as pf:
            for batch in pf.iter_batches(batch_size=min(batch_size, ROW_GROUP_ROWS), columns=cols):
                buf.append(batch)
                n += batch.num_rows
                while n >= batch_size:
                    table = pa.Table.from_batches(buf)
                    yield table.slice(0, batch_size).to_pandas()
                    rest = table.slice(batch_size)
                    buf, n = rest.to_batches(), rest.num_rows
    if n:
        yield pa.Table.from_batches(buf).to_pandas()
