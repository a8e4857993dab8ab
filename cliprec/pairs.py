"""(summary, photo) pairs for training, streamed: memory does not grow with the catalog.

`load_pairs` keeps per split only the product ids and summaries. Their JPEG bytes (MAIN, plus the
second photo where the split uses it) are spooled once out of the image shards into one flat file in a
temporary directory, with each photo's offset and length; a batch then reads its photos with
`os.pread` (random access without decoding parquet row groups, through the page cache rather than
process memory) and decodes them at the model's size in a thread pool, a few batches ahead of the model
(`prefetch`). Peak RSS is the model plus a few batches whatever the catalog size; the spool costs as
much disk as the split's JPEGs (`TMPDIR`) and is deleted with the run. Summaries are tokenized per batch.

Photo slots: product i's MAIN photo is slot i, its second photo slot n + alt_slot[i] (-1: none). So an
epoch's plan (cliprec.train.epoch_plan) picks a slot per example and a batch reads exactly those slots,
in any order, on any rank.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from cliprec.errors import CliprecError
from cliprec.model import decode_pixels, tokenize
from cliprec.paths import rebuild_hint
from cliprec.shards import iter_image_batches

log = logging.getLogger(__name__)

SPOOL_BATCH_ROWS = 512  # shard rows read at once while spooling
PREFETCH = 2  # batches decoded ahead of the model: hides decode jitter, holds ~2 batches of pixels
DECODE_THREADS = min(4, os.cpu_count() or 1)  # Pillow releases the GIL while decoding


class JpegSpool:
    """Photos appended to one file; read back by slot with os.pread (thread-safe, no shared offset)."""

    def __init__(self, directory: str | Path | None = None) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="cliprec-spool-", dir=directory)
        self.path = Path(self._dir.name) / "photos.bin"
        self._file = open(self.path, "wb+")  # noqa: SIM115 - lives as long as the spool
        self._offsets: list[int] = []
        self._lengths: list[int] = []
        self._end = 0

    def append(self, jpeg: bytes) -> int:
        """Store one photo; returns its slot."""
        self._file.write(jpeg)
        self._offsets.append(self._end)
        self._lengths.append(len(jpeg))
        self._end += len(jpeg)
        return len(self._offsets) - 1

    def seal(self) -> None:
        """Flush after the last append; reads see every photo."""
        self._file.flush()
        self.offsets = np.asarray(self._offsets, dtype=np.int64)
        self.lengths = np.asarray(self._lengths, dtype=np.int64)
        del self._offsets, self._lengths

    def read(self, slot: int) -> bytes:
        """The photo in `slot`."""
        return os.pread(self._file.fileno(), int(self.lengths[slot]), int(self.offsets[slot]))

    def __len__(self) -> int:
        return len(self.offsets)

    def close(self) -> None:
        """Delete the spool."""
        self._file.close()
        self._dir.cleanup()


@dataclass
class PairData:
    """One split: ids and summaries in memory, photos in two spools (MAIN, second photo)."""

    ids: list[str]
    texts: list[str]
    main: JpegSpool  # product i's MAIN photo at index i
    alt: JpegSpool  # second photos, in product order
    alt_slot: torch.Tensor  # (n,) index of product i's second photo in `alt`, -1 if none
    digest: str  # sha256 of ids, texts and JPEG bytes: part of the training fingerprint

    def __len__(self) -> int:
        return len(self.ids)

    def tokens(
        self, idx: Sequence[int], processor: Any, max_length: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids and attention_mask of the summaries at `idx`, padded to the longest of them."""
        enc = tokenize(processor, [self.texts[i] for i in idx], max_length)
        return enc["input_ids"], enc["attention_mask"]

    def pixels(self, slots: Iterable[int], processor: Any) -> torch.Tensor:
        """(len(slots), 3, H, W) uint8 model input. Slot i < n: product i's MAIN; n + k: second photo k."""
        n = len(self.ids)
        jpegs = [self.main.read(s) if s < n else self.alt.read(s - n) for s in map(int, slots)]
        return decode_pixels(processor, jpegs)

    def close(self) -> None:
        """Delete the photo spools."""
        self.main.close()
        self.alt.close()


def load_pairs(
    products_path: str | Path,
    summaries_path: str | Path,
    images_dir: str | Path,
    splits: Sequence[str] = ("train", "val"),
    alt_splits: Sequence[str] = ("train",),
    spool_dir: str | Path | None = None,
) -> dict[str, PairData]:
    """(summary, photo) pairs per split, in products.parquet order; products lacking either are skipped.

    Second photos are kept for `alt_splits` only (val is scored on MAIN, like the evaluation). One pass
    over the shards, which the images stage writes in products.parquet order (checked).
    """
    products = pd.read_parquet(products_path, columns=["id", "split"])
    summaries = pd.read_parquet(summaries_path, columns=["id", "summary"])
    text_of = dict(zip(summaries["id"], summaries["summary"], strict=True))
    split_of = {pid: s for pid, s in zip(products["id"], products["split"], strict=True) if s in splits}
    ids: dict[str, list[str]] = {s: [] for s in splits}
    alt_of: dict[str, dict[str, int]] = {s: {} for s in splits}
    spools = {s: (JpegSpool(spool_dir), JpegSpool(spool_dir)) for s in splits}
    hashes = {s: hashlib.sha256() for s in splits}
    bar = tqdm(desc="spool photos", unit="photo", leave=False, mininterval=2.0)
    for frame in iter_image_batches(images_dir, SPOOL_BATCH_ROWS, columns=["id", "view", "jpeg"]):
        for pid, view, jpeg in zip(frame["id"], frame["view"], frame["jpeg"], strict=True):
            split = split_of.get(pid)
            if split is None or not text_of.get(pid) or (view == "alt" and split not in alt_splits):
                continue
            main, alt = spools[split]
            if view == "main":
                main.append(jpeg)
                ids[split].append(pid)
            else:
                alt_of[split][pid] = alt.append(jpeg)
            hashes[split].update(f"{view}\0{pid}\0{text_of[pid]}\0".encode() + hashlib.sha256(jpeg).digest())
            bar.update(1)
    bar.close()
    out = {}
    for split in splits:
        kept = set(ids[split])
        wanted = products.loc[products["split"] == split, "id"]
        if [i for i in wanted if i in kept] != ids[split]:
            raise CliprecError(
                f"{images_dir}: shards are not in products.parquet order; rebuild them: "
                f"`dvc repro -f {rebuild_hint(images_dir).removeprefix('dvc repro ')}`"
            )
        no_image = int((~wanted.isin(kept)).sum())
        if no_image:
            log.info("%s: %d products without a photo or a summary are skipped", split, no_image)
        main, alt = spools[split]
        main.seal()
        alt.seal()
        out[split] = PairData(
            ids=ids[split],
            texts=[text_of[i] for i in ids[split]],
            main=main,
            alt=alt,
            alt_slot=torch.tensor([alt_of[split].get(i, -1) for i in ids[split]], dtype=torch.long),
            digest=hashes[split].hexdigest(),
        )
    return out


def prefetch(fn: Callable, items: Iterable, workers: int = DECODE_THREADS, depth: int = PREFETCH) -> Iterator:
    """fn(item) for each item, in order, computed up to `depth` items ahead in `workers` threads."""
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) > depth:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
