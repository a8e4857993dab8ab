"""Product photos for the web: one stored JPEG or a thumbnail, looked up by product id in the image shards.

At load time only the small `id` and `view` columns are read, to learn which shard, row group and row
holds each photo; the JPEG bytes are read on demand, one row group's `jpeg` column at a time, and the
answers are kept in bounded LRU caches, so memory does not grow with the catalog or the traffic. Lookups
go through that table only: a product id never becomes part of a file path.
"""

from __future__ import annotations

import functools
import io
import logging
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from cliprec.codec import decode_jpeg
from cliprec.shards import VIEWS, list_shards

log = logging.getLogger(__name__)

ROW_GROUP_CACHE = 8  # row groups of JPEG bytes kept (each holds images.ROW_GROUP_ROWS photos)
PHOTO_CACHE = 1024
THUMB_CACHE = 4096  # thumbnails: a few kB each


@dataclass(frozen=True)
class PhotoLocation:
    """Where one stored photo is: shard file, row group, row inside it."""

    shard: int
    row_group: int
    row: int


class PhotoStore:
    """The stored photos of one category (the images stage's shards), by (product id, view)."""

    def __init__(self, images_dir: str | Path, thumb_side: int = 128) -> None:
        self.images_dir = Path(images_dir)
        self.thumb_side = int(thumb_side)
        self.shards = list_shards(self.images_dir)
        self.locations: dict[tuple[str, str], PhotoLocation] = {}
        for s, shard in enumerate(self.shards):
            with pq.ParquetFile(shard) as pf:
                for g in range(pf.num_row_groups):
                    table = pf.read_row_group(g, columns=["id", "view"])
                    for r, (pid, view) in enumerate(
                        zip(table.column("id").to_pylist(), table.column("view").to_pylist())
                    ):
                        self.locations.setdefault((pid, view), PhotoLocation(s, g, r))
        # per-instance caches (a module-level lru_cache on a method would keep every store alive)
        self._row_group = functools.lru_cache(maxsize=ROW_GROUP_CACHE)(self._read_row_group)
        self.photo = functools.lru_cache(maxsize=PHOTO_CACHE)(self._photo)
        self.thumbnail = functools.lru_cache(maxsize=THUMB_CACHE)(self._thumbnail)
        log.info(
            "photos: %d stored photos in %d shards of %s", len(self.locations), len(self.shards), images_dir
        )

    def views(self, pid: str) -> list[str]:
        """The stored views of a product, main first."""
        return [v for v in VIEWS if (pid, v) in self.locations]

    def _read_row_group(self, shard: int, row_group: int) -> list[bytes]:
        with pq.ParquetFile(self.shards[shard]) as pf:
            return pf.read_row_group(row_group, columns=["jpeg"]).column("jpeg").to_pylist()

    def _photo(self, pid: str, view: str = "main") -> bytes | None:
        """The stored JPEG of (product, view), or None when there is none."""
        loc = self.locations.get((pid, view))
        if loc is None:
            return None
        return self._row_group(loc.shard, loc.row_group)[loc.row]

    def _thumbnail(self, pid: str, view: str = "main") -> bytes | None:
        """A thumb_side-pixel JPEG of (product, view), or None when there is no photo."""
        data = self.photo(pid, view)
        if data is None:
            return None
        image = decode_jpeg(data, min_side=self.thumb_side)  # trusted bytes: the images stage wrote them
        image.thumbnail((self.thumb_side, self.thumb_side))
        buf = io.BytesIO()
        image.save(buf, "JPEG", quality=85)
        return buf.getvalue()
