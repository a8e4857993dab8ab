"""Product vectors: MAIN-photo image, summary text, their fusion, and alt-photo image embeddings.

`embed_catalog` streams the image shards once. While the model encodes one batch, a small thread pool
decodes and crops the next ones (Pillow releases the GIL), so preprocessing overlaps the model instead of
adding to it; the uint8 crops are normalised on the model's device. Vectors go straight into .npy memmaps
sized from the shard row counts, so memory does not grow with the catalog (only the id -> summary map does).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm import tqdm

from cliprec.artifacts import MANIFEST_FILE, write_manifest
from cliprec.model import (
    clip_module,
    decode_pixels,
    image_features,
    image_pixels,
    model_device,
    normalize_pixels,
    text_features,
    text_max_length,
    tokenize,
)
from cliprec.pairs import DECODE_THREADS, prefetch
from cliprec.precision import autocast
from cliprec.shards import iter_image_batches, read_image_table
from cliprec.vectors import fuse

log = logging.getLogger(__name__)

FILES = ("ids.txt", "image.npy", "text.npy", "fused.npy", "alt_ids.txt", "alt_image.npy", "manifest.json")
PREFETCH = 3  # batches preprocessed ahead of the model: enough to hide jitter, little memory


def encode_texts(
    model: torch.nn.Module,
    processor: Any,
    texts: Sequence[str],
    batch_size: int = 256,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> np.ndarray:
    """(n, d) L2-normalised float32 text embeddings."""
    device = torch.device(device) if device is not None else model_device(model)
    max_length = text_max_length(model, processor)
    out = []
    for s in range(0, len(texts), batch_size):
        out.append(
            _texts(model, tokenize(processor, list(texts[s : s + batch_size]), max_length), device, amp)
        )
    return np.concatenate(out) if out else np.zeros((0, _dim(model)), np.float32)


def encode_images(
    model: torch.nn.Module,
    processor: Any,
    images: Sequence[Image.Image],
    batch_size: int = 256,
    device: str | torch.device | None = None,
    amp: bool = False,
) -> np.ndarray:
    """(n, d) L2-normalised float32 image embeddings of PIL images (any size/mode: the processor adapts)."""
    device = torch.device(device) if device is not None else model_device(model)
    out = []
    for s in range(0, len(images), batch_size):
        pixels = image_pixels(processor, [im.convert("RGB") for im in images[s : s + batch_size]])
        out.append(_images(model, processor, pixels, device, amp))
    return np.concatenate(out) if out else np.zeros((0, _dim(model)), np.float32)


@dataclass(frozen=True)
class EmbedOptions:
    """How to embed: batch size, the fused vector's text weight, mixed precision, device, decode threads,
    and this process's place among `world` processes (`accelerate launch`) with their `barrier`."""

    batch_size: int = 256
    text_weight: float = 0.5
    amp: bool = False
    device: str | torch.device | None = None
    workers: int | None = None
    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None


def _catalog_ids(images_dir: str | Path, summaries_path: str | Path) -> tuple[list[str], list[str], dict]:
    """(ids, alt_ids, summary of id): the products with a MAIN photo and a summary, in shard order."""
    views = read_image_table(images_dir, columns=["id", "view"])
    summaries = pd.read_parquet(summaries_path, columns=["id", "summary"])
    text_of = {i: s for i, s in zip(summaries["id"], summaries["summary"], strict=True) if s}
    main_ids = views.loc[views["view"] == "main", "id"].tolist()
    if len(set(main_ids)) != len(main_ids):
        raise ValueError(f"{images_dir}: a product has more than one 'main' photo")
    ids = [i for i in main_ids if i in text_of]
    if len(ids) < len(main_ids):
        log.warning("%d products with a photo but no summary are skipped", len(main_ids) - len(ids))
    keep = set(ids)
    alt_ids = [i for i in views.loc[views["view"] == "alt", "id"] if i in keep]
    return ids, alt_ids, text_of


def _fill(
    model: torch.nn.Module,
    processor: Any,
    images_dir: str | Path,
    arrays: Mapping[str, np.ndarray],
    expected: Mapping[str, list[str]],
    text_of: Mapping[str, str],
    opt: EmbedOptions,
) -> None:
    """Embed this rank's batches into its rows of `arrays`; every rank reads the same batch sequence."""
    device = torch.device(opt.device) if opt.device is not None else model_device(model)
    pos = {"main": 0, "alt": 0}
    max_length = text_max_length(model, processor)

    def prepare(item: tuple[int, tuple[str, list[str], list[bytes]]]) -> tuple[str, list[str], Any]:
        b, (view, pids, jpegs) = item
        return view, pids, decode_pixels(processor, jpegs) if b % opt.world == opt.rank else None

    batches = enumerate(_view_batches(images_dir, set(expected["main"]), opt.batch_size))
    bar = tqdm(total=sum(map(len, expected.values())), desc="embed", unit="img", disable=opt.rank != 0)
    for view, pids, pixels in prefetch(prepare, batches, opt.workers or DECODE_THREADS, PREFETCH):
        start, stop = pos[view], pos[view] + len(pids)
        if expected[view][start:stop] != pids:
            raise RuntimeError(f"{images_dir}: shards changed while embedding")
        pos[view] = stop
        bar.update(len(pids))
        if pixels is None:  # another rank's batch
            continue
        image = _images(model, processor, pixels, device, opt.amp)
        if view == "main":
            # tokenised here, not in the pool: a fast tokenizer is not thread-safe ("Already borrowed")
            tokens = tokenize(processor, [text_of[i] for i in pids], max_length)
            text = _texts(model, tokens, device, opt.amp)
            arrays["image"][start:stop] = image
            arrays["text"][start:stop] = text
            arrays["fused"][start:stop] = fuse(text, image, opt.text_weight)
        else:
            arrays["alt_image"][start:stop] = image
    bar.close()
    if pos != {view: len(v) for view, v in expected.items()}:
        want = f"{len(expected['main'])}/{len(expected['alt'])}"
        raise RuntimeError(f"{images_dir}: expected {want} photos, read {pos}")


def embed_catalog(
    model: torch.nn.Module,
    processor: Any,
    images_dir: str | Path,
    summaries_path: str | Path,
    out_dir: str | Path,
    *,
    options: EmbedOptions = EmbedOptions(),
    info: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Embed every product with a MAIN photo and a summary into `out_dir` (`FILES`).

    Rows follow the shards' order. `info` (model, variant, adapter, and the lineage: category,
    catalog_sha256, adapter_sha256) goes into manifest.json, which is written last, records every file's
    size and sha256, and is returned.

    With `options.world` > 1 processes (`accelerate launch`), rank r embeds batches r, r + world, ... of
    the same batch sequence into its rows of the shared .npy files: the batches, and so the vectors, are
    exactly those of one process. `options.barrier` waits for every rank (accelerate's wait_for_everyone).
    """
    device = torch.device(options.device) if options.device is not None else model_device(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ids, alt_ids, text_of = _catalog_ids(images_dir, summaries_path)
    d = _dim(model)
    rows = {"image": len(ids), "text": len(ids), "fused": len(ids), "alt_image": len(alt_ids)}
    if options.rank == 0:  # one rank creates the files at full size, every rank fills its rows
        for name, n in rows.items():
            _memmap(out_dir / f"{name}.npy", n, d).flush()
    options.barrier()
    arrays = {name: np.load(out_dir / f"{name}.npy", mmap_mode="r+") for name in rows}
    _fill(model, processor, images_dir, arrays, {"main": ids, "alt": alt_ids}, text_of, options)
    for arr in arrays.values():
        arr.flush()
    del arrays
    options.barrier()  # every rank's rows are on disk
    if options.rank != 0:
        return {}
    (out_dir / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
    (out_dir / "alt_ids.txt").write_text("".join(f"{i}\n" for i in alt_ids))
    info = {
        "model": None, "variant": None, "adapter": None, "category": None, "catalog_sha256": None,
        "adapter_sha256": None, **dict(info or {}),
        "d": d, "n": len(ids), "n_alt": len(alt_ids), "text_weight": float(options.text_weight),
        "dtype": "float32", "amp": bool(options.amp), "device": device.type,
    }  # fmt: skip
    manifest = write_manifest(out_dir, [f for f in FILES if f != MANIFEST_FILE], info)
    log.info("embedded %d products (%d alt photos), d=%d -> %s", len(ids), len(alt_ids), d, out_dir)
    return manifest


def _view_batches(
    images_dir: str | Path, keep: set[str], batch_size: int
) -> Iterator[tuple[str, list[str], list[bytes]]]:
    # Shard rows regrouped into per-view batches of batch_size, each view in shard order.
    pending: dict[str, tuple[list[str], list[bytes]]] = {"main": ([], []), "alt": ([], [])}
    for frame in iter_image_batches(images_dir, batch_size, columns=["id", "view", "jpeg"]):
        for pid, view, jpeg in zip(frame["id"], frame["view"], frame["jpeg"], strict=True):
            if pid in keep and view in pending:
                pending[view][0].append(pid)
                pending[view][1].append(jpeg)
                if len(pending[view][0]) == batch_size:
                    yield view, *pending[view]
                    pending[view] = ([], [])
    for view, (pids, jpegs) in pending.items():
        if pids:
            yield view, pids, jpegs


@torch.inference_mode()
def _texts(
    model: torch.nn.Module, tokens: Mapping[str, torch.Tensor], device: torch.device, amp: bool
) -> np.ndarray:
    with autocast(device, amp):
        out = text_features(model, tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
    return out.float().cpu().numpy()


@torch.inference_mode()
def _images(
    model: torch.nn.Module, processor: Any, pixels: torch.Tensor, device: torch.device, amp: bool
) -> np.ndarray:
    pixels = normalize_pixels(pixels.to(device, non_blocking=True), processor)
    with autocast(device, amp):
        out = image_features(model, pixels)
    return out.float().cpu().numpy()


def _dim(model: torch.nn.Module) -> int:
    return int(clip_module(model).config.projection_dim)


def _memmap(path: Path, n: int, d: int) -> np.ndarray:
    return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
